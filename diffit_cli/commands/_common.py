"""Shared command-line options and the one place that turns user errors into exit code 2."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import typer
from rich.console import Console

from diffit_cli.errors import DiffitError

console = Console(stderr=True)


@dataclass
class _State:
    debug: bool = bool(os.environ.get("DIFFIT_DEBUG"))


STATE = _State()

PresetOpt = typer.Option(None, "--preset", "-p", help="Preset name (cifar10, ffhq64, imagenet256, ...) or YAML path.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a preset value: section.key=value (repeatable).")


def fail(message: str) -> None:
    """Print one readable error and exit with code 2."""
    console.print(f"[bold red]Error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code=2)


def user_errors(fn: Callable) -> Callable:
    """Decorator for command bodies: DiffitError (and bad-value errors from the library) → message, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffitError as e:
            if STATE.debug:
                raise
            fail(str(e).replace("[", r"\["))

    return wrapper

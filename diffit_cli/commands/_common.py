"""Shared command-line options and the one place that turns user errors into exit code 2."""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import typer
from rich.console import Console
from typer._click import exceptions as _click_exceptions

from diffit_cli.errors import DiffitError
from diffit_cli.preemption import INTERRUPTED_EXIT, Preempted, exit_code

console = Console(stderr=True)

# Typer (held to 0.29 in pyproject.toml) carries its own copy of click: its usage errors are of this class
CLICK_ERRORS = _click_exceptions.ClickException


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


_PATH_HINTS = {
    errno.EEXIST: "a file is in the way where a folder is needed: choose another path or move the file",
    errno.ENOTDIR: "a file is in the way where a folder is needed: choose another path or move the file",
    errno.EISDIR: "it is a folder where a file is needed: choose another path",
    errno.EACCES: "no permission: choose a location you can write to",
    errno.EPERM: "no permission: choose a location you can write to",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.ENOSPC: "the disk is full: free space or choose another location, then rerun the same command to resume",
}


def usage_line(e: Exception) -> str:
    """One line for a usage error: the flag, the value given and what is valid (a value that failed Typer's own
    validation carries it on the pydantic error behind it), then where the command's flags are listed."""
    text = e.format_message()
    param, ctx = getattr(e, "param", None), getattr(e, "ctx", None)
    if param is not None and getattr(param, "param_type_name", "") == "option":
        flag = max(param.opts, key=len)
        cause = e.__cause__
        value = cause.errors()[0].get("input") if hasattr(cause, "errors") else None
        text = text.removeprefix(f"Invalid value for '{flag}': ")
        if value is not None and repr(str(value)) not in text:
            text = f"{flag} {str(value)!r}: {text[:1].lower()}{text[1:]}"
        elif not text.startswith(flag):
            text = f"{flag}: {text}"
    where = f"{ctx.command_path} -h" if ctx is not None else "diffit -h"
    return f"{text.rstrip('.')} (see `{where}`)"


def path_error(e: OSError) -> str:
    """One line naming the path, the problem and the fix."""
    hint = _PATH_HINTS.get(e.errno, "check the path")
    return f"{e.filename}: {e.strerror or type(e).__name__}; {hint}"


def user_errors(fn: Callable) -> Callable:
    """Decorator for command bodies: DiffitError (and bad-value errors from the library) → message, exit 2; a worker
    stopped by a preemption signal or Ctrl-C after saving its work → a note, exit 3 or 130 (`preemption`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Preempted as e:
            console.print(f"[yellow]{e}[/]", highlight=False)
            raise typer.Exit(code=exit_code(e.signal_name)) from None
        except DiffitError as e:
            if STATE.debug:
                raise
            fail(str(e).replace("[", r"\["))
        except OSError as e:  # a path the user gave: a file in the way, no permission, read-only, disk full
            if STATE.debug or e.filename is None:
                raise
            fail(path_error(e).replace("[", r"\["))
        except BaseException as e:  # Ctrl-C before the work started, or a second one (torch.save may wrap it)
            if STATE.debug or not _interrupted(e):
                raise
            console.print(
                "[yellow]interrupted[/]: what was not saved yet is lost (checkpoints, images and shards "
                "already written are kept); rerun the same command to continue",
                highlight=False,
            )
            raise typer.Exit(code=INTERRUPTED_EXIT) from None

    return wrapper


def _interrupted(e: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt is `e` or in its chain of causes."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class RichProgress:
    """The one renderer of `diffit_cli.events` for every command: a rich bar per task (restarted when a task
    starts again), `Start.text` and `Message`s printed above the bars, warnings in yellow.

    Use as a context manager and pass the instance as the worker's `progress`."""

    def __init__(self, label: Callable[[str], str] | None = None):
        self.label = label or (lambda task: task)

    def __enter__(self) -> RichProgress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,.4g}/{task.total:,.4g} {task.fields[unit]}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.bar.__enter__()
        self.tasks: dict[str, int] = {}
        return self

    def __call__(self, event) -> None:
        from diffit_cli.events import Message, Start, Step

        if isinstance(event, Start):
            if event.text:
                self.bar.console.print(event.text, highlight=False)
            if event.task in self.tasks:
                self.bar.remove_task(self.tasks[event.task])
            self.tasks[event.task] = self.bar.add_task(
                self.label(event.task), total=event.total, completed=event.done, unit=event.unit, status=""
            )
        elif isinstance(event, Step) and event.task in self.tasks:
            self.bar.update(self.tasks[event.task], completed=event.done, total=event.total, status=event.status)
        elif isinstance(event, Message):
            prefix = "[bold yellow]warning:[/] " if event.level == "warning" else ""
            self.bar.console.print(prefix + event.text.replace("[", r"\["), highlight=False)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

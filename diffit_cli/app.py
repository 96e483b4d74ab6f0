"""The `diffit` Typer app: built-in command modules plus third-party ones from entry points.

A command module exposes `register(app: typer.Typer)`. Built-ins are listed in COMMAND_MODULES;
another distribution adds commands by advertising a module (or a `register` callable) under the
entry-point group `diffit.commands`. Nothing here imports torch, so `diffit --help` is instant.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points

import typer

from diffit_cli import __version__
from diffit_cli.commands import _common

COMMAND_MODULES = ["train", "sample", "eval_fid", "encode_latents", "ablate", "plot", "export", "ema"]
ENTRY_POINT_GROUP = "diffit.commands"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffit {__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """Train, sample, evaluate and study DiffiT (Diffusion Vision Transformers, arXiv 2312.02139)."""
    _common.STATE.debug = debug


def _register(app: typer.Typer, obj: object, origin: str) -> None:
    register = getattr(obj, "register", obj)
    if not callable(register):
        raise TypeError(f"{origin} provides no register(app) function")
    register(app)


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="diffit",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    for name in COMMAND_MODULES:
        _register(app, importlib.import_module(f"diffit_cli.commands.{name}"), name)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            _register(app, ep.load(), f"plugin {ep.name}")
        except Exception as e:  # a broken plugin must not take the whole CLI down
            print(f"warning: diffit plugin {ep.name!r} ({ep.value}) failed to load: {e}", file=sys.stderr)
    return app


def main() -> None:
    """Run the app; a usage error (unknown flag or command, a bad flag value) is one line and exit 2, not click's
    usage box, like every other bad input."""
    command = typer.main.get_command(build_app())
    try:
        code = command.main(prog_name="diffit", standalone_mode=False)
    except _common.CLICK_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `diffit`: the help, as click shows it
            print(e.format_message())
        else:
            _common.console.print(
                f"[bold red]Error:[/] {_common.usage_line(e)}", highlight=False, markup=True, soft_wrap=True
            )
        sys.exit(e.exit_code)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

"""`diffit ablate` (not built yet: issue #8)."""

import typer

from diffit_cli.commands._common import not_built


def register(app: typer.Typer) -> None:
    @app.command("ablate", help="Not built yet (issue #8).")
    def ablate() -> None:
        not_built("ablate", 8)

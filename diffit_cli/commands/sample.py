"""`diffit sample` (not built yet: issue #6)."""

import typer

from diffit_cli.commands._common import not_built


def register(app: typer.Typer) -> None:
    @app.command("sample", help="Not built yet (issue #6).")
    def sample() -> None:
        not_built("sample", 6)

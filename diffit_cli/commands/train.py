"""`diffit train` (not built yet: issue #5)."""

import typer

from diffit_cli.commands._common import not_built


def register(app: typer.Typer) -> None:
    @app.command("train", help="Not built yet (issue #5).")
    def train() -> None:
        not_built("train", 5)

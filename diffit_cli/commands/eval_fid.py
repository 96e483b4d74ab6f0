"""`diffit eval-fid` (not built yet: issue #6)."""

import typer

from diffit_cli.commands._common import not_built


def register(app: typer.Typer) -> None:
    @app.command("eval-fid", help="Not built yet (issue #6).")
    def eval_fid() -> None:
        not_built("eval-fid", 6)

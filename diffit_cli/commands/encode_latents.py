"""`diffit encode-latents` (not built yet: issue #7)."""

import typer

from diffit_cli.commands._common import not_built


def register(app: typer.Typer) -> None:
    @app.command("encode-latents", help="Not built yet (issue #7).")
    def encode_latents() -> None:
        not_built("encode-latents", 7)

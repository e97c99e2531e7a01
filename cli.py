"""The `tide` command line: each command is a config (file + flags) -> pydantic -> one library call.

torch and diffusers are imported inside the commands so that `tide --help` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="tide: temporal-aware sparse autoencoders for diffusion transformers.\n\n"
    "Harvest a DiT's activations across denoising steps into a Zarr v3 cache, then train SAEs on it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Inspect, verify and summarise activation stores.", no_args_is_help=True)
demo_app = typer.Typer(help="The shipped demo model: a small class-conditional DiT on digits.", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(demo_app, name="demo-model")


def _fail(message: str) -> None:
    """Print a one-paragraph error and exit non-zero, without a traceback."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


# --- harvest ---------------------------------------------------------------------------------------

# --- store -----------------------------------------------------------------------------------------

# --- train / eval ----------------------------------------------------------------------------------

# --- demo model ------------------------------------------------------------------------------------


if __name__ == "__main__":
    app()

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


def _build_config(model_cls, config: Optional[Path], overrides: dict):
    """Config file values, then every flag the user actually gave, validated by the stage's pydantic model."""
    from pydantic import ValidationError

    from harvest.config import load_config_file

    try:
        values = load_config_file(config) if config is not None else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return model_cls(**values)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())
        _fail(msgs)
    except ValueError as e:
        _fail(str(e))


@app.command()
def harvest(
    model: Annotated[Optional[str], typer.Option(help="Diffusers pipeline folder or hub id (default: the shipped digits DiT).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Store folder to write (default runs/digits.zarr).")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Images to generate (default 1000).")] = None,
    num_steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default 50).")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Steps to store: all, '0,10,49' or a stride '::5'.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Blocks to capture: all, or '0,5,-1'.")] = None,
    sites: Annotated[Optional[str], typer.Option(help="Comma list of resid, delta, attn, mlp, or all (default resid).")] = None,
    token_fraction: Annotated[Optional[float], typer.Option(help="Fraction of tokens kept per (sample, step), in (0, 1] (default 0.25).")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (default: the model's).")] = None,
    cfg_branch: Annotated[Optional[str], typer.Option(help="CFG branch to store: cond, uncond or both.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Class labels: cycle, random, '3,5,7' or '0-9'.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Text models: file with one prompt a line.")] = None,
    prompt_embeds: Annotated[Optional[Path], typer.Option(help="Text models: precomputed prompt embeddings (safetensors).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Base seed; sample i uses seed + i.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per forward pass and per chunk (default 50).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Stored dtype: float16, float32 or bfloat16.")] = None,
    codec: Annotated[Optional[str], typer.Option(help="Compression: blosc-zstd, zstd or none.")] = None,
    model_dtype: Annotated[Optional[str], typer.Option(help="Dtype the transformer runs in.")] = None,
    save_images: Annotated[Optional[bool], typer.Option("--save-images", help="Also store the final images.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Replace an existing store with another configuration.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="YAML or TOML file of these options; flags override it.")] = None,
) -> None:
    """Run a DiT over its denoising steps and store chosen activations in a Zarr v3 cache.

    Re-running the same command after an interruption resumes it: finished samples are kept.
    """
    overrides = {k: v for k, v in locals().items() if k not in ("config", "no_progress")}
    overrides["progress"] = False if no_progress else None
    from harvest.config import HarvestConfig

    cfg = _build_config(HarvestConfig, config, overrides)
    from harvest.run import HarvestError, harvest as run_harvest
    from store.reader import StoreError

    try:
        path = run_harvest(cfg, log=lambda m: typer.echo(m, err=True))
    except (HarvestError, StoreError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


# --- store -----------------------------------------------------------------------------------------


@store_app.command("info")
def store_info(
    path: Annotated[Path, typer.Argument(help="A tide store folder.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Summarise a store: model, steps, layers, sites, samples done, bytes on disk, compression."""
    import json

    from store.inspect import summary
    from store.reader import StoreError, open_store

    try:
        info = summary(open_store(path))
    except StoreError as e:
        _fail(str(e))
    if json_out:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "bytes_on_disk":
            value = f"{value / 2**20:.1f} MiB"
        typer.echo(f"{key:>18}  {value}")


@store_app.command("verify")
def store_verify(
    path: Annotated[Path, typer.Argument(help="A tide store folder.")],
    quick: Annotated[bool, typer.Option("--quick", help="Check metadata and shapes only, not every value.")] = False,
) -> None:
    """Check a store's integrity; exits non-zero naming every problem found."""
    from store.inspect import verify

    problems = verify(path, check_values=not quick)
    if problems:
        for p in problems:
            typer.secho(f"FAIL {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    typer.echo(f"ok: {path} is a sound tide store")


# --- train / eval ----------------------------------------------------------------------------------

# --- demo model ------------------------------------------------------------------------------------


if __name__ == "__main__":
    app()

"""The `tide` command line: each command is a config (file + flags) -> pydantic -> one library call.

torch and diffusers are imported inside the commands so that `tide --help` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from tide.cliconfig import (
    REFERENCE_MARKERS,
    _build_config,
    _fail,
    config_reference,
)

# rich_markup_mode=None: plain click help. Typer's rich panels print a type after every on/off flag
# (`--overwrite <bool>`, even `--help <bool>`), which reads as if the flag took a value.
app = typer.Typer(
    help="tide: temporal-aware sparse autoencoders for diffusion transformers.\n\n"
    "Harvest a DiT's activations across denoising steps into a Zarr v3 cache, then train SAEs on it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
store_app = typer.Typer(
    help="Inspect, verify and summarise activation stores.", no_args_is_help=True, rich_markup_mode=None
)
demo_app = typer.Typer(
    help="The shipped demo model: a small class-conditional DiT on digits.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(store_app, name="store")
app.add_typer(demo_app, name="demo-model")

STORE_HELP = "A tide store: a folder, s3://, gs://, http(s)://, hf://datasets/ORG/NAME/PATH, or a .zarr.zip."

StorageOptions = Annotated[
    str | None,
    typer.Option(
        help="JSON of options for a URL store, e.g. '{\"anon\": true}' or "
        '\'{"endpoint_url": "http://host:9000"}\': obstore config keys for s3:// and gs:// (s3fs spellings '
        "such as anon, key, secret, endpoint_url work too), fsspec storage options for http(s):// and hf:// "
        "(default: from AWS_* and the like in the environment)."
    ),
]


# --- harvest ---------------------------------------------------------------------------------------


@app.command(epilog="Every setting, with the config-file keys that have no flag: `tide config-reference`.")
def harvest(
    model: Annotated[
        str | None,
        typer.Option(
            help="Diffusers pipeline folder or hub id (default harvest/demo/digits-dit, the shipped digits DiT)."
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Store to write: a folder, or s3://BUCKET/PATH, gs://... (default runs/digits.zarr)."
        ),
    ] = None,
    num_samples: Annotated[int | None, typer.Option(help="Images to generate (default 500).")] = None,
    num_steps: Annotated[int | None, typer.Option(help="Denoising steps (default 50).")] = None,
    steps: Annotated[
        str | None,
        typer.Option(
            help="Steps to store: all, a list '0,10,49' or a slice like '::5' or '10:40' (default all)."
        ),
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="Blocks to capture: all, or indices like '0,5,-1' (default all).")
    ] = None,
    sites: Annotated[
        str | None, typer.Option(help="Comma list of resid, delta, attn, mlp, or all (default resid).")
    ] = None,
    token_fraction: Annotated[
        float | None,
        typer.Option(help="Fraction of tokens kept per (sample, step), in (0, 1] (default 0.25)."),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            help="Guidance scale, >= 1: classifier-free (1 = none), or FLUX.1-dev's guidance input (default: "
            "the model's)."
        ),
    ] = None,
    cfg_branch: Annotated[
        str | None, typer.Option(help="CFG branch to store: cond, uncond or both (default cond).")
    ] = None,
    labels: Annotated[
        str | None, typer.Option(help="Class labels: cycle, random, '3,5,7' or '0-9' (default cycle).")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Text models: file with one prompt a line (default none).")
    ] = None,
    prompt_embeds: Annotated[
        Path | None,
        typer.Option(
            help="Text models: precomputed prompt embeddings, safetensors; SD3/FLUX add pooled_prompt_embeds "
            "(default none: the text encoder, PixArt only)."
        ),
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="Image height in pixels (default: the pipeline's, e.g. 1024 for FLUX).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Image width in pixels (default: the pipeline's, e.g. 1024 for FLUX).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed; sample i uses seed + i (default 0).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Samples per forward pass and per chunk (default 50).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Stored dtype: float16, float32 or bfloat16 (default float16).")
    ] = None,
    codec: Annotated[
        str | None, typer.Option(help="Compression: blosc-zstd, zstd or none (default blosc-zstd).")
    ] = None,
    model_dtype: Annotated[
        str | None,
        typer.Option(help="Dtype the transformer runs in: float32, float16 or bfloat16 (default float32)."),
    ] = None,
    save_images: Annotated[bool, typer.Option("--save-images", help="Also store the final images.")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N (default auto).")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing store with another configuration.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
    storage_options: StorageOptions = None,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML or TOML file of settings, keys named as the options; flags override it."),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Run on the dask.distributed cluster at this address, tcp://HOST:PORT; its workers must see "
            "--out at the same path (default none: this process)."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Start a local dask cluster of N worker processes and run on it: one per GPU, or N "
            "single-threaded CPU processes (default none: this process)."
        ),
    ] = None,
) -> None:
    """Run a DiT over its denoising steps and store chosen activations in a Zarr v3 cache.

    Re-running the same command after an interruption resumes it: finished samples are kept. With
    --scheduler or --workers, dask workers each write whole sample chunks; the store is the same.
    """
    # Where it runs is no setting of the store: --scheduler, --workers and --storage-options stay out of it.
    overrides = {
        k: v
        for k, v in locals().items()
        if k not in ("config", "no_progress", "scheduler", "workers", "storage_options")
    }
    # An on/off flag that is not given is None, like every other option, so a config file can set it.
    overrides |= {"save_images": save_images or None, "overwrite": overwrite or None}
    overrides["progress"] = False if no_progress else None
    from tide.harvest.config import HarvestConfig

    cfg, _ = _build_config(HarvestConfig, config, overrides)
    from tide.harvest.run import HarvestError
    from tide.harvest.run import harvest as run_harvest
    from tide.store.open import storage_options as scoped
    from tide.store.reader import StoreError

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    try:
        with scoped(storage_options):
            if scheduler is None and workers is None:
                result = run_harvest(cfg, log=log)
            else:
                from tide.harvest.cluster import connect, harvest_on_cluster

                with connect(scheduler, workers) as client:
                    log(f"dask cluster at {client.scheduler.address}: {len(client.nthreads())} workers")
                    result = harvest_on_cluster(cfg, client, log=log)
    except (HarvestError, StoreError, ValueError) as e:
        _fail(str(e))
    if result.written:
        typer.echo(f"wrote {result.out}")
    else:
        typer.echo(
            f"already complete: {result.out} holds all {result.num_samples} samples; nothing was written"
        )


# --- store -----------------------------------------------------------------------------------------


@store_app.command("info")
def store_info(
    path: Annotated[str, typer.Argument(help=STORE_HELP)],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Summarise a store: model, steps, layers, sites, samples done, bytes on disk, compression."""
    import json

    from tide.store.inspect import summary
    from tide.store.open import storage_options as scoped
    from tide.store.reader import StoreError, open_store

    try:
        with scoped(storage_options):
            info = summary(open_store(path))
    except StoreError as e:
        _fail(str(e))
    if json_out:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "bytes_on_disk" and value is not None:
            value = f"{value / 2**20:.1f} MiB"
        typer.echo(f"{key:>18}  {value}")


@store_app.command("verify")
def store_verify(
    path: Annotated[str, typer.Argument(help=STORE_HELP)],
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Check metadata, shapes and that every chunk file is there with a plausible size only.",
        ),
    ] = False,
    reset_damaged: Annotated[
        bool,
        typer.Option(
            "--reset-damaged",
            help="Mark the samples of missing or unreadable chunks not done, so that re-running the store's "
            "`tide harvest --out PATH` command writes them again.",
        ),
    ] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Check a store's integrity; exits non-zero naming every problem found (every damaged chunk by its file)."""
    from tide.store.inspect import reset_damaged as reset
    from tide.store.inspect import verify
    from tide.store.open import storage_options as scoped

    with scoped(storage_options):
        verdict = verify(path, check_values=not quick)
    if verdict.problems:
        for p in verdict.problems:
            typer.secho(f"FAIL {p}", fg=typer.colors.RED, err=True)
        if verdict.damaged and reset_damaged:
            ranges = reset(path, verdict.damaged)
            samples = ", ".join(f"{r.start}..{r.stop - 1}" for r in ranges)
            typer.echo(
                f"marked samples {samples} not done; run the `tide harvest --out {path}` command that made this "
                "store again to write them anew, then verify again",
                err=True,
            )
        elif verdict.damaged:
            typer.echo(
                f"{len(verdict.damaged)} chunk(s) are missing or unreadable: restore them from a copy of the store, "
                f"or run `tide store verify {path} --reset-damaged` and then the store's `tide harvest --out "
                f"{path}` command again to write their samples anew",
                err=True,
            )
        raise typer.Exit(code=1)
    if quick:
        typer.echo(
            f"ok: {path} is a sound tide store as far as --quick checks (metadata, shapes, and every chunk file "
            "of the done samples there with a plausible size); without --quick every chunk is also read and "
            "its checksum verified"
        )
    else:
        typer.echo(f"ok: {path} is a sound tide store")
    if verdict.samples_done < verdict.num_samples:
        typer.echo(
            f"incomplete: {verdict.samples_done} of {verdict.num_samples} samples done; re-run the same "
            f"`tide harvest --out {path}` command to finish it (finished samples are kept)"
        )


@store_app.command("pack")
def store_pack(
    path: Annotated[str, typer.Argument(help=STORE_HELP)],
    out: Annotated[Path, typer.Argument(help="The zip file to write, e.g. h.zarr.zip.")],
    storage_options: StorageOptions = None,
) -> None:
    """Pack a store into one zip file (entries stored, not deflated) that tide, zarr and xarray open directly."""
    from tide.store.open import storage_options as scoped
    from tide.store.pack import pack
    from tide.store.reader import StoreError

    try:
        with scoped(storage_options):
            n = pack(path, out)
    except (StoreError, ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(
        f"wrote {out} ({n} entries); `tide store verify {out}` checks it, `tide train --store {out}` reads it"
    )


@store_app.command("card")
def store_card(
    path: Annotated[str, typer.Argument(help="A tide store: a folder, or s3:// or gs://.")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the card to this file instead of into the store, e.g. the README.md at the root of a "
            "Hugging Face dataset repository that holds the store in a folder (the hub shows only that one)."
        ),
    ] = None,
    storage_options: StorageOptions = None,
) -> None:
    """Write README.md into the store: a Hugging Face dataset card (what it holds, how to load it)."""
    from tide.store.card import write_card
    from tide.store.open import storage_options as scoped
    from tide.store.reader import StoreError

    try:
        with scoped(storage_options):
            typer.echo(f"wrote {write_card(path, out)}")
    except (StoreError, ValueError) as e:
        _fail(str(e))


@store_app.command("stats")
def store_stats(
    path: Annotated[str, typer.Argument(help=STORE_HELP)],
    array: Annotated[
        str | None, typer.Option(help="Activation array, e.g. resid_l03 (default: all).")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="dask.distributed scheduler address, e.g. tcp://host:8786.")
    ] = None,
    write: Annotated[
        bool, typer.Option("--write", help="Rewrite the stored sums with the recomputed ones.")
    ] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Recompute per-step statistics with dask, print them, and check (or --write) the writer's stored sums."""
    from tide.store.open import storage_options as scoped
    from tide.store.reader import StoreError

    try:
        with scoped(storage_options):
            mismatched, store = _stats(path, array, scheduler, write)
    except (StoreError, ValueError) as e:
        _fail(str(e))
    if mismatched:
        if store.meta.format_version >= 2:
            why = (
                "every chunk passed its checksum, so the stored sums are at fault: rewrite them with --write"
            )
        else:
            why = (
                f"this version-1 store has no checksums, so damaged activations could explain it too: run "
                f"`tide store verify {path}`, and rewrite the sums with --write only if it finds nothing else"
            )
        _fail(f"stored sums disagree with the activations for {', '.join(mismatched)}; {why}")


def _stats(path: str, array: str | None, scheduler: str | None, write: bool):
    """`tide store stats`' work: (the arrays whose stored sums disagree, the store)."""
    from tide.store.reader import open_store
    from tide.store.stats import difference, recompute_sums, step_table, stored_sums, write_sums

    store = open_store(path)
    names = [array] if array else store.meta.act_names()
    mismatched = []
    for name in names:
        sums = recompute_sums(store, name, scheduler=scheduler)
        typer.echo(f"{name}: {len(sums.chunks)} sample chunks")
        typer.echo(f"{'step':>5} {'t':>9} {'rows':>9} {'|mean|':>10} {'rms norm':>10} {'channel std':>12}")
        for r in step_table(store, sums):
            typer.echo(
                f"{r['step']:>5} {r['t']:>9.2f} {r['rows']:>9} {r['mean_norm']:>10.4g} {r['rms_norm']:>10.4g} "
                f"{r['channel_std']:>12.4g}"
            )
        diff = difference(sums, stored_sums(store, name, sums.chunks))
        if write:
            write_sums(store, name, sums)
            typer.echo(f"{name}: rewrote the stored sums (they differed by {diff:.3g} relative)")
        elif diff > 1e-9:
            mismatched.append(f"{name} (relative difference {diff:.3g})")
        else:
            typer.echo(f"{name}: stored sums match (relative difference {diff:.3g})")
    return mismatched, store


# --- train / eval ----------------------------------------------------------------------------------


def _print_evals(results) -> None:
    from tide.train.analysis.eval import format_table

    for r in results:
        typer.echo("")
        typer.echo(format_table(r))


def _log(message: str) -> None:
    typer.echo(message, err=True)


@app.command(epilog="Every setting, with the config-file keys that have no flag: `tide config-reference`.")
def train(
    store: Annotated[
        str | None,
        typer.Option(
            help="Tide store to train on: a folder, a URL or a .zarr.zip (default runs/digits.zarr)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the SAEs (default runs/saes).")] = None,
    site: Annotated[
        str | None, typer.Option(help="Capture site: resid, delta, attn or mlp (default resid).")
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(help="Stored layers: middle (the middle stored one), all, or '2,3' (default middle)."),
    ] = None,
    branch: Annotated[str | None, typer.Option(help="CFG branch: cond or uncond (default cond).")] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Comma list of SAE architectures, e.g. tide,topk,jumprelu,matryoshka; `tide config-reference` "
            "lists them all (default tide,topk)."
        ),
    ] = None,
    k: Annotated[
        str | None, typer.Option(help="Active latents per row; a comma list sweeps (default 16).")
    ] = None,
    init_modulation: Annotated[
        str | None,
        typer.Option(
            help="tide modulation at step 0: zero (starts as topk) or adaln (copy the store's DiT's adaLN "
            "that reads the layer) (default zero)."
        ),
    ] = None,
    expansion: Annotated[int | None, typer.Option(help="Width = expansion x d_model (default 8).")] = None,
    num_latents: Annotated[
        int | None, typer.Option(help="Width, overriding --expansion (default none: use --expansion).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per optimiser step (default 4096).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate (default 0.001).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training split (default 2).")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps instead (default none: --epochs decides).")
    ] = None,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            help="Linear learning-rate warm-up steps (default 50, or max_steps // 10 when --max-steps <= 50)."
        ),
    ] = None,
    steps: Annotated[
        str | None, typer.Option(help="Stored steps to train on: all or 'start:stop' (default all).")
    ] = None,
    stratify_steps: Annotated[
        bool, typer.Option("--stratify-steps", help="Equal share of every step in each batch.")
    ] = False,
    val_fraction: Annotated[
        float | None, typer.Option(help="Fraction of sample chunks held out (default 0.1).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the SAEs' weights and the data order (default 0).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N (default auto).")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Steps between checkpoints (default 50).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a run with another configuration in --out.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
    no_eval: Annotated[
        bool, typer.Option("--no-eval", help="Skip the held-out evaluation at the end.")
    ] = False,
    storage_options: StorageOptions = None,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML or TOML file of settings, keys named as the options; flags override it."),
    ] = None,
) -> None:
    """Train SAEs (default: a tide and a topk SAE on the middle layer) and print their held-out metrics per timestep.

    Re-running the same command after an interruption resumes it exactly where its last checkpoint was.
    """
    overrides = {
        k_: v
        for k_, v in locals().items()
        if k_ not in ("config", "no_progress", "no_eval", "storage_options")
    }
    # An on/off flag that is not given is None, like every other option, so a config file can set it.
    overrides |= {"stratify_steps": stratify_steps or None, "overwrite": overwrite or None}
    overrides["progress"] = False if no_progress else None
    from tide.train.fit.config import DEFAULT_WARMUP, TrainConfig

    cfg, given = _build_config(TrainConfig, config, overrides)
    if "warmup_steps" not in given and cfg.warmup_steps != DEFAULT_WARMUP:
        _log(
            f"note: warm-up of {cfg.warmup_steps} steps (max_steps // 10): the default {DEFAULT_WARMUP} does "
            f"not fit in max_steps={cfg.max_steps}; set --warmup-steps to choose"
        )
    from tide.store.open import storage_options as scoped
    from tide.store.reader import StoreError
    from tide.train.analysis.eval import evaluate_folders
    from tide.train.fit.trainer import TrainError
    from tide.train.fit.trainer import train as run_train

    try:
        with scoped(storage_options):
            _train_and_eval(cfg, run_train, evaluate_folders, no_eval)
    except (TrainError, StoreError, ValueError) as e:
        _fail(str(e))


def _train_and_eval(cfg, run_train, evaluate_folders, no_eval: bool) -> None:
    """Train, then evaluate on the held-out split unless there is none or --no-eval."""
    result = run_train(cfg, log=_log)
    typer.echo(f"wrote {', '.join(str(p) for p in result.saes)}")
    if not no_eval and cfg.val_fraction > 0 and not result.split.val_chunks:
        typer.echo(
            f"note: no held-out samples (the store has {len(result.split.train_chunks)} done sample chunk(s), "
            "all used for training), so the evaluation is skipped; harvest more samples to evaluate",
            err=True,
        )
    elif not no_eval and cfg.val_fraction > 0:
        _print_evals(
            evaluate_folders(
                result.saes,
                cfg.store,
                batch_size=cfg.batch_size,
                buckets=cfg.eval_buckets,
                read_threads=cfg.read_threads,
                log=_log,
            )
        )


@app.command("eval")
def eval_(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="SAE folders, or `tide train --out` folders holding them.")
    ],
    store: Annotated[
        str | None, typer.Option(help="The store, a folder or a URL (default: the one recorded at training).")
    ] = None,
    buckets: Annotated[
        int, typer.Option(min=1, help="Timestep buckets in the table (JSON has every step too).")
    ] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward pass.")] = 4096,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N.")] = "cpu",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write all results to this JSON file.")
    ] = None,
    storage_options: StorageOptions = None,
) -> None:
    """Held-out metrics (MSE, FVU, explained variance, cosine, L0, dead, dense), overall and per timestep.

    Each SAE folder also gets the results: eval.json for the default 10 buckets, eval_bN.json for
    --buckets N, so that one bucketing never replaces another's.
    """
    import json

    from tide.store.open import storage_options as scoped
    from tide.store.reader import StoreError, configure_read_threads
    from tide.train.analysis.eval import evaluate_folders

    configure_read_threads(4)
    try:
        with scoped(storage_options):
            results = evaluate_folders(
                checkpoints, store, buckets=buckets, batch_size=batch_size, device=device, log=_log
            )
    except (StoreError, ValueError) as e:
        _fail(str(e))
    _print_evals(results)
    if json_out is not None:
        json_out.write_text(json.dumps([r.to_json() for r in results], indent=2))


# --- splice / steer: SAEs inside the denoising loop ---------------------------------------------


@app.command()
def splice(
    saes: Annotated[
        list[Path], typer.Argument(help="SAE folders, or `tide train --out` folders holding them.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for <condition>/images.npy, report.json, grid.png.")],
    num_samples: Annotated[int, typer.Option(min=1, help="Images per condition.")] = 100,
    steps: Annotated[
        str | None, typer.Option(help="Splice only at steps 'a:b' (a <= step < b; default every step).")
    ] = None,
    num_steps: Annotated[
        int | None, typer.Option(min=1, help="Denoising steps (default the store's).")
    ] = None,
    buckets: Annotated[
        int, typer.Option(min=0, help="Also splice inside each of this many step buckets alone (0: none).")
    ] = 5,
    rows: Annotated[str, typer.Option(help="CFG rows spliced: both or cond.")] = "both",
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per forward pass.")] = 50,
    model: Annotated[
        str | None, typer.Option(help="Pipeline to splice into (default: the SAEs' store's model).")
    ] = None,
    site: Annotated[str | None, typer.Option(help="Site to splice at (default each SAE's own).")] = None,
    layer: Annotated[int | None, typer.Option(help="Layer to splice at (default each SAE's own).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier splice in --out.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
) -> None:
    """Sample with each SAE's reconstruction substituted in the loop: error vs clean, fidelity recovered.

    Conditions (same seeds and labels): clean, each SAE, zero and mean ablation of its site. report.json
    and the printed table give the model-output error per step, final-image MSE, fidelity recovered
    = 1 - (spliced - clean) / (ablated - clean), digits accuracy for the demo model, and a per-bucket split.
    """
    from pydantic import ValidationError
    from tide.store.reader import StoreError
    from tide.train.loop.splice import SpliceConfig
    from tide.train.loop.splice import splice as run_splice
    from tide.train.loop.splice_report import format_report

    try:
        cfg = SpliceConfig(
            saes=tuple(saes), out=out, num_samples=num_samples, steps=steps, num_steps=num_steps,
            buckets=buckets, rows=rows, batch_size=batch_size, model=model, site=site, layer=layer,
            device=device, overwrite=overwrite, progress=not no_progress,
        )  # fmt: skip
        result = run_splice(cfg, log=_log)
    except ValidationError as e:
        _fail(
            "; ".join(f"--{'-'.join(map(str, x['loc']))}: {x['msg']}".replace("--: ", "") for x in e.errors())
        )
    except (StoreError, ValueError) as e:
        _fail(str(e))
    typer.echo(format_report(result.report))
    typer.echo(f"wrote {result.out}/report.json, grid.png and <condition>/images.npy, labels.npy")


@app.command()
def steer(
    sae: Annotated[Path, typer.Option(help="The SAE folder (one of those `tide train --out` holds).")],
    latent: Annotated[int, typer.Option(help="Latent index F.")],
    out: Annotated[Path, typer.Option(help="Folder for images.npy, labels.npy, seeds.npy, grid.png.")],
    strength: Annotated[
        float | None, typer.Option(help="Add A x the latent's raw-space decoder direction (latent units).")
    ] = None,
    clamp: Annotated[
        float | None, typer.Option(help="Instead set the latent to V in the SAE's code, error term kept.")
    ] = None,
    steps: Annotated[str | None, typer.Option(help="Steer only at steps 'a:b' (default every step).")] = None,
    labels: Annotated[
        str | None, typer.Option(help="Class labels: cycle, random, '3,5,7', '0-9' (default the store's).")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="Text models: a file of prompts, one a line.")] = None,
    rows: Annotated[str, typer.Option(help="CFG rows steered: both or cond.")] = "both",
    num_samples: Annotated[int, typer.Option(min=1, help="Images.")] = 16,
    num_steps: Annotated[
        int | None, typer.Option(min=1, help="Denoising steps (default the store's).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per forward pass.")] = 50,
    model: Annotated[str | None, typer.Option(help="Pipeline (default: the SAE's store's model).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier steer in --out.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
) -> None:
    """Edit images through one SAE latent while sampling: add its direction, or clamp its value.

    Writes the steered images.npy and the unsteered.npy of the same seeds, labels.npy, seeds.npy, a grid
    (unsteered row over steered row) and steer.json (with digits-classifier counts for the demo model).
    """
    import json

    from pydantic import ValidationError
    from tide.store.reader import StoreError
    from tide.train.loop.steer import SteerConfig
    from tide.train.loop.steer import steer as run_steer

    try:
        cfg = SteerConfig(
            sae=sae, latent=latent, out=out, strength=strength, clamp=clamp, steps=steps, labels=labels,
            prompts=prompts, rows=rows, num_samples=num_samples, num_steps=num_steps, batch_size=batch_size,
            model=model, device=device, overwrite=overwrite, progress=not no_progress,
        )  # fmt: skip
        result = run_steer(cfg, log=_log)
    except ValidationError as e:
        _fail("; ".join(x["msg"].removeprefix("Value error, ") for x in e.errors()))
    except (StoreError, ValueError) as e:
        _fail(str(e))
    typer.echo(json.dumps(result.summary))
    typer.echo(f"wrote {out}/images.npy, unsteered.npy, labels.npy, seeds.npy, grid.png, steer.json")


# --- SAELens interop ----------------------------------------------------------------------------------


@app.command("export")
def export(
    sae_dir: Annotated[
        Path, typer.Argument(help="An SAE folder written by `tide train` (or `tide import`).")
    ],
    out: Annotated[Path, typer.Option(help="Folder to write (cfg.json, sae_weights.safetensors).")],
    format: Annotated[
        str, typer.Option("--format", help="Only saelens (SAELens 6, `SAE.load_from_disk`).")
    ] = "saelens",
    timestep: Annotated[
        float | None,
        typer.Option(
            help="Export the SAE as it acts at this scheduler timestep (exact there). Needed for SAEs with "
            "per-timestep means (all that `tide train` writes) and for tide SAEs."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a SAELens export in --out.")
    ] = False,
) -> None:
    """Write an SAE in SAELens' format, its input normalisation (and tide's modulation) folded into the weights."""
    if format != "saelens":
        _fail(f"--format {format!r} is not supported; the one format is saelens")
    from tide.train.sae.export import export_saelens

    try:
        result = export_saelens(sae_dir, out, timestep=timestep, overwrite=overwrite)
    except ValueError as e:
        _fail(str(e))
    at = "every timestep" if result.timestep is None else f"timestep {result.timestep:g}"
    typer.echo(f"wrote {result.out} (SAELens {result.architecture}, exact at {at})")


@app.command("import")
def import_(
    folder: Annotated[Path, typer.Argument(help="A SAELens SAE folder (cfg.json, sae_weights.safetensors).")],
    store: Annotated[str, typer.Option(help="The tide store whose activations the SAE reads.")],
    out: Annotated[Path, typer.Option(help="The tide SAE folder to write.")],
    array: Annotated[
        str | None, typer.Option(help="Its activation array, e.g. resid_l03 (default: metadata.hook_name).")
    ] = None,
) -> None:
    """Make a SAELens SAE a tide SAE folder, so `tide eval` and everything using `load_sae` read it."""
    from tide.train.sae.export import import_saelens

    try:
        written = import_saelens(folder, store, out, array=array)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"wrote {written}")


@app.command("features")
def features(
    sae: Annotated[
        Path,
        typer.Argument(help="An SAE folder written by `tide train` (e.g. runs/saes/resid_l03-tide-k16)."),
    ],
    out: Annotated[Path, typer.Option(help="Folder for the report: index.html, latents/, features.json.")],
    store: Annotated[
        str | None, typer.Option(help="The store, a folder or a URL (default: the one recorded at training).")
    ] = None,
    split: Annotated[
        str, typer.Option(help="val: the SAE's held-out samples; all: every done sample (training ones too).")
    ] = "val",
    top_k: Annotated[int, typer.Option(min=1, help="Top activating rows kept per latent.")] = 32,
    buckets: Annotated[int, typer.Option(min=1, help="Timestep buckets of the per-bucket AUROC.")] = 5,
    max_pages: Annotated[
        int,
        typer.Option(
            min=0,
            help="Latent pages: the alive latents with the best AUROC, at most this many (0: every alive one).",
        ),
    ] = 256,
    images: Annotated[int, typer.Option(min=1, help="Top samples pictured per latent page.")] = 8,
    model: Annotated[
        str | None,
        typer.Option(
            help="Pipeline folder to redraw images with when the store has none (default: the recorded one)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per SAE forward pass.")] = 4096,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a previous report in --out.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bars.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """A browsable report of every latent: frequency, timestep profile, class AUROC, top images with heatmaps.

    One streaming pass of the SAE over the store, then DIR/index.html (a sortable table of every latent)
    linking to one page per latent, and DIR/features.json / features.npz with the numbers.
    """
    from pydantic import ValidationError
    from tide.store.device import resolve_device
    from tide.store.open import storage_options as scoped
    from tide.store.reader import StoreError
    from tide.train.analysis.features import FeaturesConfig
    from tide.train.analysis.report import features_report

    if split not in ("val", "all"):
        _fail(f"--split {split!r} is not val or all")
    try:
        cfg = FeaturesConfig(
            split=split,
            top_k=top_k,
            buckets=buckets,
            max_pages=max_pages or None,
            images_per_page=images,
            batch_size=batch_size,
            progress=not no_progress,
        )
        with scoped(storage_options):
            result = features_report(
                sae,
                out,
                cfg,
                store=store,
                model=model,
                device=str(resolve_device(device)),
                overwrite=overwrite,
                log=_log,
            )
    except (StoreError, ValueError, ValidationError) as e:
        _fail(str(e))
    t = result.table
    typer.echo(
        f"{len(t.frequency_F)} latents ({int(t.dead_F.sum())} dead, {int(t.dense_F.sum())} dense) over "
        f"{result.rows} rows; {len(result.pages)} latent pages; open {out / 'index.html'}"
    )


# --- every setting -------------------------------------------------------------------------------


@app.command("config-reference")
def config_reference_(
    readme: Annotated[
        Path | None,
        typer.Option(help="Rewrite the table between the config-reference markers of this file instead."),
    ] = None,
) -> None:
    """Print every config-file key of `tide harvest` and `tide train`, with its option, default and meaning."""
    text = config_reference()
    if readme is None:
        typer.echo(text, nl=False)
        return
    start, end = REFERENCE_MARKERS
    old = readme.read_text()
    if start not in old or end not in old:
        _fail(f"{readme} has no {start} ... {end} lines to put the reference between; add them")
    head, rest = old.split(start, 1)
    readme.write_text(f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}")
    typer.echo(f"wrote the config reference into {readme}")


# --- demo model ------------------------------------------------------------------------------------

_DEMO_DEFAULT = "harvest/demo/digits-dit (shipped)"


@demo_app.command("train")
def demo_train(
    out: Annotated[
        Path | None, typer.Option(help=f"Pipeline folder to write (default {_DEMO_DEFAULT}).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default: the shipped model's).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of weights, data order, noise and label dropout.")
    ] = None,
    label_block: Annotated[
        int | None,
        typer.Option(
            help="Feed the label to this block only (default: every block and the output layer, as in DiT-XL/2 "
            "and the shipped model); downstream of it the class lives in the residual stream alone.",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing folder.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
) -> None:
    """Train the demo DiT on scikit-learn's digits (CPU, ~10-15 min), measure its quality, write its model card."""
    import os

    # Set before torch loads OpenMP: spinning worker threads halve the speed when the cores are shared with
    # other jobs (measured 2.4 s vs 4.5 s a step). It changes scheduling only, never the numbers.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from tide.harvest.config import DEMO_MODEL
    from tide.harvest.demo_model import DemoTrainConfig, train_demo

    overrides = {"steps": steps, "seed": seed, "label_block": label_block}
    cfg, _ = _build_config(DemoTrainConfig, None, overrides)
    try:
        quality = train_demo(cfg, out or DEMO_MODEL, overwrite=overwrite, progress=not no_progress,
                             log=lambda m: typer.echo(m, err=True))  # fmt: skip
    except FileExistsError as e:
        _fail(str(e))
    typer.echo(f"demo_accuracy: {quality.demo_accuracy:.4f}")
    typer.echo(f"classifier_heldout_accuracy: {quality.classifier_heldout_accuracy:.4f}")


@demo_app.command("eval")
def demo_eval(
    model: Annotated[
        Path | None, typer.Option(help=f"Demo pipeline folder (default {_DEMO_DEFAULT}).")
    ] = None,
    per_class: Annotated[int, typer.Option(min=1, help="Samples generated per class.")] = 50,
    num_steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 50,
    guidance_scale: Annotated[float | None, typer.Option(help="CFG scale (default: the model's).")] = None,
    seed: Annotated[int, typer.Option(help="Sample i uses seed + i; also seeds the classifier's split.")] = 0,
) -> None:
    """Generate samples of every digit and score them with a classifier trained only on real digits."""
    from tide.harvest.config import DEMO_MODEL
    from tide.harvest.demo_model import evaluate

    try:
        quality = evaluate(model or DEMO_MODEL, per_class, num_steps, guidance_scale, seed)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"demo_accuracy: {quality.demo_accuracy:.4f}")
    typer.echo(f"classifier_heldout_accuracy: {quality.classifier_heldout_accuracy:.4f}")
    typer.echo(f"num_samples: {quality.num_samples}")


@demo_app.command("grid")
def demo_grid(
    model: Annotated[
        Path | None, typer.Option(help=f"Demo pipeline folder (default {_DEMO_DEFAULT}).")
    ] = None,
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("docs/digits_grid.png"),
    per_row: Annotated[int, typer.Option(min=1, help="Samples per class (one row per class).")] = 8,
    seed: Annotated[int, typer.Option(help="Sample i uses seed + i.")] = 0,
) -> None:
    """Render a grid of samples, one row per digit, to a PNG."""
    from tide.harvest.config import DEMO_MODEL
    from tide.harvest.demo_model import render_grid

    try:
        path = render_grid(model or DEMO_MODEL, out, per_row=per_row, seed=seed)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()

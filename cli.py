"""The `tide` command line: each command parses, builds its config (file + flags -> pydantic) and makes one
library call. The options, the config plumbing and the config reference live in cliconfig.py.

torch and diffusers are imported inside the commands so that `tide --help` is instant.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from tide import clioptions as opt
from tide.cliconfig import (
    build_config,
    deprecated_flag,
    fail,
    flags_config,
    full_short_help,
    given_flags,
    log,
    user_errors,
    write_reference,
)
from tide.cliconfig import config_reference as reference_text


def _typer(help: str) -> typer.Typer:
    # rich_markup_mode=None: plain click help. Typer's rich panels print a type after every on/off flag
    # (`--overwrite <bool>`, even `--help <bool>`), which reads as if the flag took a value.
    return typer.Typer(help=help, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)


app = _typer(
    "tide: temporal-aware sparse autoencoders for diffusion transformers.\n\nHarvest a DiT's activations across "
    "denoising steps into a Zarr v3 cache, then train SAEs on it."
)
store_app = _typer("Inspect, verify and summarise activation stores.")
demo_app = _typer("The shipped demo model: a small class-conditional DiT on digits.")
app.add_typer(store_app, name="store", short_help=store_app.info.help)
app.add_typer(demo_app, name="demo-model", short_help=demo_app.info.help)
EVERY_SETTING = "Every setting, with the config-file keys that have no flag: `tide config-reference`."


# --- harvest ---------------------------------------------------------------------------------------


@app.command(epilog=EVERY_SETTING)
def harvest(
    model: opt.Harvest.Model = None,
    out: opt.Harvest.Out = None,
    num_samples: opt.Harvest.NumSamples = None,
    num_steps: opt.Harvest.NumSteps = None,
    steps: opt.Harvest.Steps = None,
    layers: opt.Harvest.Layers = None,
    sites: opt.Harvest.Sites = None,
    token_fraction: opt.Harvest.TokenFraction = None,
    guidance_scale: opt.Harvest.GuidanceScale = None,
    cfg_branch: opt.Harvest.CfgBranch = None,
    labels: opt.Harvest.Labels = None,
    prompts: opt.Harvest.Prompts = None,
    prompt_embeds: opt.Harvest.PromptEmbeds = None,
    height: opt.Harvest.Height = None,
    width: opt.Harvest.Width = None,
    seed: opt.Harvest.Seed = None,
    batch_size: opt.Harvest.BatchSize = None,
    dtype: opt.Harvest.Dtype = None,
    codec: opt.Harvest.Codec = None,
    model_dtype: opt.Harvest.ModelDtype = None,
    cpu_threads: opt.Harvest.CpuThreads = None,
    save_images: opt.Harvest.SaveImages = False,
    device: opt.DeviceSetting = None,
    overwrite: opt.Harvest.Overwrite = False,
    no_progress: opt.NoProgress = False,
    storage_options: opt.StorageOptions = None,
    config: opt.ConfigFile = None,
    scheduler: opt.Harvest.Scheduler = None,
    workers: opt.Harvest.Workers = None,
) -> None:
    """Run a DiT over its denoising steps and store chosen activations in a Zarr v3 cache.

    Re-running the same command after an interruption resumes it: finished samples are kept. With
    --scheduler or --workers, dask workers each write whole sample chunks; the store is the same.
    """
    # Where it runs is no setting of the store: --scheduler, --workers and --storage-options stay out of it.
    flags = given_flags(locals(), skip=("config", "scheduler", "workers", "storage_options"))
    from tide.harvest.cluster import harvest_where
    from tide.harvest.config import HarvestConfig

    cfg, _ = build_config(HarvestConfig, config, flags)
    with user_errors(storage_options):
        result = harvest_where(cfg, scheduler, workers, log=log)
    typer.echo(result.summary())


# --- store -----------------------------------------------------------------------------------------


@store_app.command("info")
def store_info(
    path: opt.StorePath, json_out: opt.Store.Json = False, storage_options: opt.StorageOptions = None
) -> None:
    """Summarise a store: model, steps, layers, sites, samples done, bytes on disk, compression."""
    import json

    from tide.store.inspect import summary, summary_table
    from tide.store.reader import open_store

    with user_errors(storage_options):
        info = summary(open_store(path))
    typer.echo(json.dumps(info, indent=2) if json_out else summary_table(info))


@store_app.command("verify")
def store_verify(
    path: opt.StorePath,
    quick: opt.Store.Quick = False,
    reset_damaged: opt.Store.ResetDamaged = False,
    storage_options: opt.StorageOptions = None,
) -> None:
    """Check a store's integrity; exits non-zero naming every problem found (every damaged chunk by its file)."""
    from tide.store.verify import check_resettable, verdict_advice, verify
    from tide.store.verify import reset_damaged as reset

    with user_errors(storage_options):
        if reset_damaged:  # before the checks, which can take long: a store tide only reads is refused
            check_resettable(path)
        verdict = verify(path, check_values=not quick)
        ranges = reset(path, verdict.damaged) if verdict.damaged and reset_damaged else None
    for p in verdict.problems:
        typer.secho(f"FAIL {p}", fg=typer.colors.RED, err=True)
    for line in verdict_advice(path, verdict, quick, ranges):
        typer.echo(line, err=bool(verdict.problems))
    if verdict.problems:
        raise typer.Exit(code=1)


@store_app.command("pack")
def store_pack(
    path: opt.StorePath,
    out: opt.Store.PackOut,
    codec: opt.Store.PackCodec = None,
    storage_options: opt.StorageOptions = None,
) -> None:
    """Pack a store into one zip file (entries stored, not deflated) that tide, zarr and xarray open directly."""
    from tide.store.pack import pack

    with user_errors(storage_options):
        n = pack(path, out, codec)
    typer.echo(
        f"wrote {out} ({n} entries); `tide store verify {out}` checks it, `tide train --store {out}` reads it"
    )


@store_app.command("card")
def store_card(
    path: opt.Store.CardPath, out: opt.Store.CardOut = None, storage_options: opt.StorageOptions = None
) -> None:
    """Write README.md into the store: a Hugging Face dataset card (what it holds, how to load it)."""
    from tide.store.card import write_card

    with user_errors(storage_options):
        typer.echo(f"wrote {write_card(path, out)}")


@store_app.command("stats")
def store_stats(
    path: opt.StorePath,
    array: opt.Store.Array = None,
    scheduler: opt.Store.Scheduler = None,
    write: opt.Store.Write = False,
    storage_options: opt.StorageOptions = None,
) -> None:
    """Recompute per-step statistics with dask, print them, and check (or --write) the writer's stored sums."""
    from tide.store.stats import check_sums

    with user_errors(storage_options):
        check_sums(path, array, scheduler, write, echo=typer.echo)


# --- train / eval ----------------------------------------------------------------------------------


@app.command(epilog=EVERY_SETTING)
def train(
    store: opt.Train.Store = None,
    out: opt.Train.Out = None,
    site: opt.Train.Site = None,
    layers: opt.Train.Layers = None,
    branch: opt.Train.Branch = None,
    arch: opt.Train.Arch = None,
    k: opt.Train.K = None,
    init_modulation: opt.Train.InitModulation = None,
    expansion: opt.Train.Expansion = None,
    num_latents: opt.Train.NumLatents = None,
    batch_size: opt.Train.BatchSize = None,
    lr: opt.Train.Lr = None,
    epochs: opt.Train.Epochs = None,
    max_steps: opt.Train.MaxSteps = None,
    warmup_steps: opt.Train.WarmupSteps = None,
    steps: opt.Train.Steps = None,
    stratify_steps: opt.Train.StratifySteps = False,
    val_fraction: opt.Train.ValFraction = None,
    seed: opt.Train.Seed = None,
    device: opt.DeviceSetting = None,
    checkpoint_every: opt.Train.CheckpointEvery = None,
    overwrite: opt.Train.Overwrite = False,
    no_progress: opt.NoProgress = False,
    no_eval: opt.Train.NoEval = False,
    storage_options: opt.StorageOptions = None,
    config: opt.ConfigFile = None,
    nproc: opt.Train.Nproc = None,
) -> None:
    """Train SAEs (default: a tide and a topk SAE on the middle layer) and print their held-out metrics per timestep.

    Re-running the same command after an interruption resumes it exactly where its last checkpoint was.
    Under torchrun, every rank runs this command and trains its share of each batch (docs/cluster.md).
    """
    flags = given_flags(locals(), skip=("config", "no_eval", "storage_options", "nproc"))
    from tide.train.fit.config import TrainConfig, warmup_note

    cfg, given = build_config(TrainConfig, config, flags)
    note = warmup_note(cfg, given)
    if note and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it for every rank
        log(note)
    if nproc is not None:  # the same command on nproc torchrun ranks of this machine
        from tide.train.fit.distributed import launch

        with user_errors():
            code = launch(cfg, nproc, no_eval, storage_options)
        raise typer.Exit(code=code)
    from tide.train.analysis.eval import evaluate_run, format_tables
    from tide.train.fit.trainer import train as run_train

    with user_errors(storage_options):
        trained = run_train(cfg, log=log)
        if not trained.main:  # another torchrun rank: rank 0 reports and evaluates
            return
        typer.echo(f"wrote {', '.join(str(p) for p in trained.saes)}")
        tables = format_tables([] if no_eval else evaluate_run(trained, cfg, log=log))
        typer.echo(tables, nl=bool(tables))


@app.command("eval")
def eval_(
    checkpoints: opt.SaeFolders,
    store: opt.RecordedStore = None,
    buckets: opt.Eval.Buckets = 10,
    batch_size: opt.Eval.BatchSize = 4096,
    device: opt.Device = "auto",
    json_out: opt.Eval.Json = None,
    storage_options: opt.StorageOptions = None,
) -> None:
    """Held-out metrics (MSE, FVU, explained variance, cosine, L0, dead, dense), overall and per timestep.

    Each SAE folder also gets the results: eval.json for the default 10 buckets, eval_bN.json for
    --buckets N, so that one bucketing never replaces another's.
    """
    from tide.store.device import resolve_device
    from tide.train.analysis.eval import evaluate_folders, format_tables, json_file, write_results

    with user_errors(storage_options):
        json_path = json_file(json_out)  # refused at once, before the evaluation
        dev = str(resolve_device(device))
        results = evaluate_folders(
            checkpoints, store, buckets=buckets, batch_size=batch_size, device=dev, log=log
        )
    typer.echo(format_tables(results))
    if json_path is not None:
        write_results(json_path, results)


# --- splice / steer: SAEs inside the denoising loop ---------------------------------------------


@app.command()
def splice(
    saes: opt.SaeFolders,
    out: opt.Splice.Out,
    num_samples: opt.Splice.NumSamples = 100,
    steps: opt.Splice.Steps = None,
    num_steps: opt.Splice.NumSteps = None,
    buckets: opt.Splice.Buckets = 5,
    rows: opt.Splice.Rows = "both",
    batch_size: opt.Splice.BatchSize = 50,
    model: opt.Splice.Model = None,
    site: opt.Splice.Site = None,
    layer: opt.Splice.Layer = None,
    device: opt.Device = "auto",
    overwrite: opt.Splice.Overwrite = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """Sample with each SAE's reconstruction substituted in the loop: error vs clean, fidelity recovered.

    Conditions (same seeds and labels): clean, each SAE, zero and mean ablation of its site. report.json
    and the printed table give the model-output error per step, final-image MSE, fidelity recovered
    = 1 - (spliced - clean) / (ablated - clean), digits accuracy for the demo model, and a per-bucket split.
    """
    flags = given_flags(locals())
    from tide.train.loop.splice import SpliceConfig
    from tide.train.loop.splice import splice as run_splice
    from tide.train.loop.splice_report import format_report

    with user_errors():
        result = run_splice(flags_config(SpliceConfig, **flags), log=log)
    typer.echo(format_report(result.report))
    typer.echo(f"wrote {result.out}/report.json, grid.png and <condition>/images.npy, labels.npy")


@app.command()
def steer(
    latent: opt.Steer.Latent,
    out: opt.Steer.Out,
    sae: opt.Steer.Sae = None,
    strength: opt.Steer.Strength = None,
    clamp: opt.Steer.Clamp = None,
    steps: opt.Steer.Steps = None,
    region: opt.Steer.Region = None,
    labels: opt.Steer.Labels = None,
    prompts: opt.Steer.Prompts = None,
    rows: opt.Steer.Rows = "both",
    num_samples: opt.Steer.NumSamples = 16,
    num_steps: opt.Splice.NumSteps = None,
    batch_size: opt.Splice.BatchSize = 50,
    model: opt.Steer.Model = None,
    device: opt.Device = "auto",
    overwrite: opt.Steer.Overwrite = False,
    no_progress: opt.NoProgress = False,
    sae_flag: opt.Steer.SaeFlag = None,
) -> None:
    """Edit images through one SAE latent while sampling: add its direction, or clamp its value.

    Writes the steered images.npy and the unsteered.npy of the same seeds, labels.npy, seeds.npy, a grid
    (unsteered row over steered row) and steer.json (with digits-classifier counts for the demo model).
    """
    sae = deprecated_flag(sae, sae_flag, "--sae", "tide steer SAE_FOLDER --latent F --strength A --out DIR")
    flags = given_flags(locals(), skip=("sae_flag",))
    from tide.train.loop.steer import SteerConfig, format_summary
    from tide.train.loop.steer import steer as run_steer

    with user_errors():
        result = run_steer(flags_config(SteerConfig, **flags), log=log)
    typer.echo(format_summary(result.summary))
    typer.echo(f"wrote {out}/images.npy, unsteered.npy, labels.npy, seeds.npy, grid.png, steer.json")


# --- SAELens interop ----------------------------------------------------------------------------------


@app.command("export")
def export(
    sae_dir: opt.SaeFolder,
    out: opt.Export.Out,
    format: opt.Export.Format = "saelens",
    timestep: opt.Export.Timestep = None,
    overwrite: opt.Export.Overwrite = False,
) -> None:
    """Write an SAE in SAELens' format, its input normalisation (and tide's modulation) folded into the weights."""
    if format != "saelens":
        fail(f"--format {format!r} is not supported; the one format is saelens")
    from tide.train.sae.export import export_saelens

    with user_errors():
        result = export_saelens(sae_dir, out, timestep=timestep, overwrite=overwrite)
    at = "every timestep" if result.timestep is None else f"timestep {result.timestep:g}"
    typer.echo(f"wrote {result.out} (SAELens {result.architecture}, exact at {at})")


@app.command("import")
def import_(
    folder: opt.Export.Folder,
    store: opt.Export.Store,
    out: opt.Export.ImportOut,
    array: opt.Export.Array = None,
    overwrite: opt.Export.ImportOverwrite = False,
) -> None:
    """Make a SAELens SAE a tide SAE folder, so `tide eval` and everything using `load_sae` read it."""
    from tide.train.sae.export import import_saelens

    with user_errors():
        typer.echo(f"wrote {import_saelens(folder, store, out, array=array, overwrite=overwrite)}")


@app.command("features")
def features(
    sae: opt.SaeFolder,
    out: opt.Features.Out,
    store: opt.RecordedStore = None,
    split: opt.Features.Split = "val",
    top_k: opt.Features.TopK = 32,
    buckets: opt.Features.Buckets = 5,
    max_pages: opt.Features.MaxPages = 256,
    images: opt.Features.Images = 8,
    causal: opt.Features.Causal = 2,
    causal_scale: opt.Features.CausalScale = 4.0,
    model: opt.Features.Model = None,
    batch_size: opt.Features.BatchSize = 4096,
    device: opt.Device = "auto",
    overwrite: opt.Features.Overwrite = False,
    no_progress: opt.NoProgress = False,
    storage_options: opt.StorageOptions = None,
) -> None:
    """A browsable report of every latent: frequency, timestep profile, class AUROC, top images with heatmaps,
    and what it does (its top samples redrawn with it off and scaled up).

    One streaming pass of the SAE over the store, then DIR/index.html (a sortable table of every latent)
    linking to one page per latent, and DIR/features.json / features.npz with the numbers.
    """
    from tide.store.device import resolve_device
    from tide.train.analysis.features import FeaturesConfig
    from tide.train.analysis.report import features_report

    cfg = flags_config(  # a refused value is one line naming its flag
        FeaturesConfig, split=split, top_k=top_k, buckets=buckets, max_pages=max_pages or None,
        images_per_page=images, causal_samples=causal, causal_scale=causal_scale, batch_size=batch_size,
        progress=not no_progress,
    )  # fmt: skip
    with user_errors(storage_options):
        result = features_report(
            sae, out, cfg, store=store, model=model, device=str(resolve_device(device)), overwrite=overwrite, log=log
        )  # fmt: skip
    typer.echo(result.summary())


# --- every setting -------------------------------------------------------------------------------


@app.command("config-reference")
def config_reference(readme: opt.ReferenceReadme = None) -> None:
    """Print every config-file key of `tide harvest` and `tide train`, with its option, default and meaning."""
    if readme is None:
        typer.echo(reference_text(app), nl=False)
        return
    write_reference(app, readme)
    typer.echo(f"wrote the config reference into {readme}")


# --- demo model ------------------------------------------------------------------------------------


@demo_app.command("train")
def demo_train(
    out: opt.Demo.Out = None,
    steps: opt.Demo.Steps = None,
    seed: opt.Demo.Seed = None,
    label_block: opt.Demo.LabelBlock = None,
    overwrite: opt.Demo.Overwrite = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """Train the demo DiT on scikit-learn's digits (CPU, ~10-15 min), measure its quality, write its model card."""
    import os

    # Set before torch loads OpenMP: spinning worker threads halve the speed when the cores are shared with
    # other jobs (measured 2.4 s vs 4.5 s a step). It changes scheduling only, never the numbers.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from tide.harvest.config import DEMO_MODEL
    from tide.harvest.demo_model import DemoTrainConfig, train_demo

    cfg = flags_config(DemoTrainConfig, steps=steps, seed=seed, label_block=label_block)
    with user_errors():
        quality = train_demo(cfg, out or DEMO_MODEL, overwrite=overwrite, progress=not no_progress, log=log)
    typer.echo("\n".join(quality.lines(samples=False)))


@demo_app.command("eval")
def demo_eval(
    model: opt.Demo.Model = None,
    per_class: opt.Demo.PerClass = 50,
    num_steps: opt.Demo.NumSteps = 50,
    guidance_scale: opt.Demo.GuidanceScale = None,
    seed: opt.Demo.EvalSeed = 0,
) -> None:
    """Generate samples of every digit and score them with a classifier trained only on real digits."""
    from tide.harvest.config import DEMO_MODEL
    from tide.harvest.demo_model import evaluate

    with user_errors():
        quality = evaluate(model or DEMO_MODEL, per_class, num_steps, guidance_scale, seed)
    typer.echo("\n".join(quality.lines()))


@demo_app.command("grid")
def demo_grid(
    model: opt.Demo.Model = None,
    out: opt.Demo.GridOut = Path("docs/digits_grid.png"),
    per_row: opt.Demo.PerRow = 8,
    seed: opt.Demo.GridSeed = 0,
) -> None:
    """Render a grid of samples, one row per digit, to a PNG."""
    from tide.harvest.config import DEMO_MODEL
    from tide.harvest.demo_model import render_grid

    with user_errors():
        typer.echo(f"wrote {render_grid(model or DEMO_MODEL, out, per_row=per_row, seed=seed)}")


full_short_help(app, store_app, demo_app)

if __name__ == "__main__":
    app()

"""Every option of the `tide` commands, defined once: the ones several commands share, then each command's.

cli.py's signatures name these (`num_samples: Splice.NumSamples = 100`); a default of the option's own stays
in the signature, where typer shows it. One style of help: it ends in `[default: X]`, which typer writes for a
default of the option's own and `option(help, default)` writes for an option left at None (unset, so that a
config file or the library decides). tests/test_cli_help.py walks every command's help and checks it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from tide.cliconfig import default_text


def option(help: str, default: Any = None, *decls: str, **kw: Any) -> Any:
    """A typer option left at None whose help ends in `[default: <default>]`, the default it stands for."""
    text = help if default is None else f"{help}  [default: {default_text(default)}]"
    return typer.Option(*decls, help=text, show_default=False, **kw)


def flag(name: str, help: str) -> Any:
    """An on/off flag, off unless given: `--overwrite`, `--no-progress`."""
    return typer.Option(name, help=help)


def overwrite(what: str) -> Any:
    return flag("--overwrite", f"Replace {what}.")


# --- shared ------------------------------------------------------------------------------------------

STORE_HELP = "A tide store: a folder, s3://, gs://, http(s)://, hf://datasets/ORG/NAME/PATH, or a .zarr.zip."
StorePath = Annotated[str, typer.Argument(help=STORE_HELP)]
RecordedStore = Annotated[str | None, option("The store, a folder or a URL.", "the one recorded at training")]
SaeFolder = Annotated[
    Path, typer.Argument(help="An SAE folder written by `tide train` (e.g. runs/saes/resid_l03-tide-k16).")
]
SaeFolders = Annotated[
    list[Path], typer.Argument(help="SAE folders, or `tide train --out` folders holding them.")
]
DEVICE_HELP = "auto (CUDA when available), cpu, cuda, cuda:N."
Device = Annotated[str, typer.Option(help=DEVICE_HELP)]
DeviceSetting = Annotated[str | None, option(DEVICE_HELP, "auto")]
NoProgress = Annotated[bool, flag("--no-progress", "Hide the progress bars.")]
ConfigFile = Annotated[
    Path | None,
    option("YAML or TOML file of settings, keys named as the options; flags override it.", "none"),
]
StorageOptions = Annotated[
    str | None,
    option(
        "JSON of options for a URL store, e.g. '{\"anon\": true}' or "
        '\'{"endpoint_url": "http://host:9000"}\': obstore config keys for s3:// and gs:// (s3fs spellings '
        "such as anon, key, secret, endpoint_url work too), fsspec storage options for http(s):// and hf://.",
        "from AWS_* and the like in the environment",
    ),
]


# --- each command's (harvest's and train's set HarvestConfig / TrainConfig fields: the default shown is
# the config's, checked against it by tests/test_cli_help.py) --------------------------------------------


class Harvest:
    """`tide harvest`'s options."""

    Model = Annotated[
        str | None,
        option("Diffusers pipeline folder or hub id.", "harvest/demo/digits-dit, the shipped digits DiT"),
    ]
    Out = Annotated[
        str | None, option("Store to write: a folder, or s3://BUCKET/PATH, gs://...", "runs/digits.zarr")
    ]
    NumSamples = Annotated[int | None, option("Images to generate.", 500)]
    NumSteps = Annotated[int | None, option("Denoising steps.", 50)]
    Steps = Annotated[
        str | None, option("Steps to store: all, a list '0,10,49' or a slice like '::5' or '10:40'.", "all")
    ]
    Layers = Annotated[str | None, option("Blocks to capture: all, or indices like '0,5,-1'.", "all")]
    Sites = Annotated[str | None, option("Comma list of resid, delta, attn, mlp, or all.", "resid")]
    TokenFraction = Annotated[
        float | None, option("Fraction of tokens kept per (sample, step), in (0, 1].", 0.25)
    ]
    GuidanceScale = Annotated[
        float | None,
        option(
            "Guidance scale, >= 1: classifier-free (1 = none), or FLUX.1-dev's guidance input.", "the model's"
        ),
    ]
    CfgBranch = Annotated[str | None, option("CFG branch to store: cond, uncond or both.", "cond")]
    Labels = Annotated[str | None, option("Class labels: cycle, random, '3,5,7' or '0-9'.", "cycle")]
    Prompts = Annotated[Path | None, option("Text models: file with one prompt a line.", "none")]
    PromptEmbeds = Annotated[
        Path | None,
        option(
            "Text models: precomputed prompt embeddings, safetensors; SD3/FLUX add pooled_prompt_embeds.",
            "none: the text encoder, PixArt only",
        ),
    ]
    Height = Annotated[int | None, option("Image height in pixels.", "the pipeline's, e.g. 1024 for FLUX")]
    Width = Annotated[int | None, option("Image width in pixels.", "the pipeline's, e.g. 1024 for FLUX")]
    Seed = Annotated[int | None, option("Base seed; sample i uses seed + i.", 0)]
    BatchSize = Annotated[int | None, option("Samples per forward pass and per chunk.", 50)]
    Dtype = Annotated[str | None, option("Stored dtype: float16, float32 or bfloat16.", "float16")]
    Codec = Annotated[
        str | None, option("Compression: none, blosc-zstd (smaller, slower to read) or zstd.", "none")
    ]
    ModelDtype = Annotated[
        str | None, option("Dtype the transformer runs in: float32, float16 or bfloat16.", "float32")
    ]
    CpuThreads = Annotated[
        int | None,
        option(
            "torch threads per model call on the CPU, recorded in the store so that every process writing it "
            "uses the same count and the bytes match; for more cores use --workers N.",
            1,
        ),
    ]
    SaveImages = Annotated[bool, flag("--save-images", "Also store the final images.")]
    Overwrite = Annotated[bool, flag("--overwrite", "Replace an existing store with another configuration.")]
    Scheduler = Annotated[
        str | None,
        option(
            "Run on the dask.distributed cluster at this address, tcp://HOST:PORT; its workers write --out "
            "themselves: a folder they all see at the same path, or an s3:// or gs:// URL.",
            "none: this process",
        ),
    ]
    Workers = Annotated[
        int | None,
        option(
            "Start a local dask cluster of N worker processes and run on it: one per GPU, or N single-threaded "
            "CPU processes.",
            "none: this process",
        ),
    ]


class Train:
    """`tide train`'s options."""

    Store = Annotated[
        str | None, option("Tide store to train on: a folder, a URL or a .zarr.zip.", "runs/digits.zarr")
    ]
    Out = Annotated[str | None, option("Folder for the SAEs, a local path.", "runs/saes")]
    Site = Annotated[str | None, option("Capture site: resid, delta, attn or mlp.", "resid")]
    Layers = Annotated[
        str | None, option("Stored layers: middle (the middle stored one), all, or '2,3'.", "middle")
    ]
    Branch = Annotated[str | None, option("CFG branch: cond or uncond.", "cond")]
    Arch = Annotated[
        str | None,
        option(
            "Comma list of SAE architectures, e.g. tide,topk,jumprelu,matryoshka; `tide config-reference` lists "
            "them all.",
            "tide,topk",
        ),
    ]
    K = Annotated[str | None, option("Active latents per row; a comma list sweeps.", 16)]
    InitModulation = Annotated[
        str | None,
        option(
            "tide modulation at step 0: zero (starts as topk) or adaln (copy the store's DiT's adaLN that reads "
            "the layer).",
            "zero",
        ),
    ]
    Expansion = Annotated[int | None, option("Width = expansion x d_model.", 8)]
    NumLatents = Annotated[int | None, option("Width, overriding --expansion.", "none: use --expansion")]
    BatchSize = Annotated[int | None, option("Rows per optimiser step.", 4096)]
    Lr = Annotated[float | None, option("Peak AdamW learning rate.", 0.001)]
    Epochs = Annotated[int | None, option("Passes over the training split.", 2)]
    MaxSteps = Annotated[int | None, option("Stop after this many steps instead.", "none: --epochs decides")]
    WarmupSteps = Annotated[
        int | None,
        option("Linear learning-rate warm-up steps.", "50, or max_steps // 10 when --max-steps <= 50"),
    ]
    Steps = Annotated[str | None, option("Stored steps to train on: all or 'start:stop'.", "all")]
    StratifySteps = Annotated[bool, flag("--stratify-steps", "Equal share of every step in each batch.")]
    ValFraction = Annotated[float | None, option("Fraction of sample chunks held out.", 0.1)]
    Seed = Annotated[int | None, option("Seed of the SAEs' weights and the data order.", 0)]
    CheckpointEvery = Annotated[int | None, option("Steps between checkpoints.", 50)]
    Overwrite = Annotated[bool, flag("--overwrite", "Replace a run with another configuration in --out.")]
    NoEval = Annotated[bool, flag("--no-eval", "Skip the held-out evaluation at the end.")]
    Nproc = Annotated[
        int | None,
        option(
            "Train on N processes of this machine (torchrun; one GPU each, or CPU processes sharing the cores), "
            "each on a share of every batch: the same SAEs as one process at the same --batch-size. For several "
            "machines run torchrun yourself (docs/cluster.md).",
            "none: this process",
            min=1,
        ),
    ]


class Store:
    """`tide store`'s subcommands' options."""

    Json = Annotated[bool, flag("--json", "Print JSON instead of a table.")]
    Quick = Annotated[
        bool,
        flag(
            "--quick", "Check metadata, shapes and that every chunk file is there with a plausible size only."
        ),
    ]
    ResetDamaged = Annotated[
        bool,
        flag(
            "--reset-damaged",
            "Mark the samples of missing or unreadable chunks not done, so that re-running the store's "
            "`tide harvest --out PATH` command writes them again.",
        ),
    ]
    PackOut = Annotated[str, typer.Option(help="The zip file to write, a local path, e.g. h.zarr.zip.")]
    PackCodec = Annotated[
        str | None,
        option(
            "Recompress the activations into the zip: none, blosc-zstd (smaller to share, 1.2x at float16, 1.5x "
            "at bfloat16) or zstd.",
            "the store's",
        ),
    ]
    CardPath = Annotated[str, typer.Argument(help="A tide store: a folder, or s3:// or gs://.")]
    CardOut = Annotated[
        str | None,
        option(
            "Write the card to this file (a path, or s3:// or gs://) instead of into the store, e.g. the README.md "
            "at the root of a Hugging Face dataset repository that holds the store in a folder (the hub shows only "
            "that one). An existing file is written over only when it is a tide card.",
            "PATH/README.md",
        ),
    ]
    Array = Annotated[str | None, option("Activation array, e.g. resid_l03.", "all")]
    Scheduler = Annotated[
        str | None, option("dask.distributed scheduler address, e.g. tcp://host:8786.", "none: this process")
    ]
    Write = Annotated[bool, flag("--write", "Rewrite the stored sums with the recomputed ones.")]


class Eval:
    """`tide eval`'s options."""

    Buckets = Annotated[
        int, typer.Option(min=1, help="Timestep buckets in the table (JSON has every step too).")
    ]
    BatchSize = Annotated[int, typer.Option(min=1, help="Rows per forward pass.")]
    Json = Annotated[
        str | None,
        option(
            "Also write all results to this JSON file, a local path (an existing file is written over only when "
            "it holds earlier results of tide eval).",
            "none",
            "--json",
        ),
    ]


class Splice:
    """`tide splice`'s options."""

    Out = Annotated[str, typer.Option(help="Folder for <condition>/images.npy, report.json, grid.png.")]
    NumSamples = Annotated[int, typer.Option(min=1, help="Images per condition.")]
    Steps = Annotated[str | None, option("Splice only at steps 'a:b' (a <= step < b).", "every step")]
    NumSteps = Annotated[int | None, option("Denoising steps.", "the store's", min=1)]
    Buckets = Annotated[
        int, typer.Option(min=0, help="Also splice inside each of this many step buckets alone (0: none).")
    ]
    Rows = Annotated[str, typer.Option(help="CFG rows spliced: both or cond.")]
    BatchSize = Annotated[int, typer.Option(min=1, help="Samples per forward pass.")]
    Model = Annotated[str | None, option("Pipeline to splice into.", "the SAEs' store's model")]
    Site = Annotated[str | None, option("Site to splice at.", "each SAE's own")]
    Layer = Annotated[int | None, option("Layer to splice at.", "each SAE's own")]
    Overwrite = Annotated[bool, overwrite("an earlier splice in --out")]


class Steer:
    """`tide steer`'s options."""

    Sae = Annotated[
        Path | None,
        typer.Argument(help="The SAE folder (one of those `tide train --out` holds).", show_default=False),
    ]
    SaeFlag = Annotated[Path | None, typer.Option("--sae", hidden=True, help="Deprecated: the SAE folder.")]
    Latent = Annotated[int, typer.Option(help="Latent index F.")]
    Out = Annotated[str, typer.Option(help="Folder for images.npy, labels.npy, seeds.npy, grid.png.")]
    Strength = Annotated[
        float | None, option("Add A x the latent's raw-space decoder direction (latent units).", "none")
    ]
    Clamp = Annotated[
        float | None, option("Instead set the latent to V in the SAE's code, error term kept.", "none")
    ]
    Steps = Annotated[str | None, option("Steer only at steps 'a:b'.", "every step")]
    Region = Annotated[
        str | None,
        option(
            "Steer only the image tokens of one region of the token grid: left, right, top, bottom, "
            "inner-cols, outer-cols, inner-rows, outer-rows, diagonal, antidiagonal (or all); or A/B, two "
            "disjoint ones, for a push-pull: --strength added on A, subtracted on B (left/right moves ink right).",
            "every token",
        ),
    ]
    Labels = Annotated[str | None, option("Class labels: cycle, random, '3,5,7', '0-9'.", "the store's")]
    Prompts = Annotated[Path | None, option("Text models: a file of prompts, one a line.", "the store's")]
    Rows = Annotated[str, typer.Option(help="CFG rows steered: both or cond.")]
    NumSamples = Annotated[int, typer.Option(min=1, help="Images.")]
    Model = Annotated[str | None, option("Pipeline.", "the SAE's store's model")]
    Overwrite = Annotated[bool, overwrite("an earlier steer in --out")]


class Export:
    """`tide export`'s and `tide import`'s options."""

    Out = Annotated[str, typer.Option(help="Folder to write (cfg.json, sae_weights.safetensors).")]
    Format = Annotated[str, typer.Option("--format", help="Only saelens (SAELens 6, `SAE.load_from_disk`).")]
    Timestep = Annotated[
        float | None,
        option(
            "Export the SAE as it acts at this scheduler timestep (exact there). Needed for SAEs with "
            "per-timestep means (all that `tide train` writes) and for tide SAEs.",
            "none: only an SAE that is the same at every timestep",
        ),
    ]
    Overwrite = Annotated[bool, overwrite("a SAELens export in --out")]
    Folder = Annotated[Path, typer.Argument(help="A SAELens SAE folder (cfg.json, sae_weights.safetensors).")]
    Store = Annotated[str, typer.Option(help="The tide store whose activations the SAE reads.")]
    ImportOut = Annotated[str, typer.Option(help="The tide SAE folder to write.")]
    ImportOverwrite = Annotated[bool, overwrite("an earlier `tide import` in --out")]
    Array = Annotated[str | None, option("Its activation array, e.g. resid_l03.", "metadata.hook_name")]


class Features:
    """`tide features`' options."""

    Out = Annotated[str, typer.Option(help="Folder for the report: index.html, latents/, features.json.")]
    Split = Annotated[
        str, typer.Option(help="val: the SAE's held-out samples; all: every done sample (training ones too).")
    ]
    TopK = Annotated[int, typer.Option(min=1, help="Top activating rows kept per latent.")]
    Buckets = Annotated[int, typer.Option(min=1, help="Timestep buckets of the per-bucket AUROC.")]
    MaxPages = Annotated[
        int,
        typer.Option(
            min=0,
            help="Latent pages: the alive latents with the best AUROC, at most this many (0: every alive one).",
        ),
    ]
    Images = Annotated[int, typer.Option(min=1, help="Top samples pictured per latent page.")]
    Causal = Annotated[
        int,
        typer.Option(
            min=0,
            help="Top samples per page redrawn with the latent off and scaled up (the causal section; 0 skips it).",
        ),
    ]
    CausalScale = Annotated[
        float,
        typer.Option(min=1, help="Factor the latent is scaled by in the causal section's scaled-up redraw."),
    ]
    Model = Annotated[
        str | None,
        option("Pipeline folder to redraw images with when the store has none.", "the recorded one"),
    ]
    BatchSize = Annotated[int, typer.Option(min=1, help="Rows per SAE forward pass.")]
    Overwrite = Annotated[bool, overwrite("a previous report in --out")]


class Demo:
    """`tide demo-model`'s subcommands' options."""

    Model = Annotated[Path | None, option("Demo pipeline folder.", "harvest/demo/digits-dit (shipped)")]
    Out = Annotated[str | None, option("Pipeline folder to write.", "harvest/demo/digits-dit (shipped)")]
    Steps = Annotated[int | None, option("Optimiser steps.", "the shipped model's")]
    Seed = Annotated[int | None, option("Seed of weights, data order, noise and label dropout.", 0)]
    LabelBlock = Annotated[
        int | None,
        option(
            "Feed the label to this block only; downstream of it the class lives in the residual stream alone.",
            "every block and the output layer, as in DiT-XL/2 and the shipped model",
        ),
    ]
    Overwrite = Annotated[bool, overwrite("an existing folder")]
    PerClass = Annotated[int, typer.Option(min=1, help="Samples generated per class.")]
    NumSteps = Annotated[int, typer.Option(min=1, help="Denoising steps.")]
    GuidanceScale = Annotated[float | None, option("CFG scale.", "the model's")]
    EvalSeed = Annotated[int, typer.Option(help="Sample i uses seed + i; also seeds the classifier's split.")]
    GridOut = Annotated[Path, typer.Option(help="PNG to write.")]
    PerRow = Annotated[int, typer.Option(min=1, help="Samples per class (one row per class).")]
    GridSeed = Annotated[int, typer.Option(help="Sample i uses seed + i.")]


ReferenceReadme = Annotated[
    Path | None,
    option("Rewrite the table between the config-reference markers of this file instead.", "none: print it"),
]

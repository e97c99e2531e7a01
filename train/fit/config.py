"""The training configuration: one frozen, validated model, built from a config file plus CLI flags.

`TrainConfig.specs(meta)` turns it into the list of SAEs trained side by side on the same batches: every
combination of layer x arch x k (relu, which has no k, gets one), all at the same width. The
architectures and their hyperparameters (`ArchOptions`, inherited) come from train/sae/archs.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator
from tide.store.limits import LearningRate, Seed
from tide.store.open import as_location
from tide.store.outputs import local_out
from tide.store.schema import StoreMeta, act_name
from tide.train.sae.archs import ARCHITECTURES, ArchName, ArchOptions
from tide.train.sae.model import SAEConfig

DEFAULT_WARMUP = 50
"""warmup_steps when not given, unless max_steps is this or less (then max_steps // 10)."""

# Fields that say how a run goes, not what it computes: they may change between a kill and its resume.
RUN_ONLY_FIELDS = frozenset(
    {
        "store",
        "out",
        "overwrite",
        "device",
        "progress",
        "log_every",
        "checkpoint_every",
        "read_threads",
        "rank_timeout",
    }
)


class SAESpec(NamedTuple):
    """One SAE of a run: which activation array it reads and its architecture."""

    name: str
    """Folder name of its checkpoint, e.g. resid_l03-tide-k16."""
    array: str
    """Activation array it trains on, e.g. resid_l03."""
    sae: SAEConfig
    layer: int
    """Block index of the array (for --init-modulation adaln: which adaLN reads it)."""


def _comma_list(v: Any) -> Any:
    return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v


class TrainConfig(ArchOptions):
    """Everything that defines a training run. Saved next to the SAEs; a resume must match it."""

    # use_attribute_docstrings: the docstring under each field is its description (docs/settings.md).
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    store: Path | str = Path("runs/digits.zarr")
    """The tide store to train on (`tide harvest --out`)."""
    out: Path = Path("runs/saes")
    """Folder for the SAEs, the metrics and the resume state."""
    site: Literal["resid", "delta", "attn", "mlp"] = "resid"
    """Capture site of the activations."""
    layers: str = "middle"
    """Which stored layers get SAEs: 'middle' (the middle one of those stored), 'all', or a comma list."""
    branch: Literal["cond", "uncond"] = "cond"
    """Classifier-free-guidance branch, for stores that hold both."""
    # Read as `arch`, the option's name (`--arch`), or as `archs`, the field's name, which saved
    # train_config.json files, sae.json and the resume identity keep using.
    archs: tuple[ArchName, ...] = Field(
        ("tide", "topk"),
        validation_alias=AliasChoices("arch", "archs"),
        description=f"Architectures trained side by side (comma list): {', '.join(ARCHITECTURES)}.",
    )
    k: tuple[int, ...] = (16,)
    """Active latents per row (comma list for a sweep); every arch but relu gets one SAE per k (jumprelu: the L0
    it starts at, unless jumprelu_init_threshold is set; its l0_coeff decides where it goes)."""
    expansion: int = Field(8, gt=0)
    """Width F = expansion * d_model, unless num_latents is given."""
    num_latents: int | None = Field(None, gt=0)
    """Width F, overriding expansion."""
    init_modulation: Literal["zero", "adaln"] = "zero"
    """tide SAEs' timestep modulation at step 0: 'zero' (its last layer is zero, so a tide SAE starts as the
    topk SAE) or 'adaln' (copied from the source DiT's adaLN that reads the activations, loaded from the
    store's recorded model folder; train/sae/adaln.py). 'zero' is the default because on the demo model 'adaln'
    reconstructs no better (worse on the middle layer) and it needs the model folder (train/RESULTS.md)."""
    dead_after_rows: int = Field(250_000, gt=0)
    """A latent counts as dead (and AuxK revives it) after this many training rows without firing."""
    batch_size: int = Field(4096, gt=0)
    """Rows (tokens) per optimiser step."""
    lr: LearningRate = 1e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = Field(DEFAULT_WARMUP, ge=0)
    """Optimiser steps of linear warm-up from 0 to lr. When not given and max_steps is 50 or less, it is
    max_steps // 10, so that a short run gets the steps it asked for."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up, down to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of lr."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (0: sparsity already regularises; decay would shrink the decoder's unit rows)."""
    epochs: int = Field(2, gt=0)
    """Passes over the training split."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimiser steps instead (the schedule is sized to it)."""
    val_fraction: float = Field(0.1, ge=0, lt=1)
    """Fraction of sample chunks (whole harvest batches of images) held out for evaluation."""
    split_seed: Seed = 0
    """Seed of the choice of held-out sample chunks."""
    steps: str = "all"
    """Stored steps to train on: 'all' or a range 'start:stop' of stored step positions."""
    stratify_steps: bool = False
    """Give every batch the stored steps in equal shares (see train/fit/data.py)."""
    window_rows: int = Field(1 << 17, gt=0)
    """Rows shuffled together: chunks are read in windows this large and every window is permuted."""
    read_threads: int | None = Field(None, gt=0)
    """Threads reading (checking, decompressing) chunks in the background; default one per core this process
    may use (os.sched_getaffinity)."""
    seed: Seed = 0
    """Seeds the SAEs' initial weights and the data order."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ..."""
    amp: bool = True
    """bfloat16 autocast on CUDA (ignored on CPU)."""
    log_every: int = Field(20, gt=0)
    """Optimiser steps between metrics lines (and progress-bar updates)."""
    checkpoint_every: int = Field(50, gt=0)
    """Optimiser steps between checkpoints (one is also written at the end)."""
    eval_buckets: int = Field(10, gt=0)
    """Per-timestep evaluation after training: stored steps grouped into at most this many buckets."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace a finished run, or one with another configuration, in out."""
    rank_timeout: float = Field(600.0, gt=0)
    """Under torchrun: seconds a rank waits for the others at any exchange before every rank stops with an
    error, so that a stuck or stopped rank fails the run instead of hanging it (train/fit/distributed.py)."""

    @model_validator(mode="before")
    @classmethod
    def _short_run_warmup(cls, data: Any) -> Any:
        # Only where the default would be refused below (warmup_steps >= max_steps), so the warm-up of every
        # configuration that was valid before, and with it the resume identity of saved runs, is unchanged.
        # An explicit warmup_steps is never replaced: given both, an inconsistency stays an error.
        if isinstance(data, dict) and "warmup_steps" not in data:
            max_steps = data.get("max_steps")
            if type(max_steps) is int and 0 < max_steps <= DEFAULT_WARMUP:
                data = {**data, "warmup_steps": max_steps // 10}
        return data

    @field_validator("store", mode="before")
    @classmethod
    def _location(cls, value: Any) -> Any:
        # A URL stays a string (Path would fold `s3://b/x` into `s3:/b/x`); anything else is a Path.
        return as_location(value) if isinstance(value, str | Path) else value

    @field_validator("out", mode="before")
    @classmethod
    def _local_out(cls, value: Any) -> Any:
        # Before Path folds `s3://b/x` into a local `s3:/b/x`: a run folder is local (store/outputs.py).
        return local_out(value, "train", option="") if isinstance(value, str | Path) else value

    @field_validator("archs", "k", "matryoshka_prefixes", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _comma_list(v)

    @field_validator("archs")
    @classmethod
    def _archs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"arch is empty; choose from {', '.join(ARCHITECTURES)}")
        return tuple(dict.fromkeys(v))

    @field_validator("k")
    @classmethod
    def _k(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or min(v) < 1:
            raise ValueError(f"k={list(v)} must be positive integers, e.g. 16 or '8,16,32'")
        return tuple(dict.fromkeys(v))

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str) -> str:
        v = v.replace(" ", "")
        if v not in ("middle", "all") and not re.fullmatch(r"\d+(,\d+)*", v):
            raise ValueError(
                f"layers={v!r} is not 'middle', 'all' or a comma list of layer indices like '2,3'"
            )
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: str) -> str:
        v = v.replace(" ", "")
        m = re.fullmatch(r"(\d*):(\d*)", v)
        if v != "all" and (m is None or (m[1] and m[2] and int(m[1]) >= int(m[2]))):
            raise ValueError(f"steps={v!r} is not 'all' or a range 'start:stop' of stored steps, e.g. '0:25'")
        return v

    @model_validator(mode="after")
    def _cross(self) -> TrainConfig:
        if self.init_modulation == "adaln" and not any(ARCHITECTURES[a].modulated for a in self.archs):
            raise ValueError(
                f"init_modulation='adaln' initialises tide SAEs, but arch={list(self.archs)} has none; add "
                "tide (or another tide-* arch) to arch or leave init_modulation at 'zero'"
            )
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be below max_steps={self.max_steps}; lower warmup_steps"
            )
        return self

    def step_range(self, num_steps: int) -> tuple[int, int]:
        """[start, stop) of stored step positions, checked against the store's S."""
        if self.steps == "all":
            return 0, num_steps
        a, b = self.steps.split(":")
        lo, hi = int(a or 0), int(b) if b else num_steps
        if lo >= num_steps or hi > num_steps:
            # Refused rather than cut to the store: a run recorded as '0:100' would not say what it trained on.
            raise ValueError(
                f"steps={self.steps!r} reaches past the store's {num_steps} stored steps (0..{num_steps - 1}); "
                f"give a range inside them, such as '{min(lo, num_steps - 1)}:{num_steps}', or 'all'"
            )
        return lo, hi

    def layer_list(self, meta: StoreMeta) -> list[int]:
        """The layers to train on, checked against the store's."""
        if self.layers == "all":
            return list(meta.layers)
        if self.layers == "middle":
            return [meta.layers[len(meta.layers) // 2]]  # of 6 blocks, block 3; of 12, block 6
        want = [int(p) for p in self.layers.split(",")]
        missing = [layer for layer in want if layer not in meta.layers]
        if missing:
            raise ValueError(
                f"layer(s) {missing} are not in the store; it holds layers {meta.layers} (of {meta.num_layers} "
                f"blocks). Pick from those with --layers, or harvest the others with `tide harvest --layers`"
            )
        return sorted(set(want))

    def specs(self, meta: StoreMeta) -> list[SAESpec]:
        """Every SAE of the run, checked against the store (site, layers, branch, width)."""
        if self.site not in meta.sites:
            raise ValueError(
                f"site {self.site!r} is not in the store; it holds sites {meta.sites}. Pick one with --site, "
                f"or harvest it with `tide harvest --sites {self.site}`"
            )
        if self.branch not in meta.branches:
            raise ValueError(f"branch {self.branch!r} is not in the store; it holds {meta.branches}")
        width = self.num_latents or self.expansion * meta.d_model
        with_k = [a for a in self.archs if ARCHITECTURES[a].uses_k]
        too_big = [k for k in self.k if k > width and with_k]
        if too_big:
            raise ValueError(
                f"k={too_big} exceeds the SAE width num_latents={width} (d_model {meta.d_model}"
                + ("" if self.num_latents else f" x expansion {self.expansion}")
                + "); lower --k or raise --expansion / --num-latents"
            )
        specs = []
        for layer in self.layer_list(meta):
            array = act_name(self.site, layer, self.branch)
            for arch in self.archs:
                cls = ARCHITECTURES[arch]
                for k in self.k if cls.uses_k else self.k[:1]:
                    name = f"{array}-{arch}" + (f"-k{k}" if cls.uses_k else "")
                    sae = SAEConfig(
                        arch=arch,
                        d_model=meta.d_model,
                        num_latents=width,
                        k=min(k, width),
                        dead_steps_threshold=math.ceil(self.dead_after_rows / self.batch_size),
                        num_train_timesteps=_num_train_timesteps(meta),
                        includes_max_timestep=_flow_matching(meta),
                        **{f: getattr(self, f) for f in cls.fields},
                    )
                    specs.append(SAESpec(name, array, sae, layer))
        return specs

    def identity(self) -> dict[str, Any]:
        """The fields that define the result (what a resume must match)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RUN_ONLY_FIELDS}


def warmup_note(cfg: TrainConfig, given: set[str] | frozenset[str]) -> str | None:
    """What `tide train` says when the warm-up is not the default and the user did not set it: the short-run
    rule chose it (max_steps // 10). None when there is nothing to say."""
    if "warmup_steps" in given or cfg.warmup_steps == DEFAULT_WARMUP:
        return None
    return (
        f"note: warm-up of {cfg.warmup_steps} steps (max_steps // 10): the default {DEFAULT_WARMUP} does not "
        f"fit in max_steps={cfg.max_steps}; set --warmup-steps to choose"
    )


def _num_train_timesteps(meta: StoreMeta) -> int:
    return int(meta.scheduler.config.get("num_train_timesteps", 1000))


def _flow_matching(meta: StoreMeta) -> bool:
    """Flow-matching schedulers' timesteps are sigma x num_train_timesteps, so the first is exactly 1000.0."""
    return "FlowMatch" in meta.scheduler.class_name

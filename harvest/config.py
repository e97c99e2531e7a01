"""The harvest configuration: one frozen, validated model, built from a config file plus CLI flags."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from tide.store.limits import Seed
from tide.store.open import as_location
from tide.store.schema import DEFAULT_CODEC, SITES, Codec

DEMO_MODEL = Path(__file__).resolve().parent / "demo" / "digits-dit"
"""The shipped default model: a small class-conditional DiT trained on digits (see its README)."""

# Fields that describe how a harvest runs, not what it stores: they may change between a crash and its resume.
RUN_ONLY_FIELDS = frozenset({"out", "overwrite", "device", "progress", "writer_queue"})
# Fields newer than some stores: the value a store made before the field existed is taken to have, so that
# such a store still resumes.
UNRECORDED = {"cpu_threads": 1}


class HarvestConfig(BaseModel):
    """Everything that defines a harvest. Stored in the cache; a resume must match it field by field."""

    # use_attribute_docstrings: the docstring under each field is its description (docs/settings.md).
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    model: str = str(DEMO_MODEL)
    """A diffusers pipeline folder, or a hub id such as facebook/DiT-XL-2-256 (needs network)."""
    revision: str | None = None
    """Hub revision to load, for hub ids."""
    out: Path | str = Path("runs/digits.zarr")
    """Where the Zarr store goes."""
    num_samples: int = Field(500, gt=0)
    """Images to generate."""
    num_steps: int = Field(50, gt=0)
    """Denoising steps of the sampling schedule."""
    steps: str = "all"
    """Which steps to store: 'all', a comma list of step indices ('0,10,49'), or a Python-style slice
    'start:stop:stride' of the num_steps steps ('::5', '10:20', '10:40:2')."""
    layers: str = "all"
    """Which blocks to capture: 'all' or a comma list of indices (negative counts from the end)."""
    sites: tuple[str, ...] = ("resid",)
    """Capture sites per block: resid (block output), delta (output minus input), attn, mlp."""
    token_fraction: float = 0.25
    """Fraction of image tokens stored per (sample, step), drawn at random; 1 keeps all.
    TIDE kept 1/16 of PixArt's 256 tokens (16); 0.25 of the demo model's 64 tokens is the same 16."""
    guidance_scale: float | None = None
    """Guidance scale, >= 1; default: the model's recommended value. Classifier-free guidance (1 disables it),
    except FLUX.1-dev, which takes it as a model input (distilled guidance, no CFG batch)."""
    cfg_branch: Literal["cond", "uncond", "both"] = "cond"
    """Which CFG branch's activations to store."""
    labels: str = "cycle"
    """Class labels: 'cycle' (i mod num_classes), 'random' (seeded by seed), a list '3,5,7' (cycled),
    or a range '0-9' (cycled)."""
    prompts: Path | None = None
    """Text-conditional models: a file with one prompt per line (cycled over samples)."""
    prompt_embeds: Path | None = None
    """Text-conditional models: precomputed prompt embeddings (safetensors with prompt_embeds (P, L, C),
    prompt_attention_mask (P, L), negative_prompt_embeds (1, L, C), negative_prompt_attention_mask (1, L);
    SD3/FLUX: prompt_embeds, pooled_prompt_embeds (P, C2), and for CFG negative_prompt_embeds and
    negative_pooled_prompt_embeds (1, C2), no masks), used instead of the pipeline's text encoder."""
    height: int | None = Field(None, gt=0)
    """Image height in pixels (a multiple of the VAE factor x patch size); default: the pipeline's default."""
    width: int | None = Field(None, gt=0)
    """Image width in pixels (a multiple of the VAE factor x patch size); default: the pipeline's default."""
    seed: Seed = 0
    """Sample i has seed `seed + i`; labels='random' draws from this seed too."""
    batch_size: int = Field(50, gt=0)
    """Samples per forward pass; also the store's chunk size along samples (fixed for a store)."""
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    """Storage dtype of activations. bfloat16 is stored as raw uint16 bits (zarr has no bfloat16)."""
    codec: Codec = DEFAULT_CODEC
    """Chunk compression: none (reads at raw speed; the default, measured in store/FORMAT.md), blosc-zstd
    (level 1, byte shuffle: 1.2x smaller at float16, 1.5x at bfloat16, for sharing), zstd."""
    model_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype the transformer runs in."""
    cpu_threads: int = Field(1, gt=0)
    """torch threads of every model call when the model runs on the CPU. Part of the store: a sum split over
    another number of threads rounds differently, so every process that writes the store (a resume, each dask
    worker) runs with this count and the bytes do not depend on the layout. For more cores, use --workers N."""
    save_images: bool = False
    """Also store the final images (decoded by the VAE if the pipeline has one) as uint8."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ..."""
    overwrite: bool = False
    """Replace an existing store whose configuration differs."""
    progress: bool = True
    """Show a progress bar."""
    writer_queue: int = Field(4, gt=0)
    """Chunk writes that may wait in the background writer before the model pauses."""

    @field_validator("out", mode="before")
    @classmethod
    def _location(cls, value: Any) -> Any:
        # A URL stays a string (Path would fold `s3://b/x` into `s3:/b/x`); anything else is a Path.
        return as_location(value) if isinstance(value, str | Path) else value

    @field_validator("token_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"token_fraction={v} is outside (0, 1]; use e.g. 0.0625 for 1/16 of the tokens")
        return v

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _guidance(cls, v: Any) -> Any:
        # Before pydantic's own finite-number check, so that NaN gets this message too.
        try:
            number = float(v)
        except (TypeError, ValueError):
            return v  # None, or not a number: pydantic's own message
        if not (math.isfinite(number) and number >= 1):
            raise ValueError(
                f"guidance_scale={v} is not a CFG scale: it must be a finite number >= 1, where 1 means no "
                "classifier-free guidance; use e.g. 4, or 1 to sample without guidance"
            )
        return v

    @field_validator("sites", mode="before")
    @classmethod
    def _sites(cls, v: Any) -> tuple[str, ...]:
        items = [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v)
        if items == ["all"]:
            return SITES
        bad = [s for s in items if s not in SITES]
        if bad or not items:
            raise ValueError(f"unknown site(s) {bad or items}; choose from {', '.join(SITES)} (or 'all')")
        return tuple(dict.fromkeys(items))

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: str, info: ValidationInfo) -> str:
        v = v.replace(" ", "")
        m = re.fullmatch(r"(\d*):(\d*)(?::(\d*))?", v)
        if v != "all" and m is None and not re.fullmatch(r"\d+(,\d+)*", v):
            raise ValueError(
                f"steps={v!r} is not 'all', a comma list like '0,10,49', or a slice 'start:stop:stride' "
                "like '::5' or '10:40'"
            )
        if m is not None and m[3] not in (None, "") and int(m[3]) == 0:
            raise ValueError(
                f"steps={v!r} has stride 0; the stride after the second ':' must be >= 1, e.g. '::5'"
            )
        if "num_steps" in info.data:  # num_steps is declared first, so it is validated by now (if valid)
            cls.step_indices_of(v, info.data["num_steps"])  # refuses an empty selection or a step too far
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str) -> str:
        if v != "all" and not re.fullmatch(r"-?\d+(,-?\d+)*", v.replace(" ", "")):
            raise ValueError(f"layers={v!r} is not 'all' or a comma list of block indices like '0,5,-1'")
        return v.replace(" ", "")

    @model_validator(mode="after")
    def _cross(self) -> HarvestConfig:
        if self.prompts is not None and self.labels != "cycle":
            raise ValueError("labels and prompts are both set; a model is either class- or text-conditional")
        if self.guidance_scale is not None and self.guidance_scale <= 1 and self.cfg_branch != "cond":
            raise ValueError(
                f"cfg_branch={self.cfg_branch!r} needs classifier-free guidance, but guidance_scale="
                f"{self.guidance_scale} disables it; set guidance_scale > 1 or cfg_branch='cond'"
            )
        return self

    def step_indices(self, num_steps: int) -> list[int]:
        """Positions in the schedule to store."""
        return self.step_indices_of(self.steps, num_steps)

    @staticmethod
    def step_indices_of(steps: str, num_steps: int) -> list[int]:
        """Positions in a schedule of num_steps that a `steps` value selects; never empty."""
        if steps == "all":
            return list(range(num_steps))
        if ":" in steps:
            start, stop, stride = (int(p) if p else None for p in (steps.split(":") + [""])[:3])
            idx = list(range(num_steps))[slice(start, stop, stride)]
            if not idx:
                raise ValueError(
                    f"steps={steps!r} selects no step of num_steps={num_steps} (steps 0..{num_steps - 1}); "
                    "give a start below num_steps and a stop above it, e.g. '::5' or '0:10'"
                )
            return idx
        idx = sorted({int(p) for p in steps.split(",")})
        if idx[-1] >= num_steps:
            raise ValueError(
                f"steps={steps!r} asks for step {idx[-1]} but num_steps={num_steps} (steps 0..{num_steps - 1})"
            )
        return idx

    def layer_indices(self, num_layers: int) -> list[int]:
        """Block indices to capture, resolved against the model's depth."""
        if self.layers == "all":
            return list(range(num_layers))
        raw = [int(p) for p in self.layers.split(",")]
        bad = [i for i in raw if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(
                f"layers {bad} out of range: the model has {num_layers} blocks (0..{num_layers - 1}, "
                f"or -{num_layers}..-1 from the end)"
            )
        return sorted({i % num_layers for i in raw})

    def identity(self) -> dict[str, Any]:
        """The fields that define the store's content (what a resume must match)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RUN_ONLY_FIELDS}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or TOML harvest/train config into a plain dict; syntax errors name the file and line."""
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist (or is not a file)")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        kind, example = (
            ("TOML", "num_samples = 100") if path.suffix == ".toml" else ("YAML", "num_samples: 100")
        )
        # YAML's messages span lines and call the text "<unicode string>"; keep the error one paragraph.
        detail = " ".join(str(e).replace('in "<unicode string>", ', "at ").split())
        raise ValueError(
            f"config file {path} is not valid {kind}: {detail}. Fix that line; keys are option names with "
            f"underscores, one `{example}` a line"
        ) from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value, not {type(data).__name__}")
    return data

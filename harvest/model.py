"""Load a diffusers pipeline folder (or hub id) into the parts the harvester drives itself.

Components are loaded one by one with `from_pretrained`, not through a pipeline class, so that a
pixel-space model with no VAE (like the shipped demo) loads the same way as DiT-XL or PixArt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tide.harvest.backbones import DEFAULT_SAMPLING, GuidanceKind, Sampling
from tide.harvest.capture import REGISTRY, Arch, arch_for
from tide.store.fingerprint import fingerprint
from tide.store.schema import ModelInfo, SchedulerInfo
from torch import nn


@contextmanager
def cpu_threads(device: torch.device, n: int) -> Iterator[None]:
    """Run the block's torch ops on exactly `n` intra-op threads when `device` is the CPU; the count before is
    restored after. MKL's sgemm splits a small batch's sums differently on 1 and 2 threads (measured: 0.08% of
    the demo model's float16 values differ), so a store's bytes would depend on how many threads wrote it."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMPONENTS = ["model_index.json", "transformer/*", "scheduler/*", "vae/*", "text_encoder/*", "tokenizer/*"]


@dataclass
class LoadedModel:
    transformer: nn.Module
    scheduler: Any
    arch: Arch
    info: ModelInfo
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    default_guidance_scale: float = 1.0
    id2label: dict[str, str] | None = None
    height: int | None = None
    """Image height in pixels; None: the pipeline's default."""
    width: int | None = None
    """Image width in pixels; None: the pipeline's default."""

    @property
    def sampling(self) -> Sampling:
        return self.arch.sampling or DEFAULT_SAMPLING

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: 2^(VAE levels - 1), as the pipelines compute it; 1 without a VAE."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(H, W) of the unpacked latent."""
        default = self.sampling.default_latent_size(self.transformer.config)
        f = self.vae_scale_factor
        return tuple(default if px is None else px // f for px in (self.height, self.width))

    def size_multiple(self) -> int:
        """--height/--width must be multiples of this: a whole number of image tokens."""
        return self.vae_scale_factor * self.sampling.patch(self.transformer.config)

    def guidance_kind(self, guidance_scale: float) -> GuidanceKind:
        """How `guidance_scale` is applied: a CFG batch, a distilled-guidance input, or not at all."""
        return self.sampling.guidance_kind(self.transformer.config, guidance_scale)

    def set_schedule(self, num_steps: int, device: str | torch.device | None = None) -> None:
        """Set the scheduler's timesteps exactly as the model's pipeline does."""
        self.sampling.schedule(self.scheduler, self.transformer.config, self.latent_hw, num_steps, device)

    @property
    def num_classes(self) -> int | None:
        return (
            self.transformer.config.get("num_embeds_ada_norm") if self.arch.conditioning == "class" else None
        )

    @property
    def num_layers(self) -> int:
        return len(self.arch.blocks(self.transformer))

    @property
    def d_model(self) -> int:
        cfg = self.transformer.config
        return cfg.num_attention_heads * cfg.attention_head_dim

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.sampling.latent_channels(self.transformer.config), *self.latent_hw)

    @property
    def num_tokens(self) -> int:
        c, h, w = self.latent_shape
        p = self.sampling.patch(self.transformer.config)
        return (h // p) * (w // p)

    def scheduler_info(self) -> SchedulerInfo:
        return SchedulerInfo(
            class_name=type(self.scheduler).__name__, config=_jsonable(dict(self.scheduler.config))
        )


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def resolve(model: str, revision: str | None = None) -> tuple[Path, str | None]:
    """A local pipeline folder for `model` (a path, or a hub id fetched into the HF cache)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"--model {model} is a file; give a diffusers pipeline folder (with model_index.json, "
                "transformer/ and scheduler/) or a hub id like facebook/DiT-XL-2-256"
            )
        return path.resolve(), revision
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise ValueError(
            f"model folder {model} does not exist; give an existing diffusers pipeline folder or a hub id "
            "like facebook/DiT-XL-2-256"
        )
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(model, revision=revision, allow_patterns=_COMPONENTS))
    except Exception as e:
        raise ValueError(
            f"could not fetch {model!r} from the Hugging Face hub ({type(e).__name__}: {e}). Without network "
            "access, download the pipeline elsewhere and pass its local folder to --model"
        ) from e
    return local, local.name if re.fullmatch(r"[0-9a-f]{40}", local.name) else revision


def _component_class(folder: Path, sub: str, config_name: str) -> str | None:
    cfg = folder / sub / config_name
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("_class_name")


def _transformer_and_scheduler(folder: Path, device: str | torch.device, dtype: torch.dtype):
    """(transformer class name, transformer in eval mode on `device`, scheduler) of a pipeline folder."""
    import diffusers

    t_cls = _component_class(folder, "transformer", "config.json")
    s_cls = _component_class(folder, "scheduler", "scheduler_config.json")
    if t_cls is None or s_cls is None:
        missing = [
            n
            for n, c in (("transformer/config.json", t_cls), ("scheduler/scheduler_config.json", s_cls))
            if c is None
        ]
        raise ValueError(
            f"{folder} is not a supported diffusers pipeline folder: missing {', '.join(missing)}. Expected a "
            f"folder saved by a pipeline's save_pretrained, with a transformer of class {' or '.join(REGISTRY)}"
        )
    arch_for(t_cls)  # refuses an unsupported class before its weights are read
    try:
        transformer = getattr(diffusers, t_cls).from_pretrained(
            folder, subfolder="transformer", torch_dtype=dtype
        )
        scheduler = getattr(diffusers, s_cls).from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"could not load the transformer/scheduler from {folder}: {e}") from e
    transformer.to(device).eval().requires_grad_(False)
    return t_cls, transformer, scheduler


def _component(folder: Path, sub: str, device: str | torch.device, dtype: torch.dtype):
    """A diffusers model saved in `folder/sub` (the VAE), in eval mode on `device`; None when absent."""
    import diffusers

    cls = _component_class(folder, sub, "config.json")
    if cls is None:
        return None
    module = getattr(diffusers, cls).from_pretrained(folder, subfolder=sub, torch_dtype=dtype)
    return module.to(device).eval().requires_grad_(False)


def _text_encoder(folder: Path, device: str | torch.device, dtype: torch.dtype):
    """(text encoder, tokenizer) of a single-encoder pipeline folder (PixArt's T5)."""
    import transformers

    te_cls = json.loads((folder / "text_encoder" / "config.json").read_text())["architectures"][0]
    text_encoder = getattr(transformers, te_cls).from_pretrained(
        folder, subfolder="text_encoder", torch_dtype=dtype
    )
    text_encoder.to(device).eval().requires_grad_(False)
    return text_encoder, transformers.AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")


def load_model(
    model: str,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    height: int | None = None,
    width: int | None = None,
) -> LoadedModel:
    """Load transformer, scheduler and (if present) VAE and text encoder from a pipeline folder or hub id."""
    folder, revision = resolve(model, revision)
    t_cls, transformer, scheduler = _transformer_and_scheduler(folder, device, dtype)
    arch = arch_for(t_cls)
    index = (
        json.loads((folder / "model_index.json").read_text())
        if (folder / "model_index.json").is_file()
        else {}
    )
    vae = _component(folder, "vae", device, dtype)
    sampling = arch.sampling or DEFAULT_SAMPLING
    text_encoder = tokenizer = None
    if arch.conditioning == "prompt" and sampling.encodes_prompts and (folder / "text_encoder").is_dir():
        text_encoder, tokenizer = _text_encoder(folder, device, dtype)

    default_cfg = sampling.default_guidance or {"class": 4.0, "prompt": 4.5}[arch.conditioning]  # DiT, PixArt
    if sampling.guidance_kind(transformer.config, default_cfg) == "none":
        default_cfg = 1.0  # a model that takes no guidance (FLUX.1-schnell) samples without
    info = ModelInfo(
        id=model,
        path=str(folder),
        revision=revision,
        transformer_class=t_cls,
        transformer_config=_jsonable(dict(transformer.config)),
        fingerprint=fingerprint(transformer, dtype),
    )
    return LoadedModel(
        transformer=transformer,
        scheduler=scheduler,
        arch=arch,
        info=info,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        default_guidance_scale=float(index.get("tide_default_guidance_scale", default_cfg)),
        id2label=index.get("id2label"),
        height=height,
        width=width,
    )

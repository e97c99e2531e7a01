"""Flow-matching backbones: SD3/SD3.5 (MMDiT joint blocks) and FLUX.1 (double- then single-stream blocks).

Each is one `Arch` registry entry (harvest/capture.py) plus the sampling details its diffusers pipeline
applies (`Sampling`): how the schedule is set (shift, FLUX's resolution-dependent `mu`), how guidance
enters (a CFG batch for SD3, a model input for FLUX.1-dev, none for FLUX.1-schnell), the latent size and
the conditioning keys. DiT and PixArt use `Sampling()`'s defaults, which are what the DDPM-style loop did
before flow matching was added, so their results do not change.

Every block of these models returns `(encoder_hidden_states, hidden_states)` (diffusers 0.42,
JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock): the image stream is the second.
Their attention modules return `(image, text)` outputs; the `attn` site is the image one, before the
block's gate, like DiT's `attn1` output.

Shape key: B batch, C latent channels, H/W latent height/width, N image tokens, L text tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from tide.harvest.capture import Arch, Conditioning

GuidanceKind = Literal["cfg", "distilled", "none"]


def _cfg_guidance(config: Any, scale: float) -> GuidanceKind:
    return "cfg" if scale > 1 else "none"


def _default_schedule(
    scheduler: Any, config: Any, latent_hw: tuple[int, int], num_steps: int, device
) -> None:
    scheduler.set_timesteps(num_steps, device=device)


@dataclass(frozen=True)
class Sampling:
    """What a backbone's diffusers pipeline does around the transformer; defaults are DiT's and PixArt's."""

    guidance_kind: Callable[[Any, float], GuidanceKind] = _cfg_guidance
    """(transformer config, guidance scale) -> how the scale is applied."""
    default_guidance: float | None = None
    """The pipeline's default guidance scale; None: DiT's 4.0 / PixArt's 4.5 (harvest/model.py)."""
    schedule: Callable[[Any, Any, tuple[int, int], int, Any], None] = _default_schedule
    """(scheduler, transformer config, latent (H, W), num_steps, device): set the scheduler's timesteps."""
    latent_channels: Callable[[Any], int] = lambda config: config.in_channels
    """C of the unpacked latent the initial noise is drawn in."""
    patch: Callable[[Any], int] = lambda config: config.patch_size
    """Latent pixels per image token along each side."""
    default_latent_size: Callable[[Any], int] = lambda config: config.sample_size
    """Latent height = width when --height/--width are not given (the pipeline's default)."""
    embed_keys: tuple[str, ...] = ("prompt_embeds", "prompt_attention_mask")
    """Per-prompt tensors a --prompt-embeds file must hold."""
    negative_keys: tuple[str, ...] = ("negative_prompt_embeds", "negative_prompt_attention_mask")
    """Tensors of the negative prompt, needed for CFG."""
    encodes_prompts: bool = True
    """tide can run the folder's own text encoder (PixArt's T5); else --prompt-embeds is required."""
    encode: Callable[[Any, list[str], bool], dict[str, torch.Tensor]] | None = None
    """(model, prompts, with negative) -> --prompt-embeds tensors, by the pipeline's own encode_prompt, for
    a folder with text_encoder/; None: only --prompt-embeds."""


# --- SD3 / SD3.5 -----------------------------------------------------------------------------------------


def calculate_shift(
    image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    """FLUX/SD3's resolution-dependent shift `mu`, in the pipelines' own order of float operations."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _shift_args(scheduler: Any, seq_len: int, max_shift_default: float) -> dict[str, float]:
    c = scheduler.config
    mu = calculate_shift(
        seq_len,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", max_shift_default),
    )
    return {"mu": mu}


def _sd3_schedule(scheduler: Any, config: Any, latent_hw: tuple[int, int], num_steps: int, device) -> None:
    # As StableDiffusion3Pipeline: `shift` from the scheduler config; `mu` only with dynamic shifting.
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", None):
        p = config.patch_size
        kwargs = _shift_args(scheduler, (latent_hw[0] // p) * (latent_hw[1] // p), 1.16)
    scheduler.set_timesteps(num_steps, device=device, **kwargs)


def _text_pipeline(model: Any, pipeline_class: str) -> Any:
    """The folder's pipeline with its text encoders and tokenizers, sharing the loaded transformer (SD3 reads
    its config to pad a missing T5); components the folder lacks are passed as None, as the pipeline allows."""
    from pathlib import Path

    import diffusers

    folder = Path(model.info.path)
    optional = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "image_encoder")
    absent = {k: None for k in (*optional, "feature_extractor") if not (folder / k).is_dir()}
    cls = getattr(diffusers, pipeline_class)
    return cls.from_pretrained(
        folder,
        **{**absent, "transformer": model.transformer, "vae": None},
        torch_dtype=model.transformer.dtype,
    )


@torch.no_grad()
def _sd3_encode(model: Any, prompts: list[str], negative: bool) -> dict[str, torch.Tensor]:
    """StableDiffusion3Pipeline.encode_prompt on the folder's CLIP encoders (and T5 when present; without it
    the pipeline pads with zeros, as SD3 does), with its defaults: the negative prompt is ""."""
    pipe = _text_pipeline(model, "StableDiffusion3Pipeline")
    e, ne, p, np_ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=model.transformer.device,
        do_classifier_free_guidance=negative,
    )
    out = {"prompt_embeds": e, "pooled_prompt_embeds": p}
    if negative:  # one row per prompt, all of the same "": keep one
        out |= {"negative_prompt_embeds": ne[:1], "negative_pooled_prompt_embeds": np_[:1]}
    return out


@torch.no_grad()
def _flux_encode(model: Any, prompts: list[str], negative: bool) -> dict[str, torch.Tensor]:
    """FluxPipeline.encode_prompt on the folder's CLIP (pooled) and T5 (sequence, 512 tokens as the
    pipeline's default); FLUX takes no negative prompt (no CFG batch)."""
    pipe = _text_pipeline(model, "FluxPipeline")
    e, p, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=model.transformer.device)
    return {"prompt_embeds": e, "pooled_prompt_embeds": p}


def _sd3_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    # Embeddings from a file are float32; the model may run in bfloat16 (a no-op cast in float32).
    return model(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=cond.prompt_embeds.to(x.dtype),
        pooled_projections=cond.pooled_prompt_embeds.to(x.dtype),
        return_dict=False,
    )[0]


# --- FLUX.1 ----------------------------------------------------------------------------------------------

FLUX_DEFAULT_LATENT = 128
"""FluxPipeline.default_sample_size: 1024 px at the VAE's factor 8."""


def pack(x_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's 2x2 patches, row-major, as FluxPipeline._pack_latents."""
    b, c, h, w = x_BCHW.shape
    x = x_BCHW.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x_BNC: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for a latent of height h and width w."""
    b, n, c4 = x_BNC.shape
    x = x_BNC.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(N, 3) rotary position ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _flux_guidance(config: Any, scale: float) -> GuidanceKind:
    return "distilled" if config.guidance_embeds else "none"


def _flux_schedule(scheduler: Any, config: Any, latent_hw: tuple[int, int], num_steps: int, device) -> None:
    # As FluxPipeline: sigmas linspace(1, 1/n, n) and `mu` from the packed sequence length, always passed.
    if scheduler.config.get("stochastic_sampling", False):
        raise ValueError(
            "the scheduler has stochastic_sampling=True; tide keeps FLUX latents unpacked between steps, so its "
            "step noise would be drawn in another order than FluxPipeline's: set stochastic_sampling to false"
        )
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if scheduler.config.get("use_flow_sigmas", False):
        sigmas = None
    mu = _shift_args(scheduler, (latent_hw[0] // 2) * (latent_hw[1] // 2), 1.15)["mu"]
    if sigmas is None:
        scheduler.set_timesteps(num_steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    scheduler.set_begin_index(0)


def _flux_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Packs the (B, C, H, W) latent into tokens, runs FLUX, and unpacks its velocity to (B, C, H, W); the
    Euler step is elementwise, so stepping unpacked latents equals FluxPipeline's packed ones."""
    b, c, h, w = x.shape
    txt = cond.prompt_embeds.to(x.dtype)
    out = model(
        hidden_states=pack(x),
        timestep=t.to(x.dtype) / 1000,
        guidance=cond.guidance,
        pooled_projections=cond.pooled_prompt_embeds.to(x.dtype),
        encoder_hidden_states=txt,
        txt_ids=torch.zeros(txt.shape[1], 3, device=x.device, dtype=txt.dtype),
        img_ids=image_ids(h, w, x.device, x.dtype),
        return_dict=False,
    )[0]
    return unpack(out, h, w)


def _second(output: Any) -> torch.Tensor:
    """Joint blocks return (encoder_hidden_states, hidden_states): the image stream is the second."""
    return output[1]


def _first_if_pair(output: Any) -> torch.Tensor:
    """Joint attention returns (image, text) outputs; a feed-forward returns the image tensor itself."""
    return output[0] if isinstance(output, tuple) else output


_JOINT_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
_JOINT_NEGATIVE = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")

SD3 = Sampling(
    default_guidance=7.0,  # StableDiffusion3Pipeline's default
    schedule=_sd3_schedule,
    embed_keys=_JOINT_KEYS,
    negative_keys=_JOINT_NEGATIVE,
    encodes_prompts=False,
    encode=_sd3_encode,
)

FLUX = Sampling(
    guidance_kind=_flux_guidance,
    default_guidance=3.5,  # FluxPipeline's default; schnell ignores it
    schedule=_flux_schedule,
    latent_channels=lambda config: config.in_channels // 4,
    patch=lambda config: 2,
    default_latent_size=lambda config: FLUX_DEFAULT_LATENT,
    embed_keys=_JOINT_KEYS,
    negative_keys=(),
    encodes_prompts=False,
    encode=_flux_encode,
)


def joint_archs() -> dict[str, Arch]:
    """The registry entries of the flow-matching backbones."""
    from tide.harvest.capture import Arch

    joint = {"attn": "attn", "mlp": "ff"}
    return {
        "SD3Transformer2DModel": Arch(
            conditioning="prompt",
            blocks=lambda m: m.transformer_blocks,
            image_stream=_second,
            forward=_sd3_forward,
            submodules=joint,
            sub_stream=_first_if_pair,
            sampling=SD3,
        ),
        "FluxTransformer2DModel": Arch(
            conditioning="prompt",
            # One global index: the double-stream blocks first, then the single-stream ones.
            blocks=lambda m: [*m.transformer_blocks, *m.single_transformer_blocks],
            image_stream=_second,
            forward=_flux_forward,
            submodules=joint,
            sub_stream=_first_if_pair,
            single_stream_from=lambda m: len(m.transformer_blocks),
            sampling=FLUX,
        ),
    }


DEFAULT_SAMPLING = Sampling()
"""DiT's and PixArt's: a DDPM-style loop, CFG as a batch."""

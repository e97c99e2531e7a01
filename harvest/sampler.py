"""The denoising loop, unrolled as a generator that yields after every step.

Written out here rather than calling a diffusers pipeline so that capture hooks see every forward pass
and the caller can act between steps. The loop is the one diffusers' pipelines share: DDPM-style schedulers
(DiT, PixArt) scale the noise and the model input, flow-matching ones (SD3, FLUX) do neither; the scheduler's
step() reads the prediction as epsilon or velocity, and the model's own schedule, guidance and latent layout
come from its registry entry (harvest/backbones.py `Sampling`). Seeding follows store.schema.SEEDING: each sample owns one CPU
torch.Generator that draws its initial noise and then any scheduler noise, so a sample's trajectory does
not depend on which other samples share its batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import NamedTuple

import torch
from tide.harvest.capture import Conditioning
from tide.harvest.model import LoadedModel


class StepRecord(NamedTuple):
    """One denoising step, yielded after the model ran and the scheduler stepped."""

    index: int
    """Position in the schedule, 0 = first (noisiest) step."""
    timestep: float
    """The scheduler's timestep value passed to the model."""
    latents: torch.Tensor
    """(B, C, H, W) latents after this step."""


def initial_noise(shape: tuple[int, int, int], generators: list[torch.Generator]) -> torch.Tensor:
    """(B, C, H, W) float32 noise, sample i drawn from generators[i] on the CPU (device-independent)."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


class CfgRows(NamedTuple):
    """Which rows of the model batch belong to which CFG branch: the one place that decides it.

    With guidance the sampler runs 2B rows for B samples, conditional rows first: cond = [0, B), uncond =
    [B, 2B). Without guidance there are B rows, all conditional, and uncond is None.
    """

    cond: slice
    """Rows of the conditional branch."""
    uncond: slice | None
    """Rows of the unconditional branch; None without CFG."""


def cfg_rows(batch: int, use_cfg: bool) -> CfgRows:
    """The row layout of a model batch for `batch` samples (see CfgRows)."""
    return CfgRows(slice(0, batch), slice(batch, 2 * batch) if use_cfg else None)


def cfg_conditioning(model: LoadedModel, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
    """Stack conditional rows over unconditional ones, in the order cfg_rows lays out."""
    if uncond is None:
        return cond
    cat = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
    return Conditioning(
        class_labels=cat(cond.class_labels, uncond.class_labels),
        prompt_embeds=cat(cond.prompt_embeds, uncond.prompt_embeds),
        prompt_mask=cat(cond.prompt_mask, uncond.prompt_mask),
        pooled_prompt_embeds=cat(cond.pooled_prompt_embeds, uncond.pooled_prompt_embeds),
    )


def null_conditioning(model: LoadedModel, cond: Conditioning) -> Conditioning:
    """The unconditional counterpart of `cond`."""
    if cond.class_labels is not None:
        # diffusers' DiT label embedding keeps its null class at index num_classes.
        return Conditioning(class_labels=torch.full_like(cond.class_labels, model.num_classes))
    raise ValueError("text-conditional models need explicit negative prompt embeddings for CFG")


def denoise(
    model: LoadedModel,
    cond: Conditioning,
    generators: list[torch.Generator],
    num_steps: int,
    guidance_scale: float,
    uncond: Conditioning | None = None,
) -> Iterator[StepRecord]:
    """Run the sampler, yielding after each step. With guidance_scale > 1 the model sees 2B rows."""
    transformer, scheduler = model.transformer, model.scheduler
    device, dtype = transformer.device, transformer.dtype
    kind = model.guidance_kind(guidance_scale)
    use_cfg = kind == "cfg"
    if use_cfg and uncond is None:
        uncond = null_conditioning(model, cond)
    if kind == "distilled":  # FLUX.1-dev: the scale is a model input, as FluxPipeline passes it
        b = len(generators)
        cond = replace(cond, guidance=torch.full((b,), guidance_scale, dtype=torch.float32, device=device))
    both = cfg_conditioning(model, cond, uncond if use_cfg else None)
    channels = model.latent_shape[0]

    model.set_schedule(num_steps, device=device)
    latents = initial_noise(model.latent_shape, generators).to(device)
    # DDPM-style schedulers scale the noise and the model input; flow-matching ones have neither step.
    if hasattr(scheduler, "init_noise_sigma"):
        latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x = torch.cat([latents, latents]) if use_cfg else latents
        if hasattr(scheduler, "scale_model_input"):
            x = scheduler.scale_model_input(x, t)
        x = x.to(dtype)
        t_batch = t.expand(x.shape[0]).to(device)
        with torch.inference_mode():
            out = model.arch.forward(transformer, x, t_batch, both).float()
        # Learned-sigma models (DiT-XL) predict (eps, variance); the sampler uses eps, as DiTPipeline does.
        if out.shape[1] == 2 * channels:
            out = out[:, :channels]
        if use_cfg:  # the same mix for an epsilon (DDPM) and a velocity (flow matching) prediction
            rows = cfg_rows(latents.shape[0], True)
            out = out[rows.uncond] + guidance_scale * (out[rows.cond] - out[rows.uncond])
        latents = scheduler.step(out, t, latents, generator=generators, return_dict=False)[0]
        yield StepRecord(index=i, timestep=float(t), latents=latents)


@torch.no_grad()
def to_images(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 images: VAE-decoded when the pipeline has a VAE, else the pixels themselves."""
    x = latents
    if model.vae is not None:
        cfg = model.vae.config
        x = x / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
        x = model.vae.decode(x.to(model.vae.dtype), return_dict=False)[0].float()
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


def generate(
    model: LoadedModel, cond: Conditioning, seeds: list[int], num_steps: int, guidance_scale: float
) -> torch.Tensor:
    """Final latents (B, C, H, W) for a batch, without capture: the plain sampling baseline."""
    latents = None
    for rec in denoise(model, cond, make_generators(seeds), num_steps, guidance_scale):
        latents = rec.latents
    return latents

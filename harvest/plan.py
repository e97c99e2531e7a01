"""What a harvest will store: the store's metadata and per-sample arrays (labels, seeds, prompt
embeddings), planned from a configuration and a loaded model, with every input checked before anything runs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tide.harvest.capture import check_sites
from tide.harvest.config import HarvestConfig
from tide.harvest.model import LoadedModel, cpu_threads
from tide.harvest.target import HarvestError
from tide.store.schema import StoreMeta, TokenSampling, choose_chunks, kept_tokens, numpy_storage_dtype

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _labels(cfg: HarvestConfig, num_classes: int) -> np.ndarray:
    n = cfg.num_samples
    if cfg.labels == "cycle":
        return np.arange(n) % num_classes
    if cfg.labels == "random":
        return np.random.default_rng(cfg.seed).integers(0, num_classes, size=n)
    try:
        if "-" in cfg.labels and "," not in cfg.labels:
            lo, hi = (int(p) for p in cfg.labels.split("-"))
            pool = np.arange(lo, hi + 1)
        else:
            pool = np.asarray([int(p) for p in cfg.labels.split(",")])
    except ValueError:
        raise HarvestError(
            f"labels={cfg.labels!r} is not 'cycle', 'random', a list like '3,5,7' or a range like '0-9'"
        ) from None
    bad = pool[(pool < 0) | (pool >= num_classes)]
    if len(pool) == 0 or len(bad):
        raise HarvestError(f"labels {bad.tolist()} out of range: the model has classes 0..{num_classes - 1}")
    return pool[np.arange(n) % len(pool)]


def _prompt_conditioning(
    cfg: HarvestConfig, model: LoadedModel, device: torch.device, needs_negative: bool
) -> tuple[list[str], dict[str, torch.Tensor]]:
    if cfg.prompts is None:
        raise HarvestError(
            f"{model.info.transformer_class} is text-conditional: pass --prompts FILE (one prompt a line)"
        )
    if not cfg.prompts.is_file():
        raise HarvestError(f"prompts file {cfg.prompts} does not exist")
    prompts = [p for p in cfg.prompts.read_text().splitlines() if p.strip()]
    if not prompts:
        raise HarvestError(f"prompts file {cfg.prompts} has no prompts")
    if cfg.prompt_embeds is not None:
        from safetensors.torch import load_file

        emb = load_file(str(cfg.prompt_embeds))
        sampling = model.sampling
        need = set(sampling.embed_keys) | (set(sampling.negative_keys) if needs_negative else set())
        if need - emb.keys():
            raise HarvestError(
                f"{cfg.prompt_embeds} lacks {sorted(need - emb.keys())}; {model.info.transformer_class} needs "
                f"{', '.join(sorted(need))}" + (" (the negative ones for CFG)" if needs_negative else "")
            )
        if emb["prompt_embeds"].shape[0] != len(prompts):
            raise HarvestError(
                f"{cfg.prompt_embeds} holds {emb['prompt_embeds'].shape[0]} prompt embeddings but {cfg.prompts} "
                f"has {len(prompts)} prompts; they must match line for line"
            )
    elif model.text_encoder is not None:
        emb = _encode_prompts(model, prompts, device)
    elif model.sampling.encode is not None and (Path(model.info.path) / "text_encoder").is_dir():
        emb = model.sampling.encode(model, prompts, needs_negative)
    elif not model.sampling.encodes_prompts:
        raise HarvestError(
            f"{model.info.path} has no text_encoder/ for {model.info.transformer_class}: add the pipeline's text "
            "encoders and tokenizers to the folder, or compute the embeddings with the pipeline's encode_prompt "
            "and pass them as --prompt-embeds FILE (safetensors with "
            f"{', '.join(model.sampling.embed_keys + model.sampling.negative_keys)}, the negative ones for CFG)"
        )
    else:
        raise HarvestError(f"{model.info.path} has no text_encoder/; pass precomputed --prompt-embeds FILE")
    return prompts, {k: v.to(device) for k, v in emb.items()}


@torch.no_grad()
def _encode_prompts(model: LoadedModel, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """T5 prompt states as PixArt's pipeline makes them (max 120 tokens, negative prompt "")."""

    def enc(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = model.tokenizer(
            texts, padding="max_length", max_length=120, truncation=True, return_tensors="pt"
        )
        mask = tok.attention_mask.to(device)
        return model.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0], mask

    e, m = enc(prompts)
    ne, nm = enc([""])
    return {
        "prompt_embeds": e,
        "prompt_attention_mask": m,
        "negative_prompt_embeds": ne,
        "negative_prompt_attention_mask": nm,
    }


def plan(cfg: HarvestConfig, model: LoadedModel) -> tuple[StoreMeta, dict[str, Any]]:
    """The store's metadata and per-sample arrays for `cfg` on `model`, with every input checked."""
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else model.default_guidance_scale
    if guidance <= 1 and cfg.cfg_branch != "cond":
        raise HarvestError(
            f"cfg_branch={cfg.cfg_branch!r} needs guidance_scale > 1 (the model default is {guidance})"
        )
    kind = _guidance_kind(cfg, model, guidance)
    _check_size(cfg, model)
    layers, step_indices, timesteps = _schedule(cfg, model)
    itemsize = numpy_storage_dtype(cfg.dtype).itemsize
    kept = kept_tokens(model.num_tokens, cfg.token_fraction)
    steps_per_chunk, tokens_per_chunk = choose_chunks(
        cfg.batch_size, len(step_indices), kept, model.d_model, itemsize
    )
    arrays: dict[str, Any] = {
        "timesteps": timesteps[step_indices],
        "seeds": cfg.seed + np.arange(cfg.num_samples),
        "labels": None,
        "prompt_index": None,
    }
    prompts = _conditioning(cfg, model, kind, arrays)
    meta = StoreMeta(
        tide_version=_version(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=model.info,
        scheduler=model.scheduler_info(),
        num_inference_steps=cfg.num_steps,
        step_indices=step_indices,
        guidance_scale=guidance,
        guidance=kind,
        cfg_branch=cfg.cfg_branch,
        conditioning=model.arch.conditioning,
        prompts=prompts,
        sites=list(cfg.sites),
        layers=layers,
        num_layers=model.num_layers,
        double_stream_blocks=model.arch.single_stream_from(model.transformer),
        d_model=model.d_model,
        num_samples=cfg.num_samples,
        batch_size=cfg.batch_size,
        steps_per_chunk=steps_per_chunk,
        tokens_per_chunk=tokens_per_chunk,
        tokens=TokenSampling(num_tokens=model.num_tokens, fraction=cfg.token_fraction, kept=kept),
        dtype=cfg.dtype,
        codec=cfg.codec,
        harvest_config=cfg.identity(),
    )
    return meta, arrays


def _schedule(cfg: HarvestConfig, model: LoadedModel) -> tuple[list[int], list[int], np.ndarray]:
    """Checked layer indices, stored step indices and the scheduler's timesteps (model.set_schedule is called)."""
    try:
        layers = cfg.layer_indices(model.num_layers)
        step_indices = cfg.step_indices(cfg.num_steps)
        check_sites(model.arch, model.transformer, list(cfg.sites), layers)
        model.set_schedule(cfg.num_steps)
    except ValueError as e:
        raise HarvestError(str(e)) from None
    timesteps = model.scheduler.timesteps.cpu().numpy().astype(np.float64)
    if len(timesteps) != cfg.num_steps:
        raise HarvestError(f"the scheduler made {len(timesteps)} steps for num_steps={cfg.num_steps}")
    return layers, step_indices, timesteps


def _conditioning(
    cfg: HarvestConfig, model: LoadedModel, kind: str, arrays: dict[str, Any]
) -> list[str] | None:
    """Fill `arrays` with the labels, or the prompt embeddings and prompt index; returns the prompts."""
    if model.arch.conditioning == "class":
        if cfg.prompts is not None:
            raise HarvestError(
                f"{model.info.transformer_class} is class-conditional; use --labels, not --prompts"
            )
        arrays["labels"] = _labels(cfg, model.num_classes)
        return None
    # PixArt's files always carried the negative prompt; the joint backbones need it only for CFG.
    needs_negative = kind == "cfg" or model.sampling.encodes_prompts
    device = model.transformer.device
    with cpu_threads(device, cfg.cpu_threads):  # text encoders on the CPU too: the embeddings feed every row
        prompts, arrays["prompt_embeds"] = _prompt_conditioning(cfg, model, device, needs_negative)
    arrays["prompt_index"] = np.arange(cfg.num_samples) % len(prompts)
    return prompts


def _guidance_kind(cfg: HarvestConfig, model: LoadedModel, guidance: float) -> str:
    """How the guidance scale is applied; refuses a scale or a CFG branch the model cannot take."""
    kind = model.guidance_kind(guidance)
    name = model.info.transformer_class
    if kind == "none" and guidance > 1:
        raise HarvestError(
            f"guidance_scale={guidance}, but {name} takes no guidance (guidance_embeds is false: a FLUX.1-schnell "
            "style model); leave --guidance-scale out or set it to 1"
        )
    if kind == "distilled" and cfg.cfg_branch != "cond":
        raise HarvestError(
            f"cfg_branch={cfg.cfg_branch!r}, but {name} takes its guidance scale as a model input (distilled "
            "guidance, no unconditional batch): use --cfg-branch cond"
        )
    return kind


MAX_SIZE_FACTOR = 8
"""--height/--width at most this many times the pipeline's own size. A DiT is trained at one size (FLUX and
PixArt-Sigma stretch to about 2x); the tokens, and attention's cost, grow with the square of the side, so far
past it a harvest only runs for hours to store noise."""


def _check_size(cfg: HarvestConfig, model: LoadedModel) -> None:
    m = model.size_multiple()
    native = model.sampling.default_latent_size(model.transformer.config) * model.vae_scale_factor
    for name, px in (("height", cfg.height), ("width", cfg.width)):
        if px is not None and px > MAX_SIZE_FACTOR * native:
            tokens = ((cfg.height or native) // m) * ((cfg.width or native) // m)
            raise HarvestError(
                f"--{name} {px} is over {MAX_SIZE_FACTOR}x the {native} px {model.info.transformer_class} makes by "
                f"default (at most {MAX_SIZE_FACTOR * native} here): it was not trained for such images, and each "
                f"would take {tokens:,} tokens instead of {(native // m) ** 2:,}. Leave --{name} out, or stay "
                f"near {native}"
            )
        if px is not None and px % m:
            raise HarvestError(
                f"--{name} {px} is not a multiple of {m} (the VAE's factor {model.vae_scale_factor} x "
                f"{m // model.vae_scale_factor} latent pixels per token); use e.g. {max(m, px // m * m)}"
            )
    h, w = (px or native for px in (cfg.height, cfg.width))
    if model.arch.square_only and h != w:
        raise HarvestError(
            f"--height {h} and --width {w} differ, but {model.info.transformer_class} makes square images only; "
            "give both the same size"
        )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tide")
    except PackageNotFoundError:
        return "0+unknown"


def image_shape(model: LoadedModel) -> tuple[int, int, int]:
    c, h, w = model.latent_shape
    if model.vae is None:
        return (c, h, w)
    f = model.vae_scale_factor
    return (model.vae.config.out_channels, h * f, w * f)

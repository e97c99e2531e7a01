"""harvest(cfg): run the DiT over its denoising steps and write the chosen activations into a tide store.

Shape key: B batch of samples, S stored steps, T kept tokens, N image tokens, D model width.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tide.harvest.capture import Conditioning, capture
from tide.harvest.config import HarvestConfig
from tide.harvest.model import LoadedModel, load_model
from tide.harvest.sampler import denoise, make_generators, to_images
from tide.harvest.target import (
    HarvestError,
    Target,
    inspect_out,
    locked,
    open_target,
    os_error,
    writable_out,
    write_failure,
)
from tide.store.card import write_card
from tide.store.device import resolve_device
from tide.store.open import where
from tide.store.schema import (
    StoreMeta,
    TokenSampling,
    act_name,
    choose_chunks,
    kept_tokens,
    numpy_storage_dtype,
    to_stored,
    token_subset,
)
from tide.store.writer import StoreWriter, block_bytes, disk_bound, free_bytes
from tqdm.auto import tqdm

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


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
    cfg: HarvestConfig, model: LoadedModel, device: torch.device
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
        need = {
            "prompt_embeds",
            "prompt_attention_mask",
            "negative_prompt_embeds",
            "negative_prompt_attention_mask",
        }
        if need - emb.keys():
            raise HarvestError(f"{cfg.prompt_embeds} lacks {sorted(need - emb.keys())}")
        if emb["prompt_embeds"].shape[0] != len(prompts):
            raise HarvestError(
                f"{cfg.prompt_embeds} holds {emb['prompt_embeds'].shape[0]} prompt embeddings but {cfg.prompts} "
                f"has {len(prompts)} prompts; they must match line for line"
            )
    elif model.text_encoder is not None:
        emb = _encode_prompts(model, prompts, device)
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
    try:
        layers = cfg.layer_indices(model.num_layers)
        step_indices = cfg.step_indices(cfg.num_steps)
    except ValueError as e:
        raise HarvestError(str(e)) from None
    model.scheduler.set_timesteps(cfg.num_steps)
    timesteps = model.scheduler.timesteps.cpu().numpy().astype(np.float64)
    if len(timesteps) != cfg.num_steps:
        raise HarvestError(f"the scheduler made {len(timesteps)} steps for num_steps={cfg.num_steps}")
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
    prompts = None
    if model.arch.conditioning == "class":
        if cfg.prompts is not None:
            raise HarvestError(
                f"{model.info.transformer_class} is class-conditional; use --labels, not --prompts"
            )
        arrays["labels"] = _labels(cfg, model.num_classes)
    else:
        prompts, arrays["prompt_embeds"] = _prompt_conditioning(cfg, model, model.transformer.device)
        arrays["prompt_index"] = np.arange(cfg.num_samples) % len(prompts)
    meta = StoreMeta(
        tide_version=_version(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=model.info,
        scheduler=model.scheduler_info(),
        num_inference_steps=cfg.num_steps,
        step_indices=step_indices,
        guidance_scale=guidance,
        cfg_branch=cfg.cfg_branch,
        conditioning=model.arch.conditioning,
        prompts=prompts,
        sites=list(cfg.sites),
        layers=layers,
        num_layers=model.num_layers,
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tide")
    except PackageNotFoundError:
        return "0+unknown"


class HarvestResult(NamedTuple):
    out: Path
    """The store."""
    written: int
    """Samples this run wrote; 0 when the store was already complete (nothing was written then)."""
    num_samples: int
    """Samples in the store, all of them done now."""


def format_bytes(n: float) -> str:
    """A byte count for people: 512 B, 3.5 KiB, 12.0 MiB, 1.25 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _check_space(cfg: HarvestConfig, target: Target, arrays: dict[str, Any], log) -> None:
    """Refuse, before anything is written, a harvest whose upper bound on disk use exceeds the free space."""
    lay = target.meta.layout()
    todo_samples = sum(lay.sample_chunk(c).stop - lay.sample_chunk(c).start for c in target.todo)
    if not where(cfg.out).local:
        if log is not None:
            log(
                f"{cfg.out}: {lay.num_samples} samples, {lay.num_samples - todo_samples} already done; the free-disk "
                "check is skipped for an object store (its capacity is the provider's)"
            )
        return
    image = arrays.get("image_shape")
    need = disk_bound(
        target.meta,
        len(target.todo),
        create=not target.resume,
        images_shape=None if image is None else (image[1], image[2], image[0]),
        block=block_bytes(cfg.out),
    )
    free = free_bytes(cfg.out)
    if log is not None:
        log(
            f"{cfg.out}: {lay.num_samples} samples x {lay.num_steps} steps x {lay.tokens} tokens x {lay.d_model} d, "
            f"{len(target.meta.act_names())} arrays; {lay.num_samples - todo_samples} samples already done; "
            f"at most {format_bytes(need)} to write ({format_bytes(free)} free)"
        )
    if target.todo and need > free:
        raise HarvestError(
            f"the harvest of {todo_samples} samples needs up to {format_bytes(need)} of disk (uncompressed, "
            f"with metadata and filesystem blocks) but only {format_bytes(free)} is free at {cfg.out}; nothing "
            "was written. Lower --num-samples, --layers, --sites or --token-fraction, free space, or choose an "
            "--out on another disk"
        )


def harvest(cfg: HarvestConfig, log: Callable[[str], None] = print) -> HarvestResult:
    """Run the harvest described by `cfg`, resuming a store left by an interrupted run.

    Every refusal (another configuration, a folder that is not a tide store, too little disk) comes before
    anything is written. A full disk or an unwritable folder met later ends in a HarvestError that says
    what to do; the store stays resumable.
    """
    writable_out(cfg.out)  # a read-only URL or an unknown scheme, before loading the model
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, cfg.revision, device=device, dtype=_TORCH_DTYPES[cfg.model_dtype])
    meta, arrays = plan(cfg, model)
    if cfg.save_images:
        arrays["image_shape"] = _image_shape(model)
    n = meta.num_samples
    _check_space(cfg, inspect_out(cfg, meta), arrays, None)
    try:
        if where(cfg.out).local:
            cfg.out.parent.mkdir(parents=True, exist_ok=True)
        with locked(cfg.out):
            # Again under the lock: another harvest may have changed --out since the check above.
            target = inspect_out(cfg, meta)
            _check_space(cfg, target, arrays, log)
            if not target.todo:
                log(f"{cfg.out} is already complete: all {n} samples are done; nothing to write")
                return HarvestResult(cfg.out, 0, n)
            root, meta = open_target(cfg, target, arrays, log)
            written = _write(cfg, model, meta, arrays, root, target.todo)
            write_card(cfg.out)  # the dataset card (README.md) describes the finished store
    except OSError as e:  # making the folder, the lock or the store; _write reports its own
        raise write_failure(cfg.out, e, n, creating=True) from e
    return HarvestResult(cfg.out, written, n)


def _write(cfg: HarvestConfig, model: LoadedModel, meta: StoreMeta, arrays, root, todo: list[int]) -> int:
    """Generate and write sample chunks `todo` (returns their sample count); a write error becomes a
    HarvestError naming what was kept."""
    lay = meta.layout()
    todo_samples = sum(lay.sample_chunk(c).stop - lay.sample_chunk(c).start for c in todo)
    writer = StoreWriter(root, meta, max_pending=cfg.writer_queue)
    try:
        try:
            with capture(model.transformer, model.arch, list(meta.sites), list(meta.layers)) as acts:
                bar = tqdm(
                    total=todo_samples * cfg.num_steps,
                    unit="img-step",
                    disable=not cfg.progress,
                    smoothing=0.1,
                )
                for c in todo:
                    _harvest_chunk(c, model, meta, arrays, acts, writer, bar, cfg.save_images)
                bar.close()
        finally:
            writer.close()
    except (OSError, RuntimeError) as e:
        err = os_error(e)
        if err is None:
            raise
        try:
            done = int(root["done"][:].sum())
        except Exception:  # the done flags could not be read back: say nothing rather than a wrong number
            done = None
        raise write_failure(cfg.out, err, lay.num_samples, done) from e
    return todo_samples


def _image_shape(model: LoadedModel) -> tuple[int, int, int]:
    c, h, w = model.latent_shape
    if model.vae is None:
        return (c, h, w)
    f = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return (model.vae.config.out_channels, h * f, w * f)


def _batch_conditioning(meta: StoreMeta, arrays: dict[str, Any], samples: slice, device: torch.device):
    if meta.conditioning == "class":
        return Conditioning(class_labels=torch.as_tensor(arrays["labels"][samples], device=device)), None
    emb, idx = arrays["prompt_embeds"], torch.as_tensor(arrays["prompt_index"][samples], device=device)
    b = len(idx)
    cond = Conditioning(
        prompt_embeds=emb["prompt_embeds"][idx], prompt_mask=emb["prompt_attention_mask"][idx]
    )
    uncond = Conditioning(
        prompt_embeds=emb["negative_prompt_embeds"].expand(b, -1, -1),
        prompt_mask=emb["negative_prompt_attention_mask"].expand(b, -1),
    )
    return cond, uncond


def _harvest_chunk(
    c: int,
    model: LoadedModel,
    meta: StoreMeta,
    arrays: dict[str, Any],
    acts: dict,
    writer: StoreWriter,
    bar: tqdm,
    save_images: bool,
) -> None:
    """Generate sample chunk c and submit its blocks, then its done flag, to the writer."""
    lay = meta.layout()
    samples = lay.sample_chunk(c)
    seeds = arrays["seeds"][samples]
    b, device = len(seeds), model.transformer.device
    cond, uncond = _batch_conditioning(meta, arrays, samples, device)
    subsample = meta.tokens.subsampled
    index_BST = np.stack(
        [
            np.stack([token_subset(int(s), i, meta.tokens.num_tokens, lay.tokens) for i in meta.step_indices])
            for s in seeds
        ]
    )  # (B, S, T)
    stored_pos = {step: p for p, step in enumerate(meta.step_indices)}
    rows = {"cond": slice(0, b), "uncond": slice(b, 2 * b)}
    store_dtype = _TORCH_DTYPES[meta.dtype]
    buffers: dict[str, torch.Tensor] = {}
    latents = None
    for rec in denoise(
        model, cond, make_generators(seeds.tolist()), meta.num_inference_steps, meta.guidance_scale, uncond
    ):
        bar.update(b)
        latents = rec.latents
        p = stored_pos.get(rec.index)
        if p is None:
            continue
        j = p % lay.steps_per_chunk
        if j == 0:
            width = min(lay.steps_per_chunk, lay.num_steps - p)
            buffers = {
                n: torch.empty((b, width, lay.tokens, lay.d_model), dtype=store_dtype, device=device)
                for n in meta.act_names()
            }
            index_BT = torch.as_tensor(index_BST[:, p : p + width], device=device, dtype=torch.long)
        for (site, layer), a_RND in acts.items():
            for branch in meta.branches:
                a_BND = a_RND[rows[branch]]
                if subsample:
                    idx = index_BT[:, j, :, None].expand(-1, -1, a_BND.shape[-1])
                    a_BND = torch.gather(a_BND, 1, idx)  # (B, T, D)
                buffers[act_name(site, layer, branch)][:, j] = a_BND
        if j == next(iter(buffers.values())).shape[1] - 1:
            steps = slice(p - j, p + 1)
            for name, buf in buffers.items():
                writer.submit(writer.write_block, name, c, steps, to_stored(buf))
            if subsample:
                writer.submit(writer.write_token_index, c, steps, index_BST[:, steps])
    if save_images:
        writer.submit(writer.write_images, c, to_images(model, latents).numpy())
    writer.submit(writer.mark_done, c)

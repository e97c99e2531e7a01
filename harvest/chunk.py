"""One sample chunk of a harvest: run the model on one batch over every denoising step and write it.

`harvest_chunk` is the unit of work. The local loop (harvest/run.py) and a dask task (harvest/cluster.py)
both call it; what it writes depends only on the model, the plan (StoreMeta + per-sample arrays) and the
chunk index, so any process may (re)write any chunk and the store's bytes come out the same: on the CPU
its model calls run on the store's `cpu_threads`, whatever the process's own thread count. Its writes
are whole chunks of every array, then the chunk's `done` flags last: a rerun of a chunk cut short
overwrites, and a chunk counts as done only once all of it is on disk.

Shape key: B batch of samples, S stored steps, T kept tokens, N image tokens, D model width.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from tide.harvest.capture import Conditioning, capture
from tide.harvest.config import UNRECORDED
from tide.harvest.model import LoadedModel, cpu_threads
from tide.harvest.plan import TORCH_DTYPES
from tide.harvest.sampler import cfg_rows, denoise, make_generators, to_images
from tide.store.schema import StoreMeta, act_name, to_stored, token_subset
from tide.store.writer import StoreWriter

Submit = Callable[..., None]
"""StoreWriter.submit, or anything that takes (writer method, *args) and runs them in order."""


class ChunkSummary(NamedTuple):
    """What a finished chunk reports: small enough to travel back through a dask scheduler."""

    chunk: int
    """The sample chunk."""
    samples: int
    """Samples in it."""
    img_steps: int
    """Samples x denoising steps run."""
    seconds: float
    """Wall time of the chunk, model and writes."""


def batch_conditioning(meta: StoreMeta, arrays: dict[str, Any], samples: slice, device: torch.device):
    """(cond, uncond) Conditioning of the samples `samples`; uncond is None for class models (the
    denoising loop adds the null label itself)."""
    if meta.conditioning == "class":
        return Conditioning(class_labels=torch.as_tensor(arrays["labels"][samples], device=device)), None
    emb, idx = arrays["prompt_embeds"], torch.as_tensor(arrays["prompt_index"][samples], device=device)
    b = len(idx)
    rows = lambda k: emb[k][idx] if k in emb else None  # noqa: E731
    cond = Conditioning(
        prompt_embeds=rows("prompt_embeds"),
        prompt_mask=rows("prompt_attention_mask"),
        pooled_prompt_embeds=rows("pooled_prompt_embeds"),
    )
    if "negative_prompt_embeds" not in emb:  # no CFG (FLUX, or SD3 without guidance)
        return cond, None
    neg = lambda k: emb[k].expand(b, *emb[k].shape[1:]) if k in emb else None  # noqa: E731
    uncond = Conditioning(
        prompt_embeds=neg("negative_prompt_embeds"),
        prompt_mask=neg("negative_prompt_attention_mask"),
        pooled_prompt_embeds=neg("negative_pooled_prompt_embeds"),
    )
    return cond, uncond


def harvest_chunk(
    c: int,
    model: LoadedModel,
    meta: StoreMeta,
    arrays: dict[str, Any],
    writer: StoreWriter,
    save_images: bool,
    on_step: Callable[[int], None] | None = None,
) -> ChunkSummary:
    """Generate sample chunk `c` and hand its blocks, token index, images and then its done flag to
    `writer` (in that order); `on_step(b)` is called after each denoising step of the b samples."""
    start = time.perf_counter()
    lay = meta.layout()
    samples = lay.sample_chunk(c)
    seeds = arrays["seeds"][samples]
    index_BST = np.stack(
        [
            np.stack([token_subset(int(s), i, meta.tokens.num_tokens, lay.tokens) for i in meta.step_indices])
            for s in seeds
        ]
    )  # (B, S, T)
    threads = meta.harvest_config.get("cpu_threads", UNRECORDED["cpu_threads"])
    with cpu_threads(model.transformer.device, threads):  # the store's count, whichever process runs this
        with capture(model.transformer, model.arch, list(meta.sites), list(meta.layers)) as acts:
            latents = _run_and_write(c, model, meta, arrays, acts, writer, index_BST, on_step)
        if save_images:
            writer.submit(writer.write_images, c, to_images(model, latents).numpy())
    writer.submit(writer.mark_done, c)
    b = len(seeds)
    return ChunkSummary(c, b, b * meta.num_inference_steps, time.perf_counter() - start)


def _run_and_write(c, model, meta, arrays, acts, writer, index_BST, on_step) -> torch.Tensor:
    """The denoising loop of chunk c: gather the hooked activations of the stored steps into buffers of
    one step chunk each and submit every full buffer; returns the final latents."""
    lay = meta.layout()
    b, device = len(index_BST), model.transformer.device
    cond, uncond = batch_conditioning(meta, arrays, lay.sample_chunk(c), device)
    subsample = meta.tokens.subsampled
    seeds = arrays["seeds"][lay.sample_chunk(c)]
    stored_pos = {step: p for p, step in enumerate(meta.step_indices)}
    rows = cfg_rows(b, meta.guidance_scale > 1)
    store_dtype = TORCH_DTYPES[meta.dtype]
    buffers: dict[str, torch.Tensor] = {}
    latents = None
    for rec in denoise(
        model, cond, make_generators(seeds.tolist()), meta.num_inference_steps, meta.guidance_scale, uncond
    ):
        if on_step is not None:
            on_step(b)
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
                a_BND = a_RND[getattr(rows, branch)]
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
    return latents

"""Regenerate the final images of stored samples from their seeds: the one entry point train/ uses into harvest/.

A store records everything a sample depends on (model folder and fingerprint, scheduler, steps, guidance,
seed, label or prompt; store/FORMAT.md "Reproducing a row"), and a sample's trajectory does not depend
on which samples share its batch, so any subset of samples can be redrawn in any grouping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tide.harvest.chunk import batch_conditioning
from tide.harvest.config import HarvestConfig
from tide.harvest.intervene import sample
from tide.harvest.model import LoadedModel, load_model
from tide.harvest.plan import TORCH_DTYPES, plan
from tide.store.fingerprint import check_same_model
from tide.store.schema import StoreMeta


def load_store_model(meta: StoreMeta, model: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """The model that made a store: `model` if given, else the folder recorded in it; refused when its
    weights are not the ones the store was made with (fingerprint)."""
    source = str(model) if model is not None else meta.model.path
    if model is None and not Path(source).exists():
        source = meta.model.id
    dtype = TORCH_DTYPES[meta.harvest_config.get("model_dtype", "float32")]
    try:
        loaded = load_model(source, meta.model.revision, device=device, dtype=dtype)
    except ValueError as e:
        raise ValueError(
            f"cannot regenerate images: the store's model {source} could not be loaded ({e}); pass --model "
            "with the pipeline folder the store was harvested with, or harvest with --save-images"
        ) from e
    check_same_model(
        meta.model, loaded.info.fingerprint, source, "cannot regenerate images",
        "pass --model with the original pipeline folder",
    )  # fmt: skip
    return loaded


def regenerate_images(
    meta: StoreMeta,
    samples: Sequence[int],
    model: LoadedModel,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(n, H, W, C) uint8 final images of `samples`, redrawn from their seeds exactly as the harvest drew them."""
    cfg = HarvestConfig.model_validate({**meta.harvest_config, "progress": False})
    _, arrays = plan(cfg, model)
    samples = np.asarray(samples, dtype=np.int64)
    out = []
    for lo in range(0, len(samples), batch_size):
        idx = samples[lo : lo + batch_size]
        cond, uncond = batch_conditioning(meta, arrays, idx, model.transformer.device)
        seeds = arrays["seeds"][idx].tolist()
        out.append(
            sample(
                model, cond, seeds, meta.num_inference_steps, meta.guidance_scale, uncond=uncond
            ).images.numpy()
        )
        if on_batch is not None:
            on_batch(len(idx))
    if not out:
        return np.zeros((0, 0, 0, 0), dtype=np.uint8)
    return np.concatenate(out)

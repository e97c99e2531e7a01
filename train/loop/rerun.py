"""Run a store's model again: the one module of train/ that imports harvest/, and its one entry point.

`rerun(store_meta, ...)` loads the model that made a store (the folder given with --model, else the one the
store recorded, else its hub id when that folder is gone), refuses one whose weights are not the store's
(fingerprint), and lays out seeds and labels or prompts exactly as a harvest of the store does: sample i has
seed `seed + i` and the conditioning a harvest gives it. The `Rerun` it returns draws any of those samples in
any grouping (a sample's trajectory does not depend on which samples share its batch), through harvest's own
denoising loop, with `Intervention`s (harvest/intervene.py) editing the sites they name.

Everything in train/ that samples goes through here: `tide features` redraws the final images of top
samples and, for its causal section, the same samples with a latent scaled (train/loop/causal.py); `tide
splice` and `tide steer` sample with edits; `make steer-demo` sweeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tide.harvest.chunk import batch_conditioning
from tide.harvest.config import DEMO_MODEL, HarvestConfig
from tide.harvest.intervene import Intervention, Sampled, digits_classifier, sample
from tide.harvest.model import LoadedModel, load_model
from tide.harvest.plan import plan
from tide.harvest.run import load_for_harvest
from tide.store.fingerprint import check_same_model
from tide.store.schema import StoreMeta

__all__ = ["Intervention", "Rerun", "Sampled", "rerun"]

FIX = "pass --model with the pipeline folder the store was harvested from"


class Rerun(NamedTuple):
    """A store's model with per-sample arrays laid out exactly as a harvest of the store makes them."""

    model: LoadedModel
    meta: StoreMeta
    """The planned run's metadata (num_samples, num_inference_steps, guidance_scale, conditioning)."""
    arrays: dict[str, Any]
    """seeds, labels or prompt_index (+ prompt_embeds), as harvest/plan.py makes them."""

    def sample(
        self,
        samples: slice | Sequence[int] | np.ndarray,
        interventions: Sequence[Intervention] = (),
        record_outputs: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> Sampled:
        """The samples `samples` (a slice or indices), drawn as the harvest drew them, with `interventions`;
        `on_step(B)` after each denoising step of the B samples."""
        cond, uncond = batch_conditioning(self.meta, self.arrays, samples, self.model.transformer.device)
        seeds = np.asarray(self.arrays["seeds"][samples]).tolist()
        return sample(
            self.model, cond, seeds, self.meta.num_inference_steps, self.meta.guidance_scale, interventions,
            uncond, record_outputs, on_step,
        )  # fmt: skip

    def images(
        self, samples: Sequence[int], batch_size: int = 32, on_step: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """(n, H, W, C) uint8 final images of `samples`, unedited, `batch_size` at a time; `on_step` as in
        `sample`."""
        idx = np.asarray(samples, dtype=np.int64)
        out = []
        for lo in range(0, len(idx), batch_size):
            out.append(self.sample(idx[lo : lo + batch_size], on_step=on_step).images.numpy())
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 0), dtype=np.uint8)

    def labels(self) -> np.ndarray:
        """(num_samples,) the class label, or for a text model the prompt index, of each sample."""
        a = self.arrays
        return np.asarray(a["labels"] if a.get("labels") is not None else a["prompt_index"])

    def classifier(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """For a digits model (the demo's kind): images -> the class a real-digits classifier sees; else None."""
        return digits_classifier(self.model)

    def shipped_demo(self) -> bool:
        """Whether the model is the shipped demo (harvest/demo/digits-dit): the same weights, by fingerprint,
        in the dtype it runs in (the pixel attributes of train/analysis/attributes.py are defined on it)."""
        found = self.model.info.fingerprint
        if found is None:
            return False
        demo = load_model(str(DEMO_MODEL), None, device="cpu", dtype=self.model.transformer.dtype)
        return demo.info.fingerprint == found


def rerun(
    store_meta: StoreMeta,
    num_samples: int | None = None,
    num_steps: int | None = None,
    labels: str | None = None,
    prompts: Path | None = None,
    device: str = "auto",
    model: str | Path | None = None,
) -> Rerun:
    """The store's model and harvest's seeds and conditioning for `num_samples` samples (default: the
    store's own), over `num_steps` denoising steps (default: the store's); `labels` or `prompts` replace
    the store's conditioning, `model` its recorded folder."""
    overrides: dict[str, Any] = {"steps": "all", "progress": False, "device": device, "out": Path("unused")}
    given = {"num_samples": num_samples, "num_steps": num_steps, "labels": labels, "model": model}
    overrides |= {k: str(v) if k == "model" else v for k, v in given.items() if v is not None}
    if prompts is not None:
        overrides |= {"prompts": prompts, "prompt_embeds": None}
    if model is None:  # the folder it was loaded from; when that is gone, the model as given (a hub id)
        recorded = store_meta.model
        overrides["model"] = recorded.path if Path(recorded.path).exists() else recorded.id
    cfg = HarvestConfig(**{**store_meta.harvest_config, **overrides})
    try:
        loaded = load_for_harvest(cfg)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot load the store's model {cfg.model}: {e}; {FIX}") from e
    check_same_model(store_meta.model, loaded.info.fingerprint, str(cfg.model), "not the store's model", FIX)
    meta, arrays = plan(cfg, loaded)
    return Rerun(loaded, meta, arrays)

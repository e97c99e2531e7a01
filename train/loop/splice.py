"""Fidelity in the loop: sample with an SAE's reconstruction substituted for the activations it reads.

`splice(cfg)` samples the same N images (same seeds, same labels or prompts, harvest's sampler, through
train/loop/rerun.py) under several conditions, batch by batch:

    clean            the model untouched
    <SAE folder>     sae.forward_raw(x, t).x_hat replaces x at the SAE's site and layer
    zero_ablation    that site's activations set to 0 (a floor)
    mean_ablation    set to the store's per-step mean (store.stats, at the stored timestep nearest t; the
                     mean of the branch the store holds, in whichever CFG rows are spliced)

and compares each with clean: the model output (eps / velocity after guidance) at every step, on the
condition's own trajectory, as ||out - out_clean|| / ||out_clean|| (per step, and pooled over steps);
the final images' MSE (pixels in [0, 1]); and, for a digits model (10 classes, 1 channel), the accuracy of
the real-digits classifier. Per SAE, **fidelity recovered** = 1 - (spliced - clean) / (ablated - clean) on
each metric, against each ablation: the diffusion analogue of SAELens's loss recovered (1 = as good as
clean, 0 = no better than the ablation). With `buckets` > 0 the SAEs and the mean ablation are also spliced
inside one contiguous bucket of steps at a time, to show where along the trajectory an SAE breaks.

When several SAEs read different (site, layer)s, each gets its own ablations, named `zero_ablation@resid_l03`.

Shape key: B samples, S denoising steps, N tokens, D width, H W C image.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tide.store.fingerprint import check_same_model
from tide.store.outputs import check_replaceable, local_out, staged
from tide.train.fit.checkpoint import LoadedSAE, load_sae, sae_folders
from tide.train.loop.splice_report import build_report, save_grid


class SpliceConfig(BaseModel):
    """A `tide splice` run."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    saes: tuple[Path, ...]
    """SAE folders, or `tide train --out` folders holding them."""
    out: Path
    """Folder for images, report.json and grid.png."""
    num_samples: int = Field(100, gt=0)
    """Images per condition (sample i has the seed and label a harvest of the SAEs' store gives it)."""
    steps: str | None = None
    """Splice only at denoising steps 'a:b' (a <= step < b); default every step."""
    num_steps: int | None = Field(None, gt=0)
    """Denoising steps; default the store's."""
    buckets: int = Field(5, ge=0)
    """Timestep buckets for the per-bucket splice (0: none)."""
    rows: Literal["both", "cond"] = "both"
    """CFG rows spliced: both branches (the model as a whole) or the conditional rows only."""
    batch_size: int = Field(50, gt=0)
    """Samples per forward pass."""
    model: str | None = None
    """The pipeline to splice into; default the one the SAEs' store was harvested from."""
    site: str | None = None
    """Site to splice at; default each SAE's own (any other is refused: an SAE reads one site)."""
    layer: int | None = Field(None, ge=0)
    """Layer to splice at; default each SAE's own (any other is refused)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    overwrite: bool = False
    """Replace an earlier `tide splice` output in --out."""
    progress: bool = True
    """Show a progress bar."""

    @field_validator("out", mode="before")
    @classmethod
    def _local_out(cls, value: Any) -> Any:
        # Before Path folds `s3://b/x` into a local `s3:/b/x`: the output is a local folder (store/outputs.py).
        return local_out(value, "splice", option="") if isinstance(value, str | Path) else value


class Target(NamedTuple):
    """Where an SAE reads: parsed from its sae.json `array` (e.g. resid_l03, mlp_l11_uncond)."""

    site: str
    layer: int
    branch: str


def sae_target(s: LoadedSAE) -> Target:
    m = re.fullmatch(r"(resid|delta|attn|mlp)_l(\d+)(?:_(uncond))?", s.meta.array)
    if m is None:
        raise ValueError(f"{s.folder}: cannot read a site and layer from its array name {s.meta.array!r}")
    return Target(m[1], int(m[2]), m[3] or "cond")


def parse_steps(text: str | None, num_steps: int) -> frozenset[int] | None:
    """'a:b' -> the steps a..b-1 of a run of num_steps; None -> None (every step)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if m is None:
        raise ValueError(f"--steps {text!r} is not a range 'a:b' of step indices, e.g. '0:25'")
    a, b = int(m[1] or 0), int(m[2] or num_steps)
    if not 0 <= a < b <= num_steps:
        raise ValueError(
            f"--steps {text} is out of range: the run has {num_steps} steps (0..{num_steps - 1}); give a:b "
            f"with 0 <= a < b <= {num_steps}, e.g. '0:{num_steps // 2}'"
        )
    return frozenset(range(a, b))


def check_pipeline(s: LoadedSAE, store_meta, model_info, site: str, layer: int) -> None:
    """Refuse an SAE read from another model, site or layer than the one it is put into, naming both."""
    t = sae_target(s)
    check_same_model(
        store_meta.model, model_info.fingerprint, f"the pipeline {model_info.id}",
        f"{s.folder.name} was trained on another model's activations", "use SAEs trained on that model's store",
    )  # fmt: skip
    if (t.site, t.layer) != (site, layer):
        raise ValueError(
            f"{s.folder.name} was trained on {t.site} at layer {t.layer}, but it would be put into {site} at "
            f"layer {layer}; an SAE only reconstructs the site and layer it read"
        )


def splice_edit(sae) -> Callable:
    """The edit that substitutes the SAE's reconstruction (raw space) for the activations."""

    def edit(site: str, layer: int, step: int, t: float, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        x_hat = sae.forward_raw(x_BND.reshape(B * N, D).float(), torch.full((B * N,), t)).x_hat_BD
        return x_hat.reshape(B, N, D).to(x_BND.dtype)  # (B, N, D)

    return edit


def mean_edit(mean_SD: np.ndarray, t_S: np.ndarray) -> Callable:
    """The edit that sets every token to the stored per-step mean at the stored timestep nearest t."""
    means = torch.as_tensor(mean_SD, dtype=torch.float32)

    def edit(site: str, layer: int, step: int, t: float, x_BND: torch.Tensor) -> torch.Tensor:
        row = means[int(np.abs(t_S - t).argmin())].to(x_BND)
        return row.expand_as(x_BND).clone()

    return edit


def zero_edit(site: str, layer: int, step: int, t: float, x_BND: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_BND)


class Condition(NamedTuple):
    name: str
    edits: list[tuple[str, int, Callable]]
    """(site, layer, edit) triples."""
    steps: frozenset[int] | None
    keep_images: bool


class Tally:
    """Running sums of one condition's differences from clean, batch by batch."""

    def __init__(self, num_steps: int):
        self.err_S, self.ref_S = np.zeros(num_steps), np.zeros(num_steps)
        self.img_sq, self.pixels, self.correct, self.count = 0.0, 0, 0, 0
        self.images: list[np.ndarray] = []

    def add(self, out, clean_out, img, clean_img, pred, labels) -> None:
        d = (out - clean_out).flatten(1).double()  # (S, B*C*H*W)
        self.err_S += d.square().sum(1).numpy()
        self.ref_S += clean_out.flatten(1).double().square().sum(1).numpy()
        self.img_sq += float((((img.astype(np.float64) - clean_img) / 255) ** 2).sum())
        self.pixels += img.size
        if pred is not None:
            self.correct += int((pred == labels).sum())
        self.count += len(img)

    def metrics(self, has_classifier: bool) -> dict[str, Any]:
        per_step = np.sqrt(self.err_S / np.maximum(self.ref_S, 1e-30))
        return {
            "output_rel_error": float(np.sqrt(self.err_S.sum() / max(self.ref_S.sum(), 1e-30))),
            "output_rel_error_per_step": [round(float(v), 6) for v in per_step],
            "image_mse": self.img_sq / max(self.pixels, 1),
            "accuracy": self.correct / self.count if has_classifier else None,
        }


class SpliceResult(NamedTuple):
    report: dict[str, Any]
    """What report.json holds."""
    out: Path
    """The output folder."""


def _ablations(saes: list[LoadedSAE], stores: dict) -> dict[tuple[str, int], list[tuple[str, Callable]]]:
    """(site, layer) -> [(name, edit)] of its zero and mean ablation; named with @array when several."""
    from tide.store.schema import act_name

    sites = {(sae_target(s).site, sae_target(s).layer): stores[s.meta.store.path] for s in saes}
    out = {}
    for (site, layer), store in sites.items():
        at = f"@{act_name(site, layer)}" if len(sites) > 1 else ""
        stats = store.stats(act_name(site, layer))
        out[(site, layer)] = [
            (f"zero_ablation{at}", zero_edit),
            (f"mean_ablation{at}", mean_edit(stats.mean, store.timesteps)),
        ]
    return out


def _conditions(
    saes: list[LoadedSAE], ablations: dict, steps, buckets: list[frozenset[int]]
) -> list[Condition]:
    """clean, each SAE, each ablation; then each SAE and each mean ablation inside each bucket."""
    spliced = [
        Condition(s.folder.name, [(*sae_target(s)[:2], splice_edit(s.sae))], steps, True) for s in saes
    ]
    floors = [Condition(n, [(*key, e)], steps, True) for key, abl in ablations.items() for n, e in abl]
    conds = [Condition("clean", [], None, True), *spliced, *floors]
    for k, bucket in enumerate(buckets):
        conds += [c._replace(name=f"{c.name}#b{k}", steps=bucket, keep_images=False) for c in spliced]
        conds += [
            c._replace(name=f"{c.name}#b{k}", steps=bucket, keep_images=False)
            for c in floors
            if c.name.startswith("mean_ablation")
        ]
    return conds


def _load(cfg: SpliceConfig, folders: list[Path], log) -> tuple[list[LoadedSAE], dict, Any]:
    """The SAEs, their stores, and the pipeline planned like a harvest of the first SAE's store."""
    from tide.store.reader import open_store
    from tide.train.loop.rerun import rerun

    saes = [load_sae(f) for f in folders]
    stores = {p: open_store(p) for p in dict.fromkeys(s.meta.store.path for s in saes)}
    first = stores[saes[0].meta.store.path]
    log(f"pipeline: {first.meta.model.id}, the model of {saes[0].meta.store.path}")
    planned = rerun(first.meta, cfg.num_samples, cfg.num_steps, device=cfg.device, model=cfg.model)
    for s in saes:
        t = sae_target(s)
        site = cfg.site if cfg.site is not None else t.site
        layer = cfg.layer if cfg.layer is not None else t.layer
        check_pipeline(s, stores[s.meta.store.path].meta, planned.model.info, site, layer)
        s.sae.to(planned.model.transformer.device)
    return saes, stores, planned


def _run(cfg: SpliceConfig, planned, conds: list[Condition], clf) -> dict[str, Tally]:
    """Every condition on every batch; clean first in each batch, the others compared with it."""
    from tide.train.loop.rerun import Intervention
    from tqdm.auto import tqdm

    n, S = planned.meta.num_samples, planned.meta.num_inference_steps
    labels = planned.labels()
    tallies = {c.name: Tally(S) for c in conds}
    bar = tqdm(total=n * len(conds) * S, unit="img-step", disable=not cfg.progress, desc="splice")
    for start in range(0, n, cfg.batch_size):
        batch = slice(start, min(n, start + cfg.batch_size))
        clean = None
        for c in conds:
            ivs = [Intervention(site, layer, edit, c.steps, cfg.rows) for site, layer, edit in c.edits]
            r = planned.sample(batch, ivs, record_outputs=True, on_step=bar.update)
            img = r.images.numpy()
            clean = clean or (r.outputs, img)
            tallies[c.name].add(
                r.outputs, clean[0], img, clean[1], None if clf is None else clf(img), labels[batch]
            )
            if c.keep_images:
                tallies[c.name].images.append(img)
    bar.close()
    return tallies


def splice(cfg: SpliceConfig, log: Callable[[str], None] = print) -> SpliceResult:
    """Run every condition (module docstring), write DIR/<condition>/{images,labels}.npy, report.json and
    grid.png, and return the report."""
    folders = _distinct(sae_folders(list(cfg.saes)))  # refused before the run, not after it
    check_replaceable(cfg.out, "splice", cfg.overwrite)  # before anything is loaded: refused at once
    saes, stores, planned = _load(cfg, folders, log)
    S = planned.meta.num_inference_steps
    steps = parse_steps(cfg.steps, S)
    chosen = sorted(steps) if steps is not None else list(range(S))
    parts = np.array_split(chosen, min(cfg.buckets, len(chosen))) if cfg.buckets else []
    buckets = [frozenset(b.tolist()) for b in parts]
    ablations = _ablations(saes, stores)
    conds = _conditions(saes, ablations, steps, buckets)
    clf = planned.classifier()
    tallies = _run(cfg, planned, conds, clf)
    report = build_report(cfg, planned, saes, ablations, conds, tallies, steps, buckets, clf)
    labels = planned.labels()
    with staged(cfg.out, "splice", cfg.overwrite) as out:  # swapped in whole, once written
        for c in conds:
            if c.keep_images:
                (out / c.name).mkdir()
                np.save(out / c.name / "images.npy", np.concatenate(tallies[c.name].images))
                np.save(out / c.name / "labels.npy", labels)
        save_grid(
            out / "grid.png",
            [(c.name, np.concatenate(tallies[c.name].images)) for c in conds if c.keep_images],
        )
        (out / "report.json").write_text(json.dumps(report, indent=2))
    return SpliceResult(report, cfg.out)


def _distinct(folders: list[Path]) -> list[Path]:
    """The SAE folders, refused when two share a name: each names a condition, its images' folder and its
    row of report.json, so the second would overwrite the first after the whole run."""
    seen: dict[str, Path] = {}
    for f in folders:
        if f.name in seen:
            raise ValueError(
                f"two SAE folders are named {f.name} ({seen[f.name]} and {f}): each SAE's results go under its "
                "folder's name, so one would replace the other. Splice them in separate runs, or copy one to a "
                "folder of another name"
            )
        seen[f.name] = f
    return folders

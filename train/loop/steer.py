"""Edit images through one SAE latent while sampling (`tide steer`).

Two edits, applied at the SAE's site and layer, at the chosen steps and CFG rows, on every image token (or,
with --region, only on the tokens of one region of the image grid: train/loop/regions.py):

    --strength A   x + A * d_F(t), where d_F(t) = raw(decode(e_F), t) - raw(decode(0), t) is latent F's
                   decoder direction in RAW activation space (one unit of the latent's activation), so A is
                   in the latent's own units: the activations it takes on the store are a guide to A.
    --clamp V      z = encode(x); z_F := V; x + (raw(decode(z')) - raw(decode(z))), i.e. the edited
                   reconstruction plus the SAE's error term x - x_hat (not x_hat - x), so that only latent
                   F changes: clamping F to the value it already has returns x exactly.

Rows default to both CFG branches, so that the edit is not carried by the difference between the guided
branches alone (`rows="cond"` steers the conditional rows only). The unsteered images of the same seeds
are sampled too, for the grid and for comparison.

Shape key: B rows, N tokens, D width, F latents.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from tide.store.outputs import check_replaceable, local_out, staged
from tide.train.fit.checkpoint import LoadedSAE, load_sae
from tide.train.loop.splice import check_pipeline, parse_steps, sae_target
from tide.train.loop.splice_report import save_grid

EDIT_LIMIT = 1e4
"""The largest |--strength| or |--clamp|, in latent units. Far below it the edit already swamps the activations
(on the demo model strengths 100 and 1e12 give the same images); far above it they overflow to NaN, which
comes out as black images."""


class SteerConfig(BaseModel):
    """A `tide steer` run."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    sae: Path
    """The SAE folder."""
    latent: int = Field(ge=0)
    """Latent index F."""
    out: Path
    """Folder for images.npy, unsteered.npy, labels.npy, seeds.npy, grid.png, steer.json."""
    strength: float | None = None
    """Add strength x latent F's raw-space decoder direction."""
    clamp: float | None = None
    """Set latent F to this value inside the SAE's code (error term kept)."""
    steps: str | None = None
    """Steer only at steps 'a:b' (a <= step < b); default every step."""
    region: str | None = None
    """Steer only the image tokens of this region of the token grid (train/loop/regions.py); default all. A
    signed region A/B adds --strength on A and subtracts it on B (push-pull)."""
    labels: str | None = None
    """Class labels as harvest takes them: cycle, random, '3,5,7', '0-9' (default: the store's)."""
    prompts: Path | None = None
    """Text models: a file with one prompt a line (default: the store's)."""
    rows: Literal["both", "cond"] = "both"
    """CFG rows steered."""
    num_samples: int = Field(16, gt=0)
    """Images."""
    num_steps: int | None = Field(None, gt=0)
    """Denoising steps; default the store's."""
    batch_size: int = Field(50, gt=0)
    """Samples per forward pass."""
    model: str | None = None
    """The pipeline; default the one the SAE's store was harvested from."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    overwrite: bool = False
    """Replace an earlier `tide steer` output in --out."""
    progress: bool = True
    """Show a progress bar."""

    @field_validator("strength", "clamp", mode="before")
    @classmethod
    def _edit_size(cls, v: Any, info: ValidationInfo) -> Any:
        # Before pydantic's own finite-number check, so that NaN and infinity get this message too.
        if isinstance(v, int | float) and not abs(v) <= EDIT_LIMIT:
            raise ValueError(
                f"--{info.field_name} {v:g} is not an edit tide can apply: it takes a finite number of latent units "
                f"up to {EDIT_LIMIT:g} either way (past a few hundred the direction swamps the activations, and far "
                "past it they overflow to NaN: black images); use e.g. 10, guided by the activations the latent "
                "takes on the store (`tide features`)"
            )
        return v

    @field_validator("region")
    @classmethod
    def _known_region(cls, v: str | None) -> str | None:
        from tide.train.loop.regions import check_region

        return None if v is None else check_region(v)

    @model_validator(mode="after")
    def _one_edit(self) -> SteerConfig:
        if self.strength is not None and self.clamp is not None:
            raise ValueError(
                f"--strength {self.strength} and --clamp {self.clamp} were both given; they are two different "
                "edits (add a direction, or set the latent's value): choose one"
            )
        if self.strength is None and self.clamp is None:
            raise ValueError("give --strength A (add A x the latent's direction) or --clamp V (set it to V)")
        return self

    @field_validator("out", mode="before")
    @classmethod
    def _local_out(cls, value: Any) -> Any:
        # Before Path folds `s3://b/x` into a local `s3:/b/x`: the output is a local folder (store/outputs.py).
        return local_out(value, "steer", option="") if isinstance(value, str | Path) else value


def _raw(sae, x_norm_BD: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    # The one place that maps the SAE's normalised space back to raw activations (forward_raw's inverse half).
    return sae.denormalize(x_norm_BD, t_B)


def direction(sae, latent: int, t: float) -> torch.Tensor:
    """(D,) latent's decoder direction in raw space at timestep t: raw(decode(e_F)) - raw(decode(0))."""
    z_2F = torch.zeros(2, sae.cfg.num_latents, device=sae.W_dec.device)
    z_2F[0, latent] = 1
    x_2D = _raw(sae, sae.decode(z_2F), torch.full((2,), t, device=z_2F.device))
    return x_2D[0] - x_2D[1]


def _weights(region: str | None, x_BND: torch.Tensor) -> torch.Tensor | None:
    """(1, N, 1) the region's weights per token (train/loop/regions.py: 1 on its tokens, 0 elsewhere; +1 and -1
    on the halves of a signed one A/B) on x's device and dtype; None without a region."""
    if region is None:
        return None
    from tide.train.loop.regions import region_weights

    return region_weights(region, x_BND.shape[1]).to(x_BND)[None, :, None]


def in_region(region: str | None, x_BND: torch.Tensor, new_BND: torch.Tensor) -> torch.Tensor:
    """new_BND on the tokens of `region` (both halves of a signed one), x_BND untouched elsewhere; None:
    new_BND."""
    w_1N1 = _weights(region, x_BND)
    return new_BND if w_1N1 is None else torch.where(w_1N1 != 0, new_BND, x_BND)


def add_edit(sae, latent: int, strength: float | torch.Tensor, region: str | None = None) -> Callable:
    """x + strength * direction(latent, t) on the tokens of `region` (default all; a signed region A/B adds it
    on A and subtracts it on B); `strength` a scalar or (B,) per row."""

    def edit(site: str, layer: int, step: int, t: float, x_BND: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            d_D = direction(sae, latent, t).to(x_BND)
        a = torch.as_tensor(strength, dtype=x_BND.dtype, device=x_BND.device)
        a_B11 = (
            a.repeat(x_BND.shape[0] // a.numel())[:, None, None] if a.ndim else a
        )  # CFG rows repeat samples
        # The region's weights once per call: they mark its tokens and, for a signed region, give the sign.
        w_1N1 = _weights(region, x_BND)
        sign = w_1N1 if w_1N1 is not None and "/" in region else 1.0  # 1.0: x + a * d as without --region
        new_BND = x_BND + a_B11 * sign * d_D
        return new_BND if w_1N1 is None else torch.where(w_1N1 != 0, new_BND, x_BND)

    return edit


def clamp_edit(sae, latent: int, value: float, region: str | None = None) -> Callable:
    """x + (raw(decode(z with z_F = value)) - x_hat) on the tokens of `region` (default all; both halves of a
    signed one: a value set has no sign): the error term x - x_hat is kept."""

    def edit(site: str, layer: int, step: int, t: float, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        x_RD = x_BND.reshape(B * N, D).float()
        t_R = torch.full((B * N,), t, device=x_RD.device)
        with torch.no_grad():
            out = sae.forward_raw(x_RD, t_R)
            z_RF = out.z_BF.clone()
            z_RF[:, latent] = value
            x_new = x_RD + (_raw(sae, sae.decode(z_RF), t_R) - out.x_hat_BD)
        return in_region(region, x_BND, x_new.reshape(B, N, D).to(x_BND.dtype))  # (B, N, D)

    return edit


class SteerResult(NamedTuple):
    images: np.ndarray
    """(N, H, W, C) uint8 steered images."""
    unsteered: np.ndarray
    """(N, H, W, C) uint8 images of the same seeds, unedited."""
    labels: np.ndarray
    """(N,) class label (or prompt index) each sample was conditioned on."""
    summary: dict[str, Any]
    """What steer.json holds."""


def check_latent(s: LoadedSAE, latent: int) -> None:
    F = s.meta.sae.num_latents
    if not 0 <= latent < F:
        raise ValueError(f"--latent {latent} is out of range: {s.folder.name} has {F} latents (0..{F - 1})")


def steer(cfg: SteerConfig, log: Callable[[str], None] = print) -> SteerResult:
    """Sample cfg.num_samples images with and without the edit; write them, the grid and steer.json."""
    from tide.store.reader import open_store
    from tide.train.loop.rerun import Intervention, rerun
    from tqdm.auto import tqdm

    s = load_sae(cfg.sae)
    check_latent(s, cfg.latent)
    store = open_store(s.meta.store.path)
    planned = rerun(
        store.meta, cfg.num_samples, cfg.num_steps, cfg.labels, cfg.prompts, cfg.device, cfg.model
    )
    site, layer, _ = sae_target(s)
    check_pipeline(s, store.meta, planned.model.info, site, layer)
    steps = parse_steps(cfg.steps, planned.meta.num_inference_steps)
    check_replaceable(cfg.out, "steer", cfg.overwrite)  # before the sampling: refused at once
    sae = s.sae.to(planned.model.transformer.device)
    edit = (
        add_edit(sae, cfg.latent, cfg.strength, cfg.region)
        if cfg.clamp is None
        else clamp_edit(sae, cfg.latent, cfg.clamp, cfg.region)
    )
    iv = [Intervention(site, layer, edit, steps, cfg.rows)]
    n, S = cfg.num_samples, planned.meta.num_inference_steps
    steered, plain = [], []
    with tqdm(total=2 * n * S, disable=not cfg.progress, desc="steer", unit="img-step") as bar:
        for start in range(0, n, cfg.batch_size):
            batch = slice(start, min(n, start + cfg.batch_size))
            plain.append(planned.sample(batch, on_step=bar.update).images.numpy())
            edited = planned.sample(batch, iv, on_step=bar.update)
            _check_finite(cfg, edited.latents, batch)
            steered.append(edited.images.numpy())
    images, unsteered = np.concatenate(steered), np.concatenate(plain)
    labels = planned.labels()
    summary = _summary(cfg, s, planned, planned.classifier(), images, unsteered, labels)
    with staged(cfg.out, "steer", cfg.overwrite) as out:  # swapped in whole, once written
        np.save(out / "images.npy", images)
        np.save(out / "unsteered.npy", unsteered)
        np.save(out / "labels.npy", labels)
        np.save(out / "seeds.npy", np.asarray(planned.arrays["seeds"]))
        save_grid(out / "grid.png", [("unsteered", unsteered), ("steered", images)], cols=16)
        (out / "steer.json").write_text(json.dumps(summary, indent=2))
    return SteerResult(images, unsteered, labels, summary)


def _check_finite(cfg: SteerConfig, latents: torch.Tensor, batch: slice) -> None:
    """Refuse an edit that drove the sampler to NaN or infinity (its images would come out black)."""
    if not torch.isfinite(latents).all():
        edit = f"--strength {cfg.strength:g}" if cfg.clamp is None else f"--clamp {cfg.clamp:g}"
        raise ValueError(
            f"steering latent {cfg.latent} with {edit} drove the model to NaN or infinity (samples "
            f"{batch.start}..{batch.stop - 1}; their images would be black); nothing was written. Use a smaller "
            "edit: one this large only saturates the model"
        )


def _summary(cfg, s, planned, clf, images, unsteered, labels) -> dict[str, Any]:
    out: dict[str, Any] = {
        "sae": s.folder.name,
        "latent": cfg.latent,
        "strength": cfg.strength,
        "clamp": cfg.clamp,
        "steps": cfg.steps,
        "region": cfg.region,
        "rows": cfg.rows,
        "num_samples": len(images),
        "num_steps": planned.meta.num_inference_steps,
        "pixels_changed": float((images != unsteered).mean()),
    }
    if clf is not None:
        pred, pred0 = clf(images), clf(unsteered)
        out["predicted"] = np.bincount(pred, minlength=10).tolist()
        out["predicted_unsteered"] = np.bincount(pred0, minlength=10).tolist()
        out["unsteered_accuracy"] = float((pred0 == labels).mean())
        out["steered_accuracy"] = float((pred == labels).mean())
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """steer.json as the labelled table `tide steer` prints: the edit, then for a digits model the
    classifier's accuracy and the count of each predicted class, unsteered over steered."""
    edit = f"strength {summary['strength']:g}" if summary["clamp"] is None else f"clamp {summary['clamp']:g}"
    lines = [
        f"SAE {summary['sae']}, latent {summary['latent']}, {edit}, steps {summary['steps'] or 'all'}, "
        f"rows {summary['rows']}" + (f", region {summary['region']}" if summary.get("region") else ""),
        f"{summary['num_samples']} samples x {summary['num_steps']} steps; "
        f"{summary['pixels_changed']:.1%} of pixel values changed",
    ]
    if "predicted" in summary:
        classes = range(len(summary["predicted"]))
        lines += [
            "",
            f"{'':<10} {'accuracy':>8}  "
            + " ".join(f"{c:>4}" for c in classes)
            + "  (predicted class counts)",
            f"{'unsteered':<10} {summary['unsteered_accuracy']:>8.2f}  "
            + " ".join(f"{v:>4}" for v in summary["predicted_unsteered"]),
            f"{'steered':<10} {summary['steered_accuracy']:>8.2f}  "
            + " ".join(f"{v:>4}" for v in summary["predicted"]),
        ]
    return "\n".join(lines)

"""`make steer-demo`: steer what a digit looks like (its ink, size, position, slant) through one tide-SAE latent.

Method, measured from pixels (train/analysis/attributes.py), nothing picked by hand:
1. Latent per attribute. The final images of the SAE's training samples (the first `probe_samples`, never
   the held-out ones; from the store, else redrawn from their seeds) give the six attributes. A sample's
   activation of a latent is its mean over the store's rows of the sample (every stored step and token).
   The latent picked for an attribute has the largest |Pearson r| between the two *within class* (class means
   subtracted from both): the class comes from the label, which this model reads through adaLN in every
   block and which no residual edit changes (docs/results.md, "Steering digits into other classes"), so a
   latent that predicts the attribute only through the class would have nothing to move. The sign of r is the attribute's
   `direction`: the way it should move when the latent is turned up. The latent's unit is its mean
   activation where it fires, over those rows. With `--pick effect` the latent is instead the one of the
   attribute's best predictors whose steering moves it most on training samples; with `--pick region` it
   is one latent for all six, the one that moves ink most, steered on the tokens of each attribute's own
   region of the image (train/loop/steer_pick.py); with `--pick push-pull` (the default) that latent is added
   on the region and subtracted on the rest, so ink is taken from one side and drawn on the other.
2. Steering. The SAE's held-out samples (same seeds and labels as the store) are drawn unsteered, then with
   `tide steer`'s edits (train/loop/steer.py) at the SAE's site, every step, both CFG rows: up, adding
   m x unit x the latent's decoder direction for each multiple m (`tide steer --strength`); off, the
   latent clamped to 0 in the SAE's code with the error term kept (`--clamp 0`: down as far as the latent
   goes, since its activation is never negative; it changes only rows where the latent fires); and with
   `--down`, subtracting m x unit x the direction, beyond the latent's own range.
3. Scoring, per attribute and edit: the mean change of the attribute, steered minus unsteered on the same
   seed, in units of the unsteered samples' standard deviation; how often the shipped real-digits classifier
   gives the steered image the class it gives the unsteered one; and how often the steered image still lies
   as close to a real digit as the farthest unsteered one (the classifier labels noise too).

Writes DIR/<attribute>/images.npy (steered at the strongest up multiple), unsteered.npy, labels.npy,
direction.txt (+1 or -1) and grid.png (unsteered, then each edit), and DIR/attributes.json with every figure.

Shape key: N samples, S steps, T tokens, D width, F latents, A attributes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tide.store.outputs import check_replaceable, local_out, staged
from tide.train.analysis.attributes import ATTRIBUTES, as_array, attributes
from tide.train.fit.checkpoint import LoadedSAE, load_sae, sae_folders
from tide.train.loop.splice import sae_target
from tide.train.loop.steer import add_edit, clamp_edit
from tide.train.loop.steer_pick import Pick, pick_by_effect, pick_for_regions, pick_latents, sample_activity

MULTIPLES = (1.0, 2.0, 4.0)
"""Up strengths, in units of the latent's mean activation where it fires."""


class AttributeDemoConfig(BaseModel):
    """A `make steer-demo` run."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    saes: Path
    """A `tide train --out` folder (its first tide SAE is used) or one SAE folder."""
    out: Path
    """Folder for <attribute>/ and attributes.json."""
    probe_samples: int = Field(200, gt=1)
    """Training samples of the SAE redrawn to pick the latents."""
    pick: Literal["push-pull", "region", "effect", "correlation"] = "push-pull"
    """How each attribute's latent is chosen (train/loop/steer_pick.py): the best within-class predictor of
    it; or, among each attribute's `candidates` best predictors, the one whose steering moves it most on
    `screen_samples` training samples; or (region) the one of those candidates that moves ink most, steered
    on the tokens of each attribute's region of the image; or (push-pull) that latent added on the region
    and subtracted on the rest of the image."""
    candidates: int = Field(8, gt=0)
    """pick effect: the best predictors of each attribute that are screened."""
    screen_samples: int = Field(20, gt=1)
    """pick effect: probe samples each candidate is steered on (the first ones)."""
    multiples: tuple[float, ...] = Field(MULTIPLES, min_length=1)
    """Up strengths / the latent's unit; the largest is the strongest (images.npy)."""
    down: tuple[float, ...] = ()
    """Down strengths / unit, subtracted (beyond the latent's own range: its activation is never negative)."""
    off: bool = True
    """Also clamp the latent to 0."""
    batch_size: int = Field(50, gt=0)
    """Samples per forward pass."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    overwrite: bool = False
    """Replace an earlier demo output in --out."""
    progress: bool = True
    """Show a progress bar."""

    @field_validator("out", mode="before")
    @classmethod
    def _local_out(cls, value: Any) -> Any:
        # Before Path folds `s3://b/x` into a local `s3:/b/x`: the output is a local folder (store/outputs.py).
        return local_out(value, "steer-demo", option="") if isinstance(value, str | Path) else value


def tide_sae(saes: Path) -> LoadedSAE:
    found = [f for f in sae_folders([saes]) if load_sae(f).meta.sae.arch == "tide"]
    if not found:
        raise ValueError(f"{saes} holds no tide SAE; run `make train` (it trains tide and topk)")
    return load_sae(found[0])


class _Edit(NamedTuple):
    name: str
    """up 2x, down 2x, off."""
    strength: float | None
    """Added multiple of the direction, in latent units; None for the clamp."""
    make: Callable[[Any], Callable]
    """sae -> the edit (train/loop/steer.py)."""


def edits(cfg: AttributeDemoConfig, pick: Pick) -> list[_Edit]:
    """The edits of one attribute's latent: up at each multiple, down at each, and off."""
    f, u, r = pick.latent, pick.unit, pick.region
    out = [_Edit(f"up {m:g}x", m * u, lambda sae, a=m * u: add_edit(sae, f, a, r)) for m in cfg.multiples]
    out += [_Edit(f"down {m:g}x", -m * u, lambda sae, a=-m * u: add_edit(sae, f, a, r)) for m in cfg.down]
    if cfg.off:
        out.append(_Edit("off", None, lambda sae: clamp_edit(sae, f, 0.0, r)))
    return out


def _score(attr0_NA, attr_NA, a: int, pred0, pred, dist, limit: float) -> dict[str, float]:
    """One edit's figures for attribute a (module docstring, step 3)."""
    sd = float(np.nanstd(attr0_NA[:, a], ddof=1))
    change = attr_NA[:, a] - attr0_NA[:, a]
    return {
        "change_sd": float(np.nanmean(change) / sd) if sd > 0 else float("nan"),
        "class_kept": float((pred == pred0).mean()),
        "digit_like": float((dist <= limit).mean()),
    }


def held_out(s: LoadedSAE, layout) -> np.ndarray:
    """The SAE's held-out samples (its val chunks), refused when it has none."""
    if not s.meta.split.val_chunks:
        raise ValueError(
            f"{s.folder.name} has no held-out samples (trained with val_fraction {s.meta.split.val_fraction}); "
            "the demo steers samples the SAE never saw: train with --val-fraction > 0"
        )
    return np.concatenate([np.arange(a, b) for a, b in s.meta.split.val_samples(layout)])


def probe_samples(s: LoadedSAE, layout, n: int) -> np.ndarray:
    """The first n of the SAE's training samples: the latents are picked on them, never on held-out ones."""
    train = np.concatenate(
        [np.arange(*layout.sample_chunk(c).indices(layout.num_samples)) for c in s.meta.split.train_chunks]
    )
    return np.sort(train)[:n]


class _Draw(NamedTuple):
    """Draws samples of the store's run (train/loop/rerun.py), with or without an edit at the SAE's site."""

    run: Any
    site: str
    layer: int
    batch_size: int
    bar: Any

    def __call__(self, samples: np.ndarray, edit: Callable | None = None) -> np.ndarray:
        return self.rows(samples, lambda lo, hi: edit)

    def rows(self, samples: np.ndarray, edit_of: Callable[[int, int], Callable | None]) -> np.ndarray:
        """The samples, batch by batch, samples[lo:hi] with the edit `edit_of(lo, hi)` (None: unedited)."""
        from tide.train.loop.rerun import Intervention

        out = []
        for lo in range(0, len(samples), self.batch_size):
            hi = min(lo + self.batch_size, len(samples))
            edit = edit_of(lo, hi)
            ivs = [Intervention(self.site, self.layer, edit)] if edit is not None else []
            out.append(self.run.sample(samples[lo:hi], ivs, on_step=self.bar.update).images.numpy())
        return np.concatenate(out)


def _final_images(store, samples: np.ndarray, draw: _Draw) -> np.ndarray:
    """The samples' final images: the store's (`tide harvest --save-images`), else redrawn from their seeds."""
    if "images" in store.root:
        draw.bar.update(len(samples) * draw.run.meta.num_inference_steps)
        return store.root["images"].get_orthogonal_selection((samples,))
    return draw(samples)


def run_demo(cfg: AttributeDemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pick a latent per attribute, steer the held-out samples with it, score and write (module docstring)."""
    from tide.store.reader import open_store
    from tide.train.loop.rerun import rerun
    from tide.train.loop.steer_classes import digit_distance
    from tqdm.auto import tqdm

    s = tide_sae(cfg.saes)
    store = open_store(s.meta.store.path)
    held, probe = held_out(s, store.layout), probe_samples(s, store.layout, cfg.probe_samples)
    check_replaceable(cfg.out, "steer-demo", cfg.overwrite)  # before the redraws: refused at once
    run = rerun(store.meta, device=cfg.device)
    clf = run.classifier()
    if clf is None:
        raise ValueError(
            f"{store.meta.model.id} is not a digits model (10 classes, one channel, pixel space): the demo "
            "scores steered images with the shipped demo's digit classifier"
        )
    site, layer, _ = sae_target(s)
    s.sae.to(run.model.transformer.device)
    n_edits = len(cfg.multiples) + len(cfg.down) + cfg.off
    total = (len(probe) + len(held) * (1 + len(ATTRIBUTES) * n_edits)) * run.meta.num_inference_steps
    with tqdm(total=total, unit="img-step", desc="steer-demo", disable=not cfg.progress) as bar:
        draw = _Draw(run, site, layer, cfg.batch_size, bar)
        labels = run.labels()
        probe_images = _final_images(store, probe, draw)
        probe_attr_NA = as_array(attributes(probe_images))
        activity = sample_activity(s, store, probe)
        picks, screened = pick_latents(*activity, probe_attr_NA, labels[probe]), None
        if cfg.pick != "correlation":
            screen_on = _screen_on(
                cfg, s, draw, probe, probe_images, probe_attr_NA, activity.unit_F, clf, digit_distance
            )
            args = (activity, probe_attr_NA, labels[probe], cfg.candidates, screen_on)
            if cfg.pick == "effect":
                picks, screened = pick_by_effect(*args)
            else:
                picks, screened = pick_for_regions(*args, signed=cfg.pick == "push-pull")
        log(f"{s.folder.name}: latents per attribute {', '.join(f'{p.attribute} {p.latent}' for p in picks)}")
        base = draw(held)
        steered = {p.attribute: {e.name: draw(held, e.make(s.sae)) for e in edits(cfg, p)} for p in picks}
    report = _report(cfg, s, held, labels[held], probe, picks, base, steered, clf, digit_distance)
    if screened is not None:
        n, m = min(cfg.screen_samples, len(probe)), max(cfg.multiples)
        report["screen"] = {"samples": n, "multiple": m, **screened}
    with staged(cfg.out, "steer-demo", cfg.overwrite) as new:  # swapped in whole, once written
        _write(new, cfg, picks, labels[held], base, steered, report)
    return report


def _screen_on(cfg, s, draw: _Draw, probe, probe_images, attr_NA, unit_F, clf, digit_distance) -> Callable:
    """latents -> their screen (train/loop/steer_pick.py, step 2) on the first `screen_samples` probe samples,
    each latent steered up at the strongest multiple in its own rows."""
    from tide.train.loop.steer_classes import rows_edit
    from tide.train.loop.steer_pick import screen

    n, m = min(cfg.screen_samples, len(probe)), max(cfg.multiples)
    limit = float(digit_distance(probe_images[:n]).max())
    sd_A = np.nanstd(attr_NA, axis=0, ddof=1)

    def judge(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return clf(images), digit_distance(images) <= limit

    def draw_rows(samples_R: np.ndarray, latents_R: list[int]) -> np.ndarray:
        def edit_of(lo: int, hi: int) -> Callable:
            return rows_edit(s.sae, latents_R[lo:hi], [m * float(unit_F[f]) for f in latents_R[lo:hi]])

        return draw.rows(samples_R, edit_of)

    def screen_on(latents: list[int]):
        draw.bar.total += len(latents) * n * draw.run.meta.num_inference_steps
        draw.bar.refresh()
        return screen(draw_rows, latents, probe[:n], probe_images[:n], sd_A, judge)

    return screen_on


def _report(cfg, s, held, labels, probe, picks, base, steered, clf, digit_distance) -> dict[str, Any]:
    """Every figure of the run (attributes.json)."""
    attr0_NA = as_array(attributes(base))
    pred0, limit = clf(base), float(digit_distance(base).max())
    per = []
    for a, p in enumerate(picks):
        rows = []
        for e in edits(cfg, p):
            imgs = steered[p.attribute][e.name]
            attr_NA = as_array(attributes(imgs))
            rows.append(
                {"edit": e.name, "strength": e.strength,
                 **_score(attr0_NA, attr_NA, a, pred0, clf(imgs), digit_distance(imgs), limit)}
            )  # fmt: skip
        per.append(
            {**p._asdict(), "unsteered_mean": float(np.nanmean(attr0_NA[:, a])),
             "unsteered_sd": float(np.nanstd(attr0_NA[:, a], ddof=1)), "edits": rows}
        )  # fmt: skip
    return {
        "sae": s.folder.name,
        "held_out_samples": held.tolist(),
        "probe_samples": len(probe),
        "pick": cfg.pick,
        "candidates": cfg.candidates,
        "multiples": list(cfg.multiples),
        "down": list(cfg.down),
        "unsteered_accuracy": float((pred0 == labels).mean()),
        "attributes": per,
    }


def _write(out: Path, cfg, picks, labels, base, steered, report) -> None:
    """DIR/<attribute>/{images,unsteered,labels}.npy, direction.txt, grid.png; DIR/attributes.json."""
    from tide.train.loop.splice_report import save_grid

    strongest = f"up {max(cfg.multiples):g}x"
    for p in picks:
        folder = out / p.attribute
        folder.mkdir()
        np.save(folder / "images.npy", steered[p.attribute][strongest])
        np.save(folder / "unsteered.npy", base)
        np.save(folder / "labels.npy", labels)
        (folder / "direction.txt").write_text(f"{p.direction:+d}\n")
        save_grid(folder / "grid.png", [("unsteered", base), *steered[p.attribute].items()], cols=16)
    (out / "attributes.json").write_text(json.dumps(report, indent=2))


def format_table(r: dict[str, Any]) -> str:
    """The printed result: per attribute, its latent and every edit's figures."""
    lines = [
        f"{r['sae']}: {len(r['held_out_samples'])} held-out samples (classifier accuracy unsteered "
        f"{r['unsteered_accuracy']:.2f}); latents picked on {r['probe_samples']} training samples"
    ]
    sc = r.get("screen")
    if sc is not None and r["pick"] == "effect":
        lines.append(
            f"picked by effect: each attribute's {r['candidates']} best predictors ({len(sc['candidates'])} "
            f"latents) steered up {sc['multiple']:g}x on {sc['samples']} of them; per attribute the largest "
            f"change among those keeping class and digit-likeness on >= {sc['min_kept']:.0%}"
        )
    if sc is not None and r["pick"] in ("region", "push-pull"):
        lines.append(
            f"picked by {r['pick']}: each attribute's {r['candidates']} best predictors ({len(sc['candidates'])} "
            f"latents) steered up {sc['multiple']:g}x on {sc['samples']} of them; the largest ink change among those keeping class and digit-likeness "
            f"on >= {sc['min_kept']:.0%}, steered on each attribute's region of the image tokens"
            + (" (added on A, subtracted on B of a region A/B)" if r["pick"] == "push-pull" else "")
        )
    for a in r["attributes"]:
        lines += [
            "",
            f"{a['attribute']}: latent {a['latent']} (within-class r {a['r_within']:+.2f}, r {a['r']:+.2f}, "
            f"fires on {a['fires']:.0%} of samples, unit {a['unit']:.3g}); direction {a['direction']:+d}; "
            f"unsteered {a['unsteered_mean']:.3g} +- {a['unsteered_sd']:.3g}"
            + (f"; region {a['region']}" if a.get("region") else "")
            + (f"; screened change {a['screened']:+.2f} sd" if a.get("screened") is not None else ""),
            f"  {'edit':<12}{'change (sd)':>12}{'class kept':>12}{'digit-like':>12}",
        ]
        lines += [
            f"  {e['edit']:<12}{e['change_sd']:>+12.2f}{e['class_kept']:>12.2f}{e['digit_like']:>12.2f}"
            for e in a["edits"]
        ]
    lines.append("")
    # Every strength: a count at the strongest alone would hide what the images look like there.
    for m in sorted(r["multiples"]):
        edit = f"up {m:g}x"
        hits = [
            (a["attribute"], e["digit_like"]) for a in r["attributes"] for e in a["edits"]
            if e["edit"] == edit and e["change_sd"] * a["direction"] >= 1 and e["class_kept"] >= 0.8
        ]  # fmt: skip
        lines.append(
            f"at {edit}: moved >= 1 sd in the declared direction with >= 80% class kept: {len(hits)} of "
            f"{len(r['attributes'])} ({', '.join(f'{n}, digit-like {d:.2f}' for n, d in hits) or 'none'})"
        )
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(m) for m in text.split(",") if m.strip())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tide.train.loop.steer_demo", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--saes", type=Path, default=Path("runs/saes"), help="`tide train --out` folder or SAE folder"
    )
    p.add_argument("--out", default="runs/steer-demo")
    p.add_argument(
        "--probe-samples", type=int, default=200, help="training samples redrawn to pick the latents"
    )
    p.add_argument(
        "--pick", choices=("push-pull", "region", "effect", "correlation"), default="push-pull",
        help="latent per attribute: (push-pull) the one of every attribute's --candidates best predictors "
        "that moves ink most on --screen-samples training samples, added on the image tokens of each "
        "attribute's region and subtracted on the rest; (region) the same on the region only; (effect) the "
        "one of its own best predictors whose steering moves it most; (correlation) its best within-class "
        "predictor",
    )  # fmt: skip
    p.add_argument(
        "--candidates", type=int, default=8, help="--pick effect: predictors screened per attribute"
    )
    p.add_argument("--screen-samples", type=int, default=20, help="--pick effect: training samples steered")
    p.add_argument("--multiples", default=",".join(f"{m:g}" for m in MULTIPLES), help="up strengths / unit")
    p.add_argument("--down", default="", help="down strengths / unit, subtracted (default none)")
    p.add_argument("--no-off", action="store_true", help="do not clamp the latent to 0")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = AttributeDemoConfig(
            saes=a.saes, out=a.out, probe_samples=a.probe_samples, pick=a.pick, candidates=a.candidates,
            screen_samples=a.screen_samples, multiples=_floats(a.multiples),
            down=_floats(a.down), off=not a.no_off, batch_size=a.batch_size, device=a.device,
            overwrite=a.overwrite, progress=not a.no_progress,
        )  # fmt: skip
        print(format_table(run_demo(cfg)))
    except ValueError as e:
        p.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()

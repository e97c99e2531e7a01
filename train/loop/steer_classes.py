"""Class steering: turn digits of other classes into a chosen target digit through one tide-SAE latent.

`python -m tide.train.loop.steer_classes` (it was `make steer-demo` before the attribute demo). Method, all
measured, nothing hand-picked:
1. Latent per target class c: the SAE encodes the store's rows (first `probe_samples` samples, every
   stored step and token); each sample's mean activation per latent is scored by Cohen's d between class c
   and the other classes; the latent with the largest d is c's. Its unit is `active_mean`, the mean of
   its nonzero activations on class-c rows.
2. Sweep: for every target c, one sample of each other class (seeds 0.. as a harvest gives them) is steered
   by adding strength x the latent's raw-space decoder direction (train/loop/steer.py) at every step, both CFG
   rows; strengths are multiples of active_mean. Success = the demo's real-digits classifier says c
   and the image lies as close to a real digit (8x8, nearest neighbour) as the farthest unsteered sample
   does: the classifier alone labels noise too (it calls zero-ablated images "4").
3. Per target, the smallest multiple with the best success is kept; its images are written to --out as
   images.npy, with labels.npy (class sampled) and target.npy (class aimed at); sweep.json has every figure,
   the unsteered accuracy and the unsteered rate of the target class (the chance of "success" untouched).
4. Baseline without the SAE: the store's class means of the site's activations per step (over samples and
   stored tokens) give the difference target mean - source mean, added at every step, both CFG rows, at
   `BASELINE_MULTIPLES` of itself. If this fails too, the SAE is not what fails: the class is not a
   direction of the residual stream.
5. Ceiling: the same seeds are sampled conditioned on the target class, their layer activations recorded at
   every step and CFG row, and written over the source runs' (activation patching, no SAE). No edit of that
   site made through the SAE can carry more of the target class than its real activations do, so this
   bounds every steering protocol at the site; on the demo model it is near zero, because the class label
   also enters every later block's and the output layer's adaLN modulation. On a model trained with
   `tide demo-model train --label-block 1` it is 0.97, and steps 2 and 4 still fail (docs/results.md, "A model whose
   label enters once").

Shape key: N samples, S steps, T tokens, D width, F latents.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tide.store.outputs import check_replaceable, local_out, staged
from tide.store.reader import read_array
from tide.train.fit.checkpoint import LoadedSAE, load_sae, sae_folders
from tide.train.loop.splice import sae_target
from tide.train.loop.steer import direction

MULTIPLES = (8.0, 16.0, 32.0, 64.0)
BASELINE_MULTIPLES = (1.0, 4.0)
NUM_CLASSES = 10


@torch.no_grad()
def class_latents(s: LoadedSAE, store, probe_samples: int) -> list[dict[str, Any]]:
    """Per class: the latent whose per-sample mean activation best separates it (Cohen's d), and its unit."""
    arr = store.root[s.meta.array]
    n = min(probe_samples, arr.shape[0])
    labels = store.read("label", (slice(0, n),))
    x_NSTD = torch.as_tensor(read_array(arr, (slice(0, n),)).astype(np.float32))
    t_S = store.timesteps
    F = s.meta.sae.num_latents
    act_NF = torch.zeros(n, F)
    sums_CF, counts_CF = torch.zeros(NUM_CLASSES, F), torch.zeros(NUM_CLASSES, F)
    onehot_NC = torch.nn.functional.one_hot(torch.as_tensor(labels), NUM_CLASSES).float()
    N, S, T, D = x_NSTD.shape
    for step in range(S):
        z = s.sae.forward_raw(x_NSTD[:, step].reshape(N * T, D), float(t_S[step])).z_BF.reshape(N, T, F)
        act_NF += z.mean(1) / S
        sums_CF += onehot_NC.T @ z.sum(1)
        counts_CF += onehot_NC.T @ (z > 0).sum(1).float()
    out = []
    for c in range(NUM_CLASSES):
        mine, rest = act_NF[labels == c], act_NF[labels != c]
        d_F = (mine.mean(0) - rest.mean(0)) / ((mine.var(0) + rest.var(0)) / 2 + 1e-12).sqrt()
        f = int(d_F.argmax())
        unit = float(sums_CF[c, f] / counts_CF[c, f].clamp_min(1))
        out.append({"target": c, "latent": f, "cohens_d": float(d_F[f]), "active_mean": unit})
    return out


def digit_distance(images_BHWC: np.ndarray) -> np.ndarray:
    """(B,) distance of each image, pooled to the digits' 8x8 grid of 0..16, to its nearest real digit.

    The classifier labels anything, noise included (it calls 38 of 40 zero-ablated images "4"), so a steered
    image only counts when it is also as close to some real digit as the unsteered samples are."""
    from sklearn.datasets import load_digits

    real_RF = load_digits().data  # (1797, 64), 0..16
    x = torch.as_tensor(images_BHWC).permute(0, 3, 1, 2).float()[:, :1] / 255  # (B, 1, H, W) in [0, 1]
    x_BF = (torch.nn.functional.adaptive_avg_pool2d(x, 8) * 16).flatten(1).numpy()
    d_BR = ((x_BF[:, None, :] - real_RF[None]) ** 2).sum(-1)
    return np.sqrt(d_BR.min(1))


def rows_edit(sae, latents_B: list[int], strengths_B: list[float]):
    """Add strengths_B[b] x direction(latents_B[b], t) to sample b (both CFG rows of it)."""
    a_B1 = torch.tensor(strengths_B, dtype=torch.float32)[:, None]

    def edit(site: str, layer: int, step: int, t: float, x_RND: torch.Tensor) -> torch.Tensor:
        dirs = {f: direction(sae, f, t) for f in set(latents_B)}
        d_BD = torch.stack([dirs[f] for f in latents_B]) * a_B1
        d_RD = d_BD.repeat(x_RND.shape[0] // len(latents_B), 1).to(x_RND)  # CFG rows repeat the samples
        return x_RND + d_RD[:, None, :]

    return edit


def class_means(store, array: str) -> torch.Tensor:
    """(S, classes, D) mean of the store's rows of `array` per stored step and class, over samples and tokens."""
    labels = torch.as_tensor(store.read("label"))
    onehot_NC = torch.nn.functional.one_hot(labels, NUM_CLASSES).double()
    arr = store.root[array]
    sums_SCD = torch.zeros(arr.shape[1], NUM_CLASSES, arr.shape[3], dtype=torch.float64)
    for start in range(0, arr.shape[0], arr.chunks[0]):  # one sample chunk at a time
        x_NSTD = torch.as_tensor(read_array(arr, (slice(start, start + arr.chunks[0]),)).astype(np.float64))
        sums_SCD += torch.einsum("nc,nstd->scd", onehot_NC[start : start + len(x_NSTD)], x_NSTD)
    return (sums_SCD / (onehot_NC.sum(0)[None, :, None] * arr.shape[2])).float()


def mean_difference_edit(means_SCD: torch.Tensor, timesteps_S, sources, targets, a: float):
    """Add a x (target class mean - source class mean) at the nearest stored timestep to each sample's rows."""
    src, tgt = torch.as_tensor(sources), torch.as_tensor(targets)
    t_S = np.asarray(timesteps_S, dtype=np.float64)

    def edit(site: str, layer: int, step: int, t: float, x_RND: torch.Tensor) -> torch.Tensor:
        m_CD = means_SCD[int(np.abs(t_S - t).argmin())]
        d_BD = a * (m_CD[tgt] - m_CD[src])
        return x_RND + d_BD.repeat(x_RND.shape[0] // len(src), 1).to(x_RND)[:, None, :]

    return edit


def recorder(into: dict[int, torch.Tensor]):
    """An edit that stores each step's activations in `into` (step -> rows) and changes nothing."""

    def edit(site: str, layer: int, step: int, t: float, x_RND: torch.Tensor) -> torch.Tensor:
        into[step] = x_RND.clone()
        return x_RND

    return edit


def replay(recorded: dict[int, torch.Tensor]):
    """An edit that writes the activations `recorder` stored for that step over the run's own."""

    def edit(site: str, layer: int, step: int, t: float, x_RND: torch.Tensor) -> torch.Tensor:
        return recorded[step].to(x_RND)

    return edit


class _Trial(NamedTuple):
    """The 90 source-class samples, the site edited and how an edited run is scored."""

    planned: Any
    site: str
    layer: int
    sources: np.ndarray
    targets: np.ndarray
    clf: Any
    limit: float
    """The farthest an unsteered (correctly drawn) sample lies from a real digit."""

    def run(self, edit=None, planned=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, success, classifier says the target) of the samples sampled with `edit` at the site."""
        from tide.train.loop.rerun import Intervention

        ivs = [Intervention(self.site, self.layer, edit)] if edit is not None else []
        images = (planned or self.planned).sample(slice(0, len(self.sources)), ivs).images.numpy()
        said = self.clf(images) == self.targets
        return images, said & (digit_distance(images) <= self.limit), said


def sweep(
    saes_dir: Path, out: Path, probe_samples: int, device: str, overwrite: bool, per_target: int = 9,
    multiples: tuple[float, ...] = MULTIPLES, log=print,
) -> dict:  # fmt: skip
    from tide.store.reader import open_store
    from tide.train.loop.rerun import rerun

    tide = [f for f in sae_folders([saes_dir]) if load_sae(f).meta.sae.arch == "tide"]
    if not tide:
        raise ValueError(f"{saes_dir} holds no tide SAE; run `make train` (it trains tide and topk)")
    s = load_sae(tide[0])
    store = open_store(s.meta.store.path)
    check_replaceable(out, "steer-demo", overwrite)  # before the sweep: refused at once
    picks = class_latents(s, store, probe_samples)
    log(f"{s.folder.name}: latents per target class {[p['latent'] for p in picks]}")
    # per target c, samples of the classes c+1, c+2, ... (mod 10): every other class when per_target = 9
    sources = [(c + i) % NUM_CLASSES for c in range(NUM_CLASSES) for i in range(1, per_target + 1)]
    targets = [c for c in range(NUM_CLASSES) for _ in range(per_target)]
    planned = rerun(store.meta, len(sources), labels=",".join(map(str, sources)), device=device)
    clf = planned.classifier()
    base = planned.sample(slice(0, len(sources))).images.numpy()
    site, layer, _ = sae_target(s)
    limit = float(digit_distance(base).max())
    trial = _Trial(planned, site, layer, np.asarray(sources), np.asarray(targets), clf, limit)
    runs = {}
    for m in multiples:
        strengths = [m * picks[c]["active_mean"] for c in targets]
        runs[m] = trial.run(rows_edit(s.sae, [picks[c]["latent"] for c in targets], strengths))
        log(
            f"strength {m} x active_mean: success {runs[m][1].mean():.3f} (classifier alone {runs[m][2].mean():.3f})"
        )
    bounds = {"baseline": _mean_difference(trial, store, s.meta.array), "ceiling": _ceiling(trial)}
    log(f"class-mean difference added (no SAE), by multiple: {bounds['baseline']}")
    log(f"ceiling (target run's activations patched in): {bounds['ceiling']}")
    with staged(out, "steer-demo", overwrite) as new:  # swapped in whole, once written
        return _write(new, s, picks, trial.sources, trial.targets, clf(base), runs, multiples, bounds)


def _mean_difference(trial: _Trial, store, array: str) -> dict[float, dict[str, float]]:
    """Success of adding the store's class-mean difference (no SAE), per multiple of it."""
    means, t_S, out = class_means(store, array), store.timesteps, {}
    for a in BASELINE_MULTIPLES:
        edit = mean_difference_edit(means, t_S, trial.sources, trial.targets, a)
        _, ok, said = trial.run(edit)
        out[a] = {"success": float(ok.mean()), "classifier_only": float(said.mean())}
    return out


def _ceiling(trial: _Trial) -> dict[str, float]:
    """The target-class run's own activations at the site, patched into the source run (no SAE)."""
    as_target = trial.planned._replace(arrays={**trial.planned.arrays, "labels": trial.targets})
    acts: dict[int, torch.Tensor] = {}
    own, _, own_said = trial.run(recorder(acts), planned=as_target)
    patched, ok, said = trial.run(replay(acts))
    return {
        "target_run_accuracy": float(own_said.mean()),
        "success": float(ok.mean()),
        "classifier_only": float(said.mean()),
        "still_source": float((trial.clf(patched) == trial.sources).mean()),
    }


def _write(out: Path, s, picks, src, tgt, pred0, runs, multiples, bounds: dict) -> dict:
    per_class, chosen = [], []
    for c in range(NUM_CLASSES):
        rates = {m: float(ok[tgt == c].mean()) for m, (_, ok, _) in runs.items()}
        said = {m: float(cls[tgt == c].mean()) for m, (_, _, cls) in runs.items()}
        best = min(m for m in multiples if rates[m] == max(rates.values()))
        chosen.append(best)
        per_class.append(
            {**picks[c], "success_by_multiple": rates, "classifier_only_by_multiple": said, "chosen_multiple": best,
             "unsteered_rate_of_target": float((pred0[tgt == c] == c).mean())}
        )  # fmt: skip
    images = np.stack([runs[chosen[t]][0][i] for i, t in enumerate(tgt)])
    np.save(out / "images.npy", images)
    np.save(out / "labels.npy", src)
    np.save(out / "target.npy", tgt)
    report = {
        "sae": s.folder.name,
        "samples_per_target": int((tgt == 0).sum()),
        "multiples": list(multiples),
        "unsteered_accuracy": float((pred0 == src).mean()),
        "success_by_multiple": {m: float(ok.mean()) for m, (_, ok, _) in runs.items()},
        "classifier_only_by_multiple": {m: float(cls.mean()) for m, (_, _, cls) in runs.items()},
        "success_at_chosen": float(
            np.mean([per_class[c]["success_by_multiple"][chosen[c]] for c in range(10)])
        ),
        "per_class": per_class,
        "class_mean_difference": bounds["baseline"],
        "ceiling": bounds["ceiling"],
    }
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    return report


def format_sweep(r: dict) -> str:
    head = (
        "target latent  d     unit  " + "".join(f"{m:>6g}x" for m in r["multiples"]) + "  chosen  untouched"
    )
    lines = [f"{r['sae']}: {r['samples_per_target']} samples per target (each of another class)", head]
    for p in r["per_class"]:
        rates = "".join(f"{p['success_by_multiple'][m]:>7.2f}" for m in r["multiples"])
        lines.append(
            f"{p['target']:>6} {p['latent']:>6} {p['cohens_d']:>5.2f} {p['active_mean']:>6.2f}{rates}"
            f"  {p['chosen_multiple']:>5g}x  {p['unsteered_rate_of_target']:>8.2f}"
        )
    only = " ".join(f"{m:g}x {v:.3f}" for m, v in r["classifier_only_by_multiple"].items())
    lines.append(f"classifier alone (no digit-likeness check): {only}")
    lines.append(
        f"unsteered accuracy {r['unsteered_accuracy']:.3f}; success at chosen strengths {r['success_at_chosen']:.3f}"
    )
    base = ", ".join(
        f"{m:g}x {v['success']:.3f} (classifier alone {v['classifier_only']:.3f})"
        for m, v in r["class_mean_difference"].items()
    )
    lines.append(f"class-mean difference added instead (no SAE): success {base}")
    c = r["ceiling"]
    lines.append(
        f"ceiling, the target run's activations patched in at every step: success {c['success']:.3f} "
        f"(classifier alone {c['classifier_only']:.3f}, still the source class {c['still_source']:.3f}; "
        f"the target runs themselves {c['target_run_accuracy']:.3f})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tide.train.loop.steer_classes", description=__doc__.splitlines()[0]
    )
    p.add_argument("--saes", type=Path, default=Path("runs/saes"), help="`tide train --out` folder")
    p.add_argument("--out", default="runs/steer-demo")
    p.add_argument("--probe-samples", type=int, default=200, help="store samples used to pick the latents")
    p.add_argument(
        "--per-target", type=int, default=9, help="samples steered per target (1..9 other classes)"
    )
    p.add_argument(
        "--multiples", default=",".join(f"{m:g}" for m in MULTIPLES), help="strengths / active_mean"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if not 1 <= a.per_target < NUM_CLASSES:
        p.error(
            f"--per-target {a.per_target} must be 1..{NUM_CLASSES - 1} (one sample of each other class at most)"
        )
    multiples = tuple(float(m) for m in a.multiples.split(","))
    try:
        out = local_out(a.out, "steer-demo")  # a local folder; a URL is refused here, before any work
    except ValueError as e:
        p.error(str(e))
    print(format_sweep(sweep(a.saes, out, a.probe_samples, a.device, a.overwrite, a.per_target, multiples)))


if __name__ == "__main__":
    main()

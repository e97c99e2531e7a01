"""Evaluate SAEs on their held-out samples: reconstruction and sparsity, overall and per timestep.

Shape key: B batch rows, D model width, F SAE latents, S stored steps.

Held-out rows are those of the validation sample chunks recorded in each SAE's sae.json (whole images the
SAE never saw), over the steps it trained on. Reconstruction metrics are in RAW activation space:
x_hat = sae.forward_raw(x, t). For a group G of rows (all of them, one stored step, or a bucket of
consecutive steps):
    mse                = mean over rows and channels of (x_hat - x)^2
    fvu                = sum ||x_hat - x||^2 / sum ||x - mean_G(x)||^2   (normalised MSE: variance unexplained)
    explained_variance = 1 - sum_d Var_G(x_d - x_hat_d) / sum_d Var_G(x_d)   (blind to a constant offset)
    cosine             = mean over rows of cos(x, x_hat)
    l0                 = mean number of active latents per row
    dead_fraction      = fraction of latents that never fire on G's rows
    dense_fraction     = fraction of latents that fire on more than `dense_threshold` of G's rows
Dead and dense are per group, so a latent that only fires at high noise is alive in the high-noise bucket.
A smaller group has more dead latents: one that is silent at one step but fires at the next is dead in that
step and alive in their bucket. So `step_mean`'s dead fraction (the mean over single steps) is above every
bucket's (several steps pooled), and the pooled one is the lowest.
A Matryoshka SAE also gets the fvu of each of its smaller prefixes (its first m latents alone, decoded with
the same b_dec), pooled and as a step mean: `EvalResult.prefixes`.
Two overall figures: `overall` ("pooled", G = every held-out row, whose fvu divides by the variance around
the mean of all steps) and `step_mean` (the mean over steps of each step's own figure, comparable with them).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tide.store.manifest import record_file
from tide.store.open import is_url
from tide.store.outputs import check_file, local_out
from tide.store.reader import Store, configure_read_threads, default_read_threads, open_store
from tide.store.schema import step_buckets
from tide.train.fit.checkpoint import LoadedSAE, load_sae, sae_folders, write_json
from tide.train.fit.data import ActivationLoader
from torch import Tensor


class Metrics(NamedTuple):
    """Metrics of one group of held-out rows; the module docstring defines each."""

    rows: int
    mse: float
    """Mean squared error per element, raw space."""
    fvu: float
    """Normalised MSE: the fraction of the group's variance left unexplained."""
    explained_variance: float
    """1 - residual variance / variance, per channel summed (ignores a constant offset)."""
    cosine: float
    """Mean cosine similarity of x and x_hat."""
    l0: float
    """Mean active latents per row."""
    dead_fraction: float
    """Latents that never fire on the group."""
    dense_fraction: float
    """Latents that fire on more than dense_threshold of the group's rows."""


class Group(NamedTuple):
    steps: tuple[int, int]
    """[start, stop) stored step positions."""
    t: tuple[float, float]
    """Scheduler timesteps of the first and last step."""
    metrics: Metrics


class PrefixFVU(NamedTuple):
    """The held-out fvu of a Matryoshka SAE's first `latents` latents on their own."""

    latents: int
    fvu: float
    """Pooled over every held-out row, as Metrics.fvu of `overall`."""
    step_mean_fvu: float
    """The mean over stored steps of each step's fvu, as `step_mean`."""


DEFAULT_BUCKETS = 10
"""Timestep buckets of `tide eval` and of the evaluation after `tide train`, unless told otherwise."""


class EvalResult(NamedTuple):
    name: str
    overall: Metrics
    """Pooled: every held-out row at once. Its fvu divides by the variance around the mean of all steps,
    which includes the spread between the steps' means, so it is usually lower than the steps' own fvus."""
    buckets: list[Group]
    """Consecutive steps in at most `buckets` groups, for the table."""
    per_step: list[Group]
    """Every stored step on its own."""
    dense_threshold: float = 0.1
    """A latent is dense in a group when it fires on more than this fraction of the group's rows."""
    prefixes: list[PrefixFVU] = []  # noqa: RUF012 (a NamedTuple default is never mutated)
    """Matryoshka SAEs: each smaller prefix's fvu, smallest first; empty for the other architectures."""

    @property
    def step_mean(self) -> Metrics:
        """The mean over stored steps of each per-step metric (rows: their sum), comparable with the steps'."""
        steps = [g.metrics for g in self.per_step if g.metrics.rows > 0]
        if not steps:
            return Metrics(0, *([float("nan")] * 7))
        values_SM = np.array(steps, dtype=np.float64)  # (S, 8): one row of Metrics per step
        return Metrics(int(values_SM[:, 0].sum()), *map(float, values_SM[:, 1:].mean(0)))

    def to_json(self) -> dict[str, Any]:
        def group(g: Group) -> dict[str, Any]:
            return {"steps": list(g.steps), "t": list(g.t), **g.metrics._asdict()}

        return {
            "name": self.name,
            "overall": self.overall._asdict(),
            "step_mean": self.step_mean._asdict(),
            "dense_threshold": self.dense_threshold,
            "buckets": [group(g) for g in self.buckets],
            "per_step": [group(g) for g in self.per_step],
            "prefixes": [p._asdict() for p in self.prefixes],
        }


class _Sums:
    """Running per-step sums, in float64, from which every metric of any group of steps follows."""

    def __init__(self, S: int, D: int, F: int, device: torch.device, prefixes: int = 0):
        z = dict(dtype=torch.float64, device=device)
        self.n_S, self.se_S, self.cos_S, self.l0_S = (torch.zeros(S, **z) for _ in range(4))
        self.se_PS = torch.zeros(prefixes, S, **z)  # squared errors of each Matryoshka prefix
        self.sx_SD, self.sxx_SD, self.sr_SD, self.srr_SD = (torch.zeros(S, D, **z) for _ in range(4))
        self.fire_SF = torch.zeros(S, F, dtype=torch.int64, device=device)

    def add(self, x_BD: Tensor, x_hat_BD: Tensor, z_BF: Tensor, step_B: Tensor) -> None:
        x_BD, x_hat_BD = x_BD.double(), x_hat_BD.double()
        r_BD = x_BD - x_hat_BD
        self.n_S.index_add_(0, step_B, torch.ones_like(x_BD[:, 0]))
        self.se_S.index_add_(0, step_B, r_BD.pow(2).sum(-1))
        self.cos_S.index_add_(
            0, step_B, torch.nn.functional.cosine_similarity(x_BD, x_hat_BD, dim=-1, eps=1e-12)
        )
        fired_BF = z_BF > 0
        self.l0_S.index_add_(0, step_B, fired_BF.sum(-1).double())
        for acc, v in (
            (self.sx_SD, x_BD),
            (self.sxx_SD, x_BD**2),
            (self.sr_SD, r_BD),
            (self.srr_SD, r_BD**2),
        ):
            acc.index_add_(0, step_B, v)
        self.fire_SF.index_add_(0, step_B, fired_BF.long())

    def add_prefixes(self, x_BD: Tensor, x_hats_PBD: list[Tensor], step_B: Tensor) -> None:
        for se_S, x_hat_BD in zip(self.se_PS, x_hats_PBD, strict=True):
            se_S.index_add_(0, step_B, (x_BD.double() - x_hat_BD.double()).pow(2).sum(-1))

    def prefix_fvu(self, p: int, steps: slice) -> float:
        """fvu of prefix p over `steps` pooled: its squared errors over the group's variance."""
        n, s_D, ss_D = float(self.n_S[steps].sum()), self.sx_SD[steps].sum(0), self.sxx_SD[steps].sum(0)
        var_x = float((ss_D - s_D**2 / max(n, 1)).sum())
        return float(self.se_PS[p, steps].sum()) / max(var_x, 1e-300) if n else float("nan")

    def prefixes(self, sizes: Sequence[int], lo: int, hi: int) -> list[PrefixFVU]:
        fvus = [[self.prefix_fvu(p, slice(s, s + 1)) for s in range(lo, hi)] for p in range(len(sizes))]
        return [
            PrefixFVU(m, self.prefix_fvu(p, slice(lo, hi)), float(np.nanmean(fvus[p])))
            for p, m in enumerate(sizes)
        ]

    def metrics(self, steps: slice, dense_threshold: float) -> Metrics:
        n = float(self.n_S[steps].sum())
        if n == 0:
            return Metrics(0, *([float("nan")] * 7))

        def var_sum(s: Tensor, ss: Tensor) -> float:  # sum over channels of n * Var_G
            s_D, ss_D = s[steps].sum(0), ss[steps].sum(0)
            return float((ss_D - s_D**2 / n).sum())

        D = self.sx_SD.shape[1]
        se, var_x = float(self.se_S[steps].sum()), var_sum(self.sx_SD, self.sxx_SD)
        fires_F = self.fire_SF[steps].sum(0).double()
        return Metrics(
            rows=int(n),
            mse=se / (n * D),
            fvu=se / max(var_x, 1e-300),
            explained_variance=1 - var_sum(self.sr_SD, self.srr_SD) / max(var_x, 1e-300),
            cosine=float(self.cos_S[steps].sum()) / n,
            l0=float(self.l0_S[steps].sum()) / n,
            dead_fraction=float((fires_F == 0).double().mean()),
            dense_fraction=float((fires_F > dense_threshold * n).double().mean()),
        )


def _groups(lo: int, hi: int, buckets: int) -> list[slice]:
    return [slice(a, b) for a, b in step_buckets(lo, hi, buckets)]


@torch.no_grad()
def evaluate(
    saes: Sequence[LoadedSAE],
    store: Store,
    *,
    buckets: int = DEFAULT_BUCKETS,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    dense_threshold: float = 0.1,
    read_threads: int | None = None,
) -> list[EvalResult]:
    """Held-out metrics of each SAE. SAEs with the same held-out samples and steps share one read."""
    device = torch.device(device)
    for s in saes:
        _check_evaluable(s, store)
    results: dict[int, EvalResult] = {}  # by id(sae): runs in different folders reuse SAE names
    keys = list(dict.fromkeys((tuple(s.meta.split.val_chunks), s.meta.step_range) for s in saes))
    t_S = store.timesteps  # one read: the property reads the array every time
    for chunks, (lo, hi) in keys:
        group = [s for s in saes if (tuple(s.meta.split.val_chunks), s.meta.step_range) == (chunks, (lo, hi))]
        loader = ActivationLoader(
            store, list(dict.fromkeys(s.meta.array for s in group)), list(chunks), batch_size, shuffle=False,
            drop_last=False, step_range=(lo, hi), read_threads=read_threads, device=device,
        )  # fmt: skip
        sums = _accumulate(group, loader, store, device)
        for s, acc in zip(group, sums, strict=True):
            results[id(s)] = _result(s, acc, t_S, buckets, dense_threshold)
    return [results[id(s)] for s in saes]


def _check_evaluable(s: LoadedSAE, store: Store) -> None:
    """Refuse an SAE trained on another store, or one with no held-out samples."""
    if s.meta.store.identity != store.identity():
        raise ValueError(
            f"{s.folder} was trained on the store {s.meta.store.path} (identity {s.meta.store.identity}), "
            f"but {store.path} has identity {store.identity()}; evaluate it on the store it was trained on"
        )
    if not s.meta.split.val_chunks:
        split = s.meta.split
        why = (
            "was trained with val_fraction=0"
            if split.val_fraction == 0
            else f"held out no sample chunk (only {len(split.train_chunks)} were done when it was trained)"
        )
        raise ValueError(
            f"{s.folder} {why}: it has no held-out samples to evaluate on; train again with "
            "--val-fraction > 0 once the store has two or more done sample chunks"
        )


def _accumulate(group: list[LoadedSAE], loader: ActivationLoader, store: Store, device) -> list[_Sums]:
    """One pass of `loader` through every SAE of `group` (they read the same samples and steps)."""
    arrays = loader.arrays
    sums = [
        _Sums(
            store.layout.num_steps, store.meta.d_model, s.sae.cfg.num_latents, device, len(_prefix_sizes(s))
        )
        for s in group
    ]
    for s in group:
        s.sae.to(device).eval()
    for batch in loader.batches(epochs=1):
        for s, acc in zip(group, sums, strict=True):
            x_BD = batch.x_ABD[arrays.index(s.meta.array)].float()
            out = s.sae.forward_raw(x_BD, batch.t_B)
            acc.add(x_BD, out.x_hat_BD, out.z_BF, batch.step_B)
            if acc.se_PS.shape[0]:
                hats = s.sae.arch.prefix_reconstructions(s.sae, out.z_BF)
                acc.add_prefixes(x_BD, [s.sae.denormalize(h, batch.t_B) for h in hats], batch.step_B)
    return sums


def _result(s: LoadedSAE, acc: _Sums, t_S, buckets: int, dense_threshold: float) -> EvalResult:
    """Overall, per-bucket and per-step metrics of one SAE from its sums."""
    lo, hi = s.meta.step_range

    def groups(slices: list[slice]) -> list[Group]:
        return [
            Group(
                (g.start, g.stop),
                (float(t_S[g.start]), float(t_S[g.stop - 1])),
                acc.metrics(g, dense_threshold),
            )
            for g in slices
        ]

    return EvalResult(
        s.meta.name,
        acc.metrics(slice(lo, hi), dense_threshold),
        groups(_groups(lo, hi, buckets)),
        groups(_groups(lo, hi, hi - lo)),
        dense_threshold,
        acc.prefixes(_prefix_sizes(s), lo, hi),
    )


def _prefix_sizes(s: LoadedSAE) -> tuple[int, ...]:
    """A Matryoshka SAE's smaller prefix sizes (the full dictionary is the SAE itself); () for the others."""
    return tuple(getattr(s.sae.arch, "prefixes", ())[:-1])


def is_eval_json(text: str) -> bool:
    """Whether `text` is what `tide eval --json` writes: a list of results, each with its SAE's name and
    overall metrics (so that a rerun may write over it, and nothing else)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, list) and all(isinstance(r, dict) and {"name", "overall"} <= r.keys() for r in doc)


def json_file(value: str | Path | None) -> Path | None:
    """`tide eval --json`'s file, checked before any work: a local path, and one tide may write (a missing
    file, or results an earlier `--json` wrote), never someone else's file."""
    if value is None:
        return None
    path = local_out(value, "eval", option="--json ")
    check_file(path, is_eval_json, "the results of `tide eval --json`")
    return path


def write_results(path: Path, results: Sequence[EvalResult]) -> None:
    """`tide eval --json`: every SAE's results in one file."""
    path.write_text(json.dumps([r.to_json() for r in results], indent=2))


def eval_file(buckets: int) -> str:
    """Where an SAE folder keeps its results: eval.json for the default bucketing, eval_bN.json for N buckets,
    so that evaluating with other buckets never replaces the results of another bucketing."""
    return "eval.json" if buckets == DEFAULT_BUCKETS else f"eval_b{buckets}.json"


def evaluate_folders(
    paths: Sequence[Path],
    store: Path | str | None = None,
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> list[EvalResult]:
    """Evaluate SAE folders (or run folders holding them) and write each one's `eval_file(buckets)`."""
    configure_read_threads(default_read_threads())
    folders = sae_folders(list(paths))
    device = kwargs.get("device", "cpu")
    loaded = [load_sae(f, device) for f in folders]
    stores = {s.meta.store.path for s in loaded}
    if store is None and len(stores) > 1:
        raise ValueError(
            f"the SAEs come from {len(stores)} stores ({', '.join(sorted(stores))}); evaluate them apart"
        )
    recorded = next(iter(stores))
    if store is None and not is_url(recorded) and not Path(recorded).exists():
        raise ValueError(
            f"the store these SAEs were trained on, {next(iter(stores))} (recorded in their sae.json), is not "
            "there any more; pass --store PATH to the same store's new location"
        )
    opened = open_store(store if store is not None else next(iter(stores)))
    results = evaluate(loaded, opened, **kwargs)
    _save_results(loaded, results, eval_file(kwargs.get("buckets", DEFAULT_BUCKETS)), log)
    return results


def _save_results(
    loaded: list[LoadedSAE], results: list[EvalResult], name: str, log: Callable[[str], None] | None
) -> None:
    """Write each SAE folder's results file; a folder on a read-only disk gets a note instead (the results
    are still returned, and printed)."""
    for s, r in zip(loaded, results, strict=True):
        try:
            record_file(
                s.folder / name
            )  # listed in the run's (or SAE folder's) manifest before it is written
            write_json(s.folder / name, r.to_json())
        except OSError as e:
            note = (
                f"note: cannot write {s.folder / name} ({e.strerror or e}), so its results are not saved there "
                "(`tide eval --json FILE` keeps them in a file of your choosing)"
            )
            log(note) if log is not None else warnings.warn(note, stacklevel=3)
            continue
        if log is not None:
            log(f"wrote {s.folder / name}")


def format_table(result: EvalResult) -> str:
    """A plain-text table: one line per timestep bucket, the two overall lines, and a legend."""
    head = f"{'steps':>9} {'t':>13} {'rows':>8} {'fvu':>7} {'ev':>7} {'cos':>6} {'mse':>9} {'L0':>6} {'dead':>6} {'dense':>6}"

    def line(label: str, t: str, m: Metrics) -> str:
        return (
            f"{label:>9} {t:>13} {m.rows:>8} {m.fvu:>7.4f} {m.explained_variance:>7.4f} {m.cosine:>6.3f} "
            f"{m.mse:>9.3g} {m.l0:>6.1f} {m.dead_fraction:>6.3f} {m.dense_fraction:>6.3f}"
        )

    rows = [
        line(f"{g.steps[0]}-{g.steps[1] - 1}", f"{g.t[0]:.0f}..{g.t[1]:.0f}", g.metrics)
        for g in result.buckets
    ]
    first, last = result.per_step[0], result.per_step[-1]
    span = f"{first.t[0]:.0f}..{last.t[1]:.0f}"
    return "\n".join(
        [
            f"{result.name} (held-out samples; raw activation space)",
            head,
            *rows,
            line("pooled", span, result.overall),
            line("step mean", span, result.step_mean),
            *(
                [
                    "matryoshka prefixes (first m latents alone): "
                    + ", ".join(
                        f"{p.latents}: fvu {p.fvu:.4f} pooled, {p.step_mean_fvu:.4f} step mean"
                        for p in result.prefixes
                    )
                ]
                if result.prefixes
                else []
            ),
            "pooled: all rows at once (fvu against the variance of all steps together); step mean: mean over steps",
            "fvu: unexplained variance; ev: explained variance (offset-blind); L0: latents/row; "
            f"dead, dense: latents firing on no row, on >{result.dense_threshold:.0%} of rows, of the line's rows",
            "(a latent silent at one step may fire at the next: dead is highest for single steps, as in step mean)",
        ]
    )


def format_tables(results: Sequence[EvalResult]) -> str:
    """Every result's table, each after a blank line, as `tide eval` and `tide train` print them."""
    return "".join(f"\n{format_table(r)}\n" for r in results).removesuffix("\n")


def progress_text(names: Sequence[str], fvus: Sequence[float], l0s: Sequence[float]) -> str:
    """The training progress bar's figures, e.g. `tide-k16 fvu .145 L0 16.0 | topk-k16 fvu .155 L0 16.0`.

    Names lose the leading '-' parts every SAE of the run shares (resid_l03-tide-k16 -> tide-k16).
    """
    parts = [n.split("-") for n in names]
    common = 0
    while len(parts) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1

    def short(x: float, fmt: str) -> str:
        text = format(x, fmt)
        return text[1:] if text.startswith("0.") else text

    return " | ".join(
        f"{'-'.join(p[common:])} fvu {short(f, '.3f')} L0 {l0:.1f}"
        for p, f, l0 in zip(parts, fvus, l0s, strict=True)
    )


def evaluate_run(trained, cfg, log: Callable[[str], None] = print) -> list[EvalResult]:
    """`tide train`'s closing evaluation of the SAEs a run (`trainer.TrainResult`) wrote, on its held-out
    split; none when the run holds nothing out (val_fraction 0, or too few sample chunks: said in `log`)."""
    if cfg.val_fraction == 0:
        return []
    if not trained.split.val_chunks:
        log(
            f"note: no held-out samples (the store has {len(trained.split.train_chunks)} done sample chunk(s), "
            "all used for training), so the evaluation is skipped; harvest more samples to evaluate"
        )
        return []
    return evaluate_folders(
        trained.saes, cfg.store, batch_size=cfg.batch_size, buckets=cfg.eval_buckets,
        read_threads=cfg.read_threads, log=log,
    )  # fmt: skip

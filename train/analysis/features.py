"""What each SAE latent responds to: one streaming pass over a store, collecting per-latent statistics.

Shape key: B batch rows, F SAE latents, S stored steps, G score groups (0 = all steps, then one per
timestep bucket), C classes (or prompts), K top rows kept per latent, P samples of one sample chunk,
H histogram bins.

The pass reads the store in its on-disk order (ActivationLoader, shuffle=False: sample chunk by sample
chunk), encodes every row with the SAE's public `normalize_input` and `encode`, and keeps, per latent:
  - fires_SF / sum_SF: how many rows it fires on and the sum of its activation, per stored step
    (frequency, frequency per step and the latent x timestep profile follow);
  - the K largest activations and their rows (sample, step, token), merged batch by batch (streaming top-K);
  - per class (or prompt), a histogram of each sample's score, the largest activation over the sample's
    tokens, overall (G = 0) and per timestep bucket (G >= 1). AUROC for telling a class from the rest
    follows from these histograms.
A sample's score is final once its sample chunk has been read; since the pass reads one sample chunk
after another, only the open chunk's P x G x F maxima are held. Memory is therefore
O(S F + K F + G C F H + P G F), independent of the number of samples in the store.

AUROC is exact (ranks of the per-sample scores, ties counting half, as scikit-learn's roc_auc_score)
when the scores of every sample, N x G x F float32, fit in `FeaturesConfig.exact_auroc_bytes` (512 MiB
by default: 500 samples x 6 groups x 1024 latents is 12 MiB); they are filled in as each sample chunk
closes. Beyond that it comes from the histograms, where a positive and a negative in the same bin count
as a tie: the zero bin is exact (a latent that never fires on a sample scores exactly 0), the others are
H - 2 log-spaced bins between HIST_LOW and HIST_HIGH (about 6% wide). Per-sample maxima over many
tokens bunch together, so that approximation can be off by a few hundredths; the histograms always
feed the per-class plots of the report.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tide.store.reader import Store, read_points
from tide.store.schema import step_buckets
from tide.train.fit.checkpoint import LoadedSAE
from tide.train.fit.data import ActivationLoader
from torch import Tensor

HIST_BINS = 256
"""H: histogram bins of per-sample scores: one for exactly 0, the rest log-spaced, the last open-ended."""
HIST_LOW, HIST_HIGH = 1e-3, 1e3
"""Range of the log-spaced bins. SAE latents are in the SAE's normalised space, where activations are
of order 1; scores below HIST_LOW share the first nonzero bin, above HIST_HIGH the last."""


class FeaturesConfig(BaseModel):
    """The feature pass of `tide features`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    split: Literal["val", "all"] = "val"
    """Rows to read: the SAE's held-out sample chunks (`val`, never trained on) or every done chunk (`all`)."""
    top_k: int = Field(32, gt=0)
    """K: top activating rows kept per latent."""
    buckets: int = Field(5, gt=0)
    """Timestep buckets (consecutive stored steps) for the per-bucket AUROC."""
    dense_threshold: float = Field(0.1, gt=0, le=1)
    """A latent is dense when it fires on more than this fraction of rows (as in `tide eval`)."""
    exact_auroc_bytes: int = Field(512 << 20, ge=0)
    """Keep every sample's scores (N x G x F float32) for an exact AUROC up to this size; above it the AUROC
    comes from the score histograms (0: always from the histograms)."""
    batch_size: int = Field(4096, gt=0)
    """Rows per SAE forward pass."""
    max_pages: int | None = Field(256, ge=0)
    """Latent pages of the report: the alive latents with the best AUROC (most frequent without classes),
    at most this many; None: every alive latent. Every latent is in the index either way. A page costs
    about a second of plotting on a CPU, so the default keeps a report of a wide SAE to minutes."""
    images_per_page: int = Field(8, gt=0)
    """Top samples (distinct) pictured on a latent page; at most top_k."""
    causal_samples: int = Field(2, ge=0)
    """Top samples per latent page redrawn with the latent off and scaled up (the page's causal section);
    0: no causal section. Each costs two samplings of the model, batched across latents."""
    causal_scale: float = Field(4.0, gt=1)
    """The factor the latent's activation is multiplied by in the causal section's scaled-up redraw."""
    read_threads: int | None = Field(None, gt=0)
    """Threads reading chunks; default one per core this process may use (os.sched_getaffinity)."""
    progress: bool = True
    """Show a progress bar."""


class TopRows(NamedTuple):
    """The K largest activations of every latent, largest first; rows beyond a latent's firing have value 0."""

    value_FK: np.ndarray
    sample_FK: np.ndarray
    step_FK: np.ndarray
    """Stored step position (an index into the store's `timesteps`)."""
    token_FK: np.ndarray
    """Stored token slot k of the row (the image token is token_index[sample, step, k] when subsampled)."""


class LatentStats(NamedTuple):
    """Everything the pass collects; `summarise` turns it into per-latent figures."""

    rows_S: np.ndarray
    """(S,) rows read per stored step (0 outside the SAE's step range)."""
    fires_SF: np.ndarray
    """(S, F) rows on which each latent fired (activation > 0)."""
    sum_SF: np.ndarray
    """(S, F) sum of each latent's activation."""
    top: TopRows
    hist_GCFH: np.ndarray | None
    """(G, C, F, H) per-sample score histograms per class; None for a store without classes or prompts."""
    scores_NGF: np.ndarray | None
    """Every read sample's scores (rows in `samples` order) when they fit in exact_auroc_bytes, else None."""
    class_N: np.ndarray | None
    """Class of every sample of the store."""
    bucket_steps: list[tuple[int, int]]
    """[start, stop) stored steps of each timestep bucket (group g = bucket g - 1)."""
    class_names: list[str]
    """Name of each class (the label) or prompt."""
    samples: list[int]
    """Samples read."""
    buffer_bytes: int
    """The most bytes the pass's accumulators held at once (tests check that it does not grow with the store)."""


def hist_edges() -> np.ndarray:
    """(H - 1,) bin boundaries: bin 0 holds exactly 0, bin i holds (edges[i - 1], edges[i]]."""
    return np.concatenate([[0.0], np.geomspace(HIST_LOW, HIST_HIGH, HIST_BINS - 2)])


def class_names(store: Store) -> tuple[np.ndarray | None, list[str]]:
    """(class of every sample, name of every class), or (None, []) for an unconditional store."""
    meta = store.meta
    if meta.conditioning == "prompt" and "prompt_index" in store.root:
        return store.read("prompt_index"), list(meta.prompts or [])
    if meta.conditioning == "class" and "label" in store.root:
        labels = store.read("label")
        n = meta.model.transformer_config.get("num_embeds_ada_norm") or int(labels.max()) + 1
        return labels, [str(c) for c in range(n)]
    return None, []


class _Accumulator:
    """Running per-latent sums, the streaming top-K and the open sample chunk's per-sample maxima."""

    def __init__(
        self,
        S: int,
        F: int,
        K: int,
        groups_S: Tensor,
        class_N: np.ndarray | None,
        C: int,
        P: int,
        scores_NGF: np.ndarray | None,
    ):
        dev = groups_S.device
        self.fires_SF = torch.zeros(S, F, dtype=torch.int64, device=dev)
        self.sum_SF = torch.zeros(S, F, dtype=torch.float64, device=dev)
        self.top_KF = torch.zeros(K, F, device=dev)
        self.row_KF = torch.full((K, F), -1, dtype=torch.int64, device=dev)
        self.groups_S, self.G, self.F, self.P = groups_S, int(groups_S.max()) + 1, F, P
        # The store's classes, read a sample chunk at a time in flush() rather than held: nothing the
        # accumulator keeps grows with the number of samples (except exact scores, up to their budget).
        self._class_N = class_N
        self.hist = None if class_N is None else torch.zeros(self.G * C * F * HIST_BINS, device=dev)
        self.C = C
        self.edges = torch.as_tensor(hist_edges(), dtype=torch.float32, device=dev)
        self.max_PGF = torch.zeros(P * self.G, F, device=dev)
        self.chunk: int | None = None
        self.closed: set[int] = set()
        self.scores_NGF, self.row_of_sample = scores_NGF, {}

    def add(self, z_BF: Tensor, step_B: Tensor, sample_B: Tensor, first_row: int) -> None:
        # Sums over the nonzero activations only: an SAE's z is sparse, and index_add_ over a dense (B, F)
        # costs on a CPU as much as the SAE's forward itself.
        row_N, f_N = z_BF.nonzero(as_tuple=True)
        v_N = z_BF[row_N, f_N]
        key_N = step_B[row_N] * self.F + f_N
        S = self.fires_SF.shape[0]
        self.fires_SF += torch.bincount(key_N, minlength=S * self.F).view(S, self.F)
        self.sum_SF += torch.bincount(key_N, weights=v_N.double(), minlength=S * self.F).view(S, self.F)
        beats_N = v_N > self.top_KF[-1, f_N]  # above the latent's K-th largest so far
        self._top(f_N[beats_N], v_N[beats_N], row_N[beats_N] + first_row)
        if self.hist is not None:
            self._maxima(z_BF, step_B, sample_B)

    def _top(self, f_N: Tensor, v_N: Tensor, row_N: Tensor) -> None:
        """Merge candidate activations (latent, value, stream row) into the latents' top-K.

        A segmented top-K over sparse entries: the candidates and the K kept entries of each latent they
        touch are sorted by latent, largest first, and the first K of every latent are kept. After the first
        batches few activations beat a latent's K-th, so this costs far less than a dense top-K per batch.
        """
        if f_N.numel() == 0:
            return
        K = self.top_KF.shape[0]
        cols = torch.unique(f_N)
        all_f = torch.cat([cols.repeat(K), f_N])  # the kept entries first: row k of top_KF, for each col
        all_v = torch.cat([self.top_KF[:, cols].reshape(-1), v_N])
        all_r = torch.cat([self.row_KF[:, cols].reshape(-1), row_N])
        by_value = torch.argsort(all_v, descending=True, stable=True)
        idx = by_value[torch.argsort(all_f[by_value], stable=True)]  # by latent, then largest first
        f_sorted = all_f[idx]
        rank = torch.arange(len(idx), device=idx.device) - torch.searchsorted(f_sorted, f_sorted)
        keep = rank < K  # every latent in cols has at least its K kept entries, so all K slots refill
        self.top_KF[rank[keep], f_sorted[keep]] = all_v[idx[keep]]
        self.row_KF[rank[keep], f_sorted[keep]] = all_r[idx[keep]]

    def _maxima(self, z_BF: Tensor, step_B: Tensor, sample_B: Tensor) -> None:
        # Rows come sample chunk by sample chunk; a batch may end one chunk and start the next.
        chunk_B = sample_B // self.P
        for c in torch.unique_consecutive(chunk_B).tolist():
            rows = (chunk_B == c).nonzero().squeeze(1)
            if c != self.chunk:
                self.flush()
                assert c not in self.closed, "the feature pass must read each sample chunk in one go"
                self.chunk = c
            local_R = (sample_B[rows] - c * self.P) * self.G
            z_RF = z_BF[rows]
            self.max_PGF.index_reduce_(0, local_R, z_RF, "amax")  # group 0: all steps
            self.max_PGF.index_reduce_(0, local_R + self.groups_S[step_B[rows]], z_RF, "amax")

    def nbytes(self) -> int:
        """Bytes of every buffer the accumulator holds (what the pass keeps besides the loader's windows);
        the store's class array, which it only reads, is not counted."""
        held = [v for k, v in vars(self).items() if isinstance(v, Tensor | np.ndarray) and k != "_class_N"]
        return sum(v.nbytes for v in held) + 16 * len(self.row_of_sample)

    def flush(self) -> None:
        """Bin the finished sample chunk's scores into the class histograms."""
        if self.chunk is None:
            return
        n = self._class_N.shape[0]
        samples = range(self.chunk * self.P, min((self.chunk + 1) * self.P, n))
        max_PGF = self.max_PGF.view(self.P, self.G, self.F)[: len(samples)]
        bin_PGF = torch.bucketize(max_PGF, self.edges)
        c_P = torch.as_tensor(self._class_N[samples.start : samples.stop], device=bin_PGF.device)
        g_G = torch.arange(self.G, device=bin_PGF.device)
        f_F = torch.arange(self.F, device=bin_PGF.device)
        idx = (((g_G[None, :, None] * self.C + c_P[:, None, None]) * self.F + f_F) * HIST_BINS) + bin_PGF
        self.hist.index_add_(0, idx.flatten(), torch.ones(idx.numel(), device=idx.device))
        if self.scores_NGF is not None:
            first = len(self.row_of_sample)
            self.scores_NGF[first : first + len(samples)] = max_PGF.cpu().numpy()
            self.row_of_sample |= {i: first + j for j, i in enumerate(samples)}
        self.max_PGF.zero_()
        self.closed.add(self.chunk)
        self.chunk = None


def rows_to_index(loader: ActivationLoader, row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample, step, stored token slot) of rows of an unshuffled loader's stream, which holds its reads one
    after another, each in C order (sample, step, token): top-K keeps just a row's stream position."""
    offsets = np.concatenate([[0], np.cumsum([r.rows for r in loader.reads])])
    j = np.clip(np.searchsorted(offsets, row, side="right") - 1, 0, len(loader.reads) - 1)
    sel = np.array([[s.start for s in r.selection[:3]] for r in loader.reads])  # (R, 3)
    shape = np.array([r.shape for r in loader.reads])  # (R, 3)
    local = row - offsets[j]
    tokens, steps = shape[j, 2], shape[j, 1]
    token = sel[j, 2] + local % tokens
    step = sel[j, 1] + (local // tokens) % steps
    sample = sel[j, 0] + local // (tokens * steps)
    return sample, step, token


def split_chunks(loaded: LoadedSAE, store: Store, split: str) -> list[int]:
    """Sample chunks of the split: the SAE's held-out ones, or every done chunk."""
    if split == "all":
        return store.done_chunks()
    chunks = list(loaded.meta.split.val_chunks)
    if not chunks:
        raise ValueError(
            f"{loaded.folder} has no held-out samples (trained with val_fraction="
            f"{loaded.meta.split.val_fraction}); pass --split all to read every sample (training ones included)"
        )
    return chunks


@torch.no_grad()
def collect(
    loaded: LoadedSAE, store: Store, cfg: FeaturesConfig, device: str | torch.device = "cpu"
) -> LatentStats:
    """One pass over the split's rows of `loaded.meta.array`: the statistics of every latent."""

    device = torch.device(device)
    sae = loaded.sae.to(device).eval()
    lo, hi = loaded.meta.step_range
    chunks = split_chunks(loaded, store, cfg.split)
    loader = ActivationLoader(
        store, [loaded.meta.array], chunks, cfg.batch_size, shuffle=False, drop_last=False, step_range=(lo, hi),
        read_threads=cfg.read_threads, device=device,
    )  # fmt: skip
    S, F = store.layout.num_steps, sae.cfg.num_latents
    buckets = step_buckets(lo, hi, cfg.buckets)
    groups_S = torch.zeros(S, dtype=torch.int64)
    for g, (a, b) in enumerate(buckets):
        groups_S[a:b] = g + 1
    class_N, names = class_names(store)
    samples = [
        i for c in chunks for i in range(*store.layout.sample_chunk(c).indices(store.layout.num_samples))
    ]
    G = len(buckets) + 1
    exact = class_N is not None and len(samples) * G * F * 4 <= cfg.exact_auroc_bytes
    scores_NGF = np.zeros((len(samples), G, F), dtype=np.float32) if exact else None
    acc = _Accumulator(
        S, F, cfg.top_k, groups_S.to(device), class_N, len(names), store.layout.batch_size, scores_NGF
    )
    rows_S, peak = _encode_pass(sae, loader, acc, cfg.progress)
    if acc.hist is not None:
        acc.flush()
    return LatentStats(
        rows_S=rows_S.cpu().numpy(),
        fires_SF=acc.fires_SF.cpu().numpy(),
        sum_SF=acc.sum_SF.cpu().numpy(),
        top=_top_rows(loader, acc),
        hist_GCFH=None
        if acc.hist is None
        else acc.hist.view(acc.G, acc.C, F, HIST_BINS).cpu().numpy().astype(np.int32),
        scores_NGF=scores_NGF,
        class_N=class_N,
        bucket_steps=buckets,
        class_names=names,
        samples=sorted(acc.row_of_sample, key=acc.row_of_sample.get) if exact else samples,
        buffer_bytes=peak,
    )


def _encode_pass(
    sae, loader: ActivationLoader, acc: _Accumulator, progress: bool
) -> tuple[torch.Tensor, int]:
    """Encode every row of `loader` into `acc`; returns the rows seen per step and the accumulator's peak bytes."""
    from tqdm.auto import tqdm

    rows_S = torch.zeros(acc.fires_SF.shape[0], dtype=torch.float64, device=acc.fires_SF.device)
    bar = tqdm(total=loader.rows_per_epoch, unit="row", unit_scale=True, disable=not progress)
    peak = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)  # "in beta"
        for batch in loader.batches(epochs=1):
            n = batch.step_B.shape[0]
            # The code alone: decoding, which the features never use, would double the SAE's cost.
            z_BF = sae.encode(sae.normalize_input(batch.x_ABD[0].float(), batch.t_B), batch.t_B)
            rows_S.index_add_(0, batch.step_B, torch.ones(n, dtype=torch.float64, device=rows_S.device))
            acc.add(z_BF, batch.step_B, batch.sample_B, batch.position.rows - n)
            peak = max(peak, acc.nbytes())
            bar.update(n)
    bar.close()
    return rows_S, peak


def _top_rows(loader: ActivationLoader, acc: _Accumulator) -> TopRows:
    value_FK = acc.top_KF.T.cpu().numpy()
    row_FK = acc.row_KF.T.cpu().numpy()
    sample, step, token = rows_to_index(loader, np.maximum(row_FK, 0).ravel())
    unused = row_FK.ravel() < 0
    sample[unused] = step[unused] = token[unused] = -1
    return TopRows(value_FK, *(a.reshape(row_FK.shape) for a in (sample, step, token)))


# --- per-latent figures ----------------------------------------------------------------------------


def auroc_from_hist(hist_CFH: np.ndarray) -> np.ndarray:
    """(C, F) AUROC of telling class c from the rest by the score, from per-class score histograms.

    P(score of a positive > score of a negative) + half P(equal), with equal meaning the same bin; NaN
    where a class has no sample or no other class has one.
    """
    pos_CFH = hist_CFH.astype(np.float64)
    neg_CFH = pos_CFH.sum(0, keepdims=True) - pos_CFH
    below_CFH = np.cumsum(neg_CFH, axis=-1) - neg_CFH
    n_pos, n_neg = pos_CFH.sum(-1), neg_CFH.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_CFH * (below_CFH + 0.5 * neg_CFH)).sum(-1) / (n_pos * n_neg)


def average_ranks(x_NM: np.ndarray) -> np.ndarray:
    """(N, M) ranks 1..N of each column's values, tied values sharing their average rank."""
    N = x_NM.shape[0]
    order_NM = np.argsort(x_NM, axis=0, kind="stable")
    sorted_NM = np.take_along_axis(x_NM, order_NM, axis=0)
    i_N1 = np.arange(N)[:, None]
    start_NM = np.ones_like(sorted_NM, dtype=bool)
    start_NM[1:] = sorted_NM[1:] != sorted_NM[:-1]
    end_NM = np.ones_like(start_NM)
    end_NM[:-1] = start_NM[1:]
    first_NM = np.maximum.accumulate(np.where(start_NM, i_N1, 0), axis=0)
    last_NM = np.minimum.accumulate(np.where(end_NM, i_N1, N - 1)[::-1], axis=0)[::-1]
    ranks_NM = np.empty_like(x_NM, dtype=np.float64)
    np.put_along_axis(ranks_NM, order_NM, (first_NM + last_NM) / 2 + 1, axis=0)
    return ranks_NM


def auroc_exact(scores_NM: np.ndarray, class_N: np.ndarray, C: int) -> np.ndarray:
    """(C, M) AUROC of each column's scores for telling class c from the rest (Mann-Whitney U / n_pos n_neg);
    NaN where a class has no sample or all samples are of it."""
    ranks_NM = average_ranks(scores_NM)
    onehot_CN = (class_N[None, :] == np.arange(C)[:, None]).astype(np.float64)
    n_pos_C1 = onehot_CN.sum(1, keepdims=True)
    n_neg_C1 = len(class_N) - n_pos_C1
    with np.errstate(invalid="ignore", divide="ignore"):
        return (onehot_CN @ ranks_NM - n_pos_C1 * (n_pos_C1 + 1) / 2) / (n_pos_C1 * n_neg_C1)


class LatentTable(NamedTuple):
    """Per-latent figures of a feature pass."""

    frequency_F: np.ndarray
    """Fraction of rows the latent fires on."""
    frequency_SF: np.ndarray
    """The same per stored step (NaN at steps the SAE was not run on)."""
    mean_SF: np.ndarray
    """Mean activation per stored step, over all rows (zeros included): the latent x timestep profile."""
    auroc_GCF: np.ndarray | None
    """AUROC per score group (0 = all steps, then the buckets), class and latent."""
    best_class_F: np.ndarray | None
    """Class with the highest overall AUROC (-1 for a dead latent)."""
    best_auroc_F: np.ndarray | None
    dead_F: np.ndarray
    dense_F: np.ndarray


def summarise(stats: LatentStats, dense_threshold: float) -> LatentTable:
    rows = max(float(stats.rows_S.sum()), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        n_S1 = np.where(stats.rows_S > 0, stats.rows_S, np.nan)[:, None]
        frequency_SF, mean_SF = stats.fires_SF / n_S1, stats.sum_SF / n_S1
    frequency_F = stats.fires_SF.sum(0) / rows
    dead_F = stats.fires_SF.sum(0) == 0
    auroc = best_class = best_auroc = None
    if stats.hist_GCFH is not None:
        if stats.scores_NGF is not None:
            N, G, F = stats.scores_NGF.shape
            C = stats.hist_GCFH.shape[1]
            class_n = stats.class_N[np.asarray(stats.samples, dtype=np.int64)]
            auroc = (
                auroc_exact(stats.scores_NGF.reshape(N, G * F), class_n, C)
                .reshape(C, G, F)
                .transpose(1, 0, 2)
            )
        else:
            auroc = np.stack([auroc_from_hist(h) for h in stats.hist_GCFH])  # (G, C, F)
        overall_CF = np.where(np.isnan(auroc[0]), -np.inf, auroc[0])
        best_class = np.where(dead_F, -1, overall_CF.argmax(0))
        best_auroc = np.where(dead_F, np.nan, overall_CF.max(0))
    return LatentTable(
        frequency_F=frequency_F,
        frequency_SF=frequency_SF,
        mean_SF=mean_SF,
        auroc_GCF=auroc,
        best_class_F=best_class,
        best_auroc_F=best_auroc,
        dead_F=dead_F,
        dense_F=frequency_F > dense_threshold,
    )


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def latent_records(
    stats: LatentStats, table: LatentTable, image_token_FK: np.ndarray
) -> list[dict[str, Any]]:
    """One JSON-ready dict per latent (what features.json lists)."""
    out = []
    for f in range(table.frequency_F.shape[0]):
        fired = stats.top.value_FK[f] > 0
        rec: dict[str, Any] = {
            "index": f,
            "frequency": _num(table.frequency_F[f]),
            "frequency_per_step": [_num(v) for v in table.frequency_SF[:, f]],
            "mean_per_step": [_num(v) for v in table.mean_SF[:, f]],
            "dead": bool(table.dead_F[f]),
            "dense": bool(table.dense_F[f]),
            "best_class": None,
            "best_auroc": None,
            "best_auroc_per_bucket": None,
            "top": [
                {
                    "sample": int(stats.top.sample_FK[f, k]),
                    "step": int(stats.top.step_FK[f, k]),
                    "token": int(image_token_FK[f, k]),
                    "value": _num(stats.top.value_FK[f, k]),
                }
                for k in np.flatnonzero(fired)
            ],
        }
        if table.best_class_F is not None and table.best_class_F[f] >= 0:
            c = int(table.best_class_F[f])
            rec["best_class"] = stats.class_names[c]
            rec["best_auroc"] = _num(table.best_auroc_F[f])
            rec["best_auroc_per_bucket"] = [_num(v) for v in table.auroc_GCF[1:, c, f]]
        out.append(rec)
    return out


def image_tokens(store: Store, top: TopRows) -> np.ndarray:
    """(F, K) image token position of each top row: token_index[sample, step, slot] when subsampled."""
    if not store.meta.tokens.subsampled:
        return top.token_FK.copy()
    ok = top.sample_FK >= 0
    out = np.full(top.token_FK.shape, -1, dtype=np.int64)
    if ok.any():
        coords = (top.sample_FK[ok], top.step_FK[ok], top.token_FK[ok])
        out[ok] = read_points(store.root["token_index"], coords)  # a lost chunk is an error, never -1
    return out


def features_json(
    loaded: LoadedSAE, store: Store, cfg: FeaturesConfig, stats: LatentStats, table: LatentTable
) -> dict:
    """The content of DIR/features.json."""
    return {
        "sae": str(loaded.folder),
        "name": loaded.meta.name,
        "array": loaded.meta.array,
        "store": str(store.path),
        "split": cfg.split,
        "samples": len(stats.samples),
        "rows": int(stats.rows_S.sum()),
        "timesteps": [float(t) for t in store.timesteps],
        "buckets": [list(b) for b in stats.bucket_steps],
        "classes": stats.class_names,
        "dense_threshold": cfg.dense_threshold,
        "auroc": "per-sample score = max activation over the sample's tokens (overall: over all its steps; "
        "per bucket: over the bucket's steps); AUROC of that score for telling best_class from the rest",
        "latents": latent_records(stats, table, image_tokens(store, stats.top)),
    }


def save_arrays(path: Path, stats: LatentStats, table: LatentTable) -> None:
    """Every array of the pass, for scripts: DIR/features.npz."""
    arrays = {
        "rows_S": stats.rows_S,
        "fires_SF": stats.fires_SF,
        "sum_SF": stats.sum_SF,
        **{f"top_{k}": v for k, v in stats.top._asdict().items()},
        "hist_edges": hist_edges(),
    }
    if stats.hist_GCFH is not None:
        arrays |= {"hist_GCFH": stats.hist_GCFH, "auroc_GCF": table.auroc_GCF}
    np.savez_compressed(path, **arrays)

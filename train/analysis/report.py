"""The static HTML report of a feature pass: DIR/index.html (every latent) and DIR/latents/NNNNN.html.

Shape key: F SAE latents, S stored steps, K top rows, T stored tokens, H histogram bins, h x w token grid.

Pictures: a top sample's final image comes from the store's `images` array (`tide harvest --save-images`)
or is redrawn from its seed through train/loop/rerun.py, the one entry point train/ has into harvest/.
Its heatmap is the latent's activation on each stored token of the top row's (sample, step), drawn over
the image patch that token covers; tokens that were not stored (token subsampling) stay uncoloured.
Plots are matplotlib PNGs; the pages are plain files that open from disk, with a few lines of JavaScript
to sort the table.
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Callable
from pathlib import Path
from string import Template
from typing import NamedTuple

import numpy as np
import torch
from tide.store.outputs import check_replaceable, local_out, staged
from tide.store.reader import Store, read_array, read_points, read_rows
from tide.train.analysis.features import (
    FeaturesConfig,
    LatentStats,
    LatentTable,
    collect,
    features_json,
    hist_edges,
    image_tokens,
    save_arrays,
    summarise,
)
from tide.train.fit.checkpoint import LoadedSAE

TEMPLATES = Path(__file__).resolve().parent / "templates"
PIXELS = 128
"""Width of a top sample's picture (the image is scaled up with nearest-neighbour)."""


class PageTop(NamedTuple):
    """One picture of a latent page: its top row in a distinct sample."""

    sample: int
    step: int
    token: int
    """Image token position of the top row."""
    value: float


def page_latents(table: LatentTable, max_pages: int | None) -> list[int]:
    """Latents that get a page: the alive ones, best AUROC first (most frequent first without classes)."""
    alive = np.flatnonzero(~table.dead_F)
    key = table.best_auroc_F if table.best_auroc_F is not None else table.frequency_F
    order = alive[np.argsort(-np.nan_to_num(key[alive], nan=-1.0), kind="stable")]
    return sorted(order[:max_pages].tolist()) if max_pages is not None else sorted(order.tolist())


def page_tops(stats: LatentStats, image_token_FK: np.ndarray, f: int, per_page: int) -> list[PageTop]:
    """The latent's top rows, one per sample (its best), largest first."""
    seen, tops = set(), []
    for k in np.flatnonzero(stats.top.value_FK[f] > 0):
        i = int(stats.top.sample_FK[f, k])
        if i not in seen:
            seen.add(i)
            tops.append(
                PageTop(
                    i,
                    int(stats.top.step_FK[f, k]),
                    int(image_token_FK[f, k]),
                    float(stats.top.value_FK[f, k]),
                )
            )
        if len(tops) == per_page:
            break
    return tops


def token_grid(store: Store) -> tuple[int, int]:
    """(h, w) of the image-token grid: token n covers patch (n // w, n % w)."""
    cfg, n = store.meta.model.transformer_config, store.meta.tokens.num_tokens
    side = int(round(n**0.5))
    if "sample_size" in cfg and "patch_size" in cfg:
        side = cfg["sample_size"] // cfg["patch_size"]
    if side * side != n:
        raise ValueError(f"the store's {n} image tokens do not form a square {side}x{side} token grid")
    return side, side


def final_images(
    store: Store,
    samples: list[int],
    model: str | Path | None,
    device: str,
    log: Callable[[str], None],
    progress: bool = True,
) -> dict[int, np.ndarray]:
    """sample -> (H, W, C) uint8 final image: read from the store, else redrawn from the seeds."""
    if not samples:
        return {}
    if "images" in store.root:
        imgs = read_rows(store.root["images"], samples)
        return dict(zip(samples, imgs, strict=True))
    from tide.train.loop.rerun import rerun
    from tqdm.auto import tqdm

    log(f"redrawing {len(samples)} top samples from their seeds (the store has no saved images)")
    run = rerun(store.meta, device=device, model=model)
    total = len(samples) * run.meta.num_inference_steps
    with tqdm(total=total, unit="img-step", desc="regenerate", disable=not progress) as bar:
        imgs = run.images(samples, on_step=bar.update)
    return dict(zip(samples, imgs, strict=True))


@torch.no_grad()
def token_activations(
    loaded: LoadedSAE,
    store: Store,
    pairs: list[tuple[int, int]],
    latents_of: dict[tuple[int, int], list[int]],
) -> dict[tuple[int, int, int], np.ndarray]:
    """(sample, step, latent) -> (T,) the latent's activation on each stored token, for the given pairs;
    one read per sample chunk."""
    from tide.store.schema import as_float

    arr, lay, t_S = store.array(loaded.meta.array), store.layout, store.timesteps
    out: dict[tuple[int, int, int], np.ndarray] = {}
    by_chunk: dict[int, list[tuple[int, int]]] = {}
    for i, s in pairs:
        by_chunk.setdefault(lay.chunk_of_sample(i), []).append((i, s))
    sae = loaded.sae.cpu().eval()
    for c, group in by_chunk.items():
        samples = lay.sample_chunk(c)
        x_bSTD = as_float(read_array(arr, (samples,)), store.meta.dtype)
        for i, s in group:
            x_TD = torch.as_tensor(np.asarray(x_bSTD[i - samples.start, s], dtype=np.float32))
            z_TF = sae.forward_raw(x_TD, torch.full((x_TD.shape[0],), float(t_S[s]))).z_BF.numpy()
            for f in latents_of[(i, s)]:
                out[(i, s, f)] = z_TF[:, f]
    return out


def heatmap_png(
    path: Path,
    image_HWC: np.ndarray,
    act_T: np.ndarray,
    tokens_T: np.ndarray,
    grid: tuple[int, int],
    vmax: float,
) -> None:
    """The image and, beside it, the image with each stored token's patch tinted by the activation."""
    from matplotlib import colormaps
    from PIL import Image

    img = image_HWC if image_HWC.shape[-1] == 3 else np.repeat(image_HWC[..., :1], 3, axis=-1)
    H, W = img.shape[:2]
    h, w = grid
    scale = max(1, PIXELS // W)
    big = np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8)).astype(np.float32)
    level_hw = np.full((h, w), np.nan)
    level_hw.flat[tokens_T] = np.clip(act_T / max(vmax, 1e-12), 0, 1)
    rgba = colormaps["inferno"](np.nan_to_num(level_hw))  # (h, w, 4)
    alpha_hw = np.where(np.isnan(level_hw), 0.0, 0.25 + 0.6 * np.nan_to_num(level_hw))
    ph, pw = big.shape[0] // h, big.shape[1] // w
    tint = np.kron(rgba[..., :3] * 255, np.ones((ph, pw, 1)))
    a = np.kron(alpha_hw, np.ones((ph, pw)))[..., None]
    over = big * (1 - a) + tint * a
    gap = np.full((big.shape[0], 4, 3), 255.0)
    Image.fromarray(np.concatenate([big, gap, over], axis=1).astype(np.uint8)).save(path)


class _Plots:
    """matplotlib figures reused for every latent (making a figure costs more than drawing it)."""

    def __init__(self, stats: LatentStats, table: LatentTable, t_S: np.ndarray):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.stats, self.table, self.t_S = plt, stats, table, t_S
        self.steps = np.flatnonzero(stats.rows_S > 0)
        self.spark = plt.figure(figsize=(1.6, 0.4), dpi=75)
        # Fixed margins (tight_layout would measure every text on every save, most of a plot's cost), set
        # again after each clf(), which resets them: room for the title and bucket AUROCs above the axes and
        # the legend below them (timesteps), and for the legend at the right (classes), so that nothing is
        # drawn over the data or cut off. 100 dpi at 7.2 in: the page shows them at their own 720 px.
        self.fig_t, self.fig_c = (
            plt.figure(figsize=(7.2, 4.2), dpi=100),
            plt.figure(figsize=(7.2, 3.6), dpi=100),
        )
        self.margins = {
            self.fig_t: dict(left=0.1, right=0.89, bottom=0.25, top=0.85),
            self.fig_c: dict(left=0.1, right=0.68, bottom=0.15, top=0.95),
        }

    def _axes(self, fig):
        fig.clf()
        fig.subplots_adjust(**self.margins[fig])
        return fig.add_subplot(1, 1, 1)

    def profile(self, f: int, path: Path) -> None:
        fig = self.spark
        fig.clf()
        ax = fig.add_axes((0, 0, 1, 1))
        ax.fill_between(range(len(self.steps)), self.table.mean_SF[self.steps, f], color="#3465a4", lw=0)
        ax.set_xlim(0, max(len(self.steps) - 1, 1))
        ax.set_ylim(bottom=0)
        ax.axis("off")
        fig.savefig(path)

    def timesteps(self, f: int, path: Path) -> None:
        """Mean activation where it fires and the top rows (left axis), firing frequency (right), per step."""
        fig, s = self.fig_t, self.steps
        ax = self._axes(fig)
        t = self.t_S[s]
        with np.errstate(invalid="ignore", divide="ignore"):
            active = self.stats.sum_SF[s, f] / self.stats.fires_SF[s, f]
        ax.plot(t, active, color="#3465a4", label="mean activation where it fires")
        top = self.stats.top.value_FK[f] > 0
        steps = self.stats.top.step_FK[f, top]
        ax.scatter(self.t_S[steps], self.stats.top.value_FK[f, top], s=8, color="#cc0000", label="top rows")
        ax.set_xlabel("timestep t (noisiest left)")
        ax.set_ylabel("activation")
        pad = 0.01 * (t.max() - t.min())  # the first and last steps' points drawn whole
        ax.set_xlim(t.max() + pad, t.min() - pad)  # denoising runs from high t to low t: read left to right
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot(t, self.table.frequency_SF[s, f], color="#888", ls="--", label="firing frequency (right)")
        ax2.set_ylabel("firing frequency")
        ax2.set_ylim(bottom=0)
        self._bucket_aurocs(ax, f)
        fig.legend(loc="lower center", ncol=3, fontsize=9, frameon=False)
        fig.savefig(path)

    def _bucket_aurocs(self, ax, f: int) -> None:
        """Shade the timestep buckets and write the best class's AUROC in each."""
        if self.table.best_class_F is None or self.table.best_class_F[f] < 0:
            return
        c = self.table.best_class_F[f]
        ax.set_title(f"AUROC of class {self.stats.class_names[c]} per timestep bucket", fontsize=10, pad=16)
        for g, (a, b) in enumerate(self.stats.bucket_steps):
            lo, hi = self.t_S[a], self.t_S[b - 1]
            if g % 2:
                ax.axvspan(lo, hi, color="#eee", zorder=0)
            auc = self.table.auroc_GCF[g + 1, c, f]
            ax.text(
                (lo + hi) / 2,
                1.0,
                f"{auc:.2f}",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=9,
            )

    def classes(self, f: int, path: Path, names: list[str]) -> None:
        fig = self.fig_c
        ax = self._axes(fig)
        hist_CH = self.stats.hist_GCFH[0, :, f, :].astype(np.float64)
        n_C = hist_CH.sum(1)
        edges = np.concatenate([hist_edges(), [hist_edges()[-1] * 1.07]])
        used = np.flatnonzero(hist_CH[:, 1:].sum(0)) + 1
        best = self.table.best_class_F[f] if self.table.best_class_F is not None else -1
        if len(used):
            lo, hi = used[0], used[-1] + 1
            group = max(1, (hi - lo) // 24)  # about 24 bars across the range that occurs
            cuts = np.unique(np.append(np.arange(lo, hi, group), hi))  # group j: bins cuts[j]..cuts[j+1]-1
            for c in np.flatnonzero(n_C):
                counts = np.add.reduceat(hist_CH[c, :hi], cuts[:-1]) / n_C[c]
                zero = hist_CH[c, 0] / n_C[c]
                ax.step(
                    edges[cuts[1:] - 1],
                    counts,
                    where="pre",
                    lw=2.5 if c == best else 0.8,
                    label=f"{names[c]} (0 on {zero:.0%})",
                    color=None if c != best else "#cc0000",
                )
            from matplotlib.ticker import LogFormatter

            ax.set_xscale("log")
            # 2 and 0.5, not 2 x 10^0 and 5 x 10^-1; minor ticks labelled only where few decades show
            ax.xaxis.set_major_formatter(LogFormatter())
            ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
            ax.legend(
                loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, ncol=1 if len(n_C) <= 12 else 2,
                title="class (share never firing)", title_fontsize=9, frameon=False,
            )  # fmt: skip
        ax.set_xlabel("largest activation over the sample's tokens (all steps)")
        ax.set_ylabel("fraction of the class's samples")
        fig.savefig(path)

    def close(self) -> None:
        for fig in (self.spark, self.fig_t, self.fig_c):
            self.plt.close(fig)


# --- pages -----------------------------------------------------------------------------------------


def _template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text())


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "" if x is None or not np.isfinite(x) else format(x, spec)


def index_rows(table: LatentTable, stats: LatentStats, pages: set[int]) -> str:
    """The <tr> of every latent."""
    rows = []
    for f in range(table.frequency_F.shape[0]):
        name = f"{f:05d}"
        link = f'<a href="latents/{name}.html">{f}</a>' if f in pages else str(f)
        flags = ["<span class=dead>dead</span>"] if table.dead_F[f] else []
        flags += ["<span class=dense>dense</span>"] if table.dense_F[f] else []
        best, auc = "", float("nan")
        if table.best_class_F is not None and table.best_class_F[f] >= 0:
            best, auc = html.escape(stats.class_names[table.best_class_F[f]]), table.best_auroc_F[f]
        top = float(stats.top.value_FK[f, 0])
        rows.append(
            f'<tr><td class=num data-v="{f}">{link}</td>'
            f'<td class=num data-v="{table.frequency_F[f]:.6g}">{table.frequency_F[f]:.3%}</td>'
            f'<td><img src="img/profile/{name}.png" width=120 height=30 alt=""></td>'
            f'<td>{best}</td><td class=num data-v="{_fmt(auc, ".6f")}">{_fmt(auc)}</td>'
            f'<td class=num data-v="{top:.6g}">{top:.3g}</td><td>{" ".join(flags)}</td></tr>'
        )
    return "\n".join(rows)


def latent_page(f: int, ctx: dict, tops: list[PageTop], nav: str, causal: str = "") -> str:
    """One latent's page."""
    stats, table, store = ctx["stats"], ctx["table"], ctx["store"]
    t_S, class_N, names = store.timesteps, ctx["class_N"], stats.class_names
    figures = []
    for j, top in enumerate(tops):
        cls = f" · class {html.escape(names[class_N[top.sample]])}" if class_N is not None and names else ""
        figures.append(
            f'<figure><img src="../img/top/{f:05d}_{j}.png" alt="sample {top.sample}">'
            f"<figcaption>sample {top.sample}{cls}<br>step {top.step} (t = {t_S[top.step]:g}) · token "
            f"{top.token} · {top.value:.3g}</figcaption></figure>"
        )
    summary = f"fires on {table.frequency_F[f]:.3%} of {int(stats.rows_S.sum())} rows"
    if table.best_class_F is not None and table.best_class_F[f] >= 0:
        summary += (
            f"; best class {html.escape(names[table.best_class_F[f]])} with AUROC "
            f"{table.best_auroc_F[f]:.3f} (numbers over the shaded timestep buckets below: per bucket)"
        )
    return _template("latent.html").substitute(
        index=f,
        name=html.escape(ctx["name"]),
        nav=nav,
        summary=summary,
        heatmap_note=ctx["heatmap_note"],
        tops="\n".join(figures) or "<p>no row activates this latent</p>",
        causal=causal,
        file=f"{f:05d}",
        classes=(
            "<h2>Largest activation per sample, by class</h2>\n"
            f'<img class="plot" src="../img/classes/{f:05d}.png" alt="per-class histogram of latent {f}">'
            if stats.hist_GCFH is not None
            else ""
        ),
    )


class _Pictures(NamedTuple):
    """What the top-sample pictures of the pages are drawn from."""

    tops: dict[int, list[PageTop]]
    """Latent -> its pictured top rows."""
    images: dict[int, np.ndarray]
    """Sample -> (H, W, C) final image."""
    acts: dict[tuple[int, int, int], np.ndarray]
    """(sample, step, latent) -> (T,) activation on each stored token."""
    tokens: dict[tuple[int, int], np.ndarray]
    """(sample, step) -> (T,) image token of each stored token."""
    grid: tuple[int, int]


def _pictures(loaded, store, stats, pages, cfg, model, device, log) -> _Pictures:
    image_token_FK = image_tokens(store, stats.top)
    tops = {f: page_tops(stats, image_token_FK, f, cfg.images_per_page) for f in pages}
    samples = sorted({t.sample for ts in tops.values() for t in ts})
    images = final_images(store, samples, model, device, log, cfg.progress)
    pairs: dict[tuple[int, int], list[int]] = {}
    for f, ts in tops.items():
        for t in ts:
            pairs.setdefault((t.sample, t.step), []).append(f)
    acts = token_activations(loaded, store, list(pairs), pairs)
    return _Pictures(tops, images, acts, _token_index(store, pairs), token_grid(store))


def _heatmap_note(store: Store) -> str:
    note = (
        "Each picture: the final image, and beside it the latent's activation on each token at the top row's "
        "step, drawn over the token's patch (brighter = stronger, scaled to the latent's top value)."
    )
    if store.meta.tokens.subsampled:
        note += (
            f" Only the {store.meta.tokens.kept} stored tokens of {store.meta.tokens.num_tokens} are coloured; "
            "the others were not harvested."
        )
    return note


def write_report(
    out: Path,
    loaded: LoadedSAE,
    store: Store,
    stats: LatentStats,
    table: LatentTable,
    cfg: FeaturesConfig,
    *,
    model: str | Path | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> list[int]:
    """index.html, one page per latent of `page_latents`, their pictures and plots; returns the paged latents."""
    from tqdm.auto import tqdm

    for sub in ("latents", "img/profile", "img/timestep", "img/classes", "img/top", "img/causal"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for name in ("style.css", "sort.js"):
        shutil.copyfile(TEMPLATES / name, out / name)
    pages = page_latents(table, cfg.max_pages)
    pics = _pictures(loaded, store, stats, pages, cfg, model, device, log)
    causal = None
    if cfg.causal_samples and pages:
        from tide.train.analysis.causal_section import redraw_all

        causal = redraw_all(
            loaded, store, pics.tops, cfg.causal_samples, cfg.causal_scale, model, device, cfg.progress, log
        )
    ctx = {
        "stats": stats,
        "table": table,
        "store": store,
        "class_N": stats.class_N,
        "name": loaded.meta.name,
        "heatmap_note": _heatmap_note(store),
    }
    plots = _Plots(stats, table, store.timesteps)
    try:
        quiet = not cfg.progress
        for f in tqdm(
            range(table.frequency_F.shape[0]), unit="latent", desc="profiles", leave=False, disable=quiet
        ):
            plots.profile(f, out / "img/profile" / f"{f:05d}.png")
        for n, f in enumerate(tqdm(pages, unit="page", desc="pages", disable=quiet)):
            _write_page(out, f, ctx, pics, plots, _nav(pages, n), causal)
    finally:
        plots.close()
    _write_index(out, loaded, store, stats, table, set(pages), cfg.dense_threshold)
    return pages


def _nav(pages: list[int], n: int) -> str:
    """Links from the n-th latent page to the previous and the next one."""
    return " ".join(
        f'<a href="{g:05d}.html">{label} ({g})</a>'
        for g, label in (
            (pages[n - 1] if n else None, "previous"),
            (pages[n + 1] if n + 1 < len(pages) else None, "next"),
        )
        if g is not None
    )


def _write_page(out: Path, f: int, ctx: dict, pics: _Pictures, plots: _Plots, nav: str, causal) -> None:
    """Latent f's pictures, plots and page (with its causal section when `causal` holds its redraws)."""
    from tide.train.analysis.causal_section import section

    stats = ctx["stats"]
    vmax = float(stats.top.value_FK[f, 0])
    for j, t in enumerate(pics.tops[f]):
        heatmap_png(
            out / "img/top" / f"{f:05d}_{j}.png",
            pics.images[t.sample],
            pics.acts[(t.sample, t.step, f)],
            pics.tokens[(t.sample, t.step)],
            pics.grid,
            vmax,
        )
    plots.timesteps(f, out / "img/timestep" / f"{f:05d}.png")
    if stats.hist_GCFH is not None:
        plots.classes(f, out / "img/classes" / f"{f:05d}.png", stats.class_names)
    what = section(out, f, causal, pics.images, PIXELS) if causal is not None else ""
    (out / "latents" / f"{f:05d}.html").write_text(latent_page(f, ctx, pics.tops[f], nav, what))


def _token_index(store: Store, pairs: dict[tuple[int, int], list[int]]) -> dict[tuple[int, int], np.ndarray]:
    """(sample, step) -> (T,) image token position of each stored token."""
    T = store.meta.tokens.kept
    if not store.meta.tokens.subsampled:
        return {p: np.arange(T) for p in pairs}
    if not pairs:
        return {}
    samples, steps = np.asarray(list(pairs), dtype=np.int64).T
    rows = read_points(  # every chunk checked: a lost token_index chunk is an error, never -1
        store.root["token_index"],
        (np.repeat(samples, T), np.repeat(steps, T), np.tile(np.arange(T), len(pairs))),
    ).reshape(len(pairs), T)
    return dict(zip(pairs, rows, strict=True))


def _write_index(
    out: Path,
    loaded: LoadedSAE,
    store: Store,
    stats: LatentStats,
    table: LatentTable,
    pages: set[int],
    dense_threshold: float,
) -> None:
    F = table.frequency_F.shape[0]
    t_S = store.timesteps[stats.rows_S > 0]
    summary = (
        f"{F} latents of {html.escape(loaded.meta.name)} ({loaded.meta.sae.arch}, k = {loaded.meta.sae.k}) on "
        f"{html.escape(loaded.meta.array)} of {html.escape(str(store.path))}: {len(stats.samples)} samples, "
        f"{int(stats.rows_S.sum())} rows; {int(table.dead_F.sum())} dead, {int(table.dense_F.sum())} dense; "
        f"{len(pages)} latent pages (linked)."
    )
    (out / "index.html").write_text(
        _template("index.html").substitute(
            title=f"tide features: {html.escape(loaded.meta.name)}",
            summary=summary,
            t_first=f"{t_S[0]:g}",
            t_last=f"{t_S[-1]:g}",
            dense=f"{dense_threshold:.0%}",
            rows=index_rows(table, stats, pages),
        )
    )


class FeaturesResult(NamedTuple):
    out: Path
    """The report folder: index.html, latents/, img/, features.json, features.npz."""
    table: LatentTable
    pages: list[int]
    """Latents that got a page."""
    rows: int
    """Rows read by the pass."""

    def summary(self) -> str:
        """What `tide features` prints when it is done."""
        t = self.table
        return (
            f"{len(t.frequency_F)} latents ({int(t.dead_F.sum())} dead, {int(t.dense_F.sum())} dense) over "
            f"{self.rows} rows; {len(self.pages)} latent pages; open {self.out / 'index.html'}"
        )


def features_report(
    sae_folder: Path,
    out: Path,
    cfg: FeaturesConfig = FeaturesConfig(),
    *,
    store: str | Path | None = None,
    model: str | Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> FeaturesResult:
    """`tide features`: the pass over the store, DIR/features.json and .npz, and the HTML report. `out` is
    checked first and replaced only once the new report is whole (store/outputs.py)."""
    import json

    from tide.store.open import is_url
    from tide.store.reader import open_store
    from tide.train.fit.checkpoint import load_sae

    loaded = load_sae(sae_folder, device)
    recorded = loaded.meta.store.path
    if store is None and not is_url(recorded) and not Path(recorded).exists():
        raise ValueError(
            f"the store {sae_folder} was trained on, {recorded}, is not there any more; pass --store with its "
            "new location"
        )
    opened = open_store(store if store is not None else recorded)
    if opened.identity() != loaded.meta.store.identity:
        raise ValueError(
            f"{sae_folder} was trained on the store {recorded} (identity {loaded.meta.store.identity}), but "
            f"{opened.path} has identity {opened.identity()}; pass the store it was trained on"
        )
    out = local_out(out, "features")
    check_replaceable(out, "features", overwrite)  # before the pass: refused at once
    stats = collect(loaded, opened, cfg, device)
    table = summarise(stats, cfg.dense_threshold)
    with staged(out, "features", overwrite) as new:
        (new / "features.json").write_text(
            json.dumps(features_json(loaded, opened, cfg, stats, table), indent=1)
        )
        save_arrays(new / "features.npz", stats, table)
        pages = write_report(new, loaded, opened, stats, table, cfg, model=model, device=device, log=log)
    return FeaturesResult(out, table, pages, int(stats.rows_S.sum()))

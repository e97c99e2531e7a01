"""The report's plots keep their parts apart (issue 21, pictures): drawn for real latents of a real SAE, every
text and the legend lie inside the figure (nothing clipped), the legend covers neither the data's axes nor
the title nor an axis label, and no text is smaller than 8 pt. Measured on matplotlib's own layout (each
artist's window extent after a draw), not on a picture."""

from __future__ import annotations

import pytest
from tide.store.reader import open_store
from tide.train.analysis.features import FeaturesConfig, collect, summarise
from tide.train.analysis.report import _Plots
from tide.train.fit.checkpoint import load_sae

from tests.factories import harvested, trained


@pytest.fixture(scope="module")
def plots(tiny_dit, tmp_path_factory):
    work = tmp_path_factory.mktemp("pictures")
    path = harvested(tiny_dit, work / "s.zarr", num_samples=12, num_steps=4, batch_size=3)
    (folder,) = trained(path, work / "saes", layers="1", batch_size=32, max_steps=4)
    loaded = load_sae(folder, "cpu")
    store = open_store(path)
    stats = collect(loaded, store, FeaturesConfig(split="all", buckets=2, progress=False), "cpu")
    table = summarise(stats, 0.1)
    p = _Plots(stats, table, store.timesteps)
    live = [int(f) for f in (table.frequency_F > 0).nonzero()[0][:3]]
    assert live, "the tiny SAE has no live latent to plot"
    yield p, stats, live, work
    p.close()


def _check(fig):
    """Every axes' drawn extent (ticks, labels, title, texts) and every legend inside the figure; no legend
    over an axes, its title or its labels; text at 8 pt or more."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    page = fig.bbox
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    assert legends, "no legend drawn"
    boxes = [(f"axes {i}", ax.get_tightbbox(r)) for i, ax in enumerate(fig.axes)]
    boxes += [("legend", lg.get_window_extent(r)) for lg in legends]
    for name, box in boxes:
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, f"{name} is cut at a side: {box} of {page}"
        assert page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, f"{name} is cut at the top or bottom: {box}"
    texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()]
    for lg in legends:
        box = lg.get_window_extent(r)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(r)), "the legend covers the plot"
        for t in texts:
            assert not box.overlaps(t.get_window_extent(r)), f"the legend covers {t.get_text()!r}"
    texts += [t for ax in fig.axes for t in ax.texts] + [t for lg in legends for t in lg.get_texts()]
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 8]
    assert not small, f"text under 8 pt: {small}"


def test_timestep_plot_parts_apart(plots):
    p, _, live, work = plots
    for f in live:
        p.timesteps(f, work / f"t{f}.png")
        _check(p.fig_t)


def test_class_plot_parts_apart(plots):
    p, stats, live, work = plots
    for f in live:
        p.classes(f, work / f"c{f}.png", stats.class_names)
        _check(p.fig_c)

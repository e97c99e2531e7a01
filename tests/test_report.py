"""`tide features` end to end on a tiny harvested store: features.json, the pages and their pictures, image
regeneration from seeds, the CLI, and the report in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from tide.cli import app
from tide.store.reader import open_store
from tide.train.analysis.features import FeaturesConfig
from tide.train.analysis.report import PIXELS, features_report, final_images
from typer.testing import CliRunner

from tests.browser_helpers import CHROMIUM, browse
from tests.factories import harvested, trained

runner = CliRunner()


@pytest.fixture(scope="module")
def report(tiny_dit, tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    # Half the 16 tokens stored, so the heatmaps must leave the other half uncoloured.
    store = harvested(
        tiny_dit, work / "s.zarr", num_samples=12, num_steps=4, batch_size=3, token_fraction=0.5,
        save_images=True,
    )  # fmt: skip
    (sae,) = trained(store, work / "saes", layers="1", batch_size=32, max_steps=4)
    fcfg = FeaturesConfig(split="all", top_k=6, buckets=2, images_per_page=3, max_pages=3, progress=False)
    result = features_report(sae, work / "rep", fcfg, log=lambda m: None)
    return work, sae, result


def test_features_json_and_pages(report):
    work, _, result = report
    data = json.loads((result.out / "features.json").read_text())
    F = len(result.table.frequency_F)
    assert [r["index"] for r in data["latents"]] == list(range(F))
    assert data["classes"] == ["0", "1", "2", "3"] and data["samples"] == 12
    for rec in data["latents"]:
        f = rec["index"]
        assert rec["frequency"] == pytest.approx(result.table.frequency_F[f], abs=1e-6)
        assert len(rec["frequency_per_step"]) == 4
        assert rec["dead"] == (rec["frequency"] == 0)
        assert (rec["best_class"] is None) == rec["dead"]
        if not rec["dead"]:
            assert 0 <= rec["best_auroc"] <= 1 and len(rec["best_auroc_per_bucket"]) == 2
            values = [t["value"] for t in rec["top"]]
            assert values == sorted(values, reverse=True) and values[0] > 0
    # Pages for the 3 alive latents with the best AUROC; every latent in the index, linked when paged.
    best = sorted(
        (f for f in range(F) if not result.table.dead_F[f]), key=lambda f: -result.table.best_auroc_F[f]
    )
    assert result.pages == sorted(best[:3])
    assert sorted(p.stem for p in (result.out / "latents").iterdir()) == [f"{f:05d}" for f in result.pages]
    index = (result.out / "index.html").read_text()
    assert index.count("<tr><td") == F
    assert sorted(int(m) for m in re.findall(r'href="latents/(\d+).html"', index)) == result.pages


def test_heatmaps_colour_only_stored_tokens(report):
    work, _, result = report
    store = open_store(work / "s.zarr")
    data = json.loads((result.out / "features.json").read_text())
    f = result.pages[0]
    top = data["latents"][f]["top"][0]
    pic = np.asarray(Image.open(result.out / "img/top" / f"{f:05d}_0.png").convert("RGB")).astype(int)
    left, right = pic[:, :PIXELS], pic[:, PIXELS + 4 :]
    image = store.root["images"][top["sample"]]  # (8, 8, 1): the tiny model's pixels
    np.testing.assert_array_equal(left[::16, ::16, 0], image[..., 0])  # 8x8 pixels scaled to 128
    stored = set(store.root["token_index"][top["sample"], top["step"]].tolist())
    assert top["token"] in stored
    patch = PIXELS // 4  # 16 tokens: a 4x4 grid
    for n in range(16):
        r, c = divmod(n, 4)
        same = np.array_equal(
            left[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch],
            right[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch],
        )
        assert same == (n not in stored), f"token {n}: stored={n in stored}, tinted={not same}"


def test_causal_section_shows_the_redraws_and_their_differences(report):
    """Each page's first two top samples: clean, off, off - clean, x4, x4 - clean, the redraws equal to the
    ones train/loop/causal.py draws alone; no attribute table, since the tiny DiT is not the shipped model."""
    from tide.train.fit.checkpoint import load_sae
    from tide.train.loop.causal import Request, redraw
    from tide.train.loop.rerun import rerun

    work, sae, result = report
    store = open_store(work / "s.zarr")
    data = json.loads((result.out / "features.json").read_text())
    f = result.pages[0]
    samples = list(dict.fromkeys(t["sample"] for t in data["latents"][f]["top"]))[:2]
    page = (result.out / "latents" / f"{f:05d}.html").read_text()
    assert "What it does: turned off and scaled up" in page and "class=attrs" not in page
    assert [int(m) for m in re.findall(r"<figcaption>sample (\d+): clean", page)] == samples
    s = load_sae(sae)
    drawn = redraw(
        s, rerun(store.meta, device="cpu"), [Request(samples[0], f, 0.0), Request(samples[0], f, 4.0)]
    )
    pic = np.asarray(Image.open(result.out / "img/causal" / f"{f:05d}_0.png").convert("RGB")).astype(int)
    panels = [pic[:, k * (PIXELS + 4) : k * (PIXELS + 4) + PIXELS] for k in range(5)]
    assert pic.shape[1] == 5 * PIXELS + 4 * 4
    clean = store.root["images"][samples[0]][..., 0].astype(int)  # (8, 8): 16x16 screen pixels each
    for k, want in ((0, clean), (1, drawn[0][..., 0]), (3, drawn[1][..., 0])):
        np.testing.assert_array_equal(panels[k][::16, ::16, 0], want)
    for k, edited in ((2, drawn[0][..., 0].astype(int)), (4, drawn[1][..., 0].astype(int))):
        heat = panels[k][
            ::16, ::16
        ]  # red where brighter than clean, blue where darker, one colour where equal
        d = edited - clean
        assert (heat[d > 0, 0] > heat[d > 0, 2]).all() and (heat[d < 0, 2] > heat[d < 0, 0]).all()
        assert len({tuple(c) for c in heat[d == 0]}) <= 1


def test_images_are_regenerated_from_seeds_without_saved_images(report, tmp_path):
    work, _, _ = report
    copy = tmp_path / "noimages.zarr"
    shutil.copytree(work / "s.zarr", copy)
    shutil.rmtree(copy / "images")
    store = open_store(copy)
    assert "images" not in store.root
    drawn = final_images(store, [7, 0, 11], None, "cpu", log=lambda m: None)
    saved = open_store(work / "s.zarr").root["images"]
    for i, img in drawn.items():
        np.testing.assert_array_equal(img, saved[i])


def test_cli_writes_a_report_and_refuses_to_overwrite(report, tmp_path):
    work, sae, _ = report
    out = tmp_path / "cli"
    args = ["features", str(sae), "--out", str(out), "--split", "all", "--max-pages", "1", "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(list((out / "latents").iterdir())) == 1 and "open" in res.output
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(app, [*args, "--overwrite", "--store", str(work / "s.zarr")])
    assert res.exit_code == 0, res.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    res = runner.invoke(app, ["features", str(sae), "--out", str(tmp_path / "other"), "--overwrite"])
    assert res.exit_code == 2 and "is not a tide features report" in res.output
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    res = runner.invoke(app, ["features", str(sae), "--out", str(tmp_path / "x"), "--store", str(tmp_path)])
    assert res.exit_code == 2 and "not a Zarr v3 store" in res.output


def test_no_progress_hides_every_bar_of_features(report, tmp_path):
    """features redraws the top samples from their seeds when the store has no images: that bar too."""
    work, sae, _ = report
    copy = tmp_path / "noimages.zarr"
    shutil.copytree(work / "s.zarr", copy)
    shutil.rmtree(copy / "images")
    args = ["features", str(sae), "--store", str(copy), "--split", "all", "--max-pages", "2"]
    bar = re.compile(r"\d+/\d+ \[")  # tqdm's `3/3 [00:01<00:00, ...]`
    shown = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert shown.exit_code == 0, shown.output
    assert {"regenerate", "causal", "pages"} <= {m for m in re.findall(r"(\w+): +\d+%", shown.output)}
    # the causal bar counts image-steps: each picture is 2 redraws (off, scaled up) of 4 denoising steps
    pictures = len(list((tmp_path / "a" / "img/causal").glob("*.png")))
    counts = [
        (int(a), int(b)) for a, b in re.findall(r"causal: +\d+%\|[^|]*\| *(\d+)/(\d+) \[", shown.output)
    ]
    assert pictures and counts[-1] == (2 * pictures * 4,) * 2, counts
    hidden = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--no-progress"])
    assert hidden.exit_code == 0, hidden.output
    assert not bar.search(hidden.output) and "%|" not in hidden.output, hidden.output


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run installs it)"
)
def test_report_in_headless_chromium(report):
    _, _, result = report
    F = len(result.table.frequency_F)
    index = browse(result.out / "index.html")
    assert index["rows"] == F and index["images"] == F and index["broken"] == []
    assert index["freqs"] == sorted(index["freqs"], reverse=True)  # the sort ran
    page = browse(result.out / "latents" / f"{result.pages[0]:05d}.html")
    # top samples, timestep and class plots, the causal section's pictures
    assert page["images"] == 3 + 2 + 2 and page["broken"] == []


def test_prompt_store_images_are_regenerated_from_seeds_and_prompts(tiny_pixart, tmp_path):
    """A text-conditional store: the prompt embeddings the harvest recorded are used again."""
    store = harvested(
        tiny_pixart, tmp_path / "p.zarr", num_samples=4, num_steps=3, prompts=tiny_pixart / "prompts.txt",
        prompt_embeds=tiny_pixart / "embeds.safetensors", save_images=True,
    )  # fmt: skip
    copy = tmp_path / "noimages.zarr"
    shutil.copytree(store, copy)
    shutil.rmtree(copy / "images")
    drawn = final_images(open_store(copy), [3, 0], None, "cpu", log=lambda m: None)
    saved = open_store(store).root["images"]
    for i, img in drawn.items():
        np.testing.assert_array_equal(img, saved[i])

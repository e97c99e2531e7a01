"""One rule for --overwrite (store/outputs.py), for every command: tide deletes only the files it wrote, every
check comes before anything is deleted, and an --out URL is refused in one line where a command writes locally.

The outputs are real: each command's own output on a tiny store. The reference for "nothing was deleted" is
the bytes of every file before the command ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tide.cli import app
from tide.harvest.config import DEMO_MODEL
from tide.store.manifest import MANIFEST, listing, read_manifest
from tide.store.outputs import OutputError, replace, staged
from tide.store.reader import open_store
from typer.testing import CliRunner

from tests.factories import tiny_store

runner = CliRunner()

SAE = "resid_l01-topk-k2"


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256 of its bytes)."""
    return {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest() for rel in listing(folder)}


def _error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and "error: " in result.output, result.output
    msg = result.output[result.output.index("error: ") :]
    assert msg.count("\n") == 1, result.output
    return msg


@pytest.fixture(scope="module")
def made(tiny_dit, tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """kind -> (a real output of that kind, the command that writes it again, without --out): one per command
    that writes a folder."""
    work = tmp_path_factory.mktemp("outputs")
    store = tiny_store(tiny_dit, work / "s.zarr")  # 4 samples x 4 steps, layer 1, resid and mlp
    sae = work / "run" / SAE
    t0 = f"{float(open_store(store).timesteps[0]):g}"
    commands = {
        "store": ["harvest", "--model", str(tiny_dit), "--num-samples", "4", "--num-steps", "3", "--batch-size",
                  "2", "--layers", "1", "--device", "cpu", "--no-progress"],  # another configuration
        "run": ["train", "--store", str(store), "--layers", "1", "--arch", "topk", "--k", "2", "--expansion",
                "2", "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "16", "--val-fraction", "0.5",
                "--device", "cpu", "--no-progress", "--no-eval"],
        "splice": ["splice", str(sae), "--num-samples", "2", "--batch-size", "2", "--buckets", "0",
                   "--device", "cpu", "--no-progress"],
        "steer": ["steer", str(sae), "--latent", "0", "--strength", "1", "--num-samples", "2", "--device",
                  "cpu", "--no-progress"],
        "features": ["features", str(sae), "--split", "all", "--max-pages", "1", "--images", "1", "--device",
                     "cpu", "--no-progress"],
        "export": ["export", str(sae), "--timestep", t0],
        "sae": ["import", str(work / "export"), "--store", str(store), "--array", "resid_l01"],
        "demo-model": ["demo-model", "train", "--steps", "1", "--no-progress"],
    }  # fmt: skip
    outs = {"store": store, "run": work / "run", "sae": work / "import", "demo-model": work / "demo"}
    for kind in ("run", "splice", "steer", "features", "export", "sae"):  # in this order: each needs the last
        outs.setdefault(kind, work / kind)
        result = runner.invoke(app, [*commands[kind], "--out", str(outs[kind])])
        assert result.exit_code == 0, (kind, result.output)
    shutil.copytree(DEMO_MODEL, outs["demo-model"])  # as the shipped one: written before manifests existed
    return {kind: (outs[kind], commands[kind]) for kind in commands}


def test_every_output_lists_exactly_its_files(made):
    for kind, (out, _) in made.items():
        if kind in ("store", "demo-model"):  # a store's manifest is its metadata; the demo model predates it
            assert not (out / MANIFEST).exists()
            continue
        found = read_manifest(out)
        assert found is not None and found[0] == kind, kind
        on_disk = set(listing(out)) - {MANIFEST}
        assert on_disk <= found[1], (kind, on_disk - found[1])
        if kind != "run":  # a run lists its files before writing them, some only on the way (.tmp)
            assert on_disk == found[1], kind


_NAMES = st.text(alphabet="abxyz019._-", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))


def _place(out: Path, files: list[str]) -> list[str]:
    """Write each of `files` (someone's) into `out` where a path is free: not a file or folder already, and
    with no file on the way. Returns those written."""
    written = []
    for i, rel in enumerate(files):
        on_the_way = [out / p for p in Path(rel).parents if str(p) != "."]
        if (out / rel).exists() or any(p.is_file() for p in on_the_way):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(f"mine {i}")
        written.append(rel)
    return sorted(written)


@st.composite
def _foreign(draw, folders: list[str]) -> list[str]:
    """1 to 3 files of someone's: each in a random folder of the output (or a new one), at a random depth."""
    files = []
    for _ in range(draw(st.integers(1, 3))):
        base = draw(st.sampled_from(folders))
        parts = draw(st.lists(_NAMES, min_size=1, max_size=3))
        files.append("/".join(p for p in [base, *parts] if p))
    return files


@pytest.mark.parametrize(
    "kind", ["store", "run", "splice", "steer", "features", "export", "sae", "demo-model"]
)
def test_no_command_deletes_a_foreign_file_at_any_depth(made, kind):
    out, command = made[kind]
    folders = sorted({""} | {str(Path(f).parent) for f in listing(out) if "/" in f})

    @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_foreign(folders))
    def check(foreign: list[str]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(shutil.copytree(out, Path(tmp) / out.name))
            foreign = _place(copy, foreign)  # where a file of tide's already is, no file can be someone's
            assume(foreign)
            before = _tree(copy)
            msg = _error(runner.invoke(app, [*command, "--out", str(copy), "--overwrite"]))
            assert f"but also {foreign[0]}" in msg and "which tide did not write" in msg, msg
            assert _tree(copy) == before  # nothing deleted, nothing written
            assert not (Path(tmp) / f".{copy.name}.tide-new").exists()

    check()


@pytest.mark.parametrize("kind", ["run", "splice", "steer", "features", "export", "sae", "steer-demo"])
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_replace_deletes_exactly_the_files_tide_wrote(kind, data):
    """The rule itself, with many more cases: an output of every kind (files written through `staged`) with
    foreign files anywhere is refused whole; without them, exactly tide's files go."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        ours = data.draw(st.lists(_NAMES.map(lambda n: "t" + n), min_size=1, max_size=4, unique=True))
        with staged(out, kind, overwrite=False) as new:  # type: ignore[arg-type]
            for i, rel in enumerate(ours):
                path = new / ("sub/" if i % 2 else "") / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("tide's")
        tide = set(listing(out))
        (out / "empty-of-mine").mkdir()  # a folder someone made and left empty: it stays too
        foreign = _place(out, data.draw(_foreign(["", "sub", "new"])))
        before = _tree(out)
        if foreign:
            with pytest.raises(OutputError, match="which tide did not write"):
                replace(out, kind)  # type: ignore[arg-type]
            assert _tree(out) == before
            for rel in foreign:
                (out / rel).unlink()
        assert set(listing(out)) == tide
        replace(out, kind)  # type: ignore[arg-type]
        assert listing(out) == [] and (out / "empty-of-mine").is_dir()


def test_harvest_overwrite_keeps_a_note_in_an_array_folder_and_a_zarr_group_of_ones_own(made, tmp_path):
    out, command = made["store"]
    copy = Path(shutil.copytree(out, tmp_path / "n.zarr"))
    (copy / "resid_l01" / "notes.txt").write_text("mine")
    (copy / "analysis").mkdir()
    (copy / "analysis" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (copy / "analysis" / "thesis.tex").write_text("years of work")
    msg = _error(runner.invoke(app, [*command, "--out", str(copy), "--overwrite"]))
    assert "analysis/thesis.tex (and 2 more), which tide did not write" in msg, msg
    assert (copy / "resid_l01" / "notes.txt").read_text() == "mine"
    assert (copy / "analysis" / "thesis.tex").read_text() == "years of work"
    for rel in ("resid_l01/notes.txt", "analysis/thesis.tex", "analysis/zarr.json"):
        (copy / rel).unlink()
    result = runner.invoke(app, [*command, "--out", str(copy), "--overwrite"])
    assert result.exit_code == 0 and open_store(copy).meta.num_inference_steps == 3, result.output
    assert (copy / "analysis").is_dir()  # the folder someone made stays, empty


def test_splice_checks_its_arguments_before_touching_the_old_output(made, tmp_path):
    out, command = made["splice"]
    copy = Path(shutil.copytree(out, tmp_path / "spx"))
    before = _tree(copy)
    msg = _error(runner.invoke(app, [*command, "--steps", "5:3", "--out", str(copy), "--overwrite"]))
    assert "--steps 5:3" in msg
    assert _tree(copy) == before


def test_a_command_that_fails_leaves_the_old_output_whole(made, tmp_path, monkeypatch):
    import tide.train.loop.splice as splice

    out, command = made["splice"]
    copy = Path(shutil.copytree(out, tmp_path / "spx"))
    before = _tree(copy)

    def broken(path, rows, **kw):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(splice, "save_grid", broken)
    result = runner.invoke(app, [*command, "--out", str(copy), "--overwrite"])
    assert result.exit_code != 0
    assert _tree(copy) == before and not (tmp_path / ".spx.tide-new").exists()
    monkeypatch.undo()
    assert runner.invoke(app, [*command, "--out", str(copy), "--overwrite"]).exit_code == 0
    assert set(listing(copy)) == set(before)  # the same files, written anew


def test_demo_model_overwrite_refuses_a_folder_of_ones_own_before_training(made, tmp_path):
    out, command = made["demo-model"]
    thesis = tmp_path / "thesisD"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    msg = _error(runner.invoke(app, [*command, "--out", str(thesis), "--overwrite"]))
    assert "is not a tide demo-model pipeline" in msg and "thesis.tex" in msg
    assert (thesis / "thesis.tex").read_text() == "years of work"
    copy = Path(shutil.copytree(out, tmp_path / "demo"))
    msg = _error(runner.invoke(app, [*command, "--out", str(copy)]))  # the shipped model, without --overwrite
    assert "holds a tide demo-model pipeline; pass --overwrite" in msg


@pytest.mark.parametrize("setting", [["--batch-size", "100000"], ["--steps", "50:100"]])
def test_train_refuses_its_settings_before_deleting_the_old_run(made, tmp_path, setting):
    out, command = made["run"]
    copy = Path(shutil.copytree(out, tmp_path / "runX"))
    before = _tree(copy)
    msg = _error(runner.invoke(app, [*command, "--out", str(copy), "--overwrite", *setting]))
    assert ("fewer than one batch" if "--batch-size" in setting else "steps") in msg, msg
    assert _tree(copy) == before


def test_train_overwrite_replaces_a_run_and_lists_only_the_new_files(made, tmp_path):
    out, command = made["run"]
    copy = Path(shutil.copytree(out, tmp_path / "runX"))
    result = runner.invoke(app, [*command, "--out", str(copy), "--overwrite", "--arch", "relu"])
    assert result.exit_code == 0, result.output
    kind, files = read_manifest(copy)
    (new,) = [p.name for p in copy.iterdir() if p.is_dir()]
    assert kind == "run" and new != SAE and (copy / new / "sae.json").is_file()
    assert set(listing(copy)) - {MANIFEST} <= files and not any(f.startswith(SAE) for f in files)
    result = runner.invoke(app, ["eval", str(copy), "--buckets", "2"])
    assert result.exit_code == 0, result.output
    assert f"{new}/eval_b2.json" in read_manifest(copy)[1]  # eval lists what it adds


@pytest.mark.parametrize(
    "kind", ["run", "splice", "steer", "features", "export", "sae", "demo-model", "eval", "pack"]
)
def test_an_out_url_is_refused_in_one_line_and_no_s3_folder_appears(made, tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    url = "s3://bucket/x"
    if kind == "eval":
        args = ["eval", str(made["run"][0]), "--json", url]
    elif kind == "pack":
        args = ["store", "pack", str(made["store"][0]), "--out", url + ".zarr.zip"]
    else:
        args = [*made[kind][1], "--out", url]
    msg = _error(runner.invoke(app, args))
    assert url in msg and "not a s3:// URL" in msg and "write it to a local path" in msg, msg
    assert os.listdir(tmp_path) == []


def test_eval_json_and_card_out_never_write_over_a_file_of_ones_own(made, tmp_path):
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    msg = _error(runner.invoke(app, ["eval", str(made["run"][0]), "--json", str(tmp_path / "notes.json")]))
    assert "is not the results of `tide eval --json` tide wrote" in msg
    assert json.loads((tmp_path / "notes.json").read_text()) == {"mine": 1}
    ok = runner.invoke(app, ["eval", str(made["run"][0]), "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["eval", str(made["run"][0]), "--json", str(tmp_path / "r.json")])
    assert again.exit_code == 0, again.output  # its own results are written over
    (tmp_path / "README.md").write_text("# my dataset\n")
    msg = _error(
        runner.invoke(app, ["store", "card", str(made["store"][0]), "--out", str(tmp_path / "README.md")])
    )
    assert (
        "is not a dataset card tide wrote" in msg and (tmp_path / "README.md").read_text() == "# my dataset\n"
    )

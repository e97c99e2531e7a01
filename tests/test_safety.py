"""Nothing deleted, nothing read wrong: what --overwrite may delete, disk space, unwritable folders, two
harvests of one store, partial stores, the model behind a store, a damaged resume state or zarr.json."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from tide.cli import app
from tide.harvest.run import HarvestError, harvest
from tide.store.reader import open_store
from tide.store.schema import Layout
from tide.store.writer import everything
from tide.train.fit.checkpoint import load_sae
from tide.train.fit.data import split_samples
from typer.testing import CliRunner

from tests.factories import harvest_config, harvested, synthetic_store, train_config

runner = CliRunner()


def _harvest_args(model, out, *extra):
    return [
        "harvest",
        "--model",
        str(model),
        "--out",
        str(out),
        "--num-samples",
        "6",
        "--num-steps",
        "3",
        "--batch-size",
        "2",
        "--layers",
        "0",
        "--token-fraction",
        "0.5",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _train_args(store, out, *extra):
    return [
        "train",
        "--store",
        str(store),
        "--out",
        str(out),
        "--no-progress",
        "--max-steps",
        "2",
        "--warmup-steps",
        "1",
        "--batch-size",
        "16",
        "--k",
        "2",
        "--expansion",
        "2",
        "--device",
        "cpu",
        *extra,
    ]


def _error(result) -> str:
    """The one-paragraph error of a refused command."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and "error: " in result.output, result.output
    return result.output[result.output.index("error: ") :]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    names = [n for n, _ in root.arrays()] + [
        f"stats/{g}/{a}" for g, grp in root["stats"].groups() for a, _ in grp.arrays()
    ]
    return {n: root[n][:] for n in names}


def _assert_same_store(a: Path, b: Path) -> None:
    x, y = _arrays(a), _arrays(b)
    assert x.keys() == y.keys()
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def _du(path: Path) -> int:
    """Bytes of disk allocated to a folder, as `du` counts them (folders included)."""
    return sum(p.lstat().st_blocks * 512 for p in [path, *path.rglob("*")])


@pytest.fixture(scope="module")
def clean(tiny_dit, tmp_path_factory) -> Path:
    """The store `_harvest_args` makes, written without interruption."""
    out = tmp_path_factory.mktemp("clean") / "s.zarr"
    result = runner.invoke(app, _harvest_args(tiny_dit, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A complete store of 12 samples in 4 sample chunks, without a model (only read by the tests)."""
    return synthetic_store(tmp_path_factory.mktemp("syn") / "s.zarr", values="random")


# --- 1. --overwrite replaces only tide's own output --------------------------------------------------


def test_harvest_overwrite_never_deletes_what_is_not_a_store(tiny_dit, tmp_path):
    out = tmp_path / "thesis"
    (out / "figures").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        msg = _error(runner.invoke(app, _harvest_args(tiny_dit, out, *extra)))
        assert "is not a tide store" in msg and "figures/, thesis.tex" in msg and "by hand" in msg, msg
        assert "pass --overwrite" not in msg
    assert (out / "thesis.tex").read_text() == "years of work"

    run = tmp_path / "run"  # tide's own, but a training run: harvest --overwrite leaves it too
    (run / "resid_l00-topk-k2").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    (run / "resid_l00-topk-k2" / "sae.json").write_text("{}")
    msg = _error(runner.invoke(app, _harvest_args(tiny_dit, run, "--overwrite")))
    assert "holds a tide training run, not a tide store" in msg
    assert (run / "resid_l00-topk-k2" / "sae.json").is_file()

    store = tmp_path / "s.zarr"  # a store with someone's file inside: resumable, but not deleted
    assert runner.invoke(app, _harvest_args(tiny_dit, store)).exit_code == 0
    (store / "notes.txt").write_text("mine")
    assert runner.invoke(app, _harvest_args(tiny_dit, store)).exit_code == 0
    msg = _error(runner.invoke(app, [*_harvest_args(tiny_dit, store), "--num-steps", "2", "--overwrite"]))
    assert "notes.txt" in msg and "did not write" in msg
    assert (store / "notes.txt").read_text() == "mine" and open_store(store).meta.num_inference_steps == 3
    (store / "notes.txt").unlink()
    result = runner.invoke(app, [*_harvest_args(tiny_dit, store), "--num-steps", "2", "--overwrite"])
    assert result.exit_code == 0 and open_store(store).meta.num_inference_steps == 2, result.output


def test_train_overwrite_never_deletes_what_is_not_a_run(syn, tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    msg = _error(runner.invoke(app, _train_args(syn.path, out, "--overwrite")))
    assert "is not a tide training run" in msg and "thesis.tex" in msg and "by hand" in msg
    assert (out / "thesis.tex").read_text() == "years of work"
    # A file called train_config.json does not make a folder tide's: the rest of it is still named and kept.
    (out / "train_config.json").write_text("{}")
    msg = _error(runner.invoke(app, _train_args(syn.path, out, "--overwrite")))
    assert "thesis.tex" in msg and (out / "thesis.tex").is_file()

    run = tmp_path / "run"
    assert runner.invoke(app, _train_args(syn.path, run, "--no-eval")).exit_code == 0
    (run / "notes.txt").write_text("mine")
    again = _train_args(syn.path, run, "--no-eval", "--lr", "0.5", "--overwrite")
    msg = _error(runner.invoke(app, again))
    assert "notes.txt" in msg and (run / "notes.txt").read_text() == "mine"
    (run / "notes.txt").unlink()
    assert runner.invoke(app, again).exit_code == 0
    assert load_sae(run / "resid_l00-topk-k2").meta.train_config["lr"] == 0.5


def test_train_out_and_store_never_nest(tmp_path):
    store = synthetic_store(tmp_path / "data" / "s.zarr", values="random")
    before = _arrays(store.path)
    for out in (store.path, store.path / "saes", tmp_path / "data", tmp_path):
        msg = _error(runner.invoke(app, _train_args(store.path, out, "--overwrite")))
        assert "one holds the other" in msg and "would delete the store" in msg
    assert open_store(store.path).done().all()
    after = _arrays(store.path)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["s.zarr"]


# --- 2. disk space: checked before anything is written, with an upper bound; a full disk mid-run ------


def test_space_refusal_comes_before_anything_is_written(tiny_dit, tmp_path, monkeypatch):
    import tide.harvest.run as run

    monkeypatch.setattr(run, "free_bytes", lambda path: 1000)
    out = tmp_path / "new" / "s.zarr"
    # 2000 samples: the old order created 2000 seed and label files before refusing.
    msg = _error(runner.invoke(app, [*_harvest_args(tiny_dit, out), "--num-samples", "2000"]))
    assert re.search(r"needs up to [\d.]+ MiB of disk .* but only 1000 B is free", msg), msg
    assert "nothing was written" in msg and "0.00 GiB" not in msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--token-fraction", "1", "--codec", "none", "--cfg-branch", "both", "--guidance-scale", "2"],
        ["--save-images", "--sites", "resid,mlp", "--num-samples", "5", "--dtype", "float32"],
    ],
)
def test_disk_estimate_is_an_upper_bound(tiny_dit, tmp_path, monkeypatch, extra):
    import tide.harvest.run as run

    bounds, real = [], run.disk_bound
    monkeypatch.setattr(run, "disk_bound", lambda *a, **k: bounds.append(real(*a, **k)) or bounds[-1])
    out = tmp_path / "s.zarr"
    result = runner.invoke(app, _harvest_args(tiny_dit, out, *extra))
    assert result.exit_code == 0, result.output
    used = _du(out)
    assert used <= bounds[-1] <= 3 * used, (used, bounds)


def test_full_disk_mid_run_ends_in_a_message_and_a_resumable_store(tiny_dit, clean, tmp_path, monkeypatch):
    from tide.store.writer import StoreWriter

    real = StoreWriter.write_block

    def write_block(self, name, c, steps, block):
        if c == 1:  # the disk fills while the second sample chunk is written
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.root.store.root) / name))
        real(self, name, c, steps, block)

    monkeypatch.setattr(StoreWriter, "write_block", write_block)
    out = tmp_path / "s.zarr"
    msg = _error(runner.invoke(app, _harvest_args(tiny_dit, out)))
    assert "is full" in msg and "2 of 6 samples had been written completely" in msg, msg
    assert "resumable" in msg and "run the same command again" in msg
    monkeypatch.undo()
    result = runner.invoke(app, _harvest_args(tiny_dit, out))
    assert result.exit_code == 0 and "2 samples already done" in result.output, result.output
    _assert_same_store(out, clean)


# --- 3. a folder that cannot be written ----------------------------------------------------------------


@contextlib.contextmanager
def _unwritable(folder: Path):
    """Make `folder` refuse new entries: mode 0o555, or, as root (whom modes do not stop), the immutable
    attribute; skip the test where neither holds."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    elif (
        shutil.which("chattr")
        and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    ):
        undo = ["chattr", "-i", str(folder)]
    else:
        pytest.skip("cannot make a folder unwritable here (root without chattr +i)")
    try:
        try:
            (folder / "probe").touch()
        except OSError:
            pass
        else:
            (folder / "probe").unlink()
            pytest.skip(f"{folder} is still writable")
        yield
    finally:
        subprocess.run(undo, check=True)


def test_unwritable_out_is_one_paragraph_error(tiny_dit, syn, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    with _unwritable(parent):
        harvest_msg = _error(runner.invoke(app, _harvest_args(tiny_dit, parent / "s.zarr")))
        train_msg = _error(runner.invoke(app, _train_args(syn.path, parent / "saes")))
    for msg in (harvest_msg, train_msg):
        assert "cannot write to" in msg and str(parent) in msg and "a folder you can write to" in msg, msg


@pytest.mark.parametrize(
    "code, words", [(errno.EROFS, "the filesystem is read-only"), (errno.EACCES, "permission denied")]
)
def test_store_that_turns_unwritable_mid_run(tiny_dit, tmp_path, monkeypatch, code, words):
    from tide.store.writer import StoreWriter

    def write_block(self, name, c, steps, block):
        raise OSError(
            code, os.strerror(code), str(Path(self.root.store.root) / name / "c" / "0" / "0" / "0" / "0")
        )

    monkeypatch.setattr(StoreWriter, "write_block", write_block)
    msg = _error(runner.invoke(app, _harvest_args(tiny_dit, tmp_path / "s.zarr")))
    assert f"cannot write to {tmp_path / 's.zarr'}: {words} (at {tmp_path / 's.zarr' / 'resid_l00'}" in msg, (
        msg
    )


@pytest.mark.parametrize(
    "code, words", [(errno.EROFS, "the filesystem is read-only"), (errno.EACCES, "permission denied")]
)
def test_run_folder_that_turns_unwritable_mid_run(syn, tmp_path, monkeypatch, code, words):
    import tide.train.fit.trainer as trainer

    def save_state(out, state):
        raise OSError(code, os.strerror(code), str(out / "trainer_state.pt"))

    monkeypatch.setattr(trainer, "save_state", save_state)
    msg = _error(runner.invoke(app, _train_args(syn.path, tmp_path / "saes")))
    assert (
        f"cannot write to {tmp_path / 'saes'}: {words} (at {tmp_path / 'saes' / 'trainer_state.pt'})" in msg
    ), msg


# --- 4. two harvests of one --out ----------------------------------------------------------------------


def test_second_harvest_of_one_out_is_refused_while_the_first_writes(tiny_dit, clean, tmp_path):
    # _harvest_args' settings, so that the store equals `clean`.
    cfg = harvest_config(
        tiny_dit, tmp_path / "s.zarr", num_samples=6, num_steps=3, layers="0", token_fraction=0.5,
        device="cpu",
    )  # fmt: skip
    inside, release, first = threading.Event(), threading.Event(), {}

    def log(message):  # the first harvest stops here, holding --out, until the second one has tried
        if "samples already done" in message:
            inside.set()
            release.wait(60)

    thread = threading.Thread(target=lambda: first.update(result=harvest(cfg, log=log)))
    thread.start()
    try:
        assert inside.wait(60)
        with pytest.raises(HarvestError, match=rf"another tide harvest \(pid {os.getpid()}\) is writing"):
            harvest(cfg, log=lambda m: None)
    finally:
        release.set()
        thread.join(60)
    assert first["result"].written == 6
    _assert_same_store(cfg.out, clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # the lock file is gone


def test_second_train_into_one_out_is_refused_while_the_first_runs(syn, tmp_path):
    from tide.train.fit.trainer import TrainError, train

    cfg = train_config(
        syn.path, tmp_path / "saes", max_steps=4, device="cpu", log_every=1, checkpoint_every=1
    )
    inside, release, first = threading.Event(), threading.Event(), {}

    def log(message):  # the first run stops here, holding --out, until the second one has tried
        if "training rows" in message:
            inside.set()
            release.wait(60)

    thread = threading.Thread(target=lambda: first.update(result=train(cfg, log=log)))
    thread.start()
    try:
        assert inside.wait(60)
        with pytest.raises(
            TrainError, match=rf"another tide train \(pid {os.getpid()}\) is writing {cfg.out}"
        ):
            train(cfg, log=lambda m: None)
    finally:
        release.set()
        thread.join(60)
    assert first["result"].steps == 4
    steps = [json.loads(line)["step"] for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one run's lines, once each
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saes"]  # the lock file is gone


# --- 5. training on an unfinished harvest ------------------------------------------------------------


def _partial_store(path: Path, done_samples: int):
    """12 samples in 4 chunks of 3; a harvest stopped after `done_samples`. Seed 0 holds out chunk 3."""
    store = synthetic_store(path, values="random")
    everything(zarr.open_array(str(path / "done"), mode="r+"))[done_samples:] = (
        False  # written, as a harvest does
    )
    return store


def test_training_on_an_unfinished_harvest_warns_and_evaluates(tmp_path):
    store = _partial_store(tmp_path / "p.zarr", 9)
    result = runner.invoke(app, _train_args(store.path, tmp_path / "saes"))
    assert result.exit_code == 0, result.output
    assert "9 of 12 samples are done" in result.output and f"--out {store.path}" in result.output
    assert "held-out samples" in result.output  # the evaluation table
    split = load_sae(tmp_path / "saes" / "resid_l00-topk-k2").meta.split
    assert split.val_chunks == [0] and split.train_chunks == [1, 2]


def test_one_done_chunk_skips_the_evaluation_with_a_note(tmp_path):
    store = _partial_store(tmp_path / "p.zarr", 3)
    result = runner.invoke(app, _train_args(store.path, tmp_path / "saes"))
    assert result.exit_code == 0, result.output
    assert "3 of 12 samples are done" in result.output and "evaluation is skipped" in result.output
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "saes")])
    assert evaluated.exit_code == 2 and "held out no sample chunk" in evaluated.output
    assert "val_fraction=0" not in evaluated.output  # it was trained with the default 0.1


def test_split_holds_out_a_done_chunk_and_keeps_its_choice():
    lay = Layout(
        num_samples=30, num_steps=2, tokens=1, d_model=1, batch_size=3, steps_per_chunk=2, tokens_per_chunk=1
    )
    rng = np.random.default_rng(0)
    subsets = [list(range(k)) for k in range(1, 11)] + [
        sorted(rng.choice(10, size=int(rng.integers(2, 10)), replace=False).tolist()) for _ in range(40)
    ]
    for seed in range(4):
        order = np.random.default_rng([seed, 7]).permutation(10).tolist()
        for frac in (0.1, 0.25):
            held = set(order[: max(1, round(frac * 10))])  # the rule over all chunks of the store
            for done in subsets:
                try:
                    split = split_samples(lay, done, frac, seed)
                except ValueError:
                    assert set(done) <= held  # nothing left to train on
                    continue
                assert sorted(split.train_chunks + split.val_chunks) == done
                assert held & set(done) <= set(split.val_chunks)  # the store-wide choice is kept
                if held & set(done):
                    assert set(split.val_chunks) == held & set(done)  # and is all there is
                elif len(done) >= 2:
                    assert split.val_chunks == [next(c for c in order if c in done)]
    assert split_samples(lay, list(range(10)), 0.0, 0).val_chunks == []


# --- 6. the model behind a store ---------------------------------------------------------------------


def test_adaln_init_refuses_a_model_that_did_not_make_the_store(tiny_dit, tmp_path):
    from diffusers import DiTTransformer2DModel

    model = shutil.copytree(tiny_dit, tmp_path / "model")
    out = harvested(model, tmp_path / "s.zarr", num_samples=8, num_steps=2)
    recorded = open_store(out).meta.model.fingerprint
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", recorded)
    args = _train_args(out, tmp_path / "a", "--arch", "tide", "--init-modulation", "adaln")
    assert runner.invoke(app, args).exit_code == 0  # the same model: fine

    perturbed = DiTTransformer2DModel.from_pretrained(model / "transformer")
    with torch.no_grad():
        perturbed.transformer_blocks[1].norm1.linear.weight[0, 0] += 1e-3
    perturbed.save_pretrained(model / "transformer")
    msg = _error(
        runner.invoke(app, _train_args(out, tmp_path / "b", "--arch", "tide", "--init-modulation", "adaln"))
    )
    assert f"{model} holds other weights" in msg and f"fingerprint {recorded[:19]}..." in msg
    found = re.search(r"holds other weights \(fingerprint (sha256:[0-9a-f]{12})\.\.\.\)", msg).group(1)
    assert found != recorded[:19]
    with pytest.raises(HarvestError, match="model weights: fingerprint"):  # nor does a harvest resume with it
        harvested(model, out, num_samples=8, num_steps=2)

    # A store from before fingerprints: a warning, and training goes on.
    zarr_json = out / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    del meta["attributes"]["model"]["fingerprint"]
    zarr_json.write_text(json.dumps(meta))
    result = runner.invoke(
        app, _train_args(out, tmp_path / "c", "--arch", "tide", "--init-modulation", "adaln")
    )
    assert result.exit_code == 0 and "records no fingerprint" in result.output, result.output


def test_stores_without_a_fingerprint_keep_their_identity(syn):
    attrs = json.loads((syn.path / "zarr.json").read_text())["attributes"]
    assert "fingerprint" not in attrs["model"]
    attrs.pop("created")
    old_identity = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:16]
    assert open_store(syn.path).identity() == old_identity


# --- 7. a damaged resume state or zarr.json ----------------------------------------------------------


def test_truncated_resume_state_is_one_paragraph_error(syn, tmp_path):
    out = tmp_path / "saes"
    args = _train_args(syn.path, out, "--no-eval", "--checkpoint-every", "1")
    assert runner.invoke(app, args).exit_code == 0
    state = out / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    msg = _error(runner.invoke(app, args))
    assert f"the resume state {state} is damaged" in msg and "--overwrite" in msg and "SAE folders" in msg, (
        msg
    )
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_resume_state_with_flipped_bytes_inside_a_tensor_is_refused(syn, tmp_path):
    import itertools
    import zipfile

    from tide.train.fit.trainer import fit, prepare

    out = tmp_path / "saes"
    args = _train_args(syn.path, out, "--no-eval", "--checkpoint-every", "1", "--max-steps", "4")
    # args' settings, so that the command resumes this run.
    cfg = train_config(syn.path, out, archs=("tide", "topk"), max_steps=4, device="cpu", checkpoint_every=1)
    run, loader, _ = prepare(cfg, log=lambda m: None)  # a run stopped after 2 of its 4 steps
    fit(run, itertools.islice(loader.batches(run.position), 2), cfg)
    state = out / "trainer_state.pt"
    assert torch.load(state, weights_only=True)["step"] == 2
    with zipfile.ZipFile(state) as z:  # the largest entry: a tensor's storage (the encoder's weights)
        entry = max(z.infolist(), key=lambda i: i.file_size)
    assert "/data/" in entry.filename
    data = bytearray(state.read_bytes())
    start = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra) + 16
    data[start : start + 64] = bytes(b ^ 0x5A for b in data[start : start + 64])
    state.write_bytes(bytes(data))
    weights = (out / "resid_l00-topk-k2" / "sae.safetensors").read_bytes()
    msg = _error(runner.invoke(app, args))
    assert f"the resume state {state} is damaged (its entry {entry.filename} fails its CRC-32" in msg, msg
    assert "--overwrite" in msg and "\n" not in msg.strip()
    assert (out / "resid_l00-topk-k2" / "sae.safetensors").read_bytes() == weights  # nothing trained on it


def test_wrong_shape_in_zarr_json_is_one_paragraph_error(tmp_path):
    store = synthetic_store(tmp_path / "s.zarr", values="random")
    meta_file = store.path / "resid_l00" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["shape"][2] = 3
    meta_file.write_text(json.dumps(meta))
    msg = _error(runner.invoke(app, _train_args(store.path, tmp_path / "saes")))
    assert "array 'resid_l00'" in msg and "shape (12, 5, 3, 8) in its zarr.json" in msg, msg
    assert "says (12, 5, 4, 8)" in msg and f"tide store verify {store.path}" in msg
    assert not (tmp_path / "saes").exists()


# --- 8. a finished store is left alone ---------------------------------------------------------------


def test_rerun_of_a_complete_store_writes_nothing(tiny_dit, clean, tmp_path):
    out = shutil.copytree(clean, tmp_path / "s.zarr")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    result = runner.invoke(app, _harvest_args(tiny_dit, out))
    assert result.exit_code == 0 and result.output.count("already complete") == 1, result.output
    assert "wrote" not in result.output
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


@pytest.mark.parametrize("recorded, found", [(None, "sha256:" + "a" * 64), ("sha256:" + "a" * 64, None)])
def test_check_same_model_passes_what_cannot_be_checked(recorded, found):
    from tide.store.fingerprint import check_same_model
    from tide.store.schema import ModelInfo

    info = ModelInfo.model_validate({**_model_info_fields(), "fingerprint": recorded})
    check_same_model(info, found, "/m", "why", "fix")
    check_same_model(info.model_copy(update={"fingerprint": found}), found, "/m", "why", "fix")


def test_check_same_model_names_both_and_the_fix():
    from tide.store.fingerprint import check_same_model
    from tide.store.schema import ModelInfo

    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    info = ModelInfo.model_validate({**_model_info_fields(), "fingerprint": a})
    with pytest.raises(KeyError) as e:
        check_same_model(info, b, "/new/folder", "cannot do X", "pass --model Y", KeyError)
    msg = str(e.value)
    assert msg.startswith(
        "'cannot do X: /new/folder holds other weights (fingerprint sha256:bbbbbbbbbbbb...)"
    )
    assert f"({info.id}, fingerprint sha256:aaaaaaaaaaaa...); pass --model Y" in msg


def _model_info_fields() -> dict:
    return {
        "id": "org/model",
        "path": "/m",
        "transformer_class": "DiTTransformer2DModel",
        "transformer_config": {},
    }

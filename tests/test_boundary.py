"""Bad numbers refused at the boundary, and every failure one `error:` line naming the value and the fix
(issue 24, points 6, 9 and 10): each test states what a user who gives that input should see."""

from __future__ import annotations

import errno
import functools
import http.server
import json
import math
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file
from tide.cli import app
from tide.train.fit.checkpoint import load_sae
from typer.testing import CliRunner

from tests.factories import random_sae, synthetic_store, tiny_store, write_sae
from tests.test_safety import _unwritable

runner = CliRunner()


def _error(args: list[str], *needles: str) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback), holding every needle."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and "error: " in result.output, result.output
    msg = result.output[result.output.index("error: ") :]
    assert len(msg.strip().splitlines()) == 1, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _train_args(store, out, *extra: str) -> list[str]:
    return [
        "train", "--store", str(store), "--out", str(out), "--no-progress", "--max-steps", "4",
        "--warmup-steps", "1", "--batch-size", "16", "--k", "2", "--expansion", "2", "--arch", "topk",
        "--device", "cpu", "--no-eval", *extra,
    ]  # fmt: skip


def _harvest_args(model, out, *extra: str) -> list[str]:
    return [
        "harvest", "--model", str(model), "--out", str(out), "--num-samples", "4", "--num-steps", "2",
        "--batch-size", "2", "--layers", "0", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """12 samples x 5 steps, random rows: a run of a few steps takes a second."""
    return synthetic_store(tmp_path_factory.mktemp("syn") / "s.zarr", values="random")


@pytest.fixture(scope="module")
def trained(syn, tmp_path_factory) -> Path:
    """A topk SAE folder trained on `syn` (per-timestep means: exporting it needs --timestep)."""
    out = tmp_path_factory.mktemp("run") / "saes"
    assert runner.invoke(app, _train_args(syn.path, out)).exit_code == 0
    return out / "resid_l00-topk-k2"


@pytest.fixture(scope="module")
def looped(tiny_dit, tmp_path_factory) -> Path:
    """A tiny DiT's store and a tide SAE on its resid_l01, for splice and steer."""
    root = tmp_path_factory.mktemp("loop")
    store = tiny_store(tiny_dit, root / "s.zarr")
    return write_sae(root / "saes" / "tide", store, "resid_l01", random_sae(16, store, "resid_l01"))


def _finite_weights(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(folder / "sae.safetensors").values())


# --- 6. non-finite and absurd numbers ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "1e30", "-5"])
def test_export_refuses_a_timestep_the_sae_never_saw(trained, tmp_path, value):
    t_S = load_sae(trained).sae.input_mean_t
    _error(
        ["export", str(trained), "--out", str(tmp_path / "x"), "--timestep", value],
        f"--timestep {float(value):g}",
        f"trained on scheduler timesteps {float(t_S.min()):g}..{float(t_S.max()):g}",
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("value", ["1", "inf"])
def test_features_refuses_a_causal_scale_that_scales_nothing_up(trained, tmp_path, value):
    """The config's rule (> 1, finite), which the option's own range (>= 1) lets through, in one line."""
    _error(
        ["features", str(trained), "--out", str(tmp_path / "f"), "--causal-scale", value], "--causal-scale"
    )
    assert not (tmp_path / "f").exists()


def test_an_sae_refuses_a_nan_timestep(trained):
    sae = load_sae(trained).sae  # in eval mode: instead of picking a mean for t = NaN
    with pytest.raises(ValueError, match="holds nan, which is no timestep"):
        sae.forward_raw(torch.zeros(2, 8), math.nan)


@pytest.mark.parametrize(
    "edit, value", [("--strength", "nan"), ("--strength", "1e30"), ("--strength", "-inf"), ("--clamp", "nan")]
)
def test_steer_refuses_non_finite_and_absurd_edits(tmp_path, edit, value):
    # Refused by the config, before the SAE or the model is even read.
    args = ["steer", str(tmp_path / "no-sae"), "--latent", "0", edit, value, "--out", str(tmp_path / "o")]
    _error(args, f"{edit} {float(value):g} is not an edit", "up to 10000", "use e.g. 10")
    assert not (tmp_path / "o").exists()


def test_an_edit_that_drives_the_model_to_nan_is_refused(looped, tmp_path, monkeypatch):
    """Past the config's bound (lifted here), the sampler's own check: nothing black is written."""
    import tide.train.loop.steer as steer

    monkeypatch.setattr(steer, "EDIT_LIMIT", math.inf)
    out = tmp_path / "o"
    args = ["steer", str(looped), "--latent", "3", "--strength", "1e38", "--out", str(out)]
    _error(
        [*args, "--num-samples", "2", "--no-progress"],
        "drove the model to NaN or infinity",
        "nothing was written",
    )
    assert not (out / "images.npy").exists() and not (out / "steer.json").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "1e30", "0"])
def test_train_refuses_a_learning_rate_that_is_not_one(syn, tmp_path, value):
    _error(_train_args(syn.path, tmp_path / "o", "--lr", value), "--lr")
    assert not (tmp_path / "o").exists()


def test_every_float_setting_refuses_nan_and_infinity():
    from pydantic import ValidationError
    from tide.harvest.config import HarvestConfig
    from tide.harvest.demo_model import DemoTrainConfig
    from tide.train.analysis.features import FeaturesConfig
    from tide.train.fit.config import TrainConfig

    cases = [
        (TrainConfig, ["aux_coeff", "l1_coeff", "l0_coeff", "min_lr_ratio", "weight_decay", "val_fraction"]),
        (HarvestConfig, ["token_fraction"]),
        (DemoTrainConfig, ["lr", "weight_decay", "ema_decay", "class_dropout"]),
        (FeaturesConfig, ["dense_threshold", "causal_scale"]),
    ]
    for cls, fields in cases:
        for name in fields:
            for bad in (math.nan, math.inf):
                with pytest.raises(ValidationError, match="finite number"):
                    cls(**{name: bad})


def test_import_refuses_non_finite_weights(trained, tmp_path):
    saelens = tmp_path / "saelens"
    assert (
        runner.invoke(app, ["export", str(trained), "--out", str(saelens), "--timestep", "999"]).exit_code
        == 0
    )
    weights = load_file(saelens / "sae_weights.safetensors")
    weights["W_dec"][3, 4] = math.nan
    weights["b_enc"][0] = math.inf
    save_file(weights, saelens / "sae_weights.safetensors")
    store = load_sae(trained).meta.store.path
    _error(
        ["import", str(saelens), "--store", store, "--out", str(tmp_path / "t")],
        "holds NaN or infinite values in W_dec (1 of 128), b_enc (1 of 16)",
    )
    assert not (tmp_path / "t").exists()


def test_nan_loss_stops_training_with_the_step_and_writes_no_nan_sae(syn, tmp_path, monkeypatch):
    """A learning rate the config would refuse (its bound lifted here) diverges: the run stops naming the step,
    and every SAE left on disk is the last finite checkpoint."""
    import tide.store.limits as limits

    monkeypatch.setattr(limits, "LR_MAX", math.inf)
    out = tmp_path / "o"
    args = _train_args(syn.path, out, "--lr", "1e30", "--max-steps", "20", "--checkpoint-every", "1")
    msg = _error(args, "training diverged", "became NaN or infinite at step", "Lower --lr (now 1e+30)")
    step = int(msg.split("at step ")[1].split()[0])
    saved = out / "resid_l00-topk-k2"
    if step > 1:  # the checkpoints before it are kept, and they are finite
        assert f"the checkpoint of step {step - 1}" in msg and _finite_weights(saved)
        assert load_sae(saved).meta.trained_steps == step - 1
    else:
        assert "no checkpoint had been written" in msg and not saved.exists()
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    assert all(math.isfinite(json.loads(ln)["resid_l00-topk-k2"]["fvu"]) for ln in lines)


def test_nan_activations_stop_training_and_name_the_store(tmp_path):
    store = synthetic_store(tmp_path / "s.zarr", values="random")
    zarr.open_array(str(store.path / "resid_l00"), mode="r+")[:, :, 0, 0] = np.inf  # a quarter of the rows
    out = tmp_path / "o"
    _error(_train_args(store.path, out), "resid_l00 activations hold NaN or infinity", "tide store verify")
    assert not (out / "resid_l00-topk-k2").exists()


# --- seeds, sizes, step ranges -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_seeds_out_of_range_name_the_option(syn, tiny_dit, tmp_path, seed):
    needles = ("--seed", f"seed={seed} is not a seed", "0 to 4294967295")
    _error(_harvest_args(tiny_dit, tmp_path / "h.zarr", "--seed", seed), *needles)
    _error(_train_args(syn.path, tmp_path / "t", "--seed", seed), *needles)
    _error(["demo-model", "train", "--out", str(tmp_path / "d"), "--seed", seed], *needles)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seed", "-1"], "--seed -1 is not a seed"),
        (["--seed", "99999999999999999999"], "--seed 99999999999999999999 is not a seed"),
        (["--guidance-scale", "nan"], "--guidance-scale nan is not a CFG scale"),
    ],
)
def test_demo_model_sampling_refuses_bad_seeds_and_guidance(tmp_path, args, needle):
    _error(["demo-model", "eval", "--per-class", "1", "--num-steps", "2", *args], needle)
    if "--seed" in args:
        _error(["demo-model", "grid", "--out", str(tmp_path / "g.png"), *args], needle)
    assert list(tmp_path.iterdir()) == []


def test_huge_image_size_is_refused_before_work(tiny_dit, tmp_path):
    # The tiny DiT makes 8 px images: 100000 px would take 50000 x 4 = 200,000 tokens an image.
    _error(
        _harvest_args(tiny_dit, tmp_path / "h.zarr", "--height", "100000"),
        "--height 100000 is over 8x the 8 px",
        "200,000 tokens instead of 16",
    )
    assert list(tmp_path.iterdir()) == []
    _error(
        _harvest_args(tiny_dit, tmp_path / "h.zarr", "--height", "16"),
        "--height 16 and --width 8 differ, but DiTTransformer2DModel makes square images only",
    )
    result = runner.invoke(
        app, _harvest_args(tiny_dit, tmp_path / "ok.zarr", "--height", "16", "--width", "16")
    )
    assert result.exit_code == 0, result.output  # twice the native size is fine


def test_train_steps_past_the_store_are_refused(syn, tmp_path):
    _error(
        _train_args(syn.path, tmp_path / "o", "--steps", "0:100"), "steps='0:100' reaches past", "5 stored"
    )
    _error(_train_args(syn.path, tmp_path / "o", "--steps", "7:"), "reaches past", "'4:5'")
    assert not (tmp_path / "o").exists()
    assert runner.invoke(app, _train_args(syn.path, tmp_path / "o", "--steps", "1:5")).exit_code == 0


# --- 9. one error line: files, folders, read-only disks --------------------------------------------------


def test_file_url_as_out_is_the_local_folder(tiny_dit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "x.zarr"
    result = runner.invoke(app, _harvest_args(tiny_dit, f"file://{out}"))
    assert result.exit_code == 0, result.output
    assert (out / "zarr.json").is_file() and not (tmp_path / "file:").exists()
    info = runner.invoke(app, ["store", "info", f"file://{out}"])
    assert info.exit_code == 0 and "4 / 4" in info.output, info.output


def test_saelens_folders_that_are_not_refused_in_one_line(trained, tmp_path):
    good = tmp_path / "good"
    assert (
        runner.invoke(app, ["export", str(trained), "--out", str(good), "--timestep", "999"]).exit_code == 0
    )
    store = load_sae(trained).meta.store.path

    def refused(edit, *needles):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        bad.mkdir()
        for f in good.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        edit(bad)
        _error(["import", str(bad), "--store", store, "--out", str(bad / "t")], *needles)
        assert not (bad / "t").exists()

    refused(lambda f: (f / "cfg.json").write_text("[1, 2]"), "cfg.json holds a JSON list, not the object")
    refused(lambda f: (f / "cfg.json").write_text("{bad"), "cfg.json is not JSON")
    refused(
        lambda f: (f / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": "8"})),
        "d_in='8' (a positive whole number is needed)",
        "d_sae=None",
    )
    refused(
        lambda f: (f / "sae_weights.safetensors").write_bytes(b"garbage" * 10),
        "sae_weights.safetensors is not a safetensors file",
    )

    def narrow(f):
        w = load_file(f / "sae_weights.safetensors")
        save_file({**w, "W_enc": w["W_enc"][:, :5].contiguous()}, f / "sae_weights.safetensors")

    refused(narrow, "has W_enc (8, 5), but its cfg.json (d_in=8, d_sae=16) means W_enc (8, 16)")


def test_export_out_that_is_a_file(trained, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    _error(["export", str(trained), "--out", str(target), "--timestep", "999"], f"--out {target} is a file")
    assert target.read_text() == "mine"


def test_read_only_disks_give_one_line_naming_the_folder(trained, looped, syn, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    with _unwritable(locked):
        for args in (
            ["export", str(trained), "--out", str(locked / "x"), "--timestep", "999"],
            ["splice", str(looped), "--out", str(locked / "x"), "--num-samples", "2", "--buckets", "0"],
            ["store", "card", str(syn.path), "--out", str(locked / "README.md")],
        ):
            _error(
                args,
                f"cannot write to {locked / ('README.md' if 'card' in args else 'x')}",
                "you can write to",
            )
    copy = tmp_path / "s.zarr"
    copy.mkdir()
    for p in syn.path.rglob("*"):
        (copy / p.relative_to(syn.path)).parent.mkdir(parents=True, exist_ok=True)
        if p.is_file():
            (copy / p.relative_to(syn.path)).write_bytes(p.read_bytes())
    with _unwritable(copy):
        _error(["store", "card", str(copy)], f"cannot write to {copy}", "--out FILE")


def test_a_read_only_out_is_refused_before_the_work(looped, tmp_path, monkeypatch):
    """Commands that build their output beside --out check that they can write there first, not after running
    the model for the whole run."""
    import tide.train.loop.splice as splice

    monkeypatch.setattr(splice, "_load", lambda *a, **k: pytest.fail("splice loaded the model"))
    locked = tmp_path / "locked"
    locked.mkdir()
    with _unwritable(locked):
        _error(
            ["splice", str(looped), "--out", str(locked / "new" / "x")], f"cannot write to {locked / 'new'}"
        )


def test_a_disk_that_fails_while_an_output_is_written_keeps_the_old_one(trained, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "x"
    args = ["export", str(trained), "--out", str(out), "--timestep", "999"]
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".x.tide-new" / "w"))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    _error([*args, "--overwrite"], f"the disk holding {out} is full", "free some space")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no staging folder left


def test_eval_of_read_only_saes_prints_its_results_with_a_note(trained, tmp_path):
    with _unwritable(trained):
        result = runner.invoke(app, ["eval", str(trained), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert f"note: cannot write {trained / 'eval.json'}" in result.output and "--json FILE" in result.output
    assert json.loads((tmp_path / "r.json").read_text())[0]["name"] == trained.name


def test_read_only_train_overwrite_blames_the_run_folder(syn, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, _train_args(syn.path, out)).exit_code == 0
    with _unwritable(out / "resid_l00-topk-k2"):
        msg = _error(_train_args(syn.path, out, "--lr", "0.5", "--overwrite"), f"cannot write to {out}")
    assert "check the store" not in msg and "tide store verify" not in msg


def test_full_disk_while_writing_a_checkpoint(syn, tmp_path, monkeypatch):
    """The disk fills while torch.save writes the second checkpoint: one line, the half-written file gone,
    and once there is room the same command resumes to the weights of an uninterrupted run."""
    import builtins

    import tide.train.fit.checkpoint as checkpoint

    class Full:  # a file on a disk with `room` bytes left, failing as the OS does
        def __init__(self, path, room):
            self.f, self.room = builtins.open(path, "wb"), room

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    saves = []

    def fake_open(path, mode="r", *a, **k):
        if Path(path).name == "trainer_state.pt.tmp" and "w" in mode:
            saves.append(path)
            return Full(path, 10**9 if len(saves) == 1 else 1000)
        return builtins.open(path, mode, *a, **k)

    out = tmp_path / "o"
    args = _train_args(syn.path, out, "--checkpoint-every", "2")
    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)
    _error(args, f"the disk holding {out} is full", "resumes from the run's last checkpoint")
    monkeypatch.undo()
    assert not (out / "trainer_state.pt.tmp").exists()
    assert torch.load(out / "trainer_state.pt", weights_only=True)["step"] == 2
    assert runner.invoke(app, args).exit_code == 0
    clean = tmp_path / "clean"
    assert runner.invoke(app, _train_args(syn.path, clean, "--checkpoint-every", "2")).exit_code == 0
    a, b = (load_file(p / "resid_l00-topk-k2" / "sae.safetensors") for p in (out, clean))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_splice_of_two_sae_folders_of_one_name_is_refused_first(looped, tmp_path):
    twin = tmp_path / "other" / looped.name
    twin.mkdir(parents=True)
    for f in looped.iterdir():
        (twin / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "o"
    _error(["splice", str(looped), str(twin), "--out", str(out)], f"two SAE folders are named {looped.name}")
    assert not out.exists()


# --- packed stores: entries named outside the store ------------------------------------------------------


def test_pack_and_verify_refuse_entries_named_outside_the_store(syn, tmp_path):
    packed = tmp_path / "s.zarr.zip"
    assert runner.invoke(app, ["store", "pack", str(syn.path), "--out", str(packed)]).exit_code == 0
    with zipfile.ZipFile(packed, "a") as z:
        z.writestr("../evil.txt", "outside")
        z.writestr("resid_l00/../../up.txt", "outside")
    result = runner.invoke(app, ["store", "verify", str(packed)])
    assert result.exit_code == 1 and "sound" not in result.output, result.output
    assert "entry '../evil.txt'" in result.output and "entry 'resid_l00/../../up.txt'" in result.output
    again = tmp_path / "again.zarr.zip"
    _error(
        ["store", "pack", str(packed), "--out", str(again)],
        "2 entries named outside the store",
        "'../evil.txt'",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr.zip"]


def test_reset_damaged_of_a_store_tide_only_reads(syn, tmp_path):
    packed = tmp_path / "s.zarr.zip"
    assert runner.invoke(app, ["store", "pack", str(syn.path), "--out", str(packed)]).exit_code == 0
    before = packed.read_bytes()
    _error(
        ["store", "verify", str(packed), "--reset-damaged"], "--reset-damaged rewrites the done flags", ".zip"
    )
    assert packed.read_bytes() == before
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(syn.path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s.zarr"
        _error(
            ["store", "verify", url, "--reset-damaged"],
            f"done flags of {url}",
            "http:// URL, which tide only reads",
        )
    finally:
        server.shutdown()
        server.server_close()


# --- 10. options and credentials ------------------------------------------------------------------------


@pytest.mark.parametrize("options", ["{bad", "[1]"])
def test_malformed_storage_options_name_the_option(syn, tmp_path, options):
    for args in (
        ["store", "info", str(syn.path)],
        ["store", "verify", str(syn.path)],
        ["store", "stats", str(syn.path)],
        ["store", "card", str(syn.path), "--out", str(tmp_path / "card.md")],
        ["store", "pack", str(syn.path), "--out", str(tmp_path / "p.zarr.zip")],
    ):
        _error([*args, "--storage-options", options], f"--storage-options {options!r}", "'{\"anon\": true}'")
    assert list(tmp_path.iterdir()) == []


def test_gs_without_credentials_names_googles_settings_not_aws():
    """What obstore raises when no Google credentials are found (it asks the instance metadata service)."""
    from obstore.exceptions import GenericError
    from tide.store.open import explain, where

    e = GenericError(
        "Generic GCS error: Error performing token request: Error performing GET http://169.254.169.254/"
        "computeMetadata/v1/instance/service-accounts/default/token in 3.99ms - Server returned non-2xx status "
        "code: 403 Forbidden"
    )
    for url in ("gs://bkt/h.zarr", "gcs://bkt/h.zarr"):
        msg = str(explain(where(url), e))
        assert "no credentials found" in msg and "GOOGLE_APPLICATION_CREDENTIALS" in msg, msg
        assert "AWS" not in msg and '{"skip_signature": true}' in msg, msg
    assert "AWS_ACCESS_KEY_ID" in str(explain(where("s3://bkt/h.zarr"), e))

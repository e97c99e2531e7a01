"""A harvest killed with SIGKILL and run again ends equal to one that was never interrupted."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import zarr
from tide.store.reader import open_store

from tests.conftest import kill_harvest_mid_run


def _cmd(model, out):
    args = [
        "harvest",
        "--model",
        str(model),
        "--out",
        str(out),
        "--num-samples",
        "8",
        "--num-steps",
        "80",
        "--batch-size",
        "2",
        "--sites",
        "resid,mlp",
        "--token-fraction",
        "0.5",
        "--guidance-scale",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    return [sys.executable, "-c", "from tide.cli import app; app()", *args]


def _done(out) -> np.ndarray | None:
    try:
        return zarr.open_array(str(out / "done"), mode="r")[:]
    except Exception:  # not created yet
        return None


def _arrays(out) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(out), mode="r")
    names = [n for n, _ in root.arrays()] + [
        f"stats/{g}/{a}" for g, grp in root["stats"].groups() for a, _ in grp.arrays()
    ]
    return {n: root[n][:] for n in names}


def test_kill_and_resume_equals_uninterrupted(tiny_dit, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    partial = kill_harvest_mid_run(_cmd(tiny_dit, killed), env, lambda: _done(killed))

    resumed = subprocess.run(_cmd(tiny_dit, killed), env=env, capture_output=True, text=True, check=True)
    assert f"{int(partial.sum())} samples already done" in resumed.stderr
    subprocess.run(_cmd(tiny_dit, clean), env=env, capture_output=True, check=True)

    a, b = _arrays(killed), _arrays(clean)
    assert a.keys() == b.keys() and "resid_l02_uncond" not in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert open_store(killed).done().all()

"""`tide train` on many processes (train/fit/distributed.py): real gloo ranks on 127.0.0.1, started by torchrun
(`tide train --nproc`, `torchrun --max-restarts`) or by hand the way a multi-node launch starts them."""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from queue import Empty

import numpy as np
import psutil
import pytest
import torch
import zarr
from safetensors.torch import load_file
from tide.store.reader import open_store
from tide.train.fit.checkpoint import load_state
from tide.train.fit.config import TrainConfig
from tide.train.fit.data import ActivationLoader, split_samples
from tide.train.fit.trainer import fit, prepare, train

from tests.factories import random_store, synthetic_store

ARCHS = "tide,batchtopk,topk"
TIDE = [sys.executable, "-c", "from tide.cli import app; app()"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """16 samples in 4 sample chunks x 6 steps (2 step chunks) x 8 tokens x D 16, one layer."""
    return random_store(tmp_path_factory.mktemp("ddp") / "s.zarr", num_steps=6, steps_per_chunk=3)


SETTINGS = {
    "archs": ARCHS,
    "k": (4,),
    "expansion": 4,
    "batch_size": 32,
    "max_steps": 200,
    "warmup_steps": 5,
    "window_rows": 288,  # 3 chunks of 96 rows, dealt 2 and 1: both ranks hold rows of every batch, unevenly
    "checkpoint_every": 10,
    "device": "cpu",
    "progress": False,
}


def _args(store, out) -> list[str]:
    flags = ["--store", str(store.path), "--out", str(out), "--arch", ARCHS, "--k", "4", "--expansion", "4"]
    flags += ["--batch-size", "32", "--max-steps", "200", "--warmup-steps", "5", "--checkpoint-every", "10"]
    flags += ["--device", "cpu", "--no-progress", "--no-eval"]
    return ["train", *flags, "--config", str(_window_config(out.parent))]


def _window_config(folder: Path) -> Path:
    path = folder / "window.yaml"
    path.write_text(f"window_rows: {SETTINGS['window_rows']}\n")
    return path


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    names = ["resid_l00-tide-k4", "resid_l00-batchtopk-k4", "resid_l00-topk-k4"]
    return {n: load_file(str(out / n / "sae.safetensors")) for n in names}


def _worst_relative(a: dict, b: dict) -> float:
    """max over SAEs and tensors of ||a - b|| / ||b|| (each tensor's relative L2 difference).

    Not the largest elementwise difference: BatchTopK keeps the batch's k * B largest values, and a near-tie
    at that cut-off falls either way under any change of float summation order, after which one latent's
    b_enc entry takes another path. One process fed the same batches with their rows permuted differs from
    itself by 1.8e-4 of b_enc's largest entry after 200 steps (2.5e-5 relative L2); 2 ranks differ from one
    process by 8e-5 (1.1e-5 relative L2): the same order of rounding, not a difference of method."""
    return max(
        float((a[n][k].float() - b[n][k].float()).norm() / b[n][k].float().norm().clamp_min(1e-12))
        for n in b
        for k in b[n]
    )


@pytest.fixture(scope="module")
def two_ranks(store, tmp_path_factory):
    """An uninterrupted `tide train --nproc 2` run."""
    out = tmp_path_factory.mktemp("two") / "run"
    done = subprocess.run(
        [*TIDE, *_args(store, out), "--nproc", "2"], env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "on 2 ranks" in done.stderr and done.stderr.count("wrote ") + done.stdout.count("wrote ") == 1
    return out


def test_nproc_2_trains_the_weights_of_one_process(store, two_ranks, tmp_path):
    """2 ranks with shares of every batch of 32 = 1 process with batches of 32, up to float sums' order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank has: on 2 shared cores, 2 OpenMP threads wait on each other
    try:
        one = train(TrainConfig(store=store.path, out=tmp_path / "one", **SETTINGS), log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert one.steps == 200
    a, b = _weights(two_ranks), _weights(tmp_path / "one")
    assert a.keys() == b.keys() and all(a[n].keys() == b[n].keys() for n in a)
    assert _worst_relative(a, b) < 1e-4  # measured 1.1e-5 (batchtopk's b_enc; tide and topk 5e-7)
    assert float(a["resid_l00-batchtopk-k4"]["threshold"]) > 0
    steps = [line.split(",")[0] for line in (two_ranks / "metrics.jsonl").read_text().splitlines()]
    assert steps == [line.split(",")[0] for line in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    state = load_state(two_ranks, torch.device("cpu"))
    assert state["world_size"] == 2
    loader = ActivationLoader(
        open_store(store.path), ["resid_l00"], state["split"]["train_chunks"], 32,
        window_rows=SETTINGS["window_rows"], rank=1, ranks=2,
    )  # fmt: skip
    assert all(loader._own(w)[0].reads for w in loader.plan(0))  # rank 1 trained on a share of every window


def _rank_pid(agent: subprocess.Popen, local_rank: int) -> int | None:
    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank):
                return child.pid
        except psutil.Error:
            pass
    return None


def test_a_rank_killed_under_torchrun_resumes_to_the_same_weights(store, two_ranks, tmp_path):
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    torchrun += ["--max-restarts", "1", "-m", "tide.cli", *_args(store, out)]
    agent = subprocess.Popen(torchrun, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "trainer_state.pt").exists():
        assert agent.poll() is None, agent.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(_rank_pid(agent, 1), signal.SIGKILL)
    killed_at = load_state(out, torch.device("cpu"))["step"]
    assert agent.wait(timeout=300) == 0, agent.stderr.read()
    assert 0 < killed_at < 200, "the kill must land mid-run"
    assert agent.stderr.read().count("resuming at step") == 1  # rank 0 says it, once
    a, b = _weights(out), _weights(two_ranks)
    for n in b:
        for key in b[n]:
            torch.testing.assert_close(a[n][key], b[n][key], rtol=0, atol=0, msg=f"{n}/{key}")


def test_a_run_resumed_on_another_number_of_ranks_goes_on(store, two_ranks, tmp_path):
    """A 1-process run stopped after step 15 (last checkpoint: 10) resumed on 2 ranks ends where the 2-rank run
    does, to float rounding: the same batches, summed in another order."""
    out = tmp_path / "run"
    run, loader, _ = prepare(TrainConfig(store=store.path, out=out, **SETTINGS), log=lambda m: None)
    batches = loader.batches()
    fit(run, itertools.islice(batches, 15), TrainConfig(store=store.path, out=out, **SETTINGS))
    batches.close()
    assert load_state(out, torch.device("cpu"))["step"] == 10
    done = subprocess.run(
        [*TIDE, *_args(store, out), "--nproc", "2"], env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "resuming at step 10" in done.stderr
    assert _worst_relative(_weights(out), _weights(two_ranks)) < 1e-4


# --- failures: ranks started by hand, each in a folder of its own, as on machines that share nothing --------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(args: list[str], folders: list[Path]) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank, folder in enumerate(folders):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(len(folders))}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(
            subprocess.Popen(
                [*TIDE, *args], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        )
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    return [(p.wait(timeout=timeout), p.stderr.read().decode() + p.stdout.read().decode()) for p in procs]


def _node_folders(tmp_path: Path, store, second: str) -> list[Path]:
    """Two 'machines': the first holds the store at ./s.zarr, the second nothing there or another store."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for f in folders:
        f.mkdir()
    shutil.copytree(store.path, folders[0] / "s.zarr")
    if second == "other":
        synthetic_store(
            folders[1] / "s.zarr", num_samples=16, num_steps=6, tokens=8, d_model=16, batch_size=4, seed=5
        )
    return folders


@pytest.mark.parametrize("second", ["missing", "other"])
def test_a_rank_without_the_store_stops_every_rank_with_one_error(store, tmp_path, second):
    folders = _node_folders(tmp_path, store, second)
    args = ["train", "--store", "s.zarr", "--out", "saes", "--k", "4", "--max-steps", "5", "--no-progress"]
    (rc0, text0), (rc1, text1) = _finish(_start_ranks([*args, "--device", "cpu"], folders))
    assert (rc0, rc1) == (2, 2)
    assert text0.count("error:") == 1 and "Traceback" not in text0, text0
    assert text1 == "", text1  # rank 0 speaks for every rank
    if second == "missing":
        assert "1 of 2 ranks cannot go on. rank 1:" in text0 and "does not exist" in text0, text0
    else:
        assert "the ranks see different stores" in text0 and "identical copies" in text0, text0
    assert not (folders[0] / "saes").exists() or not any((folders[0] / "saes").iterdir())


def _flip_a_tensor(state: Path) -> None:
    """Flip bytes inside the largest entry of a torch.save zip (a tensor's storage): its CRC-32 fails."""
    import zipfile

    with zipfile.ZipFile(state) as z:
        entry = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(state.read_bytes())
    start = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra) + 16
    data[start : start + 64] = bytes(b ^ 0x5A for b in data[start : start + 64])
    state.write_bytes(bytes(data))


@pytest.mark.parametrize("problem", ["locked", "damaged state"])
def test_rank_0s_refusal_of_out_stops_every_rank_with_one_error(store, two_ranks, tmp_path, problem):
    """--out's lock and the resume state's CRC check are rank 0's alone: their refusal stops the other rank
    too (no hang), said once, and the run folder is left as it was."""
    from tide.store.lock import locked

    out = tmp_path / "run"
    shutil.copytree(two_ranks, out)
    if problem == "damaged state":
        _flip_a_tensor(out / "trainer_state.pt")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with locked(out, "train") if problem == "locked" else contextlib.nullcontext():
        (rc0, text0), (rc1, text1) = _finish(_start_ranks(_args(store, out), [tmp_path, tmp_path]))
    assert (rc0, rc1) == (2, 2)
    assert text0.count("error:") == 1 and "Traceback" not in text0, text0
    assert text1 == "", text1
    if problem == "locked":
        assert f"another tide train (pid {os.getpid()}) is writing {out}" in text0, text0
    else:
        assert "is damaged (its entry" in text0 and "fails its CRC-32" in text0, text0
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_inf_in_one_ranks_share_stops_every_rank_with_the_stores_error(store, tmp_path):
    """The non-finite watch is merged over the ranks: rank 1 alone reads a chunk holding inf, and every rank
    stops at the same check with the store's error, said once (by rank 0, which never saw the chunk)."""
    path = tmp_path / "s.zarr"
    shutil.copytree(store.path, path)
    copy = open_store(path)
    split = split_samples(copy.layout, copy.done_chunks(), 0.1, 0)  # the run's defaults
    loader = ActivationLoader(
        copy, ["resid_l00"], split.train_chunks, 32, window_rows=SETTINGS["window_rows"], rank=1, ranks=2
    )
    read = loader._own(loader.plan(0)[0])[0].reads[0]  # rank 1's first chunk of the first window
    zarr.open_array(str(path / "resid_l00"), mode="r+")[read.selection] = np.inf
    args = ["train", "--store", str(path), "--out", str(tmp_path / "saes"), "--k", "4", "--batch-size", "32"]
    args += ["--max-steps", "9", "--warmup-steps", "5", "--device", "cpu", "--no-progress", "--no-eval"]
    args += ["--config", str(_window_config(tmp_path))]  # 9 steps: the first window, read once
    (rc0, text0), (rc1, text1) = _finish(_start_ranks(args, [tmp_path, tmp_path]))
    assert (rc0, rc1) == (2, 2)
    assert text0.count("error:") == 1 and "Traceback" not in text0, text0
    assert "resid_l00 activations hold NaN or infinity" in text0 and "tide store verify" in text0, text0
    assert text1 == "", text1


def test_a_stuck_rank_stops_the_others_after_rank_timeout(store, tmp_path):
    """Each rank in a folder of its own with a relative --out, as on machines that share nothing: rank 0 alone
    writes (rank 1's folder stays empty: no run folder, no lock); a stopped rank 1 fails rank 0 after
    rank_timeout instead of hanging it."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for f in folders:
        f.mkdir()
    (tmp_path / "t.yaml").write_text(f"rank_timeout: 3\nwindow_rows: {SETTINGS['window_rows']}\n")
    args = ["train", "--store", str(store.path), "--out", "saes", "--k", "4"]
    args += ["--batch-size", "32", "--max-steps", "100000", "--warmup-steps", "5", "--checkpoint-every", "10"]
    args += ["--device", "cpu", "--no-progress", "--config", str(tmp_path / "t.yaml")]
    procs = _start_ranks(args, folders)
    deadline = time.monotonic() + 300
    while not (folders[0] / "saes" / "trainer_state.pt").exists():
        assert all(p.poll() is None for p in procs), _finish(procs)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert list(folders[1].iterdir()) == []  # rank 1 trains, but writes nothing
    os.kill(procs[1].pid, signal.SIGSTOP)  # stuck: alive, but answers nothing
    stopped = time.monotonic()
    try:
        rc0 = procs[0].wait(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        procs[1].kill()
    (_, text0), _ = _finish(procs)
    assert rc0 == 2 and text0.count("error:") == 1 and "Traceback" not in text0, text0
    assert "rank 0 of 2" in text0 and "waited 3 s for the other ranks" in text0, text0
    assert 2.5 < waited < 60
    assert list(folders[1].iterdir()) == []


# --- batch-wide quantities on real ranks, against the whole batch in one process -----------------------------


def _rank_main(rank: int, size: int, port: int, queue) -> None:
    import datetime

    import torch.distributed as dist
    from tide.train.fit.distributed import World

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        results = _share_results(World(rank=rank, size=size, joined=True, timeout_s=60))
        queue.put(
            (rank, pickle.dumps(results))
        )  # bytes: a tensor's shared memory would die with this process
    finally:
        dist.destroy_process_group()


SHARES = {"uneven": [slice(0, 13), slice(13, 40)], "one empty": [slice(0, 0), slice(0, 40)]}
"""Two ways to split a batch of 40 rows over 2 ranks, as a window's deal can leave them."""
TIES = torch.tensor([3.0, 2.0, 2.0, 0.5, 3.0, 2.0, 2.0, 3.0, 2.0, 2.0, 2.0, 3.0, 3.0, 2.0, 2.0, 0.0])
"""5 values of 3.0 and 9 of 2.0 over two ranks (7 and 9 values): the 8 largest cut through the 2.0s."""


def _share_results(world) -> dict:
    """What rank `world.rank` computes on its share of a batch of 40 rows: each architecture's latents, loss
    and (summed) gradients and buffers after one step; and BatchTopK's selection among tied values."""
    results = {split: _arch_results(world, rows[world.rank]) for split, rows in SHARES.items()}
    mine = TIES[:7] if world.rank == 0 else TIES[7:]
    kept = world.batch.top(mine, 2, 4 if world.rank == 0 else 0)  # 2 per row, 4 rows in all
    results["ties"] = (mine[kept.idx], float(kept.smallest))
    return results


def _arch_results(world, rows: slice) -> dict:
    from tide.train.sae.loss import sae_loss
    from tide.train.sae.model import SAEConfig, build_sae

    g = torch.Generator().manual_seed(0)
    x_BD, t_B = torch.randn(40, 8, generator=g), torch.randint(0, 1000, (40,), generator=g).float()
    results = {}
    for arch in ("tide", "batchtopk", "topk", "relu", "jumprelu", "matryoshka"):
        torch.manual_seed(1)
        sae = build_sae(SAEConfig(arch=arch, d_model=8, num_latents=32, k=3, dead_steps_threshold=1))
        sae.batch = world.batch
        sae.init_from_data(*world.gather_rows(x_BD[rows], t_B[rows]))
        out = sae(x_BD[rows], t_B[rows])  # latents that fire nowhere in the batch are dead: AuxK works
        loss = sae_loss(sae, x_BD[rows], out)
        loss.total.backward()
        world.reduce_grads(sae)
        results[arch] = {
            "z": out.z_BF.detach(),
            "loss": world.sum(torch.stack(list(loss)).detach()),
            "grads": {n: p.grad.clone() for n, p in sae.named_parameters()},
            "buffers": {n: b.clone() for n, b in sae.named_buffers()},
        }
    return results


def test_batch_wide_quantities_on_two_ranks_are_the_whole_batchs():
    """Each architecture's latents, loss and summed gradients on two ranks' uneven shares equal one process's on
    the whole batch; BatchTopK keeps exactly k * B values across the ranks, ties at the cut-off included."""
    import multiprocessing

    from tide.train.fit.distributed import ALONE

    ctx = multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + 300
    while len(got) < len(procs):
        assert time.monotonic() < deadline
        assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]  # a rank crashed
        try:
            rank, data = queue.get(timeout=0.5)
            got[rank] = pickle.loads(data)
        except Empty:
            pass
    for p in procs:
        p.join(timeout=60)
    whole = _arch_results(ALONE, slice(0, 40))
    for (split, arch), r in itertools.product(itertools.product(SHARES, whole), range(2)):
        want, mine, at = whole[arch], got[r][split][arch], f"{split} {arch} rank {r}"
        z = torch.cat([got[q][split][arch]["z"] for q in range(2)])
        torch.testing.assert_close(z, want["z"], rtol=1e-5, atol=1e-6, msg=at)
        torch.testing.assert_close(mine["loss"], want["loss"], rtol=1e-5, atol=1e-7, msg=at)
        for name, g in want["grads"].items():
            torch.testing.assert_close(mine["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"{at} {name}")
        for name, b in want["buffers"].items():
            torch.testing.assert_close(mine["buffers"][name], b, rtol=1e-5, atol=1e-6, msg=f"{at} {name}")
    assert float(whole["batchtopk"]["buffers"]["threshold"]) > 0
    kept = torch.cat([got[r]["ties"][0] for r in range(2)])
    assert sorted(kept.tolist()) == sorted(TIES.topk(8).values.tolist()) == [2.0] * 3 + [3.0] * 5
    assert got[0]["ties"][1] == got[1]["ties"][1] == 2.0

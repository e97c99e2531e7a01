"""`tide train` on many processes: torchrun's ranks train the same SAEs, each on a share of every batch.

Shape key: B batch rows (this rank's share), D model width, N values.

    torchrun --nproc-per-node 4 -m tide.cli train --store s3://bucket/run.zarr --out runs/saes
    tide train --nproc 4 ...          # the same on this machine: `launch` starts torchrun for you

Under torchrun (its RANK/WORLD_SIZE/MASTER_* environment), `joined` starts a process group: gloo on CPU,
nccl on CUDA, each rank on cuda:LOCAL_RANK. What the ranks share:
  - data: each rank reads its own share of every window's chunks and trains on its share of every batch
    (train/fit/data.py, "Shares"); the shares of batch j together are batch j of one process, whatever the
    number of ranks;
  - everything computed over a batch (`RankBatch`, an SAE's `batch` scope, train/sae/batch.py): BatchTopK's
    k * B largest, which latents fired (AuxK's dead counts), the loss normalisers; the first batch, from
    which b_dec (and jumprelu's thresholds) start, is gathered whole on every rank; the per-step input
    normalisation comes from the store's sums, the same on every rank;
  - gradients: each rank's loss is its rows' terms over batch-wide normalisers, so the ranks' gradients
    summed (`reduce_grads`) are one process's gradient of the whole batch; every rank takes the same
    optimiser step and keeps identical weights.
So N ranks at batch B train to the weights of one process at batch B, up to the order of float sums.

Rank 0 alone touches --out: it prepares the folder, reads the resume state and sends it to the others, and
writes metrics, checkpoints and SAE folders (and `tide train` evaluates there only). A resume on the same
number of ranks is bitwise; on another number it continues with the same batches, split another way, so
it matches to float rounding rather than bitwise. A torchrun restart (--max-restarts) resumes from the
last checkpoint, and ignores --overwrite, which would throw that checkpoint away.

Failures: the set-up runs in phases after which the ranks compare notes (`everywhere`, `from_main`,
`same`): a rank that cannot open the store, or sees another store than rank 0 (another identity), stops
every rank with one error, printed once. Every collective has a timeout (TrainConfig.rank_timeout): a rank
that stops answering (stuck, or stopped) makes the others fail with an error saying so instead of hanging.
A rank that dies is seen by the others at their next collective (the connection closes); torchrun then
stops the rest, and restarts them all if --max-restarts allows.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from tide.store.device import resolve_device
from tide.train.sae.batch import HERE, BatchScope, Kept, smallest_positive
from torch import Tensor

if TYPE_CHECKING:
    from tide.train.fit.config import TrainConfig

T = TypeVar("T")

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankError(ValueError):
    """A failure that stops every rank: the same message on each, shown by one of them (`shown`)."""

    def __init__(self, message: str, shown: bool = True):
        super().__init__(message)
        self.shown = shown


@dataclass(frozen=True)
class World:
    """The processes of a run: this one alone (`ALONE`), or torchrun's ranks joined in a process group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restarts: int = 0
    """How often torchrun has restarted the ranks (TORCHELASTIC_RESTART_COUNT)."""
    device: torch.device | None = None
    """This rank's device (None: alone, the run's --device decides)."""
    joined: bool = False
    """A torch.distributed process group is up."""
    timeout_s: float = 0.0

    @property
    def main(self) -> bool:
        """This process writes the run's files and prints its messages."""
        return self.rank == 0

    @property
    def batch(self) -> BatchScope:
        """The batch scope of the SAEs (train/sae/batch.py): the whole batch is here, or split over ranks."""
        return RankBatch(self) if self.joined else HERE

    def where(self) -> str:
        return f"rank {self.rank} of {self.size} (host {socket.gethostname()}, pid {os.getpid()})"

    # -- the set-up: phases after which the ranks compare notes ------------------------------------------

    def everywhere(self, fn: Callable[[], T]) -> T:
        """fn() on every rank; when it fails on any, every rank raises one RankError saying where and why."""
        if not self.joined:
            return fn()
        try:
            result, problem = fn(), None
        except Exception as e:
            result, problem = None, e
        notes: list[Any] = [None] * self.size
        self._call("comparing the ranks' set-up", lambda: _dist().all_gather_object(notes, _note(problem)))
        failed = [(r, note) for r, note in enumerate(notes) if note is not None]
        if not failed:
            return result  # type: ignore[return-value]
        if problem is not None and not _user_error(problem):
            raise problem  # a bug: its traceback, on the rank where it happened
        messages = {note for _, note in failed}
        if len(failed) == self.size and len(messages) == 1:  # every rank agrees: say it once, plainly
            raise RankError(failed[0][1], shown=self.main)
        where = "; ".join(f"rank {r}: {note}" for r, note in failed)
        raise RankError(f"{len(failed)} of {self.size} ranks cannot go on. {where}", shown=self.main)

    def from_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0 alone, its result sent to every rank; its failure stops every rank."""
        if not self.joined:
            return fn()
        box: list[Any] = [None]
        problem = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:
                problem, box[0] = e, ("failed", _note(e))
        self._call("receiving rank 0's set-up", lambda: _dist().broadcast_object_list(box, src=0))
        if problem is not None:
            raise problem
        kind, value = box[0]
        if kind == "failed":
            raise RankError(value, shown=False)  # rank 0 shows it
        return value

    def same(self, what: str, value: Any, fix: str, label: str | None = None) -> None:
        """Every rank must hold the same `value`; otherwise every rank stops with an error listing each rank's
        `label` (default: the value)."""
        if not self.joined:
            return
        values: list[Any] = [None] * self.size
        mine = (value, label or str(value), self.where())
        self._call(f"comparing {what}", lambda: _dist().all_gather_object(values, mine))
        if any(v != values[0][0] for v, _, _ in values):
            seen = "; ".join(f"{where}: {text}" for _, text, where in values)
            raise RankError(f"the ranks see different {what}: {seen}. {fix}", shown=self.main)

    # -- collectives of the training loop -----------------------------------------------------------------

    def sum(self, t: Tensor) -> Tensor:
        """The sum of every rank's t (a new tensor; t itself when alone)."""
        if not self.joined:
            return t
        t = t.clone()
        self._call("summing over the ranks", lambda: _dist().all_reduce(t))
        return t

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's t (same shape everywhere), stacked in rank order: (size, *t.shape)."""
        out = [torch.empty_like(t) for _ in range(self.size)]
        self._call("gathering from the ranks", lambda: _dist().all_gather(out, t.contiguous()))
        return torch.stack(out)

    def gather_rows(self, *ts_B: Tensor) -> list[Tensor]:
        """Every rank's rows of each tensor, concatenated in rank order (shares may differ in size)."""
        if not self.joined:
            return list(ts_B)
        n = ts_B[0].shape[0]
        sizes = self.gather(torch.tensor([n], device=ts_B[0].device)).flatten().tolist()
        most = max(sizes)
        out = []
        for t in ts_B:
            padded = torch.cat([t, t.new_zeros((most - n, *t.shape[1:]))])
            out.append(torch.cat([rows[:k] for rows, k in zip(self.gather(padded), sizes, strict=True)]))
        return out

    def reduce_grads(self, module: torch.nn.Module) -> None:
        """Sum the ranks' gradients into every rank's (one reduction of all of them)."""
        if not self.joined:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = self.sum(torch.cat([g.flatten() for g in grads]))
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """A collective; its failure becomes an error saying whether a rank stopped answering or left (any
        other failure is a bug, raised as it is)."""
        try:
            return fn()
        except RuntimeError as e:
            text = str(e)
            lost = (
                "connection closed",
                "connection reset",
                "broken pipe",
                "socket closed",
                "connection refused",
            )
            if not any(m in text.lower() for m in (*lost, "timed out")):
                raise
            if "timed out" in text.lower():
                raise RankError(
                    f"{self.where()} waited {self.timeout_s:g} s for the other ranks while {what} and got no "
                    "answer: a rank is stuck (a hung read of the store, a stopped process) or was stopped. "
                    "Every rank stops; look at the other ranks' output, and raise rank_timeout if a step "
                    "legitimately takes longer"
                ) from e
            raise RankError(
                f"{self.where()} lost the other ranks while {what} ({text.splitlines()[0][:200]}): another "
                "rank stopped; its own message says why",
                shown=False,
            ) from e


ALONE = World()


class RankBatch(BatchScope):
    """A batch split over the ranks: its batch-wide quantities are summed (or selected) over all of them."""

    def __init__(self, world: World):
        self.world = world

    def sum(self, t: Tensor) -> Tensor:
        return self.world.sum(t)

    def top(self, values_N: Tensor, per_row: int, rows: int) -> Kept:
        """Each rank's largest per_row * B (B the whole batch's rows) are gathered; their top per_row * B is
        the batch's. A value tied with the cut-off is kept in rank order, so exactly per_row * B are kept."""
        B = int(self.sum(torch.tensor([rows], device=values_N.device)).item())
        n = per_row * B
        mine = values_N.detach()
        mine = mine.topk(min(n, mine.numel()), sorted=False).values
        padded = torch.cat([mine, mine.new_full((n - mine.numel(),), -1.0)])  # -1: below any ReLU'd value
        every_RN = self.world.gather(padded)
        kept = every_RN.flatten().topk(n, sorted=False).values
        cut = kept.min()
        if cut <= 0:  # fewer than n positive values: every positive one is kept (zeros add nothing)
            return Kept(torch.nonzero(values_N > 0).flatten(), smallest_positive(kept))
        above = int((every_RN > cut).sum())
        ties_R = (every_RN == cut).sum(dim=1).tolist()
        before = sum(ties_R[: self.world.rank])
        take = max(0, min(ties_R[self.world.rank], n - above - before))
        idx = torch.cat(
            [torch.nonzero(values_N > cut).flatten(), torch.nonzero(values_N == cut).flatten()[:take]]
        )
        return Kept(idx, smallest_positive(kept))


def _dist():
    import torch.distributed as dist

    return dist


def _note(problem: BaseException | None) -> str | None:
    if problem is None:
        return None
    return str(problem) if _user_error(problem) else f"{type(problem).__name__}: {problem}"


def _user_error(e: BaseException) -> bool:
    """Bad input or an unreadable store (the message says what to do), as opposed to a bug."""
    return isinstance(e, ValueError | OSError)


def under_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


@contextmanager
def joined(cfg: TrainConfig) -> Iterator[World]:
    """The run's processes: under torchrun, a process group of its ranks (left on exit); else ALONE."""
    if not under_torchrun():
        yield ALONE
        return
    dist = _dist()
    rank, size, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = _rank_device(cfg.device, local, size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = World(
        rank=rank,
        size=size,
        local_rank=local,
        restarts=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        device=device,
        joined=True,
        timeout_s=cfg.rank_timeout,
    )
    try:
        _init_group(dist, "nccl" if device.type == "cuda" else "gloo", world, cfg.rank_timeout)
    except RuntimeError as e:
        raise RankError(
            f"{world.where()} could not join the other ranks at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} within {cfg.rank_timeout:g} s ({e}); start every rank with the same "
            "torchrun --rdzv-endpoint (or --master-addr/--master-port) and check that they can reach it. After "
            "a torchrun restart on several machines: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun"
        ) from e
    try:
        yield world
    finally:
        dist.destroy_process_group()


def _init_group(dist, backend: str, world: World, timeout_s: float) -> None:
    """init_process_group from torchrun's environment. When torchrun shares its own store with the ranks
    (its default), the keys of a restarted group go under a prefix of their own: the store outlives the
    ranks, and a restarted rank would otherwise read its dead predecessor's address (torch issue #135712).
    One machine's torchrun restarts every rank and counts it; on several machines each counts its own
    restarts, so a run that may restart needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per
    restart, docs/cluster.md) there."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size, False, timeout=timeout
    )
    store = dist.PrefixStore(f"tide/attempt_{world.restarts}", agent)
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=timeout)


def _rank_device(name: str, local_rank: int, size: int) -> torch.device:
    """cuda:LOCAL_RANK for auto/cuda when CUDA is here, else what --device names (one GPU per rank)."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if device.index is not None and size > 1:
        raise ValueError(
            f"--device {name} names one GPU, but the {size} ranks need one each; pass --device cuda (or auto) "
            "and each rank takes cuda:LOCAL_RANK"
        )
    return device if device.index is not None else torch.device("cuda", local_rank)


def launch(cfg: TrainConfig, nproc: int, no_eval: bool = False, storage_options: str | None = None) -> int:
    """`tide train --nproc N`: run `tide train` with cfg on N ranks of this machine under torchrun
    (--standalone, no restarts) and return its exit code. `no_eval` and `storage_options`: the command
    line's flags that are not settings, passed on to every rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if under_torchrun():
        raise ValueError("--nproc starts torchrun itself; under torchrun, leave --nproc out")
    # torchrun gives each rank 1 thread unless told; CPU ranks share the cores instead.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    with tempfile.TemporaryDirectory(prefix="tide-nproc-") as tmp:
        config = Path(tmp) / "train.yaml"
        config.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
        argv = ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0"]
        argv += ["-m", "tide.cli", "train", "--config", str(config)]
        argv += ["--no-eval"] if no_eval else []
        argv += ["--storage-options", storage_options] if storage_options else []
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = threads
        quiet = logging.getLogger("torch.distributed.elastic")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # the ranks print their own errors
        try:
            run(parse_args(argv))
            return 0
        except ChildFailedError as e:
            return max(failure.exitcode for failure in e.failures.values()) or 1
        finally:
            quiet.setLevel(level)
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved

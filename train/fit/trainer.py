"""train(cfg): train several SAEs side by side on one stream of batches from a tide store, resumably.

Shape key: A arrays read, B batch rows, D model width, S stored steps.

Every SAE of the run (TrainConfig.specs: layers x archs x k) sees the same batches, has its own AdamW,
and trains on normalised inputs x_n = (x - mean[step]) / s with the per-step means of its array over the
training split (from the writer's sums, `Store.stats`) and one scalar s with E||x_n||^2 = D. Subtracting
the per-step mean keeps the latents from spending themselves on "which timestep is this", which the
residual's mean drifts with; one scalar s, not one per step, keeps the steps' relative magnitudes, so the
loss weighs them as the model does. Every SAE, tide or baseline, sees identical inputs, so a tide-vs-topk
difference is the timestep modulation alone. With `init_modulation="adaln"` a fresh run starts every tide
SAE's modulation from the source DiT's adaLN (train/sae/adaln.py); a resume takes it from its state instead,
so it never needs the model. The normalisation is stored in the SAE's buffers
(`set_input_normalization`), so `sae.forward_raw(x, t)` works on raw activations.

A run in `cfg.out` left by a kill is resumed exactly (CPU): weights, optimiser states, step, data position
and RNG come from trainer_state.pt (train/fit/checkpoint.py), so the final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import errno
import json
import math
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tide.store.device import resolve_device
from tide.store.lock import LockedError, lock_path, locked
from tide.store.open import canonical, remote_error, where
from tide.store.outputs import nested
from tide.store.reader import Store, configure_read_threads, default_read_threads, open_store
from tide.train.analysis.eval import progress_text
from tide.train.fit.checkpoint import (
    NORMALIZATION,
    SAEMeta,
    StoreRef,
    claim_out,
    prepare_out,
    save_sae,
    save_state,
    write_json,
)
from tide.train.fit.config import SAESpec, TrainConfig
from tide.train.fit.data import ActivationLoader, Batch, Position, Split, split_samples
from tide.train.fit.distributed import ALONE, World, joined
from tide.train.sae.adaln import AdaLNInitError, init_from_dit, load_transformer
from tide.train.sae.loss import LossOutput, sae_loss
from tide.train.sae.model import SAE, build_sae
from tqdm.auto import tqdm


class TrainError(ValueError):
    """Bad input to a training run: the message says what and how to fix it."""


@dataclass
class Member:
    """One SAE of the run, with what it needs on the device."""

    spec: SAESpec
    sae: SAE
    opt: torch.optim.AdamW
    array_index: int
    """Index of its array in the loader's arrays (the A axis of a batch)."""
    mean_SD: torch.Tensor
    """Per-step input mean over the training split (every stored step; only the step range is used)."""
    scale: float
    first_bad: torch.Tensor | None = None
    """(2,) int64 on the device: the first step whose input, then whose loss, held NaN or infinity; -1 while
    none has. Kept on the device so that watching every step costs no sync; read when logging or saving."""


@dataclass
class Run:
    """The mutable state of a run: what fit() advances."""

    members: list[Member]
    total_steps: int
    store_ref: StoreRef
    split: Split
    step_range: tuple[int, int]
    step: int = 0
    rows: int = 0
    position: Position = Position(0, 0)
    last: list[LossOutput] = field(default_factory=list)
    clock: tuple[float, int] = (0.0, 0)
    """(time, rows) at the last log line, for rows/s."""
    saved: int = 0
    """The step of the last checkpoint written (or resumed from)."""
    world: World = ALONE
    """The processes training it together (train/fit/distributed.py); rank 0 writes."""


class TrainResult(NamedTuple):
    out: Path
    """The run folder."""
    saes: list[Path]
    """One folder per SAE, in spec order."""
    steps: int
    """Optimiser steps trained in total."""
    split: Split
    """The sample chunks trained on and held out (none held out: nothing to evaluate on)."""
    main: bool = True
    """This process wrote the run (False on torchrun's ranks other than 0): it evaluates and reports it."""


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to cfg.lr, then cosine or linear decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - 1 - cfg.warmup_steps))
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p, "constant": 1.0}[cfg.decay]
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def normalization(
    store: Store, array: str, chunks: list[int], step_range: tuple[int, int]
) -> tuple[torch.Tensor, float]:
    """(per-step mean (S, D), scalar s) over the training rows, so that E||(x - mean[step]) / s||^2 = D."""
    st = store.stats(array, chunks)
    lo, hi = step_range
    n = st.count[lo:hi].astype("float64")
    centred_sq = st.mean_sq_norm[lo:hi] - (st.mean[lo:hi] ** 2).sum(-1)  # E||x - mean||^2 per step
    scale = math.sqrt(max(float((n * centred_sq).sum() / n.sum()), 1e-12) / store.meta.d_model)
    return torch.as_tensor(st.mean, dtype=torch.float32), scale


def _check_arrays(store: Store, arrays: list[str]) -> None:
    """Every array the run reads has the shape and chunks the store's metadata says (an edited or damaged
    zarr.json would otherwise surface deep in the loader as numpy's 'could not broadcast')."""
    lay, c, s = store.layout, store.layout.num_sample_chunks, store.layout.num_steps
    want = {"done": ((lay.num_samples,), None), "timesteps": ((s,), None)}
    for name in arrays:
        want[name] = (lay.act_shape, lay.act_chunks)
        want[f"stats/{name}/count"] = ((c, s), None)
        for stat in ("sum", "sumsq"):
            want[f"stats/{name}/{stat}"] = ((c, s, lay.d_model), None)
    what = f"{lay.num_samples} samples x {s} steps x {lay.tokens} tokens x {lay.d_model} d"
    for name, (shape, chunks) in want.items():
        try:
            arr = store.root[name]
        except KeyError:
            raise TrainError(
                f"{store.path} has no array {name!r}, which its metadata implies; the store is damaged or was "
                f"not written to the end: run `tide store verify {store.path}` to see what is wrong"
            ) from None
        found = [("shape", tuple(arr.shape), shape)]
        if chunks is not None:
            found.append(("chunk shape", tuple(arr.chunks), chunks))
        for label, got, expected in found:
            if got != tuple(expected):
                raise TrainError(
                    f"array {name!r} of {store.path} has {label} {got} in its zarr.json, but the store's metadata "
                    f"({what}) says {tuple(expected)}; the store is damaged or was edited: run "
                    f"`tide store verify {store.path}` to see everything wrong with it"
                )


def _warn_partial(store: Store, split: Split, log: Callable[[str], None]) -> None:
    done, lay = int(store.done().sum()), store.layout
    if done < lay.num_samples:
        log(
            f"warning: {store.path} is an unfinished harvest: {done} of {lay.num_samples} samples are done "
            f"({len(split.train_chunks) + len(split.val_chunks)} of {lay.num_sample_chunks} sample chunks); "
            f"training uses those only. To finish it, run the same `tide harvest ... --out {store.path}` command "
            "again: it resumes where it stopped"
        )


def _init_modulation(members: list[Member], cfg: TrainConfig, store: Store, split: Split, log) -> None:
    """--init-modulation adaln: copy the source DiT's adaLN into every tide SAE (fresh runs only)."""
    tide = [m for m in members if m.sae.modulation is not None]
    labels_N = None
    if store.meta.conditioning == "class" and "label" in store.root:
        label_N, lay = store.read("label"), store.layout
        labels_N = np.concatenate([label_N[lay.sample_chunk(c)] for c in split.train_chunks])
    try:
        transformer = load_transformer(store.meta, log)
        for m in tide:
            source = init_from_dit(m.sae, transformer, cfg.site, m.spec.layer, cfg.branch, labels_N)
            log(f"{m.spec.name}: modulation initialised from {store.meta.model.transformer_class} {source}")
    except AdaLNInitError as e:
        raise TrainError(str(e)) from e


class _Opened(NamedTuple):
    """The store and what the run reads from it (every rank opens it)."""

    store: Store
    specs: list[SAESpec]
    step_range: tuple[int, int]
    arrays: list[str]


def _open(cfg: TrainConfig) -> _Opened:
    store = open_store(cfg.store)
    try:
        specs = cfg.specs(store.meta)
        step_range = cfg.step_range(store.layout.num_steps)
    except ValueError as e:
        raise TrainError(str(e)) from None
    arrays = list(dict.fromkeys(s.array for s in specs))
    _check_arrays(store, arrays)  # before anything is written to cfg.out
    return _Opened(store, specs, step_range, arrays)


class _Start(NamedTuple):
    """What rank 0 finds in cfg.out, sent to every rank."""

    state: dict[str, Any] | None
    """The resume state (its CRC-32s checked, on the CPU, so that it can be sent), or None."""
    split: Split
    replacing: bool
    """cfg.out holds a run to replace (`claim_out` deletes it once every setting has been checked)."""


def _start(cfg: TrainConfig, opened: _Opened, world: World) -> _Start:
    """Rank 0 reads cfg.out (read only; `claim_out` acts later): the resume state, verified where it is
    loaded, and the split. The other ranks receive it; each moves the state to its device."""
    if world.restarts:  # torchrun restarted the ranks: go on from the checkpoint --overwrite would delete
        cfg = cfg.model_copy(update={"overwrite": False})
    store = opened.store
    try:
        state, replacing = prepare_out(cfg, store.identity(), torch.device("cpu"))
        if state:
            return _Start(state, Split(**state["split"]), replacing)
        split = split_samples(store.layout, store.done_chunks(), cfg.val_fraction, cfg.split_seed)
        return _Start(None, split, replacing)
    except TrainError:
        raise
    except ValueError as e:
        raise TrainError(str(e)) from None


def _build(
    cfg: TrainConfig, opened: _Opened, start: _Start, device: torch.device, world: World
) -> tuple[Run, ActivationLoader]:
    (store, specs, step_range, arrays), split = opened, start.split
    loader = ActivationLoader(
        store,
        arrays,
        split.train_chunks,
        cfg.batch_size,
        window_rows=cfg.window_rows,
        seed=cfg.seed,
        stratify_steps=cfg.stratify_steps,
        step_range=step_range,
        read_threads=cfg.read_threads,
        device=device,
        rank=world.rank,
        ranks=world.size,
    )
    if loader.batches_per_epoch == 0:
        raise TrainError(
            f"the training split has {loader.rows_per_epoch} rows, fewer than one batch of {cfg.batch_size}; "
            "lower --batch-size or harvest more samples"
        )
    total = cfg.max_steps or cfg.epochs * loader.batches_per_epoch
    members = _members(cfg, store, specs, arrays, split, step_range, device)
    for m in members:
        m.sae.batch = world.batch  # batch-wide sums over every rank's share
    store_ref = StoreRef(path=canonical(store.path), identity=store.identity())
    run = Run(members, total, store_ref, split, step_range, world=world)
    if start.state is not None:
        _resume(run, start.state)
    return run, loader


def _members(
    cfg: TrainConfig, store: Store, specs: list[SAESpec], arrays: list[str], split: Split,
    step_range: tuple[int, int], device: torch.device,
) -> list[Member]:  # fmt: skip
    """Every SAE of the run, initialised, with its input normalisation over the training split and its AdamW."""
    timesteps = torch.as_tensor(store.timesteps[step_range[0] : step_range[1]])
    members = []
    for i, spec in enumerate(specs):
        torch.manual_seed(cfg.seed * 1000 + i)  # each SAE's initial weights depend on the seed and its place
        sae = build_sae(spec.sae).to(device)
        mean_SD, scale = normalization(store, spec.array, split.train_chunks, step_range)
        sae.set_input_normalization(mean_SD[step_range[0] : step_range[1]], scale, timesteps)
        opt = torch.optim.AdamW(sae.param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        members.append(Member(spec, sae, opt, arrays.index(spec.array), mean_SD.to(device), scale))
    return members


def _resume(run: Run, state: dict[str, Any]) -> None:
    """Put the run where its resume state says: weights, optimisers, counters, data position, RNG."""
    for m in run.members:
        m.sae.load_state_dict(state["saes"][m.spec.name])
        m.opt.load_state_dict(state["optims"][m.spec.name])
    run.step, run.rows, run.position = state["step"], state["rows"], Position(*state["position"])
    run.saved = run.step
    torch.set_rng_state(state["rng"].cpu())


class Prepared(NamedTuple):
    """A run ready for its first (or resumed) step."""

    run: Run
    """What `fit` advances: the SAEs, their optimisers, the step and the data position."""
    loader: ActivationLoader
    """The training split's batches: `loader.batches(run.position)` continues where the run stands."""
    device: torch.device


def prepare(cfg: TrainConfig, log: Callable[[str], None] = print, world: World = ALONE) -> Prepared:
    """Open the store, set up cfg.out (resuming a run left there), and build every SAE and the loader.

    `train` is `prepare` then `fit`; call the two yourself to feed `fit` other batches (make bench does).
    On torchrun's ranks (`world`, train/fit/distributed.py) each step of the set-up ends with the ranks
    comparing notes, so that a rank that fails stops them all with one error instead of a hang.
    """
    configure_read_threads(cfg.read_threads or default_read_threads())
    log = log if world.main else _quiet
    device = world.device or resolve_device(cfg.device)
    opened = world.everywhere(lambda: _plainly(cfg, lambda: _open(cfg)))
    fix = "every rank must read the same store (one bucket, or identical copies) with the same settings"
    store = opened.store  # copies at other paths are the same store: their identities agree
    world.same("stores", store.identity(), fix, label=f"{store.path} (identity {store.identity()})")
    world.same("settings", cfg.identity(), fix)
    start = world.from_main(lambda: _plainly(cfg, lambda: _start(cfg, opened, world)))
    _warn_partial(opened.store, start.split, log)
    run, loader = world.everywhere(lambda: _plainly(cfg, lambda: _build(cfg, opened, start, device, world)))
    if start.state is None and cfg.init_modulation == "adaln":  # a resume takes the weights from its state
        weights = world.from_main(lambda: _adaln_weights(run.members, cfg, opened.store, run.split, log))
        for m in run.members:
            m.sae.load_state_dict(weights[m.spec.name])
    # Every setting checked on every rank: only now is --out touched, by rank 0.
    world.from_main(lambda: _plainly(cfg, lambda: _claim(cfg, run, start)))
    return Prepared(run, loader, device)


def _claim(cfg: TrainConfig, run: Run, start: _Start) -> None:
    """Rank 0 makes cfg.out the run's folder (replacing the run there when `start.replacing`), drops the
    metrics a resume will log again, and writes the run's config."""
    claim_out(cfg.out, [m.spec.name for m in run.members], start.replacing)
    if start.state is not None:
        _truncate_metrics(cfg.out / "metrics.jsonl", run.step)
    write_json(cfg.out / "train_config.json", cfg.model_dump(mode="json"))


def _adaln_weights(members: list[Member], cfg: TrainConfig, store: Store, split: Split, log) -> dict:
    """Every SAE's weights after --init-modulation adaln (computed by rank 0, sent to the others)."""
    _init_modulation(members, cfg, store, split, log)
    return {m.spec.name: {k: v.cpu() for k, v in m.sae.state_dict().items()} for m in members}


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 says everything once."""


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train every SAE of `cfg` (resuming a run left in cfg.out), write them, and return where they are.

    Under torchrun, every rank calls it and trains its share (train/fit/distributed.py); rank 0 writes.
    A folder that cannot be written (read-only, no permission, a full disk) or a remote store that stops
    answering ends in a TrainError that says what to do; such a run resumes from its last checkpoint. The run
    holds the lock of cfg.out (store/lock.py; under torchrun rank 0 holds it) throughout, so a second run into
    the same folder is refused while this one runs."""
    with joined(cfg) as world, ExitStack() as held:
        world.from_main(lambda: _plainly(cfg, lambda: _lock(cfg, held)))  # refused: every rank stops
        return _plainly(cfg, lambda: _train(cfg, log, world))


def _lock(cfg: TrainConfig, held: ExitStack) -> None:
    """Take the lock of cfg.out into `held`: a second `tide train` (or harvest) into this --out is refused."""
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        held.enter_context(locked(cfg.out, "train"))
    except LockedError as e:
        raise TrainError(str(e)) from None


def _plainly(cfg: TrainConfig, fn: Callable[[], Any]) -> Any:
    """fn(), with a failure of the store or of cfg.out said as what it means for the run (`_failure`)."""
    try:
        return fn()
    except ValueError:  # tide's own errors, which say what happened already
        raise
    except Exception as e:
        failure = _failure(cfg, e)
        if failure is None:
            raise
        raise failure from e


def _failure(cfg: TrainConfig, e: BaseException) -> TrainError | None:
    """What went wrong, for `e` met during a run: a remote store that stopped answering, the store that could
    not be read, or cfg.out that could not be written (told apart by the file named); None for other errors."""
    loc = where(cfg.store)
    lost = None if loc.local else remote_error(e, loc)
    if lost is not None:
        return TrainError(
            f"{lost}. The run's checkpoints in {cfg.out} are kept: run the same command again when the store "
            "answers, and it resumes from the last one"
        )
    if not isinstance(e, OSError):
        return None
    path = Path(e.filename) if e.filename else cfg.out
    if not (nested(path, cfg.out) or path in (lock_path(cfg.out), cfg.out.parent)):  # the store, read
        return TrainError(
            f"cannot read {path}: {e.strerror or e}; check the store with `tide store verify {cfg.store}`"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the filesystem is read-only" if e.errno == errno.EROFS else "permission denied"
        at = f" (at {path})" if path != cfg.out else ""
        return TrainError(
            f"cannot write to {cfg.out}: {why}{at}. Choose an --out in a folder you can write to, or change "
            "the folder's permissions"
        )
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TrainError(
            f"the disk holding {cfg.out} is full ({e.strerror}); free some space and run the same command "
            "again: it resumes from the run's last checkpoint"
        )
    return TrainError(f"writing the run in {cfg.out} failed at {path}: {e.strerror or e}")


def _train(cfg: TrainConfig, log: Callable[[str], None], world: World) -> TrainResult:
    run, loader, device = prepare(cfg, log, world)
    log = log if world.main else _quiet
    names = ", ".join(m.spec.name for m in run.members)
    ranks = f" on {world.size} ranks" if world.joined else ""
    log(
        f"{cfg.out}: {names} on {loader.rows_per_epoch} training rows ({len(run.split.train_chunks)} sample chunks; "
        f"{len(run.split.val_chunks)} held out), {run.total_steps} steps of {cfg.batch_size} on {device}{ranks}"
        + (f", resuming at step {run.step}" if run.step else "")
    )
    if run.step < run.total_steps:
        batches = loader.batches(run.position)
        try:
            fit(run, batches, cfg)
        finally:
            batches.close()
    saes = [cfg.out / m.spec.name for m in run.members]
    return TrainResult(cfg.out, saes, run.step, run.split, world.main)


def fit(run: Run, batches: Iterable[Batch], cfg: TrainConfig) -> Run:
    """The training loop: one step of every SAE per batch, logging and checkpointing as configured."""
    shown = cfg.progress and run.world.main
    bar = tqdm(total=run.total_steps, initial=run.step, unit="step", disable=not shown, smoothing=0.1)
    run.clock = (time.perf_counter(), run.rows)
    for batch in batches:
        if run.step >= run.total_steps:
            break
        _step(run, batch, cfg)
        bar.update(1)
        _log(run, bar, cfg)
        _maybe_checkpoint(run, cfg)
    bar.close()
    return run


def _step(run: Run, batch: Batch, cfg: TrainConfig) -> None:
    lr = lr_at(run.step, cfg, run.total_steps)
    amp = cfg.amp and batch.t_B.device.type == "cuda"
    run.last = []
    for m in run.members:
        x_BD = batch.x_ABD[m.array_index].float()
        x_BD = (x_BD - m.mean_SD[batch.step_B]) / m.scale
        if run.step == 0:  # from the whole first batch, every rank's share
            m.sae.init_from_data(*run.world.gather_rows(x_BD, batch.t_B))
        with torch.autocast(batch.t_B.device.type, dtype=torch.bfloat16, enabled=amp):
            out = m.sae(x_BD, batch.t_B)
        loss = sae_loss(m.sae, x_BD, out)
        _watch(m, run.step + 1, x_BD, loss.total)
        m.opt.zero_grad(set_to_none=True)
        loss.total.backward()
        run.world.reduce_grads(m.sae)  # the ranks' gradients sum to the whole batch's
        m.sae.project_decoder_grad()
        for group in m.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints from before lr_scale have none
        m.opt.step()
        m.sae.normalize_decoder()
        run.last.append(LossOutput(*(v.detach() for v in loss)))  # keep numbers, not the graph
    run.step += 1
    run.rows += batch.global_rows or len(batch.t_B)
    run.position = batch.position


def _watch(m: Member, step: int, x_BD: torch.Tensor, loss: torch.Tensor) -> None:
    """Record the first step (counted from 1, as metrics.jsonl does) whose input or loss is not finite; no
    device sync (see Member.first_bad)."""
    if m.first_bad is None:
        m.first_bad = torch.full((2,), -1, dtype=torch.long, device=x_BD.device)
    bad_2 = torch.stack([~torch.isfinite(x_BD).all(), ~torch.isfinite(loss)])
    m.first_bad.masked_fill_(bad_2 & (m.first_bad < 0), step)


def _check_finite(run: Run, cfg: TrainConfig, weights: bool = False) -> None:
    """Stop a run whose inputs or losses went non-finite (or, with `weights`, whose weights did) before a NaN
    reaches metrics.jsonl or a checkpoint: the SAE folders keep the last finite checkpoint."""
    kept = (
        f"the checkpoint of step {run.saved} in {cfg.out} is kept and nothing after it was saved"
        if run.saved
        else f"no checkpoint had been written to {cfg.out}"
    )
    for m, (x_step, loss_step) in zip(run.members, _first_bad(run), strict=True):
        if x_step >= 0:
            raise _stopped(
                run,
                f"the store's {m.spec.array} activations hold NaN or infinity (a batch at step {x_step} had some), "
                f"so training stopped; {kept}. Run `tide store verify {cfg.store}`: it names the chunks that hold "
                "them (a float16 harvest overflows where activations pass 65504; harvest with --dtype float32 or "
                "bfloat16 then)",
            )
        if loss_step < 0 and weights and not all(bool(torch.isfinite(p).all()) for p in m.sae.parameters()):
            loss_step, what = run.step, "weights"
        else:
            what = "loss"
        if loss_step >= 0:
            raise _stopped(
                run,
                f"training diverged: {m.spec.name}'s {what} became NaN or infinite at step {loss_step} (learning "
                f"rate {lr_at(loss_step - 1, cfg, run.total_steps):.3g} there), so it stopped; {kept}. Lower --lr "
                f"(now {cfg.lr:g}) and run again with --overwrite, or into another --out",
            )


def _first_bad(run: Run) -> list[list[int]]:
    """Each SAE's Member.first_bad, the earliest over every rank's shares of the batches (-1: none), so that
    every rank stops at the same check."""
    none = torch.full((2,), -1, dtype=torch.long)
    bad_M2 = torch.stack(
        [none.to(m.mean_SD.device) if m.first_bad is None else m.first_bad for m in run.members]
    )
    if run.world.joined:
        every_RM2 = run.world.gather(bad_M2)
        never = torch.iinfo(torch.long).max
        bad_M2 = torch.where(every_RM2 < 0, never, every_RM2).amin(0)
        bad_M2 = torch.where(bad_M2 == never, -1, bad_M2)
    return bad_M2.tolist()


def _stopped(run: Run, message: str) -> TrainError:
    """The error that stops a run: under torchrun every rank raises it alike, and rank 0 alone shows it."""
    error = TrainError(message)
    error.shown = run.world.main  # read by cliconfig.user_errors
    return error


def _log(run: Run, bar: tqdm, cfg: TrainConfig) -> None:
    if run.step % cfg.log_every and run.step != run.total_steps:
        return
    _check_finite(run, cfg)
    # Each rank's loss terms are its rows' share of the batch's: their sum is the batch's.
    losses_MK = run.world.sum(torch.stack([torch.stack(list(loss)) for loss in run.last]))
    if not run.world.main:
        return
    now = time.perf_counter()
    rate = (run.rows - run.clock[1]) / max(now - run.clock[0], 1e-9)
    run.clock = (now, run.rows)
    line: dict[str, Any] = {
        "step": run.step,
        "rows": run.rows,
        "lr": lr_at(run.step - 1, cfg, run.total_steps),
        "rows_per_s": round(rate, 1),
    }
    for m, loss_K in zip(run.members, losses_MK.tolist(), strict=True):
        values = dict(zip(LossOutput._fields, loss_K, strict=True))
        values["dead_fraction"] = float(m.sae.dead_mask().float().mean())
        line[m.spec.name] = values
    with open(cfg.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    names = [m.spec.name for m in run.members]
    text = progress_text(names, [line[n]["fvu"] for n in names], [line[n]["l0"] for n in names])
    bar.set_postfix_str(f"{text} | {rate:,.0f} rows/s", refresh=False)


def _maybe_checkpoint(run: Run, cfg: TrainConfig) -> None:
    if run.step % cfg.checkpoint_every and run.step != run.total_steps:
        return
    _check_finite(run, cfg, weights=True)  # on every rank: the ranks' watches are merged
    if run.world.main:
        _save(run, cfg)
    run.saved = run.step


def _save(run: Run, cfg: TrainConfig) -> None:
    save_state(
        cfg.out,
        {
            "step": run.step,
            "rows": run.rows,
            "position": list(run.position),
            "rng": torch.get_rng_state(),
            "saes": {m.spec.name: m.sae.state_dict() for m in run.members},
            "optims": {m.spec.name: m.opt.state_dict() for m in run.members},
            "config": cfg.identity(),
            "store": run.store_ref.model_dump(),
            "split": run.split.model_dump(),
            "finished": run.step == run.total_steps,
            "world_size": run.world.size,
        },
    )
    for m in run.members:
        meta = SAEMeta(
            name=m.spec.name,
            array=m.spec.array,
            sae=m.spec.sae,
            store=run.store_ref,
            split=run.split,
            step_range=run.step_range,
            normalization=NORMALIZATION,
            input_scale=m.scale,
            trained_steps=run.step,
            trained_rows=run.rows,
            train_config=cfg.model_dump(mode="json"),
        )
        save_sae(cfg.out / m.spec.name, m.sae, meta)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines logged after the checkpoint a resume starts from (they will be logged again)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))

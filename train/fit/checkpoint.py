"""What a training run leaves on disk, and how it is read back.

    runs/saes/
    ├── tide-manifest.json           every file tide writes here (store/outputs.py): what --overwrite deletes
    ├── train_config.json            the TrainConfig of the run
    ├── metrics.jsonl                one line per logged step
    ├── trainer_state.pt             everything an exact resume needs (see below), replaced atomically
    └── resid_l03-tide-k16/          one folder per SAE: what a user loads (`load_sae`)
        ├── sae.safetensors          weights and buffers, input normalisation included
        ├── sae.json                 SAEMeta: config, store path and identity, split, normalisation
        └── eval.json                held-out metrics, overall and per timestep bucket

`trainer_state.pt` holds, in one file written to a temporary name and renamed over the old one (so a kill
at any instant leaves either the old state or the new one, never a mixture), every SAE's state dict, every
optimiser's state, the step and row counters, the loader's Position, the torch RNG state, the split and
the store's identity. The SAE folders are exports of the same step, for users; resume never reads them.
Before a resume loads the state, every entry's CRC-32 (which the zip format records and torch.load never
checks) is compared with its bytes: a damaged state is refused, never trained on.

`prepare_out` decides what a run does with its --out, reading only: resume the run there, or replace it
when it is a tide training run with nothing else in it (store/outputs.py), never when it holds the store
or lies in it. `claim_out` acts on it once every setting has been checked: a run refused for its settings
(`--batch-size` larger than the data, an empty `--steps` range) has deleted nothing. Every run folder keeps
the manifest of store/outputs.py (tide-manifest.json), which lists the files above.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict
from tide.store.failures import os_error
from tide.store.manifest import record
from tide.store.open import is_url
from tide.store.outputs import check_replaceable, nested, replace
from tide.train.fit.data import Split
from tide.train.sae.model import SAE, SAEConfig, build_sae

if TYPE_CHECKING:
    from tide.train.fit.config import TrainConfig

SAE_FORMAT = "tide.sae"
STATE_FILE = "trainer_state.pt"


class StoreRef(BaseModel):
    """The store an SAE was trained on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    """As given to `tide train --store` (resolved to an absolute path)."""
    identity: str
    """`Store.identity()`: a hash of the metadata that defines the store's content."""


class SAEMeta(BaseModel):
    """Contents of sae.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["tide.sae"] = SAE_FORMAT
    format_version: int = 1
    name: str
    """Folder name, e.g. resid_l03-tide-k16."""
    array: str
    """Activation array it reads, e.g. resid_l03 (site resid, layer 3, cond branch)."""
    sae: SAEConfig
    store: StoreRef
    split: Split
    """Which sample chunks it trained on and which are held out for evaluation."""
    step_range: tuple[int, int]
    """[start, stop) of the stored steps it trained on."""
    normalization: str
    """How raw activations are normalised; the numbers are the input_mean/input_mean_t/input_scale buffers."""
    input_scale: float
    """The scalar s of x_n = (x - mean(t)) / s (also in the weights)."""
    trained_steps: int
    trained_rows: int
    train_config: dict[str, Any]


class LoadedSAE(NamedTuple):
    sae: SAE
    """In eval mode; `sae.forward_raw(x, t)` takes raw activations."""
    meta: SAEMeta
    folder: Path
    """Where it was loaded from (eval.json goes there)."""


NORMALIZATION = (
    "x_n = (x - mean(t)) / s: mean(t) is the per-channel mean of the training rows at the stored step whose "
    "timestep is nearest t; s is one scalar for all steps, chosen so that E||x_n||^2 = d_model over the "
    "training rows. SAE.forward_raw applies it and undoes it on the reconstruction."
)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a file cut short by a full disk would only keep the disk full
        err = os_error(e)
        if err is None or err is e:
            raise
        # torch.save reports a failed write as a RuntimeError ("unexpected pos"); the OSError is its context
        raise OSError(err.errno, err.strerror, str(tmp)) from e


def save_sae(folder: Path, sae: SAE, meta: SAEMeta) -> None:
    """Write one SAE folder; each file is replaced atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    _atomic_write(
        folder / "sae.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": SAE_FORMAT})
    )
    _atomic_write(folder / "sae.json", lambda p: p.write_text(meta.model_dump_json(indent=2)))


def is_sae_folder(path: Path) -> bool:
    return (path / "sae.json").is_file() and (path / "sae.safetensors").is_file()


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> LoadedSAE:
    """An SAE folder written by `tide train`, ready for `forward_raw` on raw activations."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_sae_folder(folder) and (folder / "cfg.json").is_file():
        raise ValueError(
            f"{folder} looks like a SAELens SAE folder (cfg.json); make it a tide SAE folder first: "
            f"`tide import {folder} --store STORE --out NEW_FOLDER`, then load NEW_FOLDER"
        )
    if not is_sae_folder(folder):
        raise ValueError(
            f"{folder} is not an SAE folder (it needs sae.json and sae.safetensors); pass a folder that "
            f"`tide train --out` wrote, such as {folder}/resid_l03-tide-k16"
        )
    meta = SAEMeta.model_validate_json((folder / "sae.json").read_text())
    sae = build_sae(meta.sae)
    sae.load_state_dict(load_file(str(folder / "sae.safetensors")))
    return LoadedSAE(sae.to(device).eval(), meta, folder)


def sae_folders(paths: list[Path]) -> list[Path]:
    """SAE folders named by `paths`: each an SAE folder, or a run folder whose SAE subfolders are taken."""
    found = []
    for p in paths:
        if is_sae_folder(p):
            found.append(p)
            continue
        subs = sorted(q for q in p.iterdir() if is_sae_folder(q)) if p.is_dir() else []
        if not subs:
            raise ValueError(
                f"{p} is neither an SAE folder nor a `tide train --out` folder holding SAE folders"
            )
        found.extend(subs)
    return found


def save_state(out: Path, state: dict[str, Any]) -> None:
    """Write the resume state atomically."""
    _atomic_write(out / STATE_FILE, lambda p: _torch_save(state, p))


def _torch_save(obj: Any, path: Path) -> None:
    # Through a Python file, so that a failed write raises (and chains) the OSError saying why.
    with open(path, "wb") as f:
        torch.save(obj, f)


STATE_KEYS = frozenset({"step", "rows", "position", "rng", "saes", "optims", "config", "store", "split"})


class CheckpointError(ValueError):
    """A run folder or resume state that cannot be used: the message says why and how to go on."""


def damaged_entry(path: Path) -> str | None:
    """Why the zip file `torch.save` wrote at `path` is damaged (an entry whose bytes fail the CRC-32 recorded
    for it, or a zip that does not open), or None when every entry checks. torch.load checks no CRC: a state
    with flipped bytes inside a tensor would load, and training would go on from corrupt weights."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every entry once (about 1 GB/s) and compares its CRC-32
    except PermissionError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a whole zip file: {type(e).__name__}: {e}"
    if bad is not None:
        return f"its entry {bad} fails its CRC-32: its bytes changed after it was written"
    return None


def load_state(out: Path, device: torch.device) -> dict[str, Any] | None:
    """The resume state in `out`, or None when there is none; CheckpointError when it is damaged (every entry's
    CRC-32 is checked before anything is loaded)."""
    path = out / STATE_FILE
    if not path.is_file():
        return None
    problem = damaged_entry(path)
    if problem is None:
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except PermissionError:  # unreadable, not damaged: the caller reports it
            raise
        except Exception as e:  # torch raises RuntimeError, EOFError or UnpicklingError on a garbled file
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"
        else:
            if isinstance(state, dict) and STATE_KEYS <= state.keys():
                return state
            missing = sorted(STATE_KEYS - state.keys()) if isinstance(state, dict) else "everything"
            problem = f"it lacks {missing}"
    raise CheckpointError(
        f"the resume state {path} is damaged ({problem}), so the run in {out} cannot be resumed. Its SAE "
        "folders, if any, hold the weights of the last checkpoint that was written completely (load them with "
        "train.checkpoint.load_sae; copy them elsewhere to keep them). To train from the start, run the same "
        "command with --overwrite, which replaces the whole run, or choose another --out"
    )


def run_files(names: list[str]) -> list[str]:
    """Every file a training run with SAEs `names` writes into its --out (with the `.tmp` names of its atomic
    writes): what its manifest lists before they are written (store/outputs.py)."""
    files = ["train_config.json", "metrics.jsonl", STATE_FILE]
    files += [f"{n}/{f}" for n in names for f in ("sae.json", "sae.safetensors", "eval.json")]
    return [*files, *(f + ".tmp" for f in files if not f.endswith(".jsonl"))]


def claim_out(out: Path, names: list[str], replacing: bool) -> None:
    """Make `out` the run's folder, once every setting has been checked: delete the run there when
    `replacing` (only the files tide wrote: store/outputs.py), and list the run's files in its manifest."""
    if replacing:
        replace(out, "run")
    out.mkdir(parents=True, exist_ok=True)
    record(out, "run", run_files(names))


def prepare_out(
    cfg: TrainConfig, store_identity: str, device: torch.device
) -> tuple[dict[str, Any] | None, bool]:
    """(the resume state in cfg.out if it is a resumable run of this config and store, whether cfg.out holds a
    run to replace). Reads only: `claim_out` deletes, after every other check has passed.

    Only a tide training run is ever replaced (store/outputs.py), and never a folder holding the store or
    inside it."""
    out = cfg.out
    if not is_url(cfg.store) and nested(out, cfg.store):  # a URL is never inside a local --out
        raise CheckpointError(
            f"--out {out} and --store {cfg.store} are the same folder or one holds the other: the SAEs need a "
            "folder of their own (replacing the run would delete the store). Choose another --out, such as "
            f"{cfg.store.resolve().parent / 'saes'}"
        )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a folder for the SAEs")
    state = None if cfg.overwrite else load_state(out, device)
    if state is not None:
        _check_resumable(state, cfg, store_identity)
        return state, False
    # Refuses anything but a tide training run, naming what is there; lists what replacing it deletes.
    old = check_replaceable(out, "run")
    # A run killed before its first checkpoint left only its config and metrics: nothing to keep.
    unstarted = not any("/" in f for f in old)
    if old and not (cfg.overwrite or unstarted):
        raise CheckpointError(
            f"--out {out} holds a tide training run with no resume state; pass --overwrite to replace it, "
            "or choose another --out"
        )
    return None, bool(old)


def _check_resumable(state: dict[str, Any], cfg: TrainConfig, store_identity: str) -> None:
    """A resume state in cfg.out must come from the same store and the same settings (those that define the
    result: TrainConfig.identity), or the run is refused, naming every difference."""
    out = cfg.out
    if state["store"]["identity"] != store_identity:
        raise CheckpointError(
            f"{out} holds a run trained on the store {state['store']['path']} (identity "
            f"{state['store']['identity']}), but --store {cfg.store} is a different store (identity "
            f"{store_identity}); point --store at the original store to resume, or pass --overwrite "
            "(or another --out) to start a new run"
        )
    old = state["config"]
    # A setting added after the run was started is missing from its state: it ran with the default.
    defaults = type(cfg)().identity()
    diffs = [
        f"{k}: {old.get(k, defaults.get(k))!r} in {out}, {v!r} now"
        for k, v in cfg.identity().items()
        if old.get(k, defaults.get(k)) != v
    ]
    if diffs:
        raise CheckpointError(
            f"{out} holds a run with a different configuration:\n  "
            + "\n  ".join(diffs)
            + "\nPass --overwrite to replace it, or choose another --out."
        )


def write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2)))

"""SAELens interop: `export_saelens` writes a tide SAE as a folder SAELens 6 loads with `SAE.load_from_disk`,
`import_saelens` turns such a folder into a tide SAE folder that `tide eval`, `load_sae` and everything
built on it read.

Shape key: D model width, F SAE latents.

A SAELens 6 folder is `cfg.json` plus `sae_weights.safetensors` with W_enc (D, F), W_dec (F, D), b_enc (F,),
b_dec (D,), and `threshold` (F,) for jumprelu. SAELens computes, with apply_b_dec_to_input and no
normalisation, pre = (x - b_dec) @ W_enc + b_enc, z = act(pre), x_hat = z @ W_dec + b_dec, on RAW x. Its
loader (sae_lens/loading/pretrained_sae_loaders.py `handle_config_defaulting`) treats a cfg.json without
`metadata.sae_lens_version` >= 6 as a pre-6 config and renames its keys, so the version is written, and
`model_name` / `hook_name` go under `metadata`.

Folding. tide computes on x_n = (x - mu(t)) / s, and a modulated SAE on x_mod = (x_n - b_dec) * (1 + c(t))
+ h(t) with (h, c) = (shift, scale) of its modulation. At one timestep t all of that is affine per
channel, so it folds exactly:
    b_dec' = s * b_dec + mu(t),   W_dec' = s * W_dec,   W_enc' = diag((1 + c(t)) / s) W_enc,
    b_enc' = b_enc + h(t) @ W_enc,   threshold' = threshold,
for then (x - b_dec') @ W_enc' + b_enc' is tide's pre-activation and z @ W_dec' + b_dec' its raw
reconstruction. Across timesteps it does not: a per-timestep mean and the modulation have no SAELens
counterpart. So an SAE with per-timestep means (every SAE `tide train` writes) or a timestep modulation
(tide, tide-*) is exported AT ONE TIMESTEP, `timestep=T`: exact on activations of step T, an
approximation elsewhere; without T such an SAE is refused, saying why. An SAE with one mean and no
modulation folds exactly with no T. The timestep is recorded as metadata.tide_timestep.

Architectures: topk and tide -> `topk` (k); batchtopk -> `jumprelu` with its inference threshold for every
latent (as SAELens saves a trained BatchTopK SAE); jumprelu -> `jumprelu`; relu -> `standard`; matryoshka
-> `topk` or `jumprelu` as its inner activation, its prefix sizes in metadata.matryoshka_prefixes.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tide.store.outputs import check_replaceable, local_out, staged
from tide.train.fit.checkpoint import (
    LoadedSAE,
    SAEMeta,
    StoreRef,
    load_sae,
    save_sae,
)
from tide.train.fit.data import Split
from tide.train.sae.model import SAE, T_TOLERANCE, SAEConfig, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"
"""Written when sae-lens is not installed: the first version whose loader reads this layout."""


class ExportResult(NamedTuple):
    out: Path
    """The SAELens folder."""
    architecture: str
    """SAELens architecture written: topk, jumprelu or standard."""
    timestep: float | None
    """The timestep it is exact at; None when it is exact at every timestep."""


class ExportError(ValueError):
    """An SAE that cannot be exported or imported as asked; the message says why and what to do."""


def _saelens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return SAELENS_VERSION


def _fold(sae: SAE, timestep: float | None) -> dict[str, torch.Tensor]:
    """SAELens weights of `sae` acting on raw activations at `timestep` (module docstring)."""
    D = sae.cfg.d_model
    t_1 = None if timestep is None else torch.tensor([float(timestep)])
    mu_D = sae.denormalize(torch.zeros(1, D), t_1)[0]  # the mean at t (checks t against the trained range)
    s = sae.input_scale
    shift_D, gain_D = torch.zeros(D), torch.ones(D)
    if sae.modulation is not None:
        shift_1D, scale_1D = sae.modulation(t_1)
        shift_D, gain_D = shift_1D[0], 1 + scale_1D[0]
    weights = {
        "W_enc": (gain_D / s)[:, None] * sae.W_enc,
        "W_dec": s * sae.W_dec,
        "b_enc": sae.b_enc + shift_D @ sae.W_enc,
        "b_dec": s * sae.b_dec + mu_D,
    }
    threshold = getattr(sae, "threshold", None)
    if threshold is not None:  # batchtopk's one threshold, jumprelu's one per latent
        weights["threshold"] = threshold.expand(sae.cfg.num_latents)
    return {k: v.detach().float().contiguous().clone() for k, v in weights.items()}


def _check_timestep(loaded: LoadedSAE, timestep: float | None) -> None:
    sae, folder = loaded.sae, loaded.folder
    per_t, modulated = sae.input_mean.shape[0] > 1, sae.modulation is not None
    if timestep is None and (per_t or modulated):
        t_S = sae.input_mean_t.tolist()
        why = (
            "its timestep modulation has no SAELens counterpart"
            if modulated
            else f"its input normalisation has one mean per timestep ({len(t_S)} of them)"
        )
        raise ExportError(
            f"{folder} ({sae.cfg.arch}) cannot be exported for every timestep at once: {why}, which SAELens "
            f"cannot express. Pass --timestep T to export it as it acts at scheduler timestep T, exactly (one "
            f"of {t_S[0]:g}, ..., {t_S[-1]:g}; the nearest stored mean is used)"
        )
    span = sae.timestep_range()
    if timestep is not None and not (
        math.isfinite(timestep)
        and (span is None or span[0] - T_TOLERANCE <= timestep <= span[1] + T_TOLERANCE)
    ):
        trained = (
            "on scheduler timesteps of its store"
            if span is None
            else f"on scheduler timesteps {span[0]:g}..{span[1]:g}"
        )
        raise ExportError(
            f"--timestep {timestep:g}: {folder} was trained {trained}; give one of the values of the store's "
            "`timesteps` array (the nearest stored mean is used)"
        )
    if timestep is not None and not (per_t or modulated):
        warnings.warn(f"{folder} does not depend on t: --timestep {timestep:g} changes nothing", stacklevel=3)


def _cfg_json(loaded: LoadedSAE, architecture: str, timestep: float | None) -> dict[str, Any]:
    sae, meta = loaded.sae, loaded.meta
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.cfg.d_model,
        "d_sae": sae.cfg.num_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if architecture == "topk":
        cfg |= {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    prefixes = getattr(sae.arch, "prefixes", None)
    cfg["metadata"] = {
        "sae_lens_version": _saelens_version(),
        "sae_lens_training_version": None,
        "model_name": _model_id(meta),
        "hook_name": meta.array,
        "tide_arch": sae.cfg.arch,
        "tide_timestep": timestep,
        "tide_store": meta.store.model_dump(),
        "tide_split": meta.split.model_dump(),
        "tide_step_range": list(meta.step_range),
        **({"matryoshka_prefixes": list(prefixes)} if prefixes else {}),
    }
    return cfg


def _model_id(meta: SAEMeta) -> str | None:
    """The id of the DiT the store was harvested from, when the store can still be opened."""
    from tide.store.reader import open_store

    try:
        return open_store(meta.store.path).meta.model.id
    except Exception:  # a moved or remote store: the metadata just lacks the model
        warnings.warn(
            f"the store {meta.store.path} cannot be opened: metadata.model_name is left empty", stacklevel=3
        )
        return None


def export_saelens(
    sae_dir: Path, out: Path, *, timestep: float | None = None, overwrite: bool = False
) -> ExportResult:
    """Write the SAE folder `sae_dir` as a SAELens 6 folder `out` (module docstring: what folds and when)."""
    from safetensors.torch import save_file

    out = local_out(out, "export")
    loaded = load_sae(sae_dir)
    _check_timestep(loaded, timestep)
    check_replaceable(out, "export", overwrite)  # only an earlier export, with nothing else in it
    architecture = loaded.sae.arch.saelens
    with torch.no_grad():
        weights = _fold(loaded.sae, timestep)
    _check_finite(weights, f"{sae_dir}'s weights fold to", "the SAE is damaged or diverged: train it again")
    with staged(out, "export", overwrite) as new:
        save_file(weights, str(new / WEIGHTS_FILE))
        (new / CFG_FILE).write_text(json.dumps(_cfg_json(loaded, architecture, timestep), indent=2))
    return ExportResult(out, architecture, timestep)


def _check_finite(tensors: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Refuse weights holding NaN or infinity, naming each tensor and how many of its values."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        counts = ", ".join(f"{k} ({n} of {tensors[k].numel()})" for k, n in bad.items())
        raise ExportError(f"{what} NaN or infinite values in {counts}; {fix}")


# --- import ----------------------------------------------------------------------------------------------

TIDE_ARCH = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}
"""SAELens architecture -> the tide architecture that computes the same thing."""


def is_saelens_folder(path: Path) -> bool:
    return (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _read_saelens(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """cfg.json and the weights of a SAELens folder, each refused with the reason when it is not what SAELens
    writes (not JSON, not an object, not a safetensors file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not is_saelens_folder(folder):
        raise ExportError(f"{folder} is not a SAELens SAE folder (it needs {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(
            f"{folder / CFG_FILE} is not JSON ({e}); it must be the cfg.json SAELens writes"
        ) from e
    if not isinstance(cfg, dict):
        raise ExportError(
            f"{folder / CFG_FILE} holds a JSON {type(cfg).__name__}, not the object of settings SAELens writes "
            '(e.g. {"architecture": "topk", "d_in": 768, "d_sae": 16384, ...})'
        )
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except SafetensorError as e:
        raise ExportError(
            f"{folder / WEIGHTS_FILE} is not a safetensors file ({e}); it must be the weights SAELens saves"
        ) from e
    return cfg, tensors


def _import_config(cfg: dict[str, Any], folder: Path) -> SAEConfig:
    arch = cfg.get("architecture", "standard")
    sizes = {key: cfg.get(key) for key in ("d_in", "d_sae", *(["k"] if arch == "topk" else []))}
    problems = [
        (arch not in TIDE_ARCH, f"architecture {arch!r} (tide imports {', '.join(TIDE_ARCH)})"),
        (
            cfg.get("normalize_activations", "none") not in ("none", None),
            f"normalize_activations={cfg.get('normalize_activations')!r}, a normalisation computed at run time "
            "from data tide does not have (only 'none' is imported)",
        ),
        (cfg.get("reshape_activations", "none") != "none", "reshape_activations (attention-head SAEs)"),
        (bool(cfg.get("rescale_acts_by_decoder_norm")), "rescale_acts_by_decoder_norm=true"),
        *(
            (not (type(v) is int and v > 0), f"{k}={v!r} (a positive whole number is needed)")
            for k, v in sizes.items()
        ),
    ]
    bad = [what for wrong, what in problems if wrong]
    if bad:
        raise ExportError(f"{folder} cannot be imported: its {CFG_FILE} has {'; '.join(bad)}")
    tide_arch = TIDE_ARCH[arch]
    return SAEConfig(
        arch=tide_arch,
        d_model=cfg["d_in"],
        num_latents=cfg["d_sae"],
        k=cfg.get("k", 1) if tide_arch == "topk" else 1,
        aux_coeff=0.0,
    )


def _import_weights(sae: SAE, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path) -> None:
    D, F = sae.cfg.d_model, sae.cfg.num_latents
    need = {"W_enc": (D, F), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,)}
    need |= {"threshold": (F,)} if sae.cfg.arch == "jumprelu" else {}
    missing = [n for n in need if n not in tensors]
    if missing:
        raise ExportError(f"{WEIGHTS_FILE} lacks {missing}; it is not a SAELens {cfg['architecture']} SAE")
    wrong = [
        f"{n} {tuple(tensors[n].shape)}" for n, shape in need.items() if tuple(tensors[n].shape) != shape
    ]
    if wrong:
        expected = ", ".join(f"{n} {shape}" for n, shape in need.items())
        raise ExportError(
            f"{folder / WEIGHTS_FILE} has {', '.join(wrong)}, but its {CFG_FILE} (d_in={D}, d_sae={F}) means "
            f"{expected}; the two files do not belong together"
        )
    t = {n: tensors[n].float() for n in need}
    _check_finite(t, f"{folder / WEIGHTS_FILE} holds", "such an SAE reconstructs nothing; fix or retrain it")
    if not cfg.get("apply_b_dec_to_input", True):  # SAELens encodes x, tide x - b_dec: move b_dec into b_enc
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    with torch.no_grad():
        for name, value in t.items():
            getattr(sae, name).copy_(value)
    sae.set_input_normalization(torch.zeros(sae.cfg.d_model), 1.0)


def import_saelens(
    folder: Path, store_path: str | Path, out: Path, *, array: str | None = None, overwrite: bool = False
) -> Path:
    """Write the SAELens folder `folder` as a tide SAE folder `out`, reading `array` of the store; an earlier
    import in `out` is replaced only with `overwrite` (store/outputs.py).

    The array defaults to metadata.hook_name when it names one of the store's arrays. Held-out samples: the
    split recorded by `tide export` when the store is the one it was trained on, else every done sample
    chunk (the SAE never saw this store's samples)."""
    from tide.store.open import canonical
    from tide.store.reader import open_store

    out = local_out(out, "import")
    cfg, tensors = _read_saelens(folder)
    check_replaceable(out, "sae", overwrite)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    sae = build_sae(_import_config(cfg, folder))
    _import_weights(sae, cfg, tensors, folder)
    store = open_store(store_path)
    array = _imported_array(folder, store, sae, array or metadata.get("hook_name") or cfg.get("hook_name"))
    identity = store.identity()
    split, step_range = _imported_split(store, metadata, identity)
    meta = SAEMeta(
        name=out.name,
        array=array,
        sae=sae.cfg,
        store=StoreRef(path=canonical(store.path), identity=identity),
        split=split,
        step_range=step_range,
        normalization=f"none: imported from the SAELens folder {folder.resolve()}, which works on raw activations",
        input_scale=1.0,
        trained_steps=0,
        trained_rows=0,
        train_config={"imported_from": str(folder.resolve()), "saelens_metadata": metadata},
    )
    with staged(out, "sae", overwrite) as new:
        save_sae(new, sae, meta)
    return out


def _imported_array(folder: Path, store, sae, array: str | None) -> str:
    """The store array an imported SAE reads: `array` when the store has it and its width is the SAE's."""
    arrays = store.meta.act_names()
    if array not in arrays:
        raise ValueError(
            f"which activations does {folder} read? hook_name {array!r} is not an array of {store.path} "
            f"({', '.join(arrays)}); pass --array NAME"
        )
    if sae.cfg.d_model != store.meta.d_model:
        raise ValueError(
            f"{folder} has d_in={sae.cfg.d_model}, but {store.path} has d_model {store.meta.d_model}"
        )
    return array


def _imported_split(store, metadata: dict, identity: str) -> tuple[Split, tuple[int, int]]:
    """Held-out samples and step range: those `tide export` recorded when the store is the one the SAE was
    trained on, else every done sample chunk and every step (the SAE never saw this store's samples)."""
    if (metadata.get("tide_store") or {}).get("identity") == identity and "tide_split" in metadata:
        return Split(**metadata["tide_split"]), tuple(metadata["tide_step_range"])
    held_out = Split(val_fraction=1.0, split_seed=0, train_chunks=[], val_chunks=store.done_chunks())
    return held_out, (0, store.layout.num_steps)

"""Summaries and integrity checks of a tide store (`tide store info`, `tide store verify`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from store.reader import Store, open_store
from store.schema import ACT_DIMS, as_float, numpy_storage_dtype
from store.writer import block_stats


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summary(store: Store) -> dict[str, Any]:
    """What a user wants to know about a store at a glance."""
    meta, lay = store.meta, store.layout
    done = store.done()
    names = meta.act_names()
    itemsize = numpy_storage_dtype(meta.dtype).itemsize
    written = sum(store.root[n].nbytes_stored() for n in names)
    # Uncompressed bytes of the chunks that exist; done samples are a lower bound when a run is in flight.
    raw = int(done.sum()) * lay.num_steps * lay.tokens * lay.d_model * itemsize * len(names)
    return {
        "path": str(store.path),
        "model": meta.model.id,
        "transformer": meta.model.transformer_class,
        "scheduler": meta.scheduler.class_name,
        "steps": f"{lay.num_steps} stored of {meta.num_inference_steps} (timesteps {store.timesteps[0]:g} .. {store.timesteps[-1]:g})",
        "layers": meta.layers,
        "sites": meta.sites,
        "cfg": f"guidance {meta.guidance_scale:g}, branch {meta.cfg_branch}",
        "tokens": f"{meta.tokens.kept} of {meta.tokens.num_tokens} per (sample, step)",
        "d_model": meta.d_model,
        "dtype": meta.dtype,
        "codec": meta.codec,
        "samples_done": f"{int(done.sum())} / {lay.num_samples}",
        "rows_per_array": int(done.sum()) * lay.num_steps * lay.tokens,
        "chunk": list(lay.act_chunks),
        "bytes_on_disk": disk_bytes(store.path),
        "compression_ratio": round(raw / written, 3) if written and raw else None,
        "created": meta.created,
        "tide_version": meta.tide_version,
    }


def verify(path: Path, check_values: bool = True) -> list[str]:
    """Every problem found in a store, as sentences; empty when it is sound."""
    try:
        store = open_store(path)
    except ValueError as e:
        return [str(e)]
    problems: list[str] = []
    meta, lay, root = store.meta, store.layout, store.root
    expected = {
        "timesteps": (lay.num_steps,),
        "step_index": (lay.num_steps,),
        "seed": (lay.num_samples,),
        "done": (lay.num_samples,),
    }
    expected["label" if meta.conditioning == "class" else "prompt_index"] = (lay.num_samples,)
    if meta.tokens.subsampled:
        expected["token_index"] = (lay.num_samples, lay.num_steps, lay.tokens)
    for name in meta.act_names():
        expected[name] = lay.act_shape
    for name, shape in expected.items():
        if name not in root:
            problems.append(f"array {name} is missing")
        elif root[name].shape != shape:
            problems.append(f"array {name} has shape {root[name].shape}, expected {shape}")
    if problems:
        return problems
    if list(root["step_index"][:]) != meta.step_indices:
        problems.append("step_index disagrees with the metadata's step_indices")
    done_chunks = store.done_chunks()
    for name in meta.act_names():
        arr = root[name]
        if tuple(arr.metadata.dimension_names or ()) != ACT_DIMS:
            problems.append(
                f"{name} has dimension_names {arr.metadata.dimension_names}, expected {list(ACT_DIMS)}"
            )
        if not check_values:
            continue
        count = np.zeros(lay.num_steps, dtype=np.int64)
        total = np.zeros((lay.num_steps, lay.d_model))
        for c in done_chunks:
            try:
                block = arr[lay.sample_chunk(c)]
            except Exception as e:
                problems.append(f"{name}: samples {lay.sample_chunk(c)} unreadable ({e})")
                continue
            values = as_float(block, meta.dtype)
            if not np.isfinite(values).all():
                bad = np.argwhere(~np.isfinite(values))[0]
                problems.append(
                    f"{name}: non-finite value at sample {lay.sample_chunk(c).start + bad[0]}, step {bad[1]}"
                )
            n, s, _ = block_stats(block, meta.dtype)
            count += n
            total += s
        stats = store.stats(name, done_chunks)
        if not np.array_equal(stats.count, count) or not np.allclose(
            stats.mean * count[:, None], total, rtol=1e-6, atol=1e-6
        ):
            problems.append(f"stats/{name} disagree with the stored activations")
    if meta.tokens.subsampled and done_chunks:
        idx = root["token_index"][lay.sample_chunk(done_chunks[0])]
        if idx.min() < 0 or idx.max() >= meta.tokens.num_tokens:
            problems.append("token_index holds positions outside the image's tokens")
    return problems

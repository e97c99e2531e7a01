"""Summaries of a tide store (`tide store info`); its integrity checks are store/verify.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tide.store.reader import Store
from tide.store.schema import numpy_storage_dtype


def disk_bytes(path: Path | str) -> int | None:
    """Bytes of a local store's files (of the zip file, when packed); None for a URL."""
    if isinstance(path, str):
        return None
    if path.is_file():
        return path.stat().st_size
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
        **({"blocks": block_kinds(meta)} if meta.double_stream_blocks is not None else {}),
        "sites": meta.sites,
        "cfg": f"guidance {meta.guidance_scale:g}"
        + (f" ({meta.guidance})" if meta.guidance else "")
        + f", branch {meta.cfg_branch}",
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
        "format_version": meta.format_version,
    }


def summary_table(info: dict[str, Any]) -> str:
    """`summary` as `tide store info` prints it: one `key  value` line each, sizes in MiB."""
    mib = {"bytes_on_disk"}
    return "\n".join(
        f"{key:>18}  {f'{value / 2**20:.1f} MiB' if key in mib and value is not None else value}"
        for key, value in info.items()
    )


def block_kinds(meta) -> str:
    """FLUX's one global layer index, split into its double- and single-stream blocks."""
    d, n = meta.double_stream_blocks, meta.num_layers
    return f"double-stream 0..{d - 1}, single-stream {d}..{n - 1} (one global layer index)"

"""`tide store card`: a Hugging Face dataset card (README.md at the top of the store) that says what the store
holds and how to load it with tide, zarr and xarray. `tide harvest` writes it at the end of every harvest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tide.store.failures import writing
from tide.store.open import is_url, read_only, where, zarr_store
from tide.store.outputs import OutputError, check_file
from tide.store.reader import Store, open_store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

TAGS = ("tide", "sparse-autoencoders", "diffusion-transformer", "zarr")


def card_text(store: Store) -> str:
    """The dataset card of an open store, as Markdown with YAML front matter."""
    meta = store.meta
    name = meta.act_names()[0]
    by_label = (
        f'ds.set_xindex("label").sel(label={int(store.read("label", (slice(0, 1),))[0])})'
        if "label" in store.root
        else "ds.where(ds.done, drop=True)"
    )
    return CARD.format(
        tags="\n".join(f"- {t}" for t in TAGS), model=meta.model.id, summary="\n".join(_summary(store)),
        name=name, t0=f"{store.timesteps[0]:g}", by_label=by_label, seeding=meta.seeding,
    )  # fmt: skip


def _summary(store: Store) -> list[str]:
    """The card's bullet list: model, scheduler, layers, arrays, tokens, dtype, samples."""
    meta, lay, ts = store.meta, store.layout, store.timesteps
    done = int(store.done().sum())
    blocks = (
        f" (blocks 0..{meta.double_stream_blocks - 1} double-stream, then single-stream)"
        if meta.double_stream_blocks is not None
        else ""
    )
    return [
        f"- model: `{meta.model.id}` ({meta.model.transformer_class})",
        f"- scheduler: {meta.scheduler.class_name}, {meta.num_inference_steps} inference steps; "
        f"{lay.num_steps} stored (timesteps {ts[0]:g} .. {ts[-1]:g})",
        f"- layers: {', '.join(map(str, meta.layers))} of {meta.num_layers}; sites: {', '.join(meta.sites)}{blocks}",
        f"- arrays: {', '.join(meta.act_names())}, each (sample, step, token, d) = {tuple(lay.act_shape)}",
        f"- tokens: {meta.tokens.kept} of {meta.tokens.num_tokens} per (sample, step); d_model {meta.d_model}",
        f"- dtype: {meta.dtype}, codec {meta.codec}; chunks {tuple(lay.act_chunks)}",
        f"- samples: {done} of {lay.num_samples} done; {done * lay.num_steps * lay.tokens} rows per array; "
        f"guidance {meta.guidance_scale:g} ({meta.guidance + ', ' if meta.guidance else ''}{meta.cfg_branch} branch)",
    ]


CARD = """\
---
license: other  # TODO: the license of these activations (and of the model that made them)
tags:
{tags}
---

# Activations of {model} over its denoising steps

A tide store: Diffusion Transformer activations captured at every stored
denoising step, for training temporal-aware sparse autoencoders. Zarr v3, one array per (site, layer).

{summary}

## Load it

With tide (`pip install tide-sae`; replace URL with where this folder or its .zarr.zip lives: a local path,
s3://..., https://..., hf://datasets/ORG/NAME/PATH):

```
tide store info URL
tide train --store URL --out saes
```

With zarr:

```python
import zarr

# zarr warns that it does not recognise README.md (this card) as part of the hierarchy: harmless
root = zarr.open_group("URL", mode="r")  # a .zarr.zip: zarr.storage.ZipStore("x.zarr.zip", mode="r")
acts = root["{name}"][0, :, :, :]  # sample 0: (step, token, d)
timesteps = root["timesteps"][:]
```

With xarray (per-sample and per-step arrays are coordinates of every activation array):

```python
import xarray as xr
ds = xr.open_zarr("URL", consolidated=False)
ds.set_xindex("timesteps").sel(timesteps={t0})["{name}"]  # one step, by its timestep
{by_label}["{name}"]  # by label
stats = xr.open_zarr("URL", group="stats/{name}", consolidated=False)  # running sums
```

## Seeding

{seeding}

Only samples whose `done` flag is set are complete; the store format is described in tide's
store/FORMAT.md.
"""


def write_card(path: str | Path, out: str | Path | None = None) -> str:
    """Write README.md into the store at `path` (a folder or an s3/gs URL), or the card to the file `out` (a
    path, or an s3/gs URL); returns where it went. An existing `out` is written over only when it is a card
    tide wrote (store/outputs.py); a read-only URL (http, hf, a zip) is refused in one line.

    `out` is for a Hugging Face dataset repository, whose card is the README.md at the repository's root: the
    store goes in a folder of the repository (hf://datasets/ORG/NAME/h.zarr), the card beside it. (Uploading
    the store itself as the repository root would put the hub's own .gitattributes into the store.)
    """
    from zarr.core.buffer import cpu

    target = _card_target(out) if out is not None else None  # before the store is read: refused at once
    store = open_store(path)
    text = card_text(store)
    if isinstance(target, Path):
        check_file(target, is_card, "a dataset card")
        with writing(target, OutputError):
            target.write_text(text)
        return str(target)
    zstore, key = target if target is not None else (zarr_store(where(path), "w"), "README.md")
    if target is not None:
        old = sync(zstore.get(key, prototype=default_buffer_prototype()))
        if old is not None and not is_card(old.to_bytes().decode(errors="replace")):
            raise OutputError(
                f"--out {out} exists and is not a dataset card tide wrote; it will not write over it: choose "
                "another --out, or delete that object yourself"
            )
    # A store on a read-only disk: the card can still go to a file elsewhere (--out FILE).
    with writing(out or path, OutputError, "--out FILE"):
        sync(zstore.set(key, cpu.Buffer.from_bytes(text.encode())))
    return str(out) if out is not None else f"{path}/README.md"


def _card_target(out: str | Path) -> Path | tuple[Any, str]:
    """Where `store card --out` writes: a local path, or (object store, key) for an s3:// or gs:// URL."""
    if not is_url(out):
        return Path(out)
    loc = where(out)
    if loc.local:
        return loc.path
    if not loc.writable:
        raise OutputError(f"--out {read_only(loc)}")
    parent, _, name = loc.text.rpartition("/")
    if "/" not in parent.split("://", 1)[1]:
        raise OutputError(
            f"--out {out} names no file inside the bucket; give the card's key, e.g. {out}/README.md"
        )
    return zarr_store(where(parent), "w"), name


def is_card(text: str) -> bool:
    """Whether `text` is a dataset card tide wrote: CARD's front matter with tide's tags."""
    return text.startswith("---\n") and "tags:\n" + "\n".join(f"- {t}" for t in TAGS) + "\n---\n" in text

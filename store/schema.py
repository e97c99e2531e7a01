"""The tide activation store: its layout, its metadata model, and all of its index arithmetic.

A store is a Zarr v3 group. Everything a reader needs is in this module; `FORMAT.md` describes the
same layout for readers without tide.

    cache.zarr/
    ├── zarr.json             root attributes: StoreMeta (format "tide.activations")
    ├── timesteps             (S,)  float64  the scheduler's timestep value at each stored step
    ├── step_index            (S,)  int32    position of each stored step in the sampling schedule
    ├── seed                  (N,)  int64    per-sample seed: all randomness of sample i comes from it
    ├── label                 (N,)  int64    class label (class-conditional models), or
    ├── prompt_index          (N,)  int64    index into StoreMeta.prompts (text-conditional models)
    ├── done                  (N,)  bool     sample fully written (set last, after its activations)
    ├── token_index           (N, S, T) int32  kept token positions, when tokens are subsampled
    ├── images                (N, H, W, C) uint8  final images (harvest --save-images)
    ├── resid_l03             (N, S, T, D)   activations; one array per (site, layer, branch);
    ├── resid_l03_uncond      (N, S, T, D)   "_uncond" marks the unconditional CFG branch
    └── stats/
        └── resid_l03/
            ├── count         (C, S)     int64    rows summed, per sample chunk and step
            ├── sum           (C, S, D)  float64  per-channel sum
            └── sumsq         (C, S, D)  float64  per-channel sum of squares

Shape key: N samples, S stored steps, T kept tokens per (sample, step), D model width,
C sample chunks (= ceil(N / batch_size)).

Every activation array has `dimension_names = ["sample", "step", "token", "d"]` and a chunk of shape
`(batch_size, steps_per_chunk, tokens_per_chunk, D)`: one harvest write fills whole chunks, so no chunk
is ever written by two writers, and a crash loses at most the batch in flight. Since format version 3
every chunk of every array (the small ones and stats/ too; version 2: the activations and token_index)
ends with a crc32c checksum and is written even when it holds only the fill value: the per-step and
per-sample arrays whole when the store is created (`done` all false), the others with their sample chunk.
So a missing chunk file (of a done sample) is always a lost one. Statistics are kept per sample chunk so
that they are exact and independent of how a harvest was interrupted and resumed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

FORMAT = "tide.activations"
FORMAT_VERSION = 3
"""Version 3 ends every chunk of every array with a crc32c checksum and writes every chunk, even one that
holds only the fill value (`done` is written whole, all false, when the store is created), so that a missing
chunk file always means a lost one. Version 2 did so for the activations and token_index only; version 1
stores have neither. Both are still read."""
READABLE_VERSIONS = (1, 2, 3)

CHECKSUM_BYTES = 4
"""The crc32c trailer (little-endian uint32 of the bytes before it) that ends a checksummed chunk."""
# Worst case a compressor adds to incompressible data: a blosc frame stores it verbatim after a 16-byte
# header (plus 4 bytes of block offset per block when split); zstd adds about 1/256 plus a frame header.
_COMPRESSED_OVERHEAD_BYTES = 1024

SITES = ("resid", "delta", "attn", "mlp")
"""Capture sites per block: block output; block output minus block input; attention output; MLP output."""

Site = Literal["resid", "delta", "attn", "mlp"]
Branch = Literal["cond", "uncond"]
StorageDtype = Literal["float16", "float32", "bfloat16"]
CfgBranch = Literal["cond", "uncond", "both"]
Codec = Literal["none", "blosc-zstd", "zstd"]
"""Compression of the data arrays, as named on the command line (store/writer.py builds each chain)."""
CODECS: tuple[str, ...] = ("none", "blosc-zstd", "zstd")
DEFAULT_CODEC = "none"
"""Chosen by measurement for training reads (FORMAT.md, "Codecs"): no compression reads at the page cache's
speed, and these activations compress by 1.2x (float16) to 1.5x (bfloat16) at best; `blosc-zstd` is the
smaller one, for sharing (`tide harvest --codec`, `tide store pack --codec`)."""

ACT_DIMS = ("sample", "step", "token", "d")

SEEDING = (
    "Sample i is generated from torch.Generator(device='cpu').manual_seed(seed[i]): its initial noise is "
    "drawn first, with shape (1, C, H, W) in float32, then any noise the scheduler's step() needs, in step "
    "order, from that same generator. Kept tokens at (sample i, step s) are the sorted first T entries of "
    "numpy.random.default_rng([seed[i], step_index[s]]).permutation(num_tokens)."
)

# Chunks hold a few MB of whole token vectors.
TARGET_CHUNK_BYTES = 4 << 20
MIN_CHUNK_ROWS = 2048
MAX_CHUNK_ROWS = 8192


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelInfo(_Frozen):
    """Where the diffusion transformer came from."""

    id: str
    """The model as given: a hub id or a path."""
    path: str
    """The resolved local folder it was loaded from."""
    revision: str | None = None
    """Hub revision (commit hash) when known."""
    transformer_class: str
    """diffusers class name of the transformer, e.g. DiTTransformer2DModel."""
    transformer_config: dict[str, Any]
    """The transformer's config as saved by diffusers."""
    fingerprint: str | None = Field(default=None, exclude_if=lambda v: v is None)
    """`sha256:...` of the transformer's config and weights (store/fingerprint.py); absent in stores made
    before it was recorded (left out of the metadata when None, so those stores keep their identity)."""


class SchedulerInfo(_Frozen):
    """The sampling scheduler exactly as used."""

    class_name: str
    config: dict[str, Any]


class TokenSampling(_Frozen):
    """Which token positions of each (sample, step) are stored."""

    num_tokens: int
    """Tokens in the image stream (patches)."""
    fraction: float
    """Requested fraction in (0, 1]; 1 keeps every token in order and stores no token_index."""
    kept: int
    """T: tokens stored per (sample, step)."""

    @property
    def subsampled(self) -> bool:
        """Only some tokens are stored; the token_index array says which."""
        return self.kept < self.num_tokens


class StoreMeta(_Frozen):
    """Root attributes of a tide store. Validated on every open."""

    format: Literal["tide.activations"] = FORMAT
    format_version: int = FORMAT_VERSION
    tide_version: str
    created: str
    """ISO 8601 time the store was created."""
    model: ModelInfo
    scheduler: SchedulerInfo
    num_inference_steps: int
    step_indices: list[int]
    """Positions in the sampling schedule that are stored (S of them); timesteps holds their values."""
    guidance_scale: float
    guidance: Literal["cfg", "distilled", "none"] | None = Field(default=None, exclude_if=lambda v: v is None)
    """How guidance_scale was applied: `cfg` (a conditional and an unconditional batch), `distilled` (a model
    input, FLUX.1-dev), `none`. Absent in stores made before it was recorded (they used cfg when > 1)."""
    cfg_branch: CfgBranch
    """Which classifier-free-guidance branch is stored: cond, uncond or both."""
    conditioning: Literal["class", "prompt", "none"]
    prompts: list[str] | None = None
    """The prompts, indexed by the prompt_index array, for text-conditional models."""
    sites: list[Site]
    layers: list[int]
    num_layers: int
    """Blocks in the transformer."""
    double_stream_blocks: int | None = Field(default=None, exclude_if=lambda v: v is None)
    """FLUX: layers 0..double_stream_blocks-1 are double-stream blocks, the rest single-stream; absent for
    models with one kind of block."""
    d_model: int
    num_samples: int
    batch_size: int
    """Samples per forward pass, and per chunk along the sample axis."""
    steps_per_chunk: int
    tokens_per_chunk: int
    tokens: TokenSampling
    dtype: StorageDtype
    """Logical dtype of activations. bfloat16 is stored as its raw uint16 bits."""
    codec: str
    """Compression, as named on the harvest command line."""
    seeding: str = SEEDING
    harvest_config: dict[str, Any] = Field(default_factory=dict)
    """The harvest configuration that produced the store; a resume must match it."""

    @property
    def branches(self) -> list[Branch]:
        return {"cond": ["cond"], "uncond": ["uncond"], "both": ["cond", "uncond"]}[self.cfg_branch]

    def act_names(self) -> list[str]:
        return [act_name(s, layer, b) for s in self.sites for layer in self.layers for b in self.branches]

    def layout(self) -> Layout:
        return Layout(
            num_samples=self.num_samples,
            num_steps=len(self.step_indices),
            tokens=self.tokens.kept,
            d_model=self.d_model,
            batch_size=self.batch_size,
            steps_per_chunk=self.steps_per_chunk,
            tokens_per_chunk=self.tokens_per_chunk,
        )


def act_name(site: str, layer: int, branch: str = "cond") -> str:
    """Array name of one (site, layer, branch), e.g. `resid_l03` or `mlp_l11_uncond`."""
    return f"{site}_l{layer:02d}" + ("" if branch == "cond" else f"_{branch}")


# --- storage dtypes: zarr has no bfloat16, so its raw bits are stored as uint16 ----------------------


def numpy_storage_dtype(dtype: str) -> np.dtype:
    """The dtype zarr stores for a logical dtype."""
    return np.dtype({"float16": "float16", "float32": "float32", "bfloat16": "uint16"}[dtype])


def as_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as numbers: bfloat16 bits (uint16) become float32, others pass through."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


def to_stored(t: torch.Tensor) -> np.ndarray:
    """A float16, float32 or bfloat16 tensor as the numpy array zarr stores (on the CPU)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(np.uint16)
    return t.cpu().numpy()


def torch_storage_dtypes(dtype: str) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of a torch buffer that zarr's stored values are copied into, dtype to view it as)."""
    import torch

    if dtype == "bfloat16":
        return torch.int16, torch.bfloat16
    return getattr(torch, dtype), getattr(torch, dtype)


def choose_chunks(
    batch_size: int, num_steps: int, tokens: int, d_model: int, itemsize: int
) -> tuple[int, int]:
    """(steps_per_chunk, tokens_per_chunk) so that one chunk holds a few MB of whole rows.

    A chunk spans a whole batch of samples (one write's worth), so a batch's rows for one step are split
    along tokens only when they alone exceed the target.
    """
    rows = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, TARGET_CHUNK_BYTES // (d_model * itemsize)))
    if batch_size * tokens >= rows:
        tokens_per_chunk = max(1, math.ceil(rows / batch_size))
        # Keep chunks equal along tokens so that every write covers whole chunks.
        while tokens % tokens_per_chunk and tokens_per_chunk < tokens:
            tokens_per_chunk += 1
        return 1, min(tokens_per_chunk, tokens)
    steps_per_chunk = min(num_steps, max(1, math.ceil(rows / (batch_size * tokens))))
    # No partial edge chunk where a divisor of num_steps is at least half the target: zarr stores an edge
    # chunk at full size, and a reader decodes all of it to keep part (50 steps in chunks of 13 would make a
    # quarter of the chunks partial; chunks of 10 tile them exactly). Otherwise even the step chunks out.
    divisors = [n for n in range(math.ceil(steps_per_chunk / 2), steps_per_chunk + 1) if num_steps % n == 0]
    if divisors:
        return divisors[-1], tokens
    return math.ceil(num_steps / math.ceil(num_steps / steps_per_chunk)), tokens


def chunk_size_bounds(raw_bytes: int, codec: str, checksummed: bool) -> tuple[int, int]:
    """(smallest, largest) plausible size in bytes of a chunk file that holds `raw_bytes` of values.

    A file outside these bounds is truncated or not a chunk. Inside them it may still be damaged: only
    decoding it (and its checksum) tells.
    """
    trailer = CHECKSUM_BYTES if checksummed else 0
    if codec == "none":
        return raw_bytes + trailer, raw_bytes + trailer
    return trailer + 1, raw_bytes + raw_bytes // 128 + _COMPRESSED_OVERHEAD_BYTES + trailer


def chunks_touched(
    selection: tuple[slice, ...], shape: tuple[int, ...], chunks: tuple[int, ...]
) -> list[tuple[int, ...]]:
    """Coordinates of every chunk of a regular chunk grid that a basic selection touches (C order)."""
    ranges = []
    for s, n, c in zip(selection, shape, chunks, strict=True):
        start, stop, _ = s.indices(n)
        ranges.append(range(start // c, (stop - 1) // c + 1) if stop > start else range(0))
    return [tuple(x) for x in itertools.product(*ranges)]


def chunk_region(
    coords: tuple[int, ...], shape: tuple[int, ...], chunks: tuple[int, ...]
) -> tuple[slice, ...]:
    """The part of an array that the chunk at `coords` holds (cut at the array's edge)."""
    return tuple(slice(i * c, min((i + 1) * c, n)) for i, n, c in zip(coords, shape, chunks, strict=True))


def kept_tokens(num_tokens: int, fraction: float) -> int:
    """T for a token fraction: at least one token, rounded to nearest."""
    return max(1, min(num_tokens, round(num_tokens * fraction)))


def token_subset(seed: int, step_index: int, num_tokens: int, kept: int) -> np.ndarray:
    """The kept token positions of one (sample, step), sorted; see SEEDING."""
    if kept >= num_tokens:
        return np.arange(num_tokens, dtype=np.int32)
    perm = np.random.default_rng([seed, step_index]).permutation(num_tokens)
    return np.sort(perm[:kept]).astype(np.int32)


class ChunkRead(NamedTuple):
    """One whole chunk of an activation array (optionally cut to a step range), read as rows."""

    chunk: tuple[int, int, int]
    """(sample chunk, step chunk, token chunk), as Layout.chunks() lists them."""
    selection: tuple[slice, slice, slice, slice]
    """(samples, steps, tokens, d) of the array; rows are the C-order flattening of the first three."""
    rows: int
    """Rows in the selection: samples * steps * tokens."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(samples, steps, tokens) of the selection."""
        return tuple(s.stop - s.start for s in self.selection[:3])  # type: ignore[return-value]


def row_index(selection: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(sample, step) of every row of a selection, in the C order in which its rows are read."""
    samples, steps, tokens = selection[:3]
    b, s, t = samples.stop - samples.start, steps.stop - steps.start, tokens.stop - tokens.start
    sample = np.repeat(np.arange(samples.start, samples.stop, dtype=np.int64), s * t)
    step = np.tile(np.repeat(np.arange(steps.start, steps.stop, dtype=np.int64), t), b)
    return sample, step


@dataclass(frozen=True)
class Layout:
    """Index arithmetic between samples, steps, chunks and rows of one store."""

    num_samples: int
    num_steps: int
    tokens: int
    d_model: int
    batch_size: int
    steps_per_chunk: int
    tokens_per_chunk: int

    @property
    def act_shape(self) -> tuple[int, int, int, int]:
        return (self.num_samples, self.num_steps, self.tokens, self.d_model)

    @property
    def act_chunks(self) -> tuple[int, int, int, int]:
        return (self.batch_size, self.steps_per_chunk, self.tokens_per_chunk, self.d_model)

    @property
    def num_sample_chunks(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def num_step_chunks(self) -> int:
        return math.ceil(self.num_steps / self.steps_per_chunk)

    @property
    def num_token_chunks(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_chunk)

    def sample_chunk(self, c: int) -> slice:
        """Samples of sample chunk c (= harvest batch c)."""
        return slice(c * self.batch_size, min((c + 1) * self.batch_size, self.num_samples))

    def step_chunk(self, c: int) -> slice:
        return slice(c * self.steps_per_chunk, min((c + 1) * self.steps_per_chunk, self.num_steps))

    def token_chunk(self, c: int) -> slice:
        return slice(c * self.tokens_per_chunk, min((c + 1) * self.tokens_per_chunk, self.tokens))

    def chunk_of_sample(self, i: int) -> int:
        return i // self.batch_size

    def chunks(self, sample_chunks: list[int] | None = None) -> list[tuple[int, int, int]]:
        """All (sample chunk, step chunk, token chunk) triples, optionally for some sample chunks only."""
        scs = range(self.num_sample_chunks) if sample_chunks is None else sample_chunks
        return [
            (a, b, c) for a in scs for b in range(self.num_step_chunks) for c in range(self.num_token_chunks)
        ]

    def chunk_selection(self, chunk: tuple[int, int, int]) -> tuple[slice, slice, slice, slice]:
        a, b, c = chunk
        return (self.sample_chunk(a), self.step_chunk(b), self.token_chunk(c), slice(None))

    def chunk_rows(self, chunk: tuple[int, int, int]) -> int:
        s, t, k, _ = self.chunk_selection(chunk)
        return (s.stop - s.start) * (t.stop - t.start) * (k.stop - k.start)

    def chunk_reads(
        self, sample_chunks: list[int], step_range: tuple[int, int] | None = None
    ) -> list[ChunkRead]:
        """The chunks of `sample_chunks`, cut to stored steps [start, stop); chunks outside it are left out."""
        lo, hi = step_range if step_range is not None else (0, self.num_steps)
        reads = []
        for chunk in self.chunks(sample_chunks):
            samples, steps, tokens, d = self.chunk_selection(chunk)
            steps = slice(max(steps.start, lo), min(steps.stop, hi))
            if steps.stop > steps.start:
                rows = (
                    (samples.stop - samples.start) * (steps.stop - steps.start) * (tokens.stop - tokens.start)
                )
                reads.append(ChunkRead(chunk, (samples, steps, tokens, d), rows))
        return reads


def step_buckets(lo: int, hi: int, buckets: int) -> list[tuple[int, int]]:
    """Consecutive stored steps [lo, hi) cut into at most `buckets` near-equal groups, as (start, stop) pairs
    (eval's and features' per-timestep-bucket figures)."""
    parts = np.array_split(np.arange(lo, hi), min(buckets, hi - lo))
    return [(int(p[0]), int(p[-1]) + 1) for p in parts]

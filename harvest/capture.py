"""Where activations live in each supported transformer, and scoped hooks that capture them.

The registry is keyed by transformer class. An entry says where the blocks are, which tensor of a block's
output is the image stream, which submodules are the attention and the MLP, and how conditioning enters
the forward pass; the denoising loop knows none of this, so a new architecture (SD3/FLUX joint blocks,
whose blocks return (encoder_hidden_states, hidden_states)) is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from tide.store.schema import SITES
from torch import nn

if TYPE_CHECKING:
    from tide.harvest.backbones import Sampling


@dataclass(frozen=True)
class Conditioning:
    """Conditioning for a batch, already arranged for the forward pass (CFG rows included)."""

    class_labels: torch.Tensor | None = None
    """(B,) int64 class labels, null label in the unconditional rows."""
    prompt_embeds: torch.Tensor | None = None
    """(B, L, C) text-encoder states."""
    prompt_mask: torch.Tensor | None = None
    """(B, L) attention mask of prompt_embeds."""
    pooled_prompt_embeds: torch.Tensor | None = None
    """(B, C2) pooled text embedding (SD3, FLUX)."""
    guidance: torch.Tensor | None = None
    """(B,) float32 distilled-guidance scale fed to the model (FLUX.1-dev), not a CFG batch."""


@dataclass(frozen=True)
class Arch:
    """How one transformer class is laid out."""

    conditioning: Literal["class", "prompt"]
    blocks: Callable[[nn.Module], nn.ModuleList]
    image_stream: Callable[[Any], torch.Tensor]
    """Picks the image-token tensor (B, N, D) out of a block's output."""
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
    """Runs the transformer: (model, x (B, C, H, W), t (B,), cond) -> model output (B, C', H, W)."""
    submodules: dict[str, str] = field(default_factory=lambda: {"attn": "attn1", "mlp": "ff"})
    """Site name -> attribute of the block whose output is that site."""
    sub_stream: Callable[[Any], torch.Tensor] = lambda output: output
    """Picks the image-token tensor out of an attn/mlp submodule's output (joint attention returns a pair)."""
    single_stream_from: Callable[[nn.Module], int | None] = lambda model: None
    """Index of the first single-stream block (FLUX), whose fused attention+MLP has no attn/mlp site."""
    sampling: Sampling | None = None
    """What the pipeline does around the model (harvest/backbones.py `Sampling`); None: DiT's and PixArt's."""
    square_only: bool = False
    """The transformer can only unpatchify a square image (diffusers' DiT takes the side as sqrt(tokens))."""


def _dit_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    return model(x, timestep=t, class_labels=cond.class_labels, return_dict=False)[0]


def _pixart_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
    if model.use_additional_conditions:
        # PixArt-alpha 1024px conditions on image size; as its pipeline does, pass the pixel size.
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        added = {
            "resolution": torch.tensor([[h, w]], dtype=x.dtype, device=x.device).repeat(x.shape[0], 1),
            "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype, device=x.device).repeat(x.shape[0], 1),
        }
    return model(
        x,
        encoder_hidden_states=cond.prompt_embeds,
        encoder_attention_mask=cond.prompt_mask,
        timestep=t,
        added_cond_kwargs=added,
        return_dict=False,
    )[0]


def _tensor_output(output: Any) -> torch.Tensor:
    """diffusers' BasicTransformerBlock returns the image-token tensor itself."""
    return output


REGISTRY: dict[str, Arch] = {
    "DiTTransformer2DModel": Arch(
        conditioning="class",
        blocks=lambda m: m.transformer_blocks,
        image_stream=_tensor_output,
        forward=_dit_forward,
        square_only=True,
    ),
    "PixArtTransformer2DModel": Arch(
        conditioning="prompt",
        blocks=lambda m: m.transformer_blocks,
        image_stream=_tensor_output,
        forward=_pixart_forward,
    ),
}


def arch_for(transformer_class: str) -> Arch:
    try:
        return REGISTRY[transformer_class]
    except KeyError:
        raise ValueError(
            f"transformer class {transformer_class!r} is not supported; tide knows {', '.join(REGISTRY)}. "
            "Support for another architecture is one entry in harvest/capture.py's REGISTRY."
        ) from None


def check_sites(arch: Arch, model: nn.Module, sites: list[str], layers: list[int]) -> None:
    """Refuse attn/mlp at blocks that have no separate attention and MLP outputs (FLUX single-stream)."""
    start = arch.single_stream_from(model)
    fused = [i for i in layers if start is not None and i >= start]
    asked = [s for s in sites if s in ("attn", "mlp")]
    if fused and asked:
        raise ValueError(
            f"site(s) {asked} do not exist at layers {fused}: blocks {start}.. are FLUX single-stream blocks, "
            "whose attention and MLP are fused into one output projection; capture resid/delta there, or "
            f"choose layers below {start} (the double-stream blocks) for attn/mlp"
        )


Key = tuple[str, int]
"""(site, layer)."""


@contextmanager
def capture(
    model: nn.Module, arch: Arch, sites: list[str], layers: list[int]
) -> Iterator[dict[Key, torch.Tensor]]:
    """Hook the chosen sites of the chosen blocks; yields a dict refilled on every forward pass.

    Tensors are stored as the model produced them (B, N, D), without copies: read them before the next
    forward. Hooks are removed on exit, also on error.
    """
    blocks = arch.blocks(model)
    _check_request(arch, model, len(blocks), sites, layers)
    acts: dict[Key, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}  # a block's input, kept from its pre-hook for its delta
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for layer in layers:
            handles += _hook_block(blocks[layer], layer, arch, sites, acts, inputs)
        yield acts
    finally:
        for h in handles:
            h.remove()


def _check_request(
    arch: Arch, model: nn.Module, num_blocks: int, sites: list[str], layers: list[int]
) -> None:
    """Refuse unknown sites, layers outside the model, and sites this block kind does not have."""
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown site(s) {bad}; choose from {', '.join(SITES)}")
    out_of_range = [i for i in layers if not 0 <= i < num_blocks]
    if out_of_range:
        raise ValueError(
            f"layers {out_of_range} out of range: the model has {num_blocks} blocks (0..{num_blocks - 1})"
        )
    check_sites(arch, model, sites, layers)


def _hook_block(
    block: nn.Module,
    layer: int,
    arch: Arch,
    sites: list[str],
    acts: dict[Key, torch.Tensor],
    inputs: dict[int, torch.Tensor],
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the hooks that fill `acts` with block `layer`'s chosen sites; returns their handles."""

    def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs[layer] = args[0] if args else kwargs["hidden_states"]

    def keep_output(module: nn.Module, args: tuple, output: Any) -> None:
        out = arch.image_stream(output)
        if "resid" in sites:
            acts[("resid", layer)] = out
        if "delta" in sites:
            acts[("delta", layer)] = out - inputs.pop(layer)

    def keep_sub(site: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            acts[(site, layer)] = arch.sub_stream(output)

        return hook

    handles = []
    if "delta" in sites:
        handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))
    if "resid" in sites or "delta" in sites:
        handles.append(block.register_forward_hook(keep_output))
    for site in ("attn", "mlp"):
        if site in sites:
            handles.append(getattr(block, arch.submodules[site]).register_forward_hook(keep_sub(site)))
    return handles


def _register_backbones() -> None:
    # SD3 and FLUX live in their own module; it builds on Arch above, so it is imported last.
    from tide.harvest.backbones import joint_archs

    REGISTRY.update(joint_archs())


_register_backbones()

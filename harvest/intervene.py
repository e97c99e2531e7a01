"""Edit a site's activations while sampling: the scoped hook that splicing and steering are made of.

`intervene` hooks the sites tide captures (harvest/capture.py reads them; this module replaces them) and,
at the chosen denoising steps and CFG rows, swaps a site's value for `edit(site, layer, step_index, t,
acts_BND)`. Each site is written back where the model reads it:

    resid   block output (its image stream)       the block's output becomes the edited tensor
    delta   block output minus block input        the block's output becomes output + (edited - delta)
    attn    the attention module's output          replaced before the block gates and adds it
    mlp     the feed-forward module's output       replaced before the block gates and adds it

delta is written as output + (edited - delta) rather than input + edited so that an edit returning its
input leaves the output bit for bit as it was. A step or row an intervention does not select is not
touched at all, so an identity edit, or one outside the chosen steps, reproduces the unedited run exactly.

`sample` runs harvest's own denoising loop (harvest/sampler.py) with the hooks in place; train/loop/rerun.py
gives it the model, seeds and conditioning a harvest of the same store used (splice, steer, features).

Shape key: R model-batch rows (2B with CFG), B samples, N image tokens, D site width, S denoising steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from tide.harvest.capture import Conditioning, check_sites
from tide.harvest.model import LoadedModel
from tide.harvest.sampler import CfgRows, cfg_rows, denoise, make_generators, to_images
from tide.store.schema import SITES
from torch import Tensor, nn

Edit = Callable[[str, int, int, float, Tensor], Tensor]
"""edit(site, layer, step_index, t, acts_BND) -> acts_BND: t is the scheduler's timestep value."""
RowChoice = Literal["both", "cond", "uncond"]


@dataclass(frozen=True)
class Intervention:
    """One edit at one (site, layer)."""

    site: str
    """resid, delta, attn or mlp."""
    layer: int
    """Block index."""
    edit: Edit
    """The replacement of the selected rows' activations (same shape back)."""
    steps: frozenset[int] | None = None
    """Denoising step indices (0 = noisiest) at which it applies; None: every step."""
    rows: RowChoice = "both"
    """CFG rows it applies to: both branches, or only cond / uncond (see sampler.cfg_rows)."""


@dataclass
class _Clock:
    """Where the sampler is: set by `sample` between steps, t read from each transformer call."""

    step: int = 0
    t: float = math.nan
    layout: CfgRows = field(default_factory=lambda: cfg_rows(0, False))


def _rows(choice: RowChoice, layout: CfgRows, total: int) -> slice:
    if choice == "both":
        return slice(0, total)
    chosen = getattr(layout, choice)
    if chosen is None:
        raise ValueError(
            f"rows={choice!r} needs classifier-free guidance (guidance_scale > 1); use rows='both'"
        )
    return chosen


def _apply(iv: Intervention, clock: _Clock, x_RND: Tensor) -> Tensor:
    """x_RND with the edit applied to the chosen rows at a chosen step; x_RND itself (untouched) otherwise."""
    if iv.steps is not None and clock.step not in iv.steps:
        return x_RND
    rows = _rows(iv.rows, clock.layout, x_RND.shape[0])
    x_BND = x_RND[rows]
    new_BND = iv.edit(iv.site, iv.layer, clock.step, clock.t, x_BND)
    if new_BND is x_BND:
        return x_RND
    if new_BND.shape != x_BND.shape:
        raise ValueError(
            f"the edit at {iv.site} layer {iv.layer} returned shape {tuple(new_BND.shape)}, expected "
            f"{tuple(x_BND.shape)} (it must return activations of the shape it was given)"
        )
    if rows == slice(0, x_RND.shape[0]):
        return new_BND.to(x_RND.dtype)
    out_RND = x_RND.clone()
    out_RND[rows] = new_BND.to(x_RND.dtype)
    return out_RND


def _replace_stream(output: Any, old: Tensor, new: Tensor) -> Any:
    """The block output with its image stream `old` swapped for `new` (a tensor, or one item of a tuple)."""
    if output is old:
        return new
    if isinstance(output, tuple):
        return tuple(new if o is old else o for o in output)
    raise TypeError(f"cannot write an edited image stream back into a block output of type {type(output)}")


def _hooks(model: LoadedModel, iv: Intervention, clock: _Clock) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the hooks of one intervention; returns their handles."""
    block = model.arch.blocks(model.transformer)[iv.layer]
    stream = model.arch.image_stream
    if iv.site in ("attn", "mlp"):

        def sub_hook(module: nn.Module, args: tuple, output: Any) -> Any:
            img = model.arch.sub_stream(output)  # joint attention returns (image, text): edit the image part
            new = _apply(iv, clock, img)
            return None if new is img else _replace_stream(output, img, new)

        return [getattr(block, model.arch.submodules[iv.site]).register_forward_hook(sub_hook)]
    if iv.site == "resid":

        def resid_hook(module: nn.Module, args: tuple, output: Any) -> Any:
            img = stream(output)
            new = _apply(iv, clock, img)
            return None if new is img else _replace_stream(output, img, new)

        return [block.register_forward_hook(resid_hook)]
    inputs: list[Tensor] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append(args[0] if args else kwargs["hidden_states"])

    def delta_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        img = stream(output)
        delta = img - inputs.pop()
        new = _apply(iv, clock, delta)
        return None if new is delta else _replace_stream(output, img, img + (new - delta))

    return [
        block.register_forward_pre_hook(pre_hook, with_kwargs=True),
        block.register_forward_hook(delta_hook),
    ]


def _check(model: LoadedModel, iv: Intervention, num_steps: int) -> None:
    if iv.site not in SITES:
        raise ValueError(f"unknown site {iv.site!r}; choose from {', '.join(SITES)}")
    if not 0 <= iv.layer < model.num_layers:
        raise ValueError(
            f"layer {iv.layer} out of range: the model has {model.num_layers} blocks (0..{model.num_layers - 1})"
        )
    check_sites(model.arch, model.transformer, [iv.site], [iv.layer])  # e.g. no attn in FLUX single blocks
    bad = sorted(s for s in iv.steps or () if not 0 <= s < num_steps)
    if bad:
        raise ValueError(f"steps {bad} out of range: the run has {num_steps} steps (0..{num_steps - 1})")


@contextmanager
def intervene(
    model: LoadedModel, interventions: Sequence[Intervention], batch: int, use_cfg: bool, num_steps: int
) -> Iterator[_Clock]:
    """Hook `interventions` into the model for a batch of `batch` samples; yields the clock whose `step` the
    sampling loop must advance. Every hook is removed on exit, also on error."""
    for iv in interventions:
        _check(model, iv, num_steps)
    clock = _Clock(layout=cfg_rows(batch, use_cfg))

    def read_t(module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep")
        clock.t = float(t.flatten()[0]) if isinstance(t, Tensor) else float(t)

    handles = [model.transformer.register_forward_pre_hook(read_t, with_kwargs=True)]
    try:
        for iv in interventions:
            handles += _hooks(model, iv, clock)
        yield clock
    finally:
        for h in handles:
            h.remove()


class Sampled(NamedTuple):
    """What a sampling run leaves."""

    latents: Tensor
    """(B, C, H, W) final latents."""
    images: Tensor
    """(B, H, W, C) uint8 images (VAE-decoded when the pipeline has a VAE)."""
    outputs: Tensor | None
    """(S, B, C, H, W) float32 guided model output (eps / velocity) of every step, on the CPU; None unless
    record_outputs."""


def _recorder(model: LoadedModel, layout: CfgRows, guidance_scale: float, into: list[Tensor]):
    channels = model.latent_shape[0]

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        out = (output[0] if isinstance(output, tuple) else output.sample).float()[:, :channels]
        if layout.uncond is not None:  # the same guidance the sampler applies
            out = out[layout.uncond] + guidance_scale * (out[layout.cond] - out[layout.uncond])
        into.append(out.cpu())

    return model.transformer.register_forward_hook(hook)


def sample(
    model: LoadedModel,
    cond: Conditioning,
    seeds: Sequence[int],
    num_steps: int,
    guidance_scale: float,
    interventions: Sequence[Intervention] = (),
    uncond: Conditioning | None = None,
    record_outputs: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> Sampled:
    """Sample one batch with harvest's loop and seeding, `interventions` applied; `on_step(B)` after each
    denoising step of the batch's B samples (a progress bar counting image-steps)."""
    use_cfg = model.guidance_kind(guidance_scale) == "cfg"
    outputs: list[Tensor] = []
    with intervene(model, interventions, len(seeds), use_cfg, num_steps) as clock:
        rec_handle = _recorder(model, clock.layout, guidance_scale, outputs) if record_outputs else None
        try:
            latents = None
            for rec in denoise(model, cond, make_generators(list(seeds)), num_steps, guidance_scale, uncond):
                latents = rec.latents
                clock.step = rec.index + 1  # the next forward pass belongs to the next step
                if on_step is not None:
                    on_step(len(seeds))
        finally:
            if rec_handle is not None:
                rec_handle.remove()
    return Sampled(latents, to_images(model, latents), torch.stack(outputs) if record_outputs else None)


def digits_classifier(model: LoadedModel) -> Callable[[np.ndarray], np.ndarray] | None:
    """For a digits model (10 classes, 1 channel, the demo's kind): images (B, H, W, 1) uint8 -> the class the
    demo's real-digits classifier (harvest/demo_model.py) sees; None for any other model."""
    from tide.harvest.demo_model import DIGITS_MAX, DIGITS_SIZE, NUM_CLASSES, fit_classifier, to_digits_BF

    c, h, w = model.latent_shape
    if model.num_classes != NUM_CLASSES or c != 1 or model.vae is not None or h % DIGITS_SIZE:
        return None
    clf, _ = fit_classifier()

    def predict(images_BHWC: np.ndarray) -> np.ndarray:
        x_BCHW = torch.as_tensor(images_BHWC).permute(0, 3, 1, 2).float() / 127.5 - 1
        return clf.predict(to_digits_BF(x_BCHW).numpy() / DIGITS_MAX)

    return predict

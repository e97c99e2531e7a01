"""harvest/intervene.py: edits at every site of tiny DiT and PixArt pipelines, against plain references."""

from __future__ import annotations

import pytest
import torch
from tide.harvest.capture import Conditioning
from tide.harvest.config import DEMO_MODEL
from tide.harvest.intervene import Intervention, sample
from tide.harvest.model import load_model
from tide.harvest.sampler import generate, to_images

from tests.factories import harvested
from tests.test_backbones import tiny_flux, tiny_sd3  # noqa: F401  (fixtures)

SITES = ("resid", "delta", "attn", "mlp")


def _identity(site, layer, step, t, x_BND):
    return x_BND.clone()  # a new tensor of equal values: the write-back path runs


def _dit_cond():
    return Conditioning(class_labels=torch.tensor([0, 3, 1]))


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_identity_edit_is_bitwise_the_unedited_run(tiny_dit, guidance):
    model = load_model(str(tiny_dit))
    want = generate(model, _dit_cond(), [0, 1, 2], 4, guidance)
    ivs = [Intervention(site, layer, _identity) for site in SITES for layer in (0, 2)]
    got = sample(model, _dit_cond(), [0, 1, 2], 4, guidance, ivs)
    assert torch.equal(got.latents, want)
    assert torch.equal(got.images, to_images(model, want))


def test_identity_edit_pixart(tiny_pixart):
    from safetensors.torch import load_file

    model = load_model(str(tiny_pixart))
    emb = load_file(str(tiny_pixart / "embeds.safetensors"))
    cond = Conditioning(prompt_embeds=emb["prompt_embeds"][:2], prompt_mask=emb["prompt_attention_mask"][:2])
    uncond = Conditioning(
        prompt_embeds=emb["negative_prompt_embeds"].expand(2, -1, -1),
        prompt_mask=emb["negative_prompt_attention_mask"].expand(2, -1),
    )
    ivs = [Intervention(site, 1, _identity) for site in SITES]
    clean = sample(model, cond, [5, 6], 3, 3.0, uncond=uncond)
    edited = sample(model, cond, [5, 6], 3, 3.0, ivs, uncond=uncond)
    assert torch.equal(edited.latents, clean.latents)
    zero = sample(model, cond, [5, 6], 3, 3.0, [Intervention("attn", 1, lambda *a: a[-1] * 0)], uncond=uncond)
    assert not torch.equal(zero.latents, clean.latents)


def _zeroed(model, site, layer):
    """A reference for zero ablation made in the weights, not with hooks."""
    block = model.transformer.transformer_blocks[layer]
    lin = {"attn": block.attn1.to_out[0], "mlp": block.ff.net[-1]}[site]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()


@pytest.mark.parametrize("site", ["attn", "mlp"])
def test_zero_ablation_equals_zeroed_weights(tiny_dit, site):
    zero = [Intervention(site, 1, lambda *a: torch.zeros_like(a[-1]))]
    got = sample(load_model(str(tiny_dit)), _dit_cond(), [0, 1, 2], 4, 2.0, zero).latents
    ref = load_model(str(tiny_dit))
    _zeroed(ref, site, 1)
    want = generate(ref, _dit_cond(), [0, 1, 2], 4, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, generate(load_model(str(tiny_dit)), _dit_cond(), [0, 1, 2], 4, 2.0))


def test_delta_zero_is_a_skipped_block_and_resid_edit_feeds_the_next(tiny_dit):
    ref = load_model(str(tiny_dit))
    ref.transformer.transformer_blocks[1].forward = lambda hidden_states, *a, **k: hidden_states
    want = generate(ref, _dit_cond(), [0, 1, 2], 4, 2.0)
    model = load_model(str(tiny_dit))
    got = sample(model, _dit_cond(), [0, 1, 2], 4, 2.0, [Intervention("delta", 1, lambda *a: a[-1] * 0)])
    torch.testing.assert_close(got.latents, want, rtol=1e-5, atol=1e-5)
    # resid_1 := resid_0 is the same skip, written at the other site
    seen = {}
    model.transformer.transformer_blocks[0].register_forward_hook(lambda m, a, o: seen.update(r0=o))
    got = sample(model, _dit_cond(), [0, 1, 2], 4, 2.0, [Intervention("resid", 1, lambda *a: seen["r0"])])
    torch.testing.assert_close(got.latents, want, rtol=1e-5, atol=1e-5)


def test_steps_and_rows_select_what_is_edited(tiny_dit):
    model = load_model(str(tiny_dit))
    calls = []

    def spy(site, layer, step, t, x_BND):
        calls.append((step, t, x_BND.shape[0]))
        return x_BND + 1

    out = sample(
        model, _dit_cond(), [0, 1, 2], 5, 2.0, [Intervention("mlp", 0, spy, frozenset({1, 3}), "cond")],
        record_outputs=True,
    )  # fmt: skip
    model.set_schedule(5)
    ts = model.scheduler.timesteps.tolist()
    assert calls == [(1, ts[1], 3), (3, ts[3], 3)]
    clean = sample(model, _dit_cond(), [0, 1, 2], 5, 2.0, record_outputs=True)
    assert torch.equal(out.outputs[:1], clean.outputs[:1])  # nothing before the first edited step
    assert not torch.equal(out.outputs[1], clean.outputs[1])
    with pytest.raises(ValueError, match=r"steps \[7\] out of range: the run has 5 steps"):
        sample(model, _dit_cond(), [0], 5, 2.0, [Intervention("mlp", 0, spy, frozenset({7}))])
    with pytest.raises(ValueError, match="layer 3 out of range"):
        sample(model, _dit_cond(), [0], 5, 2.0, [Intervention("mlp", 3, spy)])


def test_demo_model_identity_and_recorded_outputs():
    model = load_model(str(DEMO_MODEL))
    cond = Conditioning(class_labels=torch.tensor([7, 2]))
    want = generate(model, cond, [0, 1], 6, 2.0)
    got = sample(model, cond, [0, 1], 6, 2.0, [Intervention("resid", 3, _identity)], record_outputs=True)
    assert torch.equal(got.latents, want)
    assert got.outputs.shape == (6, 2, 1, 16, 16)


@pytest.mark.parametrize("backbone, layer", [("sd3", 0), ("flux", 0), ("flux", 3)])
def test_identity_edit_on_joint_blocks(backbone, layer, tmp_path, request):
    """SD3/FLUX joint blocks return (text, image) and joint attention (image, text): only the image is edited."""
    from tide.store.reader import open_store
    from tide.train.loop.rerun import rerun

    folder = request.getfixturevalue(f"tiny_{backbone}")
    out = harvested(
        folder, tmp_path / "s.zarr", num_samples=2, num_steps=2, layers=str(layer), token_fraction=1.0,
        dtype="float32", prompts=folder / "prompts.txt", prompt_embeds=folder / "embeds.safetensors",
        height=16, width=16,
    )  # fmt: skip
    planned = rerun(open_store(out).meta, 2)
    clean = planned.sample(slice(0, 2))
    single = backbone == "flux" and layer >= len(planned.model.transformer.transformer_blocks)
    sites = ("resid", "delta") if single else SITES
    same = planned.sample(slice(0, 2), [Intervention(s, layer, _identity) for s in sites])
    assert torch.equal(same.latents, clean.latents)
    zero = planned.sample(slice(0, 2), [Intervention(sites[-1], layer, lambda *a: a[-1] * 0)])
    assert not torch.equal(zero.latents, clean.latents)

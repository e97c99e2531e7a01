"""The shipped demo model: it loads as documented, it draws recognisable digits, and its training is seeded."""

from __future__ import annotations

import json

import pytest
import torch
from tide.harvest.config import DEMO_MODEL
from tide.harvest.demo_model import (
    DEFAULT_GUIDANCE_SCALE,
    NULL_LABEL,
    NUM_CLASSES,
    DemoTrainConfig,
    evaluate,
    fit_classifier,
    generate,
    load_digits_BCHW,
    to_digits_BF,
    train,
)

# An untrained model scores about 1 / NUM_CLASSES; the shipped one scores > 0.9 with 500 samples at 50 steps.
# The fast check below uses 100 samples at fewer steps, so it gets some slack, but no untrained model passes it.
FAST_PER_CLASS, FAST_STEPS, FAST_MIN_ACCURACY = 10, 20, 0.7
MAX_FOLDER_BYTES = 8 * 2**20  # "a few MB": it ships inside the package


def test_shipped_folder_loads_with_plain_from_pretrained():
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    transformer = DiTTransformer2DModel.from_pretrained(DEMO_MODEL, subfolder="transformer")
    scheduler = DDPMScheduler.from_pretrained(DEMO_MODEL, subfolder="scheduler")
    cfg = transformer.config
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size, cfg.patch_size) == (1, 1, 16, 2)
    assert (cfg.num_embeds_ada_norm, cfg.norm_type, cfg.num_layers) == (NUM_CLASSES, "ada_norm_zero", 6)
    assert transformer.dtype == torch.float32  # stored fp16, loaded fp32 without asking
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.timestep_spacing == "trailing"

    index = json.loads((DEMO_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["id2label"] == {str(c): str(c) for c in range(NUM_CLASSES)}
    assert index["tide_default_guidance_scale"] == DEFAULT_GUIDANCE_SCALE
    assert (DEMO_MODEL / "README.md").is_file()
    size = sum(p.stat().st_size for p in DEMO_MODEL.rglob("*") if p.is_file())
    assert size <= MAX_FOLDER_BYTES, f"the shipped folder is {size / 2**20:.1f} MB"


def test_shipped_folder_loads_in_the_harvester():
    from tide.harvest.model import load_model

    model = load_model(str(DEMO_MODEL))
    assert (model.num_classes, model.num_layers, model.num_tokens, model.d_model) == (NUM_CLASSES, 6, 64, 128)
    assert model.default_guidance_scale == DEFAULT_GUIDANCE_SCALE


@torch.no_grad()
def _reference_sample(transformer, scheduler, labels, seeds, num_steps, guidance_scale):
    """Classifier-free guidance written out plainly: rows [cond; uncond], eps = u + g * (c - u)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, 1, 16, 16), generator=g) for g in gens]) * scheduler.init_noise_sigma
    y = torch.tensor(labels)
    y2 = torch.cat([y, torch.full_like(y, NULL_LABEL)])
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        x2 = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = transformer(x2, timestep=t.expand(len(x2)), class_labels=y2, return_dict=False)[0]
        cond, uncond = out.chunk(2)
        eps = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(eps, t, x, generator=gens, return_dict=False)[0]
    return x.clamp(-1, 1)


def test_demo_sampling_matches_a_plain_cfg_loop():
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    transformer = DiTTransformer2DModel.from_pretrained(DEMO_MODEL, subfolder="transformer").eval()
    scheduler = DDPMScheduler.from_pretrained(DEMO_MODEL, subfolder="scheduler")
    x_BCHW, labels = generate(DEMO_MODEL, per_class=1, num_steps=4, guidance_scale=3.0, seed=7)
    ref_BCHW = _reference_sample(transformer, scheduler, labels, [7 + i for i in range(len(labels))], 4, 3.0)
    torch.testing.assert_close(x_BCHW, ref_BCHW, atol=1e-4, rtol=1e-4)


def test_real_digits_survive_the_round_trip_through_16x16():
    """The classifier reads generated samples through to_digits_BF; real digits taken the same way stay legible."""
    clf, heldout = fit_classifier()
    assert heldout > 0.9
    x_BCHW, y_B = load_digits_BCHW(16)
    assert clf.score(to_digits_BF(x_BCHW).numpy() / 16, y_B.numpy()) > 0.9


def test_shipped_model_draws_recognisable_digits():
    quality = evaluate(DEMO_MODEL, per_class=FAST_PER_CLASS, num_steps=FAST_STEPS)
    assert quality.num_samples == FAST_PER_CLASS * NUM_CLASSES
    assert quality.demo_accuracy >= FAST_MIN_ACCURACY, quality


def test_training_is_seeded():
    tiny = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8)
    cfg = DemoTrainConfig(steps=2, batch_size=8, warmup_steps=1, **tiny)
    first, second = train(cfg, progress=False), train(cfg, progress=False)
    assert first.losses == second.losses
    other = train(cfg.model_copy(update={"seed": 1}), progress=False)
    assert other.losses != first.losses


@pytest.mark.parametrize("label_block", [1, 2, None])
def test_label_block_is_the_only_label_table_trained(label_block):
    tiny = dict(num_layers=3, num_attention_heads=2, attention_head_dim=8)
    cfg = DemoTrainConfig(steps=3, batch_size=8, warmup_steps=1, label_block=label_block, **tiny)
    blocks = train(cfg, progress=False).transformer.transformer_blocks
    tables = [b.norm1.emb.class_embedder.embedding_table.weight for b in blocks]
    assert [bool(t.abs().amax() > 0) for t in tables] == [label_block in (None, i) for i in range(3)]


def test_a_label_block_model_reads_the_label_there_only(tmp_path):
    """Trained with label_block 1 and saved as a pipeline: a run of another class given a run's block-1 output
    at every step is that run bit for bit; given its block-0 output, it is not."""
    from tide.harvest.capture import Conditioning
    from tide.harvest.demo_model import save_pipeline
    from tide.harvest.intervene import Intervention, sample
    from tide.harvest.model import load_model

    tiny = dict(num_layers=3, num_attention_heads=2, attention_head_dim=8)
    save_pipeline(train(DemoTrainConfig(steps=3, batch_size=8, label_block=1, **tiny), False), tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    runs, seeds = {}, [0, 1]
    for layer in (0, 1):
        acts: dict = {}
        record = lambda site, lay, step, t, x, acts=acts: acts.setdefault(step, x.clone())  # noqa: E731
        replay = lambda site, lay, step, t, x, acts=acts: acts[step].clone()  # noqa: E731
        seven, two = (Conditioning(class_labels=torch.tensor([c, c])) for c in (7, 2))
        runs["seven"] = sample(model, seven, seeds, 4, 2.0, [Intervention("resid", layer, record)])
        runs[layer] = sample(model, two, seeds, 4, 2.0, [Intervention("resid", layer, replay)])
    assert torch.equal(runs[1].latents, runs["seven"].latents)
    assert not torch.allclose(runs[0].latents, runs["seven"].latents, atol=1e-4)


@pytest.mark.parametrize("label_block, message", [(3, "must be below num_layers 3"), (0, "output layer too")])
def test_config_refuses_a_label_block_that_is_not_one_block(label_block, message):
    with pytest.raises(ValueError, match=message):
        DemoTrainConfig(num_layers=3, label_block=label_block)


def test_config_refuses_sizes_the_classifier_cannot_read():
    with pytest.raises(ValueError, match="multiple of the digits' size"):
        DemoTrainConfig(image_size=12)


def test_cli_refuses_to_overwrite(tmp_path):
    import shutil

    from tide.cli import app
    from tide.harvest.config import DEMO_MODEL
    from typer.testing import CliRunner

    shutil.copytree(DEMO_MODEL, tmp_path / "m")  # a pipeline there: refused before any training
    result = CliRunner().invoke(app, ["demo-model", "train", "--out", str(tmp_path / "m"), "--steps", "1"])
    assert result.exit_code != 0
    assert "--overwrite" in result.output

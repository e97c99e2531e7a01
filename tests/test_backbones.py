"""SD3 and FLUX.1 harvests on tiny from-config pipelines, checked against diffusers' own pipelines sampling
with the same seed and prompt embeddings while a plain forward hook records the blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tide.harvest.config import HarvestConfig
from tide.harvest.run import HarvestError, harvest
from tide.store.reader import open_store

from tests.factories import harvest_config, harvested


def _randomise_zeros(model: torch.nn.Module) -> None:
    # diffusers zero-initialises adaLN gates and output layers, which would make blocks the identity.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)


def _tiny_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        scaling_factor=1.5,
        shift_factor=0.1,
    )


def _save_pipeline(folder: Path, pipeline_class: str, transformer, scheduler, vae) -> Path:
    transformer.save_pretrained(folder / "transformer")
    scheduler.save_pretrained(folder / "scheduler")
    vae.save_pretrained(folder / "vae")
    index = {
        "_class_name": pipeline_class,
        "transformer": ["diffusers", type(transformer).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def save_tiny_sd3(folder: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=16,
    )
    _randomise_zeros(model)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return _save_pipeline(folder, "StableDiffusion3Pipeline", model, sched, _tiny_vae(4))


def save_tiny_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    _randomise_zeros(model)
    # FLUX.1's scheduler config: dynamic shifting, mu from the image sequence length.
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096
    )
    return _save_pipeline(folder, "FluxPipeline", model, sched, _tiny_vae(4))


def save_joint_embeds(folder: Path, negative: bool, num_prompts: int = 3, seq: int = 5) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(num_prompts)) + "\n")
    tensors = {
        "prompt_embeds": torch.randn(num_prompts, seq, 24, generator=g),
        "pooled_prompt_embeds": torch.randn(num_prompts, 12, generator=g),
    }
    if negative:
        tensors["negative_prompt_embeds"] = torch.randn(1, seq, 24, generator=g)
        tensors["negative_pooled_prompt_embeds"] = torch.randn(1, 12, generator=g)
    embeds = folder / "embeds.safetensors"
    save_file(tensors, str(embeds))
    return prompts, embeds


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    folder = save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))
    save_joint_embeds(folder, negative=True)
    return folder


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    folder = save_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))
    save_joint_embeds(folder, negative=False)
    return folder


def _pipeline_run(pipe_cls, folder: Path, blocks_of, layers, sample: int, **call):
    """Image-stream (input, output) of blocks `layers` at every step, recorded by plain forward hooks
    while diffusers' own pipeline samples `sample`; also the pipeline's final latents."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from safetensors.torch import load_file

    sd3 = pipe_cls.__name__ == "StableDiffusion3Pipeline"
    transformer = getattr(diffusers, "SD3Transformer2DModel" if sd3 else "FluxTransformer2DModel")
    transformer = transformer.from_pretrained(folder / "transformer").eval()
    # No text encoders: the pipelines accept precomputed embeddings.
    text = [
        f"{kind}{n}"
        for kind in ("text_encoder", "tokenizer")
        for n in (["", "_2", "_3"] if sd3 else ["", "_2"])
    ]
    pipe = pipe_cls(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
        **dict.fromkeys(text),
    )
    emb = load_file(str(folder / "embeds.safetensors"))
    p = sample % 3
    kwargs = {k: emb[k][p : p + 1] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    if sd3:
        kwargs.update({k: emb[k] for k in ("negative_prompt_embeds", "negative_pooled_prompt_embeds")})
    seen, hooks = _hook_blocks(blocks_of(transformer), layers)
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(sample), output_type="np", **call)
    for h in hooks:
        h.remove()
    return seen, out.images[0]


def _hook_blocks(blocks, layers):
    """Plain forward hooks: per layer, one dict per forward with the block's image-stream input and output
    and, where the block has them, its joint attention's image output and its feed-forward output."""
    seen, current, hooks = {layer: [] for layer in layers}, {layer: {} for layer in layers}, []
    for layer in layers:
        block, cur = blocks[layer], current[layer]
        if hasattr(block, "ff"):  # joint blocks; FLUX single-stream blocks have neither
            hooks.append(block.attn.register_forward_hook(lambda m, a, o, cur=cur: cur.update(attn=o[0])))
            hooks.append(block.ff.register_forward_hook(lambda m, a, o, cur=cur: cur.update(mlp=o)))
        hooks.append(
            block.register_forward_hook(
                lambda m, a, kw, o, layer=layer, cur=cur: seen[layer].append(
                    {**cur, "inp": kw["hidden_states"], "out": o[1]}
                ),
                with_kwargs=True,
            )
        )
    return seen, hooks


def _assert_store_matches(store, seen, sample: int, row: int, sites=("resid", "delta"), suffix=""):
    for layer, per_step in seen.items():
        assert len(per_step) == store.meta.num_inference_steps, f"the hook saw {len(per_step)} forwards"
        for step, d in enumerate(per_step):
            want = {
                "resid": d["out"],
                "delta": d["out"] - d["inp"],
                "attn": d.get("attn"),
                "mlp": d.get("mlp"),
            }
            for site in sites:
                got = store.root[f"{site}_l{layer:02d}{suffix}"][sample, step].astype(np.float32)
                # float32 stores: only the batch layout (tide's CFG rows differ from the pipeline's) may differ.
                np.testing.assert_allclose(
                    got, want[site][row].numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{site} l{layer} s{step}"
                )


def test_sd3_store_equals_pipeline_hooks(tiny_sd3, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    out = harvested(
        tiny_sd3, tmp_path / "sd3.zarr", num_samples=3, num_steps=3, sites="all", token_fraction=1.0,
        dtype="float32", prompts=tiny_sd3 / "prompts.txt", prompt_embeds=tiny_sd3 / "embeds.safetensors",
        guidance_scale=3.0, cfg_branch="both", height=16, width=24, save_images=True, device="cpu",
    )  # fmt: skip
    store = open_store(out)
    meta = store.meta
    assert meta.guidance == "cfg" and meta.tokens.num_tokens == 4 * 6 and meta.d_model == 16
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3 / "scheduler")
    sched.set_timesteps(3)
    np.testing.assert_array_equal(store.root["timesteps"][:], sched.timesteps.numpy())
    assert store.root["timesteps"][0] == 1000.0

    seen, image = _pipeline_run(
        StableDiffusion3Pipeline,
        tiny_sd3,
        lambda m: m.transformer_blocks,
        [0, 2],
        sample=2,
        num_inference_steps=3,
        guidance_scale=3.0,
        height=16,
        width=24,
    )
    # StableDiffusion3Pipeline stacks [uncond, cond]: the conditional row is row 1. Layer 2 is the last block
    # (context_pre_only), whose attention still returns the image and text outputs.
    sites = ("resid", "delta", "attn", "mlp")
    _assert_store_matches(store, seen, sample=2, row=1, sites=sites)
    _assert_store_matches(store, seen, sample=2, row=0, sites=sites, suffix="_uncond")
    got = store.root["images"][2].astype(np.int16)
    np.testing.assert_allclose(got, (image * 255).round().astype(np.int16), atol=2)


def test_flux_store_equals_pipeline_hooks(tiny_flux, tmp_path):
    from diffusers import FluxPipeline

    flux = dict(
        num_samples=2, num_steps=3, token_fraction=1.0, dtype="float32", prompts=tiny_flux / "prompts.txt",
        prompt_embeds=tiny_flux / "embeds.safetensors", guidance_scale=2.5, height=24, width=16, device="cpu",
    )  # fmt: skip
    store = open_store(
        harvested(tiny_flux, tmp_path / "flux.zarr", sites="resid,delta", layers="1,2,3", **flux)
    )
    meta = store.meta
    assert meta.guidance == "distilled" and meta.double_stream_blocks == 2 and meta.num_layers == 4
    assert meta.tokens.num_tokens == 6 * 4
    seen, _ = _pipeline_run(
        FluxPipeline,
        tiny_flux,
        lambda m: [*m.transformer_blocks, *m.single_transformer_blocks],
        [1, 2, 3],  # the last double-stream block and both single-stream ones
        sample=1,
        num_inference_steps=3,
        guidance_scale=2.5,
        height=24,
        width=16,
    )
    _assert_store_matches(store, seen, sample=1, row=0)
    # attn/mlp exist in the double-stream blocks only (single-stream ones are refused, see below).
    f2 = harvested(tiny_flux, tmp_path / "f2.zarr", sites="attn,mlp", layers="1", **flux)
    _assert_store_matches(open_store(f2), {1: seen[1]}, sample=1, row=0, sites=("attn", "mlp"))


def test_refusals_name_the_fix(tiny_flux, tiny_sd3, tmp_path):
    base = dict(num_samples=1, num_steps=2, height=16, width=16, device="cpu")
    flux = dict(prompts=tiny_flux / "prompts.txt", prompt_embeds=tiny_flux / "embeds.safetensors", **base)
    with pytest.raises(HarvestError, match="single-stream blocks"):
        harvested(tiny_flux, tmp_path / "a.zarr", sites="attn", layers="1,2", **flux)
    with pytest.raises(HarvestError, match="--cfg-branch cond"):
        harvested(tiny_flux, tmp_path / "b.zarr", guidance_scale=2, cfg_branch="both", **flux)
    with pytest.raises(HarvestError, match="multiple of 4"):
        harvested(tiny_flux, tmp_path / "c.zarr", **{**flux, "height": 18})
    schnell = save_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    # schnell's default is no guidance at all, and the store says so.
    meta = open_store(harvested(schnell, tmp_path / "s.zarr", **flux)).meta
    assert (meta.guidance, meta.guidance_scale) == ("none", 1.0)
    with pytest.raises(HarvestError, match="takes no guidance"):
        harvested(schnell, tmp_path / "d.zarr", guidance_scale=3.0, **flux)
    sd3 = dict(prompts=tiny_sd3 / "prompts.txt", guidance_scale=2.0, **base)
    with pytest.raises(HarvestError, match="has no text_encoder/ for SD3Transformer2DModel"):
        harvested(tiny_sd3, tmp_path / "e.zarr", **sd3)
    # FLUX's file has no negative embeddings: SD3 with CFG needs them, and says which.
    with pytest.raises(HarvestError, match="negative_pooled_prompt_embeds"):
        harvested(tiny_sd3, tmp_path / "f.zarr", prompt_embeds=flux["prompt_embeds"], **sd3)


def _cli_harvest(folder: Path, out: Path, *extra: str):
    from tide.cli import app
    from typer.testing import CliRunner

    args = ["harvest", "--model", str(folder), "--out", str(out), "--num-samples", "8", "--num-steps", "3"]
    args += ["--batch-size", "4", "--token-fraction", "1", "--prompts", str(folder / "prompts.txt")]
    args += ["--prompt-embeds", str(folder / "embeds.safetensors"), "--height", "16", "--width", "16"]
    result = CliRunner().invoke(app, [*args, "--no-progress", "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return out


def _cli_train(store: Path, out: Path, layer: str):
    from tide.cli import app
    from typer.testing import CliRunner

    args = ["train", "--store", str(store), "--out", str(out), "--layers", layer, "--k", "4"]
    args += ["--expansion", "2", "--batch-size", "64", "--max-steps", "4", "--warmup-steps", "1"]
    args += ["--checkpoint-every", "2", "--device", "cpu", "--no-progress", "--no-eval"]
    return CliRunner().invoke(app, args)


def test_train_eval_and_resume_on_flow_matching_stores(tiny_sd3, tiny_flux, tmp_path, monkeypatch):
    from diffusers.models.embeddings import get_timestep_embedding
    from safetensors.torch import load_file
    from tide.cli import app
    from tide.train.fit import trainer
    from tide.train.fit.checkpoint import load_sae
    from tide.train.sae.model import timestep_embedding
    from typer.testing import CliRunner

    flux = _cli_harvest(tiny_flux, tmp_path / "flux.zarr", "--layers", "1,2")
    sd3 = _cli_harvest(tiny_sd3, tmp_path / "sd3.zarr", "--guidance-scale", "2", "--layers", "-1")
    info = CliRunner().invoke(app, ["store", "info", str(flux)])
    assert "double-stream 0..1, single-stream 2..3" in info.output and "(distilled)" in info.output
    card = (flux / "README.md").read_text()
    assert "blocks 0..1 double-stream, then single-stream" in card and "(distilled, cond branch)" in card
    t_S = torch.as_tensor(open_store(flux).timesteps)
    assert t_S[0] == 1000.0 and t_S.dtype == torch.float64
    # The SAE's modulation embeds flow-matching timesteps (floats up to 1000) as diffusers does.
    ref = get_timestep_embedding(t_S.float(), 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    torch.testing.assert_close(timestep_embedding(t_S, 256), ref)

    for store, layer in ((sd3, "2"), (flux, "2")):  # the FLUX layer is a single-stream block
        result = _cli_train(store, tmp_path / f"saes-{store.stem}", layer)
        assert result.exit_code == 0, result.output
        evaluated = CliRunner().invoke(app, ["eval", str(tmp_path / f"saes-{store.stem}"), "--buckets", "2"])
        assert evaluated.exit_code == 0, evaluated.output
        sae = load_sae(tmp_path / f"saes-{store.stem}" / f"resid_l0{layer}-tide-k4")
        assert sae.meta.sae.includes_max_timestep and sae.meta.trained_steps == 4

    # Resume: a run stopped right after its step-2 checkpoint ends with the uninterrupted run's weights.
    class Stop(Exception):
        pass

    original = trainer._maybe_checkpoint

    def stop_at_2(run, cfg):
        original(run, cfg)
        if run.step == 2:
            raise Stop

    monkeypatch.setattr(trainer, "_maybe_checkpoint", stop_at_2)
    stopped = _cli_train(flux, tmp_path / "resumed", "2")  # CliRunner keeps the exception
    assert isinstance(stopped.exception, Stop), stopped.output
    monkeypatch.setattr(trainer, "_maybe_checkpoint", original)
    resumed = _cli_train(flux, tmp_path / "resumed", "2")
    assert resumed.exit_code == 0 and "resuming at step 2" in resumed.output, resumed.output
    for name in ("resid_l02-tide-k4", "resid_l02-topk-k4"):
        a = load_file(str(tmp_path / "resumed" / name / "sae.safetensors"))
        b = load_file(str(tmp_path / "saes-flux" / name / "sae.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}/{key}")


def test_dit_xl_and_pixart_sigma_shapes_at_width_1152(tmp_path):
    """DiT-XL/2 and PixArt-Sigma at their real width (16 heads x 72) and token counts, one block deep."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DiTTransformer2DModel,
        DPMSolverMultistepScheduler,
        PixArtTransformer2DModel,
    )
    from safetensors.torch import save_file
    from tide.harvest.model import load_model
    from tide.harvest.plan import plan

    torch.manual_seed(0)
    wide = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=1)
    dit = DiTTransformer2DModel(**wide, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()
    dit.save_pretrained(tmp_path / "dit" / "transformer")
    DDPMScheduler().save_pretrained(tmp_path / "dit" / "scheduler")
    out = harvested(
        tmp_path / "dit", tmp_path / "dit.zarr", num_samples=2, num_steps=1, token_fraction=1.0,
        guidance_scale=1.0, labels="7,300", device="cpu",
    )  # fmt: skip
    store = open_store(out)
    # 256 px, DiT-XL/2: 32 x 32 latent, 2 x 2 patches -> 256 tokens of width 1152; 2 x 256 rows fit one chunk.
    assert (store.meta.d_model, store.meta.tokens.num_tokens) == (1152, 256)
    assert store.root["resid_l00"].shape == store.root["resid_l00"].chunks == (2, 1, 256, 1152)
    x = torch.cat([torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(s)) for s in range(2)])
    seen = []
    dit.transformer_blocks[0].register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        dit(x, timestep=torch.full((2,), store.timesteps[0]), class_labels=torch.tensor([7, 300]))
    want = seen[0].numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(store.root["resid_l00"][:, 0].astype(np.float32), want, rtol=2e-3, atol=2e-3)

    px = PixArtTransformer2DModel(
        **wide, sample_size=128, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
        norm_type="ada_norm_single", interpolation_scale=2, use_additional_conditions=False,
    )  # fmt: skip
    px.save_pretrained(tmp_path / "px" / "transformer")
    DPMSolverMultistepScheduler().save_pretrained(tmp_path / "px" / "scheduler")
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  ).save_pretrained(tmp_path / "px" / "vae")  # fmt: skip
    (tmp_path / "prompts.txt").write_text("a\n")
    g = torch.Generator().manual_seed(0)
    emb = {"prompt_embeds": torch.randn(1, 4, 4096, generator=g), "prompt_attention_mask": torch.ones(1, 4)}
    emb |= {"negative_" + k: v.clone() for k, v in emb.items()}
    save_file(emb, str(tmp_path / "emb.safetensors"))
    text = dict(prompts=tmp_path / "prompts.txt", prompt_embeds=tmp_path / "emb.safetensors", device="cpu")
    # PixArt-Sigma's default 1024 px: 128 x 128 latent -> 4096 tokens; a batch's 2 x 4096 rows of 1152 float16
    # exceed the ~4 MiB chunk target (2048 rows), so tokens are split into chunks of 1024.
    sigma = load_model(str(tmp_path / "px"))
    meta, _ = plan(HarvestConfig(model=str(tmp_path / "px"), batch_size=2, token_fraction=1.0, **text), sigma)
    assert (meta.d_model, meta.tokens.num_tokens, meta.tokens_per_chunk, meta.steps_per_chunk) == (
        1152,
        4096,
        1024,
        1,
    )
    out = harvested(
        tmp_path / "px", tmp_path / "px.zarr", num_samples=2, num_steps=1, height=256, width=256,
        guidance_scale=1.0, **text,
    )  # fmt: skip
    store = open_store(out)
    assert store.meta.tokens.num_tokens == 256 and store.root["resid_l00"].shape == (2, 1, 64, 1152)
    assert np.isfinite(store.root["resid_l00"][:].astype(np.float32)).all()


def _save_text_encoders(folder: Path, clips: list[tuple[str, str, int, int]], t5: str | None = None) -> None:
    """Tiny CLIP text encoders (suffix, class, hidden, projection) with hand-made BPE tokenizers, and a tiny
    T5 encoder with a Unigram tokenizer under text_encoder{t5}/, all built offline and added to the folder."""
    import transformers
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    vocab = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "p", "m", "u", "b", "a", "lo", "low</w>"]
    vocab += ["w</w>", "r</w>", "er</w>", "t</w>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    index = json.loads((folder / "model_index.json").read_text())
    for n, (suffix, cls, hidden, proj) in enumerate(clips):
        tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
        tok.save_pretrained(folder / f"tokenizer{suffix}")
        torch.manual_seed(10 + n)
        ids = dict(bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
        config = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=8, projection_dim=proj, **ids,
        )  # fmt: skip
        getattr(transformers, cls)(config).save_pretrained(folder / f"text_encoder{suffix}")
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        index[f"text_encoder{suffix}"] = ["transformers", cls]
    if t5 is not None:
        words = [("▁" + w, -1.0) for w in ("a", "blue", "sun", "lower", "tower")]
        vocab_t5 = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *words]
        T5TokenizerFast(vocab=vocab_t5, extra_ids=0).save_pretrained(folder / f"tokenizer{t5}")
        torch.manual_seed(20)
        config = T5Config(vocab_size=len(vocab_t5), d_model=24, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
        T5EncoderModel(config).save_pretrained(folder / f"text_encoder{t5}")
        index[f"tokenizer{t5}"] = ["transformers", "T5TokenizerFast"]
        index[f"text_encoder{t5}"] = ["transformers", "T5EncoderModel"]
    (folder / "model_index.json").write_text(json.dumps(index))


# The prompt harvests of the text-encoder tests: the folder's own prompts.txt, encoded by its encoders.
_TEXT_ENCODED = dict(
    num_samples=2, num_steps=2, sites="resid,delta", token_fraction=1.0, dtype="float32", guidance_scale=2.0,
    height=16, width=16, device="cpu",
)  # fmt: skip


def test_sd3_text_encoders_equal_pipeline_with_prompts(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    folder = save_tiny_sd3(tmp_path / "sd3")
    clip = "CLIPTextModelWithProjection"
    _save_text_encoders(folder, [("", clip, 8, 6), ("_2", clip, 8, 6)])
    (folder / "prompts.txt").write_text("lower tower\na blue sun\n")
    store = open_store(
        harvested(folder, tmp_path / "s.zarr", layers="1", prompts=folder / "prompts.txt", **_TEXT_ENCODED)
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    seen, _ = _hook_blocks(pipe.transformer.transformer_blocks, [1])
    gen = torch.Generator().manual_seed(1)
    pipe("a blue sun", num_inference_steps=2, guidance_scale=2.0, height=16, width=16, generator=gen)
    _assert_store_matches(store, seen, sample=1, row=1)


def test_flux_text_encoders_equal_pipeline_with_prompts(tmp_path):
    from diffusers import FluxPipeline

    folder = save_tiny_flux(tmp_path / "flux")
    _save_text_encoders(folder, [("", "CLIPTextModel", 12, 12)], t5="_2")
    (folder / "prompts.txt").write_text("lower tower\na blue sun\n")
    store = open_store(
        harvested(folder, tmp_path / "f.zarr", layers="2", prompts=folder / "prompts.txt", **_TEXT_ENCODED)
    )
    pipe = FluxPipeline.from_pretrained(folder)
    seen, _ = _hook_blocks(
        [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks], [2]
    )
    gen = torch.Generator().manual_seed(1)
    pipe("a blue sun", num_inference_steps=2, guidance_scale=2.0, height=16, width=16, generator=gen)
    _assert_store_matches(store, seen, sample=1, row=0)


def test_flux_harvest_resumes_to_the_uninterrupted_bytes(tiny_flux, tmp_path, monkeypatch):
    import tide.harvest.run as run

    flux = dict(
        num_samples=4, num_steps=1, layers="1,3", prompts=tiny_flux / "prompts.txt",
        prompt_embeds=tiny_flux / "embeds.safetensors", height=16, width=16, device="cpu",
    )  # fmt: skip
    clean = harvested(tiny_flux, tmp_path / "clean.zarr", **flux)
    original = run.harvest_chunk

    def crash_on_second_chunk(c, *args, **kwargs):
        if c == 1:
            raise KeyboardInterrupt  # as if stopped mid-run, after chunk 0 was written
        return original(c, *args, **kwargs)

    monkeypatch.setattr(run, "harvest_chunk", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        harvested(tiny_flux, tmp_path / "cut.zarr", **flux)
    assert open_store(tmp_path / "cut.zarr").done().tolist() == [True, True, False, False]
    monkeypatch.setattr(run, "harvest_chunk", original)
    resumed = harvest(harvest_config(tiny_flux, tmp_path / "cut.zarr", **flux), log=lambda m: None)
    assert resumed.written == 2
    a, b = open_store(clean), open_store(resumed.out)
    for name in ("resid_l01", "resid_l03", "token_index", "timesteps"):
        np.testing.assert_array_equal(a.root[name][:], b.root[name][:], err_msg=name)

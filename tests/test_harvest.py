"""Harvest end to end on tiny DiT and PixArt pipelines, checked against plain forwards with plain hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from tide.cli import app
from tide.harvest.run import HarvestError
from tide.store.reader import open_store
from tide.store.schema import token_subset
from typer.testing import CliRunner

from tests.factories import harvested


def _reference_dit(folder, seed, label, null, num_steps, guidance, step, layer):
    """Block `layer`'s input, output, attention and MLP outputs at `step`, for one sample, with plain code."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(num_steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 1, 8, 8), generator=gen)
    block, seen = model.transformer_blocks[layer], {}
    hooks = [
        block.register_forward_hook(lambda m, a, o: seen.update(inp=a[0], resid=o)),
        block.attn1.register_forward_hook(lambda m, a, o: seen.update(attn=o)),
        block.ff.register_forward_hook(lambda m, a, o: seen.update(mlp=o)),
    ]
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            seen.clear()
            out = model(
                torch.cat([x, x]), timestep=t.expand(2), class_labels=torch.tensor([label, null])
            ).sample
            if i == step:
                break
            cond, uncond = out.chunk(2)
            x = sched.step(uncond + guidance * (cond - uncond), t, x, generator=gen).prev_sample
    for h in hooks:
        h.remove()
    seen["delta"] = seen["resid"] - seen.pop("inp")
    return seen  # each (2, N, D): row 0 cond, row 1 uncond


def test_dit_store_equals_plain_forward(tiny_dit, tmp_path):
    out = harvested(
        tiny_dit, tmp_path / "s.zarr", num_samples=5, num_steps=6, sites="all", token_fraction=0.5,
        guidance_scale=2.5, cfg_branch="both",
    )  # fmt: skip
    store = open_store(out)
    meta = store.meta
    assert meta.layers == [0, 1, 2] and meta.tokens.kept == 8 and meta.guidance_scale == 2.5
    assert store.done().all()
    np.testing.assert_array_equal(store.root["seed"][:], np.arange(5))
    np.testing.assert_array_equal(store.root["label"][:], np.arange(5) % 4)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(tiny_dit / "scheduler")
    sched.set_timesteps(6)
    np.testing.assert_array_equal(store.root["timesteps"][:], sched.timesteps.numpy())
    tok = store.root["token_index"][:]
    for i, step, layer in [(0, 0, 0), (3, 4, 2), (4, 5, 1)]:
        np.testing.assert_array_equal(tok[i, step], token_subset(i, step, 16, 8))
        ref = _reference_dit(
            tiny_dit, seed=i, label=i % 4, null=4, num_steps=6, guidance=2.5, step=step, layer=layer
        )
        for site in ("resid", "delta", "attn", "mlp"):
            for row, suffix in ((0, ""), (1, "_uncond")):
                got = store.root[f"{site}_l{layer:02d}{suffix}"][i, step].astype(np.float32)
                want = ref[site][row, tok[i, step]].numpy().astype(np.float16).astype(np.float32)
                np.testing.assert_allclose(
                    got, want, rtol=2e-3, atol=2e-3, err_msg=f"{site} l{layer} i{i} s{step}"
                )


def test_stats_match_numpy(tiny_dit, tmp_path):
    out = harvested(
        tiny_dit, tmp_path / "s.zarr", num_samples=5, num_steps=4, layers="1", token_fraction=1.0,
        guidance_scale=1.0,
    )  # fmt: skip
    store = open_store(out)
    assert "token_index" not in store.root  # all tokens kept, in order
    x = store.root["resid_l01"][:].astype(np.float64)  # (N, S, T, D)
    stats = store.stats("resid_l01")
    np.testing.assert_array_equal(stats.count, np.full(4, 5 * 16))
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 2)), rtol=1e-10)
    np.testing.assert_allclose(stats.var, x.var(axis=(0, 2)), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(stats.mean_sq_norm, (x**2).sum(-1).mean(axis=(0, 2)), rtol=1e-10)


def test_pixart_store_equals_plain_forward(tiny_pixart, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from safetensors.torch import load_file

    out = harvested(
        tiny_pixart, tmp_path / "p.zarr", num_samples=4, num_steps=3, layers="1",
        prompts=tiny_pixart / "prompts.txt", prompt_embeds=tiny_pixart / "embeds.safetensors",
        guidance_scale=3.0, token_fraction=1.0,
    )  # fmt: skip
    store = open_store(out)
    assert store.meta.conditioning == "prompt" and len(store.meta.prompts) == 3
    np.testing.assert_array_equal(store.root["prompt_index"][:], [0, 1, 2, 0])

    emb = load_file(str(tiny_pixart / "embeds.safetensors"))
    model = PixArtTransformer2DModel.from_pretrained(tiny_pixart / "transformer").eval()
    sched = DPMSolverMultistepScheduler.from_pretrained(tiny_pixart / "scheduler")
    sched.set_timesteps(3)
    i = 2
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(i))
    e = torch.cat([emb["prompt_embeds"][i : i + 1], emb["negative_prompt_embeds"]])
    m = torch.cat([emb["prompt_attention_mask"][i : i + 1], emb["negative_prompt_attention_mask"]])
    seen = []
    model.transformer_blocks[1].register_forward_hook(lambda mod, a, o: seen.append(o[0]))
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(
                torch.cat([x, x]),
                encoder_hidden_states=e,
                encoder_attention_mask=m,
                timestep=t.expand(2),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
            cond, uncond = out[:, :4].chunk(2)
            x = sched.step(uncond + 3.0 * (cond - uncond), t, x).prev_sample
    got = store.root["resid_l01"][i].astype(np.float32)
    want = torch.stack(seen).numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_bfloat16_store_keeps_bits_and_range(tiny_dit, tmp_path):
    bf16 = harvested(tiny_dit, tmp_path / "b.zarr", layers="0", dtype="bfloat16", token_fraction=1.0)
    f32 = harvested(tiny_dit, tmp_path / "f.zarr", layers="0", dtype="float32", token_fraction=1.0)
    bits = zarr.open_array(str(bf16 / "resid_l00"))
    assert bits.dtype == np.uint16 and bits.attrs["logical_dtype"] == "bfloat16"
    as_bf16 = torch.from_numpy(bits[:].view(np.int16)).view(torch.bfloat16).float().numpy()
    ref = torch.from_numpy(zarr.open_array(str(f32 / "resid_l00"))[:]).bfloat16().float().numpy()
    np.testing.assert_array_equal(as_bf16, ref)


def test_learned_sigma_and_ddim(tmp_path):
    from tests.conftest import save_tiny_dit

    folder = save_tiny_dit(tmp_path / "m", scheduler="DDIMScheduler", learned_sigma=True)
    out = harvested(
        folder, tmp_path / "s.zarr", num_samples=3, num_steps=3, batch_size=3, layers="-1", steps="::2",
        save_images=True,
    )  # fmt: skip
    store = open_store(out)
    assert store.meta.step_indices == [0, 2] and store.root["resid_l02"].shape == (3, 2, 4, 16)
    assert store.root["images"].shape == (3, 8, 8, 1) and store.root["images"][:].std() > 0


def test_xarray_reads_named_dimensions(tiny_dit, tmp_path):
    xr = pytest.importorskip("xarray")
    out = harvested(tiny_dit, tmp_path / "x.zarr", num_samples=2, num_steps=2, layers="0")
    ds = xr.open_zarr(out, consolidated=False)
    assert ds["resid_l00"].dims == ("sample", "step", "token", "d")
    assert ds["timesteps"].dims == ("step",) and ds.sizes["sample"] == 2


def test_refuses_other_config_unless_overwrite(tiny_dit, tmp_path):
    out = harvested(tiny_dit, tmp_path / "s.zarr", num_samples=2, num_steps=2, layers="0")
    with pytest.raises(HarvestError, match=r"num_steps: 2 in the store, 3 now"):
        harvested(tiny_dit, out, num_samples=2, num_steps=3, layers="0")
    harvested(tiny_dit, out, num_samples=2, num_steps=3, layers="0", overwrite=True)
    assert open_store(out).meta.num_inference_steps == 3


runner = CliRunner()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/folder"], "does not exist"),
        (["--token-fraction", "0"], "outside (0, 1]"),
        (["--token-fraction", "1.5"], "outside (0, 1]"),
        (["--layers", "0,9"], "out of range: the model has 3 blocks"),
        (["--sites", "resid,nope"], "unknown site"),
        (["--steps", "0,99", "--num-steps", "4"], "asks for step 99"),
        (["--labels", "0,7"], "out of range: the model has classes 0..3"),
        (["--cfg-branch", "both", "--guidance-scale", "1"], "needs"),
    ],
)
def test_bad_inputs_give_one_clear_error(tiny_dit, tmp_path, args, message):
    full = ["harvest", "--model", str(tiny_dit), "--out", str(tmp_path / "s.zarr"), "--no-progress", *args]
    result = runner.invoke(app, full)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bad_paths(tiny_dit, tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for args, message in [
        (["--model", str(a_file)], "is a file"),
        (["--model", str(tmp_path)], "not a supported diffusers pipeline folder"),
        (["--model", str(tiny_dit), "--out", str(a_file)], "is a file"),
    ]:
        out = [] if "--out" in args else ["--out", str(tmp_path / "s.zarr")]
        result = runner.invoke(app, ["harvest", *args, *out, "--no-progress"])
        assert result.exit_code == 2 and message in result.output, result.output


def test_pixart_text_encoder_path_equals_precomputed_embeddings(tmp_path):
    """A pipeline folder with a T5 encoder and tokenizer encodes prompts itself, as PixArt's pipeline does."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from safetensors.torch import save_file

    from tests.conftest import save_tiny_pixart

    folder = save_tiny_pixart(tmp_path / "px")
    torch.manual_seed(0)
    encoder = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=16, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, pad_token_id=0
        )
    )
    encoder.eval().save_pretrained(folder / "text_encoder")
    vocab = {"<pad>": 0, "<unk>": 1, "a": 2, "red": 3, "cat": 4, "blue": 5, "dog": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder / "tokenizer")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")

    common = dict(
        num_samples=2, num_steps=2, layers="0", guidance_scale=2.0, token_fraction=1.0, prompts=prompts
    )
    harvested(folder, tmp_path / "enc.zarr", **common)

    def encode(texts):
        t = fast(texts, padding="max_length", max_length=120, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return encoder(t.input_ids, attention_mask=t.attention_mask)[0], t.attention_mask

    e, m = encode(["a red cat", "a blue dog"])
    ne, nm = encode([""])
    save_file(
        {
            "prompt_embeds": e.contiguous(),
            "prompt_attention_mask": m,
            "negative_prompt_embeds": ne.contiguous(),
            "negative_prompt_attention_mask": nm,
        },
        str(tmp_path / "emb.safetensors"),
    )
    harvested(folder, tmp_path / "pre.zarr", prompt_embeds=tmp_path / "emb.safetensors", **common)
    a = zarr.open_array(str(tmp_path / "enc.zarr" / "resid_l00"))[:]
    b = zarr.open_array(str(tmp_path / "pre.zarr" / "resid_l00"))[:]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(np.float32)).sum() > 0


def test_refuses_when_disk_is_too_small(tiny_dit, tmp_path, monkeypatch):
    import tide.harvest.run as run

    monkeypatch.setattr(run, "free_bytes", lambda path: 1000)
    out = tmp_path / "s.zarr"
    with pytest.raises(HarvestError, match=r"needs up to [\d.]+ KiB .* but only 1000 B is free"):
        harvested(tiny_dit, out, num_samples=4, num_steps=2)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # refused before writing anything


def test_format_doc_recipe_reads_with_plain_zarr(tiny_dit, tmp_path):
    """The 'Reading without tide' recipe of store/FORMAT.md, on a real store."""
    out = harvested(tiny_dit, tmp_path / "s.zarr", num_samples=3, num_steps=2, layers="1")
    root = zarr.open_group(str(out), mode="r")
    assert dict(root.attrs)["format"] == "tide.activations" and root["done"][:].all()
    x = root["resid_l01"][:]
    mean = root["stats/resid_l01/sum"][:].sum(0) / root["stats/resid_l01/count"][:].sum(0)[:, None]
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-9)

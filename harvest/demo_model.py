"""The shipped demo model: a small class-conditional DiT trained on scikit-learn's digits, in pixel space.

tide cannot download weights, so it trains its own: `train` (seeded, CPU, minutes), `save_pipeline`
(a diffusers pipeline folder any `from_pretrained` loads), `evaluate` (a classifier trained only on real
digits labels generated ones), `render_grid` (a PNG of samples) and `train_demo`, which does all of it
and writes the model card.

Key: B batch, C channels (1: grey pixels, no VAE), H W pixels, F = 64 classifier features (8x8 digits).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tide.harvest.config import DEMO_MODEL
from tide.store.limits import SEED_MAX, LearningRate, Seed
from tide.store.outputs import check_replaceable, local_out, staged

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # diffusers' LabelEmbedding keeps its classifier-free "no class" row at num_classes
DIGITS_SIZE = 8  # load_digits images are 8x8 ...
DIGITS_MAX = 16.0  # ... with integer intensities 0..16
# Classifier-free guidance by default: the model card's sweep finds accuracy saturating here (0.995 at 200
# samples); a larger scale buys at most half a point and costs the samples' diversity.
DEFAULT_GUIDANCE_SCALE = 2.0
DEFAULT_NUM_STEPS = 50  # tide's harvester samples with 50 steps; the sampling scheduler is tuned for that


class DemoTrainConfig(BaseModel):
    """How the demo DiT is built and trained. The defaults are the shipped model."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    steps: int = Field(1000, gt=0)
    """Optimiser steps."""
    batch_size: int = Field(64, gt=0)
    """Images per step, drawn without replacement from a seeded permutation per epoch."""
    lr: LearningRate = 1e-3
    """Peak AdamW learning rate, reached after warmup_steps, then cosine-decayed to 0."""
    warmup_steps: int = Field(100, ge=0)
    """Linear learning-rate warmup (a shorter run warms up over all its steps)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    ema_decay: float = Field(0.999, ge=0, lt=1)
    """Decay of the weight average that is saved (0 saves the raw weights)."""
    class_dropout: float = Field(0.1, ge=0, lt=1)
    """Fraction of labels replaced by the null class, so that the same model is also unconditional (CFG)."""
    seed: Seed = 0
    """Seeds the initial weights, the data order, the timesteps, the noise and the label dropout."""
    image_size: int = 16
    """Digits are upsampled (bilinear) from 8x8 to this size; with patch_size 2, 16 gives 64 tokens."""
    patch_size: int = 2
    """DiT patch size."""
    num_attention_heads: int = Field(4, gt=0)
    """Attention heads; the model width is num_attention_heads * attention_head_dim."""
    attention_head_dim: int = Field(32, gt=0)
    """Width of one head."""
    num_layers: int = Field(6, gt=0)
    """Transformer blocks."""
    num_train_timesteps: int = Field(1000, gt=0)
    """Diffusion steps of the training (DDPM) schedule."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    """Noise schedule. Cosine, because the linear one destroys a 16x16 image long before the last step."""
    label_block: int | None = Field(None, ge=0)
    """None (the shipped model): every block and the output layer read the label, as in DiT-XL/2. A block
    index: only that block's adaLN reads it, every other label table is held at zero (`label_enters_once`),
    so downstream of it the class lives in the residual stream only; docs/results.md measures
    what that changes."""

    @model_validator(mode="after")
    def _check(self) -> DemoTrainConfig:
        if self.image_size % DIGITS_SIZE or self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of the digits' size {DIGITS_SIZE} (samples are "
                f"average-pooled back to 8x8 for the classifier) and of patch_size {self.patch_size}"
            )
        if self.label_block is not None and self.label_block >= self.num_layers:
            raise ValueError(
                f"label_block {self.label_block} must be below num_layers {self.num_layers} (or None: every block)"
            )
        if self.label_block == 0:
            raise ValueError(
                "label_block 0 would feed the label to the output layer too (diffusers' DiT modulates its output "
                "with block 0's embedding); pick 1 or later, or leave it unset for every block"
            )
        return self


class TrainResult(NamedTuple):
    transformer: torch.nn.Module
    """The trained model (the EMA weights when ema_decay > 0), in eval mode."""
    scheduler: object
    """The DDPMScheduler the model was trained against."""
    losses: list[float]
    """Epsilon-prediction MSE of every step."""
    wall_s: float
    """Training wall time in seconds."""


class Quality(NamedTuple):
    demo_accuracy: float
    """Fraction of generated samples the real-digits classifier labels as their class."""
    classifier_heldout_accuracy: float
    """The classifier's accuracy on real digits it was not trained on: the ceiling for demo_accuracy."""
    num_samples: int
    """Generated samples behind demo_accuracy."""

    def lines(self, samples: bool = True) -> list[str]:
        """What `tide demo-model train` and `eval` print (eval adds the number of samples)."""
        out = [f"demo_accuracy: {self.demo_accuracy:.4f}"]
        out.append(f"classifier_heldout_accuracy: {self.classifier_heldout_accuracy:.4f}")
        return out + ([f"num_samples: {self.num_samples}"] if samples else [])


def load_digits_BCHW(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (B, 1, image_size, image_size) floats in [-1, 1], and their (B,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_BCHW = torch.tensor(digits.images, dtype=torch.float32)[:, None] / DIGITS_MAX * 2 - 1  # (B, 1, 8, 8)
    x_BCHW = F.interpolate(x_BCHW, size=image_size, mode="bilinear", align_corners=False)
    return x_BCHW, torch.tensor(digits.target, dtype=torch.long)


def build(cfg: DemoTrainConfig):
    """An untrained transformer and the DDPM training scheduler for `cfg`."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=1, out_channels=1, num_layers=cfg.num_layers, sample_size=cfg.image_size,
        patch_size=cfg.patch_size, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
    )  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    return transformer, scheduler


def label_enters_once(transformer, block: int) -> None:
    """Zero and freeze the label table of every block but `block`, in place.

    Each block of diffusers' DiT owns a label embedding added to its timestep embedding, and the output
    layer's shift and scale come from block 0's. With those tables at zero the label changes the modulation
    of `block` only, and everything downstream learns the class from the residual stream: an edit of a later
    block's residual (a steering direction, a patched activation) is then not overruled by the label."""
    for i, b in enumerate(transformer.transformer_blocks):
        if i != block:
            table = b.norm1.emb.class_embedder.embedding_table.weight
            with torch.no_grad():
                table.zero_()
            table.requires_grad_(False)


def train(cfg: DemoTrainConfig, progress: bool = True) -> TrainResult:
    """Epsilon-prediction training on the digits; the same cfg gives the same weights on the same machine."""
    from diffusers.models.embeddings import LabelEmbedding
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    transformer, scheduler = build(cfg)
    # Every block of diffusers' DiT owns a label embedding that drops labels independently in train mode,
    # so a sample would be unconditional in some blocks only; labels are dropped once, below, instead.
    for m in transformer.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    if cfg.label_block is not None:
        label_enters_once(transformer, cfg.label_block)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    x_BCHW, y_B = load_digits_BCHW(cfg.image_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(min(cfg.warmup_steps, cfg.steps), 1)
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))  # noqa: E731
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order, pos, losses, start = torch.randperm(len(x_BCHW), generator=gen), 0, [], time.perf_counter()
    transformer.train()
    bar = tqdm(range(cfg.steps), desc="demo DiT", disable=not progress)
    for step in bar:
        if pos + cfg.batch_size > len(order):  # a new epoch: reshuffle, drop the ragged tail
            order, pos = torch.randperm(len(x_BCHW), generator=gen), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        x0_BCHW, y = x_BCHW[idx], y_B[idx]
        t_B = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=gen)
        noise_BCHW = torch.randn(x0_BCHW.shape, generator=gen)
        y = torch.where(torch.rand(len(idx), generator=gen) < cfg.class_dropout, NULL_LABEL, y)
        xt_BCHW = scheduler.add_noise(x0_BCHW, noise_BCHW, t_B)
        eps_BCHW = transformer(xt_BCHW, timestep=t_B, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(eps_BCHW, noise_BCHW)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched_lr.step()
        # Warm the EMA up (decay (1+s)/(10+s)) so that early steps are not averaged with the random init.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(ema.parameters()), list(transformer.parameters()), 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    wall_s = time.perf_counter() - start
    return TrainResult((ema if cfg.ema_decay > 0 else transformer).eval(), scheduler, losses, wall_s)


def sampling_scheduler(train_scheduler):
    """Ancestral DDPM on the training betas, 50 trailing-spaced steps: the first one starts from pure noise.

    Stochastic on purpose: on this small model DDIM (eta 0) and DPM-Solver++ score 0.90-0.92 demo accuracy
    at 50 steps, with blotchy samples, while the fresh noise of each DDPM step washes the model's errors out
    (0.99); that noise is drawn from each sample's own generator, so the seeds still decide everything.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(train_scheduler.config, timestep_spacing="trailing")


def to_digits_BF(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] back to the digits' format: 8x8 by average pooling, 0..16, flattened to (B, 64)."""
    pooled = F.adaptive_avg_pool2d(x_BCHW[:, :1].float(), DIGITS_SIZE)  # (B, 1, 8, 8)
    return ((pooled + 1) / 2 * DIGITS_MAX).flatten(1)


def fit_classifier(seed: int = 0):
    """A logistic regression on 75% of the real digits, and its accuracy on the other 25%."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data, digits.target, test_size=0.25, stratify=digits.target, random_state=seed
    )
    clf = LogisticRegression(max_iter=5000).fit(x_tr / DIGITS_MAX, y_tr)
    return clf, float(clf.score(x_te / DIGITS_MAX, y_te))


def generate(folder: Path | str, per_class: int, num_steps: int, guidance_scale: float | None, seed: int = 0,
             batch: int = 250) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """(per_class * 10, C, H, W) samples in [-1, 1], class-major (all 0s, then all 1s, ...), and their labels.

    Sampled by tide's own harvest loop (harvest.sampler), so the figures describe what a harvest sees;
    sample i is seeded seed + i, as in a harvest.
    """
    from tide.harvest.capture import Conditioning
    from tide.harvest.model import load_model
    from tide.harvest.sampler import generate as sample

    if not 0 <= seed <= SEED_MAX:
        raise ValueError(
            f"--seed {seed} is not a seed: a seed is a whole number from 0 to {SEED_MAX}; use e.g. 0"
        )
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 1):
        raise ValueError(
            f"--guidance-scale {guidance_scale} is not a CFG scale: a finite number >= 1 (1: no guidance); use e.g. 2"
        )
    model = load_model(str(folder))
    g = model.default_guidance_scale if guidance_scale is None else guidance_scale
    labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    seeds = [seed + i for i in range(len(labels))]
    chunks = []
    for i in range(0, len(labels), batch):
        cond = Conditioning(class_labels=torch.tensor(labels[i : i + batch]))
        chunks.append(sample(model, cond, seeds[i : i + batch], num_steps, g))
    return torch.cat(chunks).clamp(-1, 1), labels


def evaluate(folder: Path | str = DEMO_MODEL, per_class: int = 50, num_steps: int = DEFAULT_NUM_STEPS,
             guidance_scale: float | None = None, seed: int = 0) -> Quality:  # fmt: skip
    """Generate per_class samples of every digit and score them with the real-digits classifier."""
    x_BCHW, labels = generate(folder, per_class, num_steps, guidance_scale, seed)
    clf, heldout = fit_classifier(seed)
    pred = clf.predict(to_digits_BF(x_BCHW).numpy() / DIGITS_MAX)
    return Quality(float((pred == labels).mean()), heldout, len(labels))


def render_grid(folder: Path | str = DEMO_MODEL, out: Path | str = "docs/digits_grid.png", per_row: int = 8,
                scale: int = 4, seed: int = 0) -> Path:  # fmt: skip
    """A PNG with one row per class (per_row samples each), every pixel drawn as scale x scale."""
    from PIL import Image

    x_BCHW, _ = generate(folder, per_row, DEFAULT_NUM_STEPS, None, seed)
    pad, size = scale, x_BCHW.shape[-1] * scale
    cells = ((x_BCHW[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()  # (B, H, W)
    grid = Image.new("L", (per_row * (size + pad) + pad, NUM_CLASSES * (size + pad) + pad), color=255)
    for i, cell in enumerate(cells):
        row, col = divmod(i, per_row)
        img = Image.fromarray(255 - cell).resize((size, size), Image.NEAREST)  # dark ink on white, as printed
        grid.paste(img, (pad + col * (size + pad), pad + row * (size + pad)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def save_pipeline(result: TrainResult, folder: Path, guidance_scale: float = DEFAULT_GUIDANCE_SCALE) -> None:
    """A diffusers pipeline folder: model_index.json, transformer/ (fp16 safetensors), scheduler/."""
    import diffusers

    # fp16 halves the folder; from_pretrained still loads fp32 by default, and the card's figures are
    # measured on the saved weights, so the rounding is accounted for.
    copy.deepcopy(result.transformer).half().save_pretrained(folder / "transformer")
    sampler = sampling_scheduler(result.scheduler)
    sampler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "DiTPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", type(result.transformer).__name__],
        "scheduler": ["diffusers", type(sampler).__name__],
        "id2label": {str(c): str(c) for c in range(NUM_CLASSES)},
        "tide_default_guidance_scale": guidance_scale,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def train_demo(cfg: DemoTrainConfig, out: Path = DEMO_MODEL, overwrite: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> Quality:  # fmt: skip
    """Train, save to `out`, measure quality and write the model card. `out` is checked first (an earlier
    pipeline is replaced only with `overwrite`, and only its own files: store/outputs.py) and replaced only
    once all succeeded."""
    out = local_out(out, "demo-model train")
    check_replaceable(out, "demo-model", overwrite)  # before the ~10 minutes of training
    result = train(cfg, progress)
    final_loss = sum(result.losses[-100:]) / len(result.losses[-100:])
    log(f"trained {cfg.steps} steps in {result.wall_s / 60:.1f} min, final loss {final_loss:.4f}")
    with staged(out, "demo-model", overwrite) as new:
        save_pipeline(result, new)
        quality = evaluate(new)
        log(
            f"demo_accuracy {quality.demo_accuracy:.3f}, classifier held-out "
            f"{quality.classifier_heldout_accuracy:.3f}"
        )
        (new / "README.md").write_text(_card(cfg, result, final_loss, quality))
    return quality


def _card(cfg: DemoTrainConfig, result: TrainResult, final_loss: float, quality: Quality) -> str:
    width = cfg.num_attention_heads * cfg.attention_head_dim
    params = sum(p.numel() for p in result.transformer.parameters())
    tokens = (cfg.image_size // cfg.patch_size) ** 2
    label_line = LABEL_ONCE.format(b=cfg.label_block) if cfg.label_block is not None else LABEL_EVERYWHERE
    label_flag = f" --label-block {cfg.label_block}" if cfg.label_block is not None else ""
    return CARD.format(**locals(), **cfg.model_dump(), g=DEFAULT_GUIDANCE_SCALE, n=DEFAULT_NUM_STEPS,
                       minutes=result.wall_s / 60, threads=torch.get_num_threads())  # fmt: skip


LABEL_ONCE = (
    "the label enters once, at block {b}'s adaLN modulation (`--label-block {b}`): every other block's label "
    "table is zero and held there in training, and the output layer (modulated with block 0's embedding) sees "
    "no label, so downstream of block {b} the class lives in the residual stream only"
)
LABEL_EVERYWHERE = "the label enters every block's adaLN modulation and the output layer's, as in DiT-XL/2"

CARD = """\
# digits-dit: tide's shipped demo model

A class-conditional [DiT](https://arxiv.org/abs/2212.09748) (`diffusers.DiTTransformer2DModel`) trained by
`harvest/demo_model.py` on scikit-learn's bundled digits, so that tide works with no download.

## Architecture
- {num_layers} blocks, width {width} ({num_attention_heads} heads x {attention_head_dim}), adaLN-zero, {params:,} parameters
- pixel space, 1 channel, no VAE: {image_size}x{image_size} images, patch {patch_size} -> {tokens} tokens
- 10 classes ("0".."9"); label 10 is the null class used for classifier-free guidance
- {label_line}
- predicts epsilon only (`out_channels=1`, no learned sigma); weights stored in fp16 (load as fp32)

## Data
`sklearn.datasets.load_digits`: 1,797 8x8 images, values 0..16, bilinearly upsampled to {image_size}x{image_size}
and scaled to [-1, 1]. No augmentation.

## Training
`tide demo-model train --steps {steps} --seed {seed}{label_flag}`: {steps} AdamW steps of batch {batch_size}, lr {lr} (warmup
{warmup_steps}, cosine to 0), weight decay {weight_decay}, epsilon-MSE on a DDPMScheduler ({num_train_timesteps} steps,
`{beta_schedule}` betas), labels dropped to the null class with p={class_dropout}, EMA {ema_decay} (saved).
Wall time {minutes:.1f} min on {threads} CPU threads; final loss (mean of the last 100 steps) {final_loss:.4f}.

## Sampling
`scheduler/` is a DDPMScheduler (ancestral sampling, trailing timestep spacing) on the training betas, for
{n} steps; its noise comes from each sample's own seeded generator. Default classifier-free guidance scale {g}
(`tide_default_guidance_scale` in `model_index.json`).

## Quality
`tide demo-model eval`: {quality.num_samples} samples ({n} steps, guidance {g}) classified by a logistic regression
trained only on 75% of the real digits (generated samples average-pooled back to 8x8, 0..16).

| metric | value |
|---|---|
| demo_accuracy (generated samples labelled as their class) | {quality.demo_accuracy:.3f} |
| classifier_heldout_accuracy (the other 25% of real digits) | {quality.classifier_heldout_accuracy:.3f} |

![samples](../../../docs/digits_grid.png)
"""

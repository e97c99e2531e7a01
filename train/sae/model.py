"""Sparse autoencoders over DiT activations: the timestep-modulated TIDE SAE and the architectures of
train/sae/archs.py (topk, batchtopk, relu, jumprelu, matryoshka, and tide-modulated jumprelu and matryoshka).

Shape key: B batch (tokens), D model width, F SAE latents, E timestep-embedding width, H modulation MLP
width, S timesteps with a stored input mean.

Every architecture computes
    pre_BF = x_in_BD @ W_enc + b_enc,   z_BF = activation(pre_BF),   x_hat_BD = z_BF @ W_dec + b_dec
with activation = the architecture's (train/sae/archs.py), x_in = x - b_dec, and for the modulated architectures
(`tide`, `tide-jumprelu`, `tide-matryoshka`) the timestep-modulated
    x_mod = (x - b_dec) * (1 + scale(t)) + shift(t),
where (shift, scale) come from an MLP over a sinusoidal embedding of t laid out like diffusers' DiT adaLN
path, so `init_modulation_from_adaln` can copy a trained DiT's own modulation into it (train/sae/adaln.py does
so for `tide train --init-modulation adaln`). By default the MLP's last layer is zero-initialised, so an
untrained `tide` SAE is exactly a `topk` SAE.

Decoder target: `tide` encodes x_mod but decodes straight to x, never to x_mod. Dictionary atoms then live
in the model's activation space whatever t is, so one feature means one direction at every timestep and a
reconstruction splices back into the DiT as is; un-modulating instead would divide by (1 + scale(t)),
which is unstable wherever scale nears -1, and would make an atom's direction depend on t. Metrics are
always on x.

Activations: `topk`/`tide` keep the k largest pre-activations per row (ReLU'd, Gao et al. 2024).
`batchtopk` keeps the k*B largest over the whole batch while training; at inference it keeps every
pre-activation above a threshold, an exponential moving average of the smallest kept activation of each
training batch (Bussmann et al. 2024), so inference needs no batch. `relu` is a ReLU with an L1 penalty
(train/sae/archs.py) on activations times decoder-row norms (Anthropic, April 2024 update): with rows
renormalised after every step it is plain L1, and it stays scale-honest if a caller skips that.
`jumprelu` keeps pre-activations above a learned per-latent threshold; `matryoshka` is TopK or BatchTopK
whose nested prefixes of latents each reconstruct on their own (both described in train/sae/archs.py).

Decoder geometry: rows of W_dec are unit norm. A training step is `out = sae(x, t)`, `loss.backward()`,
`sae.project_decoder_grad()` (drop the radial gradient), `opt.step()`, `sae.normalize_decoder()`. W_enc
starts as W_dec.T; b_dec is set by `init_decoder_bias` to the geometric median of a data sample, which
unlike the mean is not dragged by the few huge-norm outlier tokens transformers have. Dead latents: every
training-mode forward counts, per latent, forwards since it last fired; AuxK (train/sae/loss.py) revives them.

Input normalisation: the trainer feeds x_n = (x - mu(t)) / s. `set_input_normalization` stores mu (one
row, or one row per timestep, looked up at the nearest stored timestep) and s as buffers, and
`forward_raw` takes RAW activations and returns raw-space reconstructions. It is not folded into the
weights because a per-timestep mean cannot be folded into the t-independent decoder bias.

Timesteps: every `t_B` is the scheduler's timestep VALUE of each row (the store's `timesteps` array, e.g.
999, 979, ..., 19 for 50 DDPM steps, or 1000.0, ..., for flow matching, where t = sigma x 1000 is a float in
[0, 1000]), as the DiT itself sees it, never a step index 0..S-1. The modulation embeds t with DiT's sinusoid
(periods up to 10000 timestep units), which separates every t in [0, 1000], integer or not; it assumes t on
that scale, as SD3 and FLUX also embed it (FLUX's pipeline passes t / 1000 and the model multiplies by 1000). Outside
training mode (`load_sae` returns an SAE in eval mode), an SAE that uses t refuses values outside the
timesteps its normalisation was recorded at (`timestep_range`), which catches step indices passed by
mistake. t is used by `tide` (the modulation) and by any SAE with per-timestep input means (every SAE
that `tide train` writes, in `forward_raw`); elsewhere it is ignored and may be None.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
from pydantic import ConfigDict, Field, PositiveInt, model_validator
from tide.train.sae.archs import Architecture, ArchName, ArchOptions, architecture
from tide.train.sae.batch import HERE, BatchScope
from torch import Tensor, nn

T_TOLERANCE = 0.5
"""How far (in timestep units) t may stray outside the recorded range: float rounding, not extrapolation."""


class SAEConfig(ArchOptions):
    """Architecture of one SAE. Pass `expansion` instead of `num_latents` for num_latents = expansion * d_model.

    The architecture hyperparameters (aux_coeff, l1_coeff, l0_coeff, jumprelu_*, matryoshka_*) come from
    `ArchOptions` (train/sae/archs.py); each architecture reads only its own."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    arch: ArchName = "tide"
    """A name in train/sae/archs.py's ARCHITECTURES: tide (timestep-modulated TopK), topk, batchtopk, relu, jumprelu,
    matryoshka, tide-jumprelu, tide-matryoshka."""
    d_model: PositiveInt
    """D: width of the activations the SAE reads."""
    num_latents: PositiveInt
    """F: number of dictionary latents."""
    k: PositiveInt = 32
    """Active latents per row (per row on average for batchtopk); must be <= num_latents. Unused by relu;
    jumprelu: the L0 its thresholds start at (unless jumprelu_init_threshold is set)."""
    aux_k: PositiveInt | None = None
    """Dead latents used by the AuxK loss; None means min(d_model // 2, num_latents) as in Gao et al."""
    dead_steps_threshold: PositiveInt = 1000
    """A latent is dead after this many training forward passes without firing (~4M tokens at B=4096)."""
    threshold_ema: float = Field(0.99, ge=0, lt=1)
    """batchtopk: decay of the moving average of each batch's smallest kept activation (the inference threshold)."""
    t_embed_dim: PositiveInt = 256
    """E: width of the sinusoidal timestep embedding; diffusers' DiT uses 256."""
    t_hidden: PositiveInt | None = None
    """H: hidden width of the modulation MLP; None means d_model, which a DiT adaLN initialisation needs."""
    num_train_timesteps: PositiveInt = 1000
    """Timesteps are the scheduler's own values, as the DiT sees them: floats in [0, num_train_timesteps)."""
    includes_max_timestep: bool = False
    """True for flow-matching schedulers (SD3, FLUX): t = sigma x num_train_timesteps lies in [0, 1000], and the
    first step is t = 1000.0 exactly. `tide train` sets it from the store's scheduler."""

    @model_validator(mode="before")
    @classmethod
    def _expansion(cls, data: Any) -> Any:
        if isinstance(data, dict) and "expansion" in data:
            data = dict(data)
            expansion = data.pop("expansion")
            if "num_latents" in data:
                raise ValueError(
                    f"got both expansion={expansion} and num_latents={data['num_latents']}; pass one"
                )
            data["num_latents"] = int(expansion) * int(data["d_model"])
        return data

    @model_validator(mode="after")
    def _check(self) -> SAEConfig:
        self.architecture.check()
        if self.aux_k is not None and self.aux_k > self.num_latents:
            raise ValueError(f"aux_k={self.aux_k} must be <= num_latents={self.num_latents}")
        if self.t_embed_dim % 2 or self.t_embed_dim < 4:
            raise ValueError(f"t_embed_dim={self.t_embed_dim} must be even and >= 4 (cosines, then sines)")
        return self

    @property
    def architecture(self) -> Architecture:
        """This config's architecture object (activation, loss terms): ARCHITECTURES[arch](self)."""
        return architecture(self.arch)(self)

    @property
    def effective_aux_k(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, min(self.d_model // 2, self.num_latents))

    @property
    def effective_t_hidden(self) -> int:
        return self.t_hidden if self.t_hidden is not None else self.d_model


def timestep_embedding(t_B: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1)`: cosines then sines, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_B.device) / (half - 1))
    args_BH = t_B.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args_BH), torch.sin(args_BH)], dim=-1)  # (B, E)


class Modulation(NamedTuple):
    shift_BD: Tensor
    """Added to the centred input (diffusers' shift_msa)."""
    scale_BD: Tensor
    """The centred input is multiplied by 1 + scale (diffusers' scale_msa)."""


class TimestepModulation(nn.Module):
    """t -> (shift, scale): Linear(E,H) SiLU Linear(H,H) SiLU Linear(H,2D), the shape of DiT's adaLN path."""

    def __init__(self, d_model: int, t_embed_dim: int, t_hidden: int):
        super().__init__()
        self.t_embed_dim = t_embed_dim
        self.linear_1 = nn.Linear(t_embed_dim, t_hidden)  # norm1.emb.timestep_embedder.linear_1
        self.linear_2 = nn.Linear(t_hidden, t_hidden)  # norm1.emb.timestep_embedder.linear_2
        self.linear = nn.Linear(t_hidden, 2 * d_model)  # norm1.linear, rows of shift_msa and scale_msa
        # Zero last layer: x_mod = x - b_dec, so an untrained tide SAE is a plain TopK SAE.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t_B: Tensor) -> Modulation:
        emb_BE = timestep_embedding(t_B, self.t_embed_dim).to(self.linear_1.weight.dtype)
        h_BH = nn.functional.silu(self.linear_2(nn.functional.silu(self.linear_1(emb_BE))))
        shift_BD, scale_BD = self.linear(h_BH).chunk(2, dim=-1)
        return Modulation(shift_BD, scale_BD)


class ForwardOutput(NamedTuple):
    x_hat_BD: Tensor
    """Reconstruction of x (never of x_mod), in the space of the input passed to forward."""
    z_BF: Tensor
    """Sparse latent activations (zeros outside the kept latents)."""
    pre_BF: Tensor
    """Pre-activations, encoder output before sparsification; AuxK picks dead latents from these."""
    x_mod_BD: Tensor | None
    """tide: the centred, modulated input the encoder saw; None for the other architectures."""


class SAE(nn.Module):
    """One SAE of any `SAEConfig.arch`. Decoder rows are unit norm; see the module docstring for the maths."""

    batch: BatchScope = HERE
    """Where a training batch's rows are (train/sae/batch.py): this process (the default), or several
    processes' shares, whose batch-wide quantities (BatchTopK, fired latents, loss normalisers) it sums."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        F, D = cfg.num_latents, cfg.d_model
        W_dec_FD = torch.randn(F, D)
        W_dec_FD /= W_dec_FD.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)
        # Encoder starts as the decoder's transpose (Gao et al.); cloned so no storage is shared (safetensors).
        self.W_enc = nn.Parameter(W_dec_FD.T.clone(memory_format=torch.contiguous_format))  # (D, F)
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(D))
        self.arch = cfg.architecture
        self.modulation = (
            TimestepModulation(D, cfg.t_embed_dim, cfg.effective_t_hidden) if self.arch.modulated else None
        )
        self.register_buffer("steps_since_fired", torch.zeros(F, dtype=torch.long))
        self.arch.add_state(self)
        self.register_buffer("input_mean", torch.zeros(1, D))  # (S, D)
        self.register_buffer("input_mean_t", torch.zeros(1))  # (S,)
        self.register_buffer("input_scale", torch.tensor(1.0))

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> SAE:
        return cls(cfg)

    def timestep_range(self) -> tuple[float, float] | None:
        """(lowest, highest) scheduler timestep the input normalisation was recorded at; None if unknown.

        A single mean at t = 0 is the placeholder `set_input_normalization` stores when given no timesteps,
        so it counts as unknown (an SAE really trained on t = 0 alone is then simply not range-checked).
        """
        t_S = self.input_mean_t
        if t_S.numel() == 1 and float(t_S[0]) == 0:
            return None
        lo, hi = torch.aminmax(t_S.float())
        return float(lo), float(hi)

    def _timesteps(self, t_B: Tensor | float | None, B: int, device: torch.device, use: str) -> Tensor:
        """t_B as a (B,) tensor; outside training mode, checked against `timestep_range`.

        Step indices are refused rather than offered through a keyword of their own: the SAE knows only the
        timesteps of the steps it trained on, not the store's step numbering, so it could not map them.
        Training mode is not checked: the trainer feeds the store's own timesteps, and a check costs a
        device sync per step.
        """
        if t_B is None:
            raise ValueError(
                f"this {self.cfg.arch} SAE needs timesteps t_B for {use}, got None; pass the scheduler's "
                "timestep value of each row (the store's `timesteps` array), one per row or one for all"
            )
        t_B = torch.as_tensor(t_B, device=device)
        t_B = t_B.expand(B) if t_B.ndim == 0 else t_B
        if t_B.shape != (B,):
            raise ValueError(f"t_B has shape {tuple(t_B.shape)}, expected ({B},) or a scalar: one t per row")
        if not self.training and not bool(torch.isfinite(t_B).all()):
            raise ValueError(
                f"t_B holds {t_B[~torch.isfinite(t_B)][0].item()}, which is no timestep; pass the scheduler's "
                "timestep value of each row (the store's `timesteps` array)"
            )
        expected = None if self.training else self.timestep_range()
        if expected is not None:
            lo, hi = torch.stack(torch.aminmax(t_B.float())).tolist()
            if lo < expected[0] - T_TOLERANCE or hi > expected[1] + T_TOLERANCE:
                raise ValueError(
                    f"t_B spans {lo:g}..{hi:g}, but this SAE was trained on scheduler timesteps "
                    f"{expected[0]:g}..{expected[1]:g}; pass the scheduler's timestep values (the store's "
                    "`timesteps` array, store.timesteps[step]), not step indices 0, 1, 2, ..."
                )
        return t_B

    def pre_activations(
        self, x_BD: Tensor, t_B: Tensor | float | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(pre_BF, x_mod_BD or None) of NORMALISED x_BD; t_B (scheduler timestep values) is used by tide only."""
        if x_BD.ndim != 2 or x_BD.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"x has shape {tuple(x_BD.shape)}, expected (B, {self.cfg.d_model}); flatten tokens first"
            )
        x_in_BD = x_BD - self.b_dec
        x_mod_BD = None
        if self.modulation is not None:
            t_B = self._timesteps(t_B, x_BD.shape[0], x_BD.device, "its timestep modulation")
            shift_BD, scale_BD = self.modulation(t_B)
            x_in_BD = x_mod_BD = x_in_BD * (1 + scale_BD) + shift_BD
        return x_in_BD @ self.W_enc + self.b_enc, x_mod_BD

    def activate(self, pre_BF: Tensor) -> Tensor:
        """Sparse z_BF from pre-activations, by the architecture (batchtopk in training mode also updates its
        threshold)."""
        return self.arch.activate(self, pre_BF)

    def encode(self, x_BD: Tensor, t_B: Tensor | float | None = None) -> Tensor:
        """Sparse latents z_BF of NORMALISED x_BD (as `forward`; for raw activations use `forward_raw(x, t).z_BF`).

        t_B: the scheduler's timestep value of each row, (B,) or a scalar (not a step index); used by tide
        (refused outside the trained range in eval mode), ignored and optional for the other architectures.
        """
        return self.activate(self.pre_activations(x_BD, t_B)[0])

    def decode(self, z_BF: Tensor) -> Tensor:
        """Reconstruction of x (not x_mod) from latents."""
        return z_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: Tensor, t_B: Tensor | float | None = None) -> ForwardOutput:
        """Reconstruct NORMALISED x_BD (the trainer's inputs; raw activations go to `forward_raw`).

        t_B: the scheduler's timestep value of each row, (B,) or a scalar (not a step index); needed by tide
        (refused outside the trained range in eval mode), ignored and optional for the other architectures.
        """
        pre_BF, x_mod_BD = self.pre_activations(x_BD, t_B)
        z_BF = self.activate(pre_BF)
        if self.training:
            with torch.no_grad():
                fired_F = self.batch.any((z_BF > 0).any(dim=0))  # a latent fired in any share of the batch
                self.steps_since_fired.add_(1).masked_fill_(fired_F, 0)
        return ForwardOutput(self.decode(z_BF), z_BF, pre_BF, x_mod_BD)

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups, one per learning-rate scale (the architecture's `lr_scale`), each with
        "lr_scale": the trainer sets a group's lr to lr_scale * the scheduled lr."""
        groups: dict[float, list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            groups.setdefault(self.arch.lr_scale(name), []).append(param)
        return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]

    def dead_mask(self) -> Tensor:
        """(F,) bool: latents that have not fired for dead_steps_threshold training forwards."""
        return self.steps_since_fired >= self.cfg.dead_steps_threshold

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm; call after each optimiser step."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row; call between backward and the optimiser step."""
        if self.W_dec.grad is None:
            return
        W_FD, g_FD = self.W_dec, self.W_dec.grad
        along_F = (g_FD * W_FD).sum(-1, keepdim=True) / (W_FD * W_FD).sum(-1, keepdim=True).clamp_min(1e-12)
        g_FD -= along_F * W_FD

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor, t_B: Tensor | float | None = None) -> None:
        """Training's step 0: b_dec from the data (`init_decoder_bias`), then what the architecture sets from
        data (jumprelu's thresholds, unless given)."""
        self.init_decoder_bias(x_BD)
        self.arch.init_from_data(self, x_BD, t_B)

    @torch.no_grad()
    def init_decoder_bias(self, x_BD: Tensor, iters: int = 50) -> None:
        """Set b_dec to the geometric median of a data sample (Weiszfeld), robust to outlier tokens."""
        x_BD = x_BD.float()
        m_D = x_BD.mean(0)
        for _ in range(iters):
            w_B = 1 / (x_BD - m_D).norm(dim=-1).clamp_min(1e-8)
            m_D = (w_B[:, None] * x_BD).sum(0) / w_B.sum()
        self.b_dec.copy_(m_D)

    @torch.no_grad()
    def set_input_normalization(
        self, mean: Tensor, scale: float | Tensor, timesteps: Tensor | None = None
    ) -> None:
        """Store the trainer's x_n = (x - mean(t)) / scale: mean is (D,), or (S, D) with timesteps (S,)."""
        mean_SD = torch.as_tensor(mean).reshape(-1, self.cfg.d_model)
        S = mean_SD.shape[0]
        t_S = torch.zeros(1) if timesteps is None and S == 1 else timesteps
        if t_S is None or torch.as_tensor(t_S).shape != (S,):
            raise ValueError(f"mean has {S} rows, so timesteps must have shape ({S},); got {timesteps!r}")
        t_S, T = torch.as_tensor(t_S).to(self.input_mean_t), self.cfg.num_train_timesteps
        closed = self.cfg.includes_max_timestep
        if ((t_S < 0) | ((t_S > T) if closed else (t_S >= T))).any():
            raise ValueError(
                f"timesteps {t_S.tolist()} leave [0, num_train_timesteps={T}{']' if closed else ')'}; pass "
                "scheduler values" + ("" if closed else " (flow-matching stores: includes_max_timestep=True)")
            )
        self.input_mean, self.input_mean_t = mean_SD.to(self.input_mean), t_S
        self.input_scale.fill_(float(scale))

    def _mean_BD(self, t_B: Tensor | float | None, B: int, device: torch.device) -> Tensor:
        if self.input_mean.shape[0] == 1:
            return self.input_mean
        t_B = self._timesteps(t_B, B, device, "its per-timestep input means (set_input_normalization)")
        nearest_B = (t_B.float()[:, None] - self.input_mean_t.float()[None, :]).abs().argmin(dim=-1)
        return self.input_mean[nearest_B]

    def normalize_input(self, x_raw_BD: Tensor, t_B: Tensor | float | None = None) -> Tensor:
        return (x_raw_BD - self._mean_BD(t_B, x_raw_BD.shape[0], x_raw_BD.device)) / self.input_scale

    def denormalize(self, x_BD: Tensor, t_B: Tensor | float | None = None) -> Tensor:
        return x_BD * self.input_scale + self._mean_BD(t_B, x_BD.shape[0], x_BD.device)

    def forward_raw(self, x_raw_BD: Tensor, t_B: Tensor | float | None = None) -> ForwardOutput:
        """forward on RAW activations: x_hat_BD comes back in raw space; z, pre, x_mod stay normalised.

        t_B: the scheduler's timestep value of each row, (B,) or a scalar, e.g. `store.timesteps[step]`
        (999..19 for the demo store), never a step index. Needed by tide and by any SAE with per-timestep
        input means (all that `tide train` writes); optional only for an SAE with one mean and no modulation.
        In eval mode, values outside the timesteps the SAE was trained on are refused with a ValueError.
        """
        out = self(self.normalize_input(x_raw_BD, t_B), t_B)
        return out._replace(x_hat_BD=self.denormalize(out.x_hat_BD, t_B))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The number of per-timestep means is data, not config: take whatever the checkpoint holds.
        for name in ("input_mean", "input_mean_t"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def build_sae(cfg: SAEConfig) -> SAE:
    """The SAE that `cfg` describes."""
    return SAE.from_config(cfg)


@torch.no_grad()
def init_modulation_from_adaln(
    sae: SAE,
    block: nn.Module,
    class_emb_D: Tensor | None = None,
    *,
    rows: Literal["msa", "mlp"] = "msa",
) -> None:
    """Copy a diffusers DiT block's timestep adaLN (shift, scale) into a tide SAE's modulation.

    Use the modulation that READS the captured activations. rows="msa" (shift_msa, scale_msa) modulates
    LayerNorm of the block's input: use block l+1 for the output of block l (the last block's output is
    read by the model's output layer instead: `init_modulation_from_final_adaln`). rows="mlp"
    (shift_mlp, scale_mlp) modulates LayerNorm of the residual after the block's attention is added: use
    block l for block l's attention output. The class embedding is added before the SiLU in DiT, so it is
    left out by default, giving the timestep-only part; pass `class_emb_D` (e.g. the null-label row of
    `block.norm1.emb.class_embedder.embedding_table`) to fold a fixed class into linear_2's bias.
    The DiT modulates LayerNorm(x); the SAE modulates x - b_dec, so this is a starting point, not identity.
    """
    norm1 = getattr(block, "norm1", None)
    emb = getattr(norm1, "emb", None)
    if not (hasattr(emb, "timestep_embedder") and hasattr(emb, "time_proj") and hasattr(norm1, "linear")):
        raise ValueError(
            f"expected a DiT BasicTransformerBlock with norm_type='ada_norm_zero' (norm1 = AdaLayerNormZero "
            f"with a timestep embedding), got {type(block).__name__} with norm1 {type(norm1).__name__}"
        )
    D_block = norm1.linear.out_features // 6
    first = {"msa": 0, "mlp": 3}[rows]  # chunk(6) order: shift_msa, scale_msa, gate_msa, shift_mlp, ...
    _copy_adaln(sae, emb, norm1.linear, slice(first * D_block, (first + 2) * D_block), class_emb_D, block)


@torch.no_grad()
def init_modulation_from_final_adaln(
    sae: SAE, transformer: nn.Module, class_emb_D: Tensor | None = None
) -> None:
    """Copy a DiTTransformer2DModel's output adaLN into a tide SAE's modulation: for the last block's output.

    diffusers' DiT ends with norm_out(x) * (1 + scale) + shift, (shift, scale) = proj_out_1(SiLU(c)), where c
    is block 0's norm1.emb of (t, class): the model's own modulation of the last residual at t.
    `class_emb_D` as in `init_modulation_from_adaln`.
    """
    blocks = getattr(transformer, "transformer_blocks", None)
    proj = getattr(transformer, "proj_out_1", None)
    emb = getattr(getattr(blocks[0], "norm1", None), "emb", None) if blocks else None
    if not (isinstance(proj, nn.Linear) and hasattr(emb, "timestep_embedder") and hasattr(emb, "time_proj")):
        raise ValueError(
            f"expected a DiTTransformer2DModel with norm_type='ada_norm_zero' (an output adaLN proj_out_1 fed "
            f"by transformer_blocks[0].norm1.emb), got {type(transformer).__name__}"
        )
    # proj_out_1's rows are chunk(2) order: shift, scale
    _copy_adaln(sae, emb, proj, slice(0, proj.out_features), class_emb_D, transformer)


def _copy_adaln(
    sae: SAE, emb: nn.Module, linear: nn.Linear, rows: slice, class_emb_D: Tensor | None, source: nn.Module
) -> None:
    """Copy timestep_embedder's two linears and `linear`'s rows (shift then scale, D each) into sae.modulation."""
    m, D, E, H = sae.modulation, sae.cfg.d_model, sae.cfg.t_embed_dim, sae.cfg.effective_t_hidden
    if m is None:
        raise ValueError(f"SAE arch={sae.cfg.arch!r} has no timestep modulation; build it with arch='tide'")
    proj, te = emb.time_proj, emb.timestep_embedder
    D_src, H_src = (rows.stop - rows.start) // 2, te.linear_1.out_features
    proj_args = (proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift)
    for ok, problem in [
        (proj_args == (E, True, 1), f"block's Timesteps{proj_args} != SAE's ({E}, True, 1): set t_embed_dim"),
        (D_src == D, f"block width {D_src} != SAE d_model={D}: build the SAE for this block's width"),
        (H_src == H == linear.in_features, f"MLP width {H_src} != {H}: set t_hidden={H_src}"),
        (isinstance(te.act, nn.SiLU) and not (te.post_act or te.cond_proj), "not Linear-SiLU-Linear"),
    ]:
        if not ok:
            raise ValueError(f"cannot initialise from {type(source).__name__}: {problem}")
    m.linear_1.load_state_dict(te.linear_1.state_dict())
    m.linear_2.load_state_dict(te.linear_2.state_dict())
    m.linear.weight.copy_(linear.weight[rows])
    m.linear.bias.copy_(linear.bias[rows])
    if class_emb_D is not None:
        m.linear_2.bias += class_emb_D.to(m.linear_2.bias)

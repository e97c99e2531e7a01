"""SAE architectures: each one is a class (its activation, its loss terms, its config fields) in ARCHITECTURES.

Shape key: B batch (tokens), D model width, F SAE latents, P Matryoshka prefixes.

`SAE` (train/sae/model.py) does everything architectures share: the encoder pre-activations, tide's timestep
modulation, the decoder, the input normalisation. An `Architecture` adds what differs:
    - `activate(sae, pre_BF)`: the sparsifying non-linearity;
    - `add_state(sae)`: parameters and buffers of its own (batchtopk's threshold, jumprelu's thresholds);
    - `loss_terms(sae, x_BD, out, batch)`: its loss beyond the reconstruction FVU and AuxK (train/sae/loss.py);
    - `fields`: the `ArchOptions` hyperparameters it reads, so `TrainConfig.specs` passes only those;
    - `modulated`: whether the SAE has tide's timestep modulation; `uses_k`, `uses_auxk`;
    - `saelens`: the SAELens architecture an export writes (train/sae/export.py).
The CLI, the training config, the trainer, the checkpoint loader and the exporter all read ARCHITECTURES,
so adding an architecture is adding one class here with `@register`.

JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"): z = pre * H(pre - theta) with one threshold per
latent. H has no useful gradient, so theta learns through straight-through estimators: the pseudo-
derivatives d/dtheta JumpReLU = -(theta / eps) K((pre - theta) / eps) and d/dtheta H = -(1 / eps) K(...),
with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth eps. These are the exact derivatives of a
kernel-smoothed objective (tests/test_archs.py checks them by finite differences). The sparsity loss is
l0_coeff * mean_rows sum_F H(pre - theta), the L0 itself. As in the paper (and SAELens' "step" mode),
the encoder gets no gradient from the jumps, only from the reconstruction. The thresholds learn
`jumprelu_threshold_lr_scale` (30) times faster than the other parameters: Adam moves every parameter by
about lr per step, which would leave thresholds of order 1 where they start in a run of a few hundred
steps (the paper trains for 100,000s), with the L0 then set by the encoder alone, whatever l0_coeff.

Matryoshka (Bussmann et al. 2025; Nabeshima 2024): one dictionary whose first m_1 < m_2 < ... < m_P = F
latents are each an SAE on their own. The activation (TopK or BatchTopK) is computed once over all F
latents; prefix p reconstructs with z[:, :m_p] @ W_dec[:m_p] + b_dec, and the loss is the sum of the P
prefixes' FVUs, so early latents must carry the most general directions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, NamedTuple

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, NonNegativeFloat, PositiveFloat
from tide.train.sae.batch import Moments
from torch import Tensor

if TYPE_CHECKING:
    from tide.train.sae.model import SAE, ForwardOutput, SAEConfig


class ArchOptions(BaseModel):
    """Architecture hyperparameters, declared once: `SAEConfig` and `TrainConfig` both inherit them."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    aux_coeff: NonNegativeFloat = 1 / 32
    """Weight of the AuxK dead-latent loss (the TopK-style archs and relu; 0 turns it off)."""
    l1_coeff: NonNegativeFloat = 3e-2
    """relu: weight of the L1 penalty relative to the fraction of variance unexplained; data-dependent, sweep it."""
    l0_coeff: NonNegativeFloat = 7e-3
    """jumprelu: weight of the L0 penalty (mean active latents per row) relative to the FVU; sets the L0 reached,
    data-dependent: sweep it to reach a target L0 (on the demo store's resid_l03, 174 steps: 2e-3 -> L0 29,
    4e-3 -> 21, 7e-3 -> 16, 1.6e-2 -> 9)."""
    jumprelu_bandwidth: PositiveFloat = 0.05
    """jumprelu: bandwidth eps of the rectangle kernel of the threshold's straight-through estimator (SAELens'
    default for inputs normalised to E||x||^2 = d_model, as tide's are)."""
    jumprelu_threshold_lr_scale: PositiveFloat = 30.0
    """jumprelu: the thresholds' learning rate as a multiple of the run's lr. Adam moves a parameter by about lr
    per step, whatever its gradient's size, so at lr 1e-3 a threshold of about 2 (where k = 16 of 1,024
    latents fire on inputs with E||x||^2 = d_model) could travel only 0.1 in a 174-step run, while one step of
    the encoder can move a pre-activation by up to lr * ||x||_1, about 0.1: at scale 1 the thresholds stay
    where they start, the encoder alone sets the L0, and l0_coeff has no effect (train/RESULTS.md)."""
    jumprelu_init_threshold: PositiveFloat | None = None
    """jumprelu: every latent's threshold at step 0. None: set from the first training batch so that k latents
    per row fire on average (SAELens starts at 0.01, where half the latents fire: a run of a few hundred steps
    would spend most of itself travelling from there to a sparse code)."""
    matryoshka_prefixes: tuple[int, ...] | None = None
    """matryoshka: nested dictionary sizes, increasing, the last one the width (it is added if missing); None
    means width/16, width/8, width/4, width/2, width."""
    matryoshka_inner: Literal["topk", "batchtopk"] = "batchtopk"
    """matryoshka: the activation over the whole dictionary, per row (topk) or per batch (batchtopk, as in
    Bussmann et al.)."""


class LossTerms(NamedTuple):
    """An architecture's own loss terms, beyond the reconstruction FVU and AuxK."""

    weighted: Tensor
    """What is added to the total loss."""
    l1: Tensor
    """relu: mean over rows of sum_F z * ||W_dec row||, unweighted; 0 otherwise."""
    penalty: Tensor
    """jumprelu: the L0 penalty, unweighted; matryoshka: the sum of the smaller prefixes' FVUs; 0 otherwise."""


ARCHITECTURES: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    ARCHITECTURES[cls.name] = cls
    return cls


def architecture(name: str) -> type[Architecture]:
    """The class registered as `name`; a ValueError listing the registered ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"got {name!r}, which is not an SAE architecture; choose from {', '.join(ARCHITECTURES)}"
        ) from None


def _known(name: str) -> str:
    architecture(name)
    return name


ArchName = Annotated[str, AfterValidator(_known)]
"""An architecture's name, checked against ARCHITECTURES (pydantic errors point at the bad item)."""


def fvu(x_BD: Tensor, x_hat_BD: Tensor, var_sum: Tensor) -> Tensor:
    """sum ||x_hat - x||^2 / var_sum, in float32 (the loss's reconstruction term); var_sum is the batch's
    sum ||x - mean_B x||^2 (`Moments.var_sum`: over the whole batch, when it is split across processes)."""
    return (x_hat_BD.float() - x_BD.float()).pow(2).sum() / var_sum


class Architecture:
    """Base class: a subclass sets `name` and `saelens` and defines `activate`; the rest has defaults."""

    name: ClassVar[str]
    modulated: ClassVar[bool] = False
    """Timestep modulation of the encoder input (tide)."""
    uses_k: ClassVar[bool] = True
    """Reads cfg.k: gets one SAE per k of a sweep and a `-kN` in its name."""
    uses_auxk: ClassVar[bool] = True
    """Its loss includes AuxK (when aux_coeff > 0)."""
    fields: ClassVar[tuple[str, ...]] = ("aux_coeff",)
    """The ArchOptions fields it reads."""
    saelens: ClassVar[str]
    """SAELens architecture of its export: topk, jumprelu or standard."""

    def __init__(self, cfg: SAEConfig):
        self.cfg = cfg

    def check(self) -> None:
        """Raise ValueError when cfg does not fit this architecture."""
        if self.uses_k and self.cfg.k > self.cfg.num_latents:
            raise ValueError(
                f"k={self.cfg.k} must be <= num_latents={self.cfg.num_latents}; lower k or raise F"
            )

    def add_state(self, sae: SAE) -> None:
        """Register this architecture's own parameters and buffers on `sae` (their names are saved)."""

    def init_from_data(self, sae: SAE, x_BD: Tensor, t_B: Tensor | None) -> None:
        """Set what this architecture initialises from the first training batch (after b_dec)."""

    def lr_scale(self, name: str) -> float:
        """The learning rate of parameter `name` as a multiple of the run's lr (SAE.param_groups)."""
        return 1.0

    def activate(self, sae: SAE, pre_BF: Tensor) -> Tensor:
        raise NotImplementedError

    def loss_terms(self, sae: SAE, x_BD: Tensor, out: ForwardOutput, batch: Moments) -> LossTerms:
        """Means over rows are sums over this process's rows divided by batch.rows, the whole batch's."""
        zero = out.x_hat_BD.new_zeros((), dtype=torch.float32)
        return LossTerms(zero, zero, zero)


def topk(pre_BF: Tensor, k: int) -> Tensor:
    """The k largest pre-activations of each row, ReLU'd (Gao et al. 2024)."""
    vals_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BF).scatter(-1, idx_BK, vals_BK.relu())


def batchtopk(sae: SAE, pre_BF: Tensor, k: int) -> Tensor:
    """Training: the k*B largest over the batch, updating sae.threshold; inference: pre above the threshold."""
    if sae.training:
        flat = pre_BF.relu().flatten()
        kept = sae.batch.top(flat, k, pre_BF.shape[0])  # over the whole batch, when it is split
        _update_threshold(sae, kept.smallest)
        return torch.zeros_like(flat).scatter(0, kept.idx, flat[kept.idx]).view_as(pre_BF)
    if sae.threshold.item() < 0:
        raise ValueError("batchtopk has no inference threshold yet: run training forwards first")
    return torch.where(pre_BF > sae.threshold, pre_BF, torch.zeros_like(pre_BF))


@torch.no_grad()
def _update_threshold(sae: SAE, low: Tensor) -> None:
    # low: the batch's smallest positive kept value (inf when none: such a batch leaves it unchanged).
    decay = sae.cfg.threshold_ema
    ema = torch.where(sae.threshold < 0, low, decay * sae.threshold + (1 - decay) * low)
    sae.threshold.copy_(torch.where(torch.isfinite(low), ema, sae.threshold))


def _add_batch_threshold(sae: SAE) -> None:
    # Negative = not estimated yet: no training batch has been seen.
    sae.register_buffer("threshold", torch.tensor(-1.0))


@register
class TopK(Architecture):
    """`topk`: the k largest pre-activations per row (Gao et al. 2024)."""

    name = "topk"
    saelens = "topk"

    def activate(self, sae: SAE, pre_BF: Tensor) -> Tensor:
        return topk(pre_BF, self.cfg.k)


@register
class Tide(TopK):
    """`tide`: TopK on the timestep-modulated input (the TIDE SAE)."""

    name = "tide"
    modulated = True


@register
class BatchTopK(Architecture):
    """`batchtopk`: the k*B largest over a training batch; a learned threshold at inference (Bussmann et al. 2024)."""

    name = "batchtopk"
    saelens = "jumprelu"  # as SAELens saves a trained BatchTopK SAE: its threshold for every latent

    def add_state(self, sae: SAE) -> None:
        _add_batch_threshold(sae)

    def activate(self, sae: SAE, pre_BF: Tensor) -> Tensor:
        return batchtopk(sae, pre_BF, self.cfg.k)


@register
class ReLU(Architecture):
    """`relu`: ReLU with an L1 penalty on activations times decoder-row norms (Anthropic, April 2024)."""

    name = "relu"
    uses_k = False
    fields = ("aux_coeff", "l1_coeff")
    saelens = "standard"

    def activate(self, sae: SAE, pre_BF: Tensor) -> Tensor:
        return pre_BF.relu()

    def loss_terms(self, sae: SAE, x_BD: Tensor, out: ForwardOutput, batch: Moments) -> LossTerms:
        l1 = (out.z_BF.float().abs() * sae.W_dec.float().norm(dim=-1)).sum() / batch.rows
        return LossTerms(self.cfg.l1_coeff * l1, l1, l1.new_zeros(()))


class _JumpReLU(torch.autograd.Function):
    """relu(pre) * H(pre - theta); gradient to pre where it passes, to theta through the rectangle kernel."""

    @staticmethod
    def forward(ctx, pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return pre_BF.relu() * (pre_BF > threshold_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx, grad_BF: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_BF, threshold_F = ctx.saved_tensors
        eps = ctx.bandwidth
        window_BF = ((pre_BF - threshold_F).abs() < eps / 2).to(grad_BF.dtype)  # K((pre - theta) / eps)
        grad_pre_BF = grad_BF * (pre_BF > threshold_F).to(grad_BF.dtype)
        grad_theta_F = (-(threshold_F / eps) * window_BF * grad_BF).sum(0)
        return grad_pre_BF, grad_theta_F.to(threshold_F.dtype), None


class _Step(torch.autograd.Function):
    """H(pre - theta); no gradient to pre, to theta -(1 / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > threshold_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx, grad_BF: Tensor) -> tuple[None, Tensor, None]:
        pre_BF, threshold_F = ctx.saved_tensors
        eps = ctx.bandwidth
        window_BF = ((pre_BF - threshold_F).abs() < eps / 2).to(grad_BF.dtype)
        return None, (-(1 / eps) * window_BF * grad_BF).sum(0).to(threshold_F.dtype), None


def jumprelu(pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLU.apply(pre_BF, threshold_F, bandwidth)


def step(pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
    return _Step.apply(pre_BF, threshold_F, bandwidth)


@register
class JumpReLU(Architecture):
    """`jumprelu`: a learned threshold per latent and an L0 penalty (Rajamanoharan et al. 2024)."""

    name = "jumprelu"
    uses_auxk = False  # as in the paper: dead latents are not revived
    fields = ("l0_coeff", "jumprelu_bandwidth", "jumprelu_threshold_lr_scale", "jumprelu_init_threshold")
    saelens = "jumprelu"

    def lr_scale(self, name: str) -> float:
        return self.cfg.jumprelu_threshold_lr_scale if name == "threshold" else 1.0

    def add_state(self, sae: SAE) -> None:
        # Parametrised directly, as SAELens does; relu(pre) keeps the output right if one goes negative.
        # 0 (a plain ReLU) until init_from_data when jumprelu_init_threshold is None.
        init = torch.full((self.cfg.num_latents,), self.cfg.jumprelu_init_threshold or 0.0)
        sae.register_parameter("threshold", torch.nn.Parameter(init))

    @torch.no_grad()
    def init_from_data(self, sae: SAE, x_BD: Tensor, t_B: Tensor | None) -> None:
        if self.cfg.jumprelu_init_threshold is not None:
            return
        pre_BF = sae.pre_activations(x_BD, t_B)[0].float()
        # The (k * B)-th largest pre-activation of the batch: k latents per row fire on average.
        kth = (
            pre_BF.flatten()
            .topk(min(self.cfg.k * pre_BF.shape[0], pre_BF.numel()), sorted=False)
            .values.min()
        )
        sae.threshold.fill_(float(kth.clamp_min(1e-3)))

    def activate(self, sae: SAE, pre_BF: Tensor) -> Tensor:
        return jumprelu(pre_BF, sae.threshold, self.cfg.jumprelu_bandwidth)

    def loss_terms(self, sae: SAE, x_BD: Tensor, out: ForwardOutput, batch: Moments) -> LossTerms:
        l0 = step(out.pre_BF.float(), sae.threshold, self.cfg.jumprelu_bandwidth).sum() / batch.rows
        return LossTerms(self.cfg.l0_coeff * l0, l0.new_zeros(()), l0)


@register
class TideJumpReLU(JumpReLU):
    """`tide-jumprelu`: JumpReLU on the timestep-modulated input."""

    name = "tide-jumprelu"
    modulated = True


@register
class Matryoshka(Architecture):
    """`matryoshka`: nested prefixes of one dictionary, each an SAE, the loss summed over them."""

    name = "matryoshka"
    fields = ("aux_coeff", "matryoshka_prefixes", "matryoshka_inner")

    @property
    def saelens(self) -> str:  # type: ignore[override]
        return "topk" if self.cfg.matryoshka_inner == "topk" else "jumprelu"

    @property
    def prefixes(self) -> tuple[int, ...]:
        """m_1 < ... < m_P = F."""
        F, given = self.cfg.num_latents, self.cfg.matryoshka_prefixes
        sizes = given if given is not None else tuple(F // d for d in (16, 8, 4, 2) if F // d > 0)
        return tuple(dict.fromkeys((*sizes, F)))

    def check(self) -> None:
        super().check()
        F, given = self.cfg.num_latents, self.cfg.matryoshka_prefixes
        if given is not None and (list(given) != sorted(set(given)) or given[0] < 1 or given[-1] > F):
            raise ValueError(
                f"matryoshka_prefixes={list(given)} must be increasing sizes in 1..num_latents={F}, e.g. "
                f"{[F // 8, F // 4, F // 2, F]}"
            )

    def add_state(self, sae: SAE) -> None:
        if self.cfg.matryoshka_inner == "batchtopk":
            _add_batch_threshold(sae)

    def activate(self, sae: SAE, pre_BF: Tensor) -> Tensor:
        if self.cfg.matryoshka_inner == "topk":
            return topk(pre_BF, self.cfg.k)
        return batchtopk(sae, pre_BF, self.cfg.k)

    def prefix_reconstructions(self, sae: SAE, z_BF: Tensor) -> list[Tensor]:
        """x_hat of every prefix but the full dictionary (that one is out.x_hat_BD), smallest first."""
        return [z_BF[:, :m] @ sae.W_dec[:m] + sae.b_dec for m in self.prefixes[:-1]]

    def loss_terms(self, sae: SAE, x_BD: Tensor, out: ForwardOutput, batch: Moments) -> LossTerms:
        prefixes = self.prefix_reconstructions(sae, out.z_BF)
        parts = [fvu(x_BD, x_hat_BD, batch.var_sum) for x_hat_BD in prefixes]
        penalty = torch.stack(parts).sum() if parts else out.x_hat_BD.new_zeros((), dtype=torch.float32)
        return LossTerms(penalty, penalty.new_zeros(()), penalty)


@register
class TideMatryoshka(Matryoshka):
    """`tide-matryoshka`: Matryoshka on the timestep-modulated input."""

    name = "tide-matryoshka"
    modulated = True

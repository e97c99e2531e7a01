"""SAE training losses: reconstruction, the AuxK dead-latent loss (Gao et al. 2024), and each architecture's own.

Shape key: B batch (tokens), D model width, F SAE latents.

    total = fvu + aux_coeff * aux + the architecture's own terms (train/sae/archs.py `loss_terms`):
            relu: l1_coeff * l1;  jumprelu: l0_coeff * L0;  matryoshka: the smaller prefixes' FVUs

The reconstruction term is the fraction of variance unexplained rather than a raw MSE so that it, like the
AuxK term, does not depend on the scale of the inputs or on D, and aux_coeff = 1/32 means what it does in
Gao et al. All terms are computed in float32 on x (never on tide's modulated input), so the loss is
unaffected by bf16 autocast rounding in the reductions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from tide.train.sae.batch import HERE, BatchScope
from torch import Tensor

if TYPE_CHECKING:
    from tide.train.sae.model import SAE, ForwardOutput


class LossOutput(NamedTuple):
    total: Tensor
    """Scalar to backpropagate: fvu + aux_coeff * aux + the architecture's own weighted terms."""
    fvu: Tensor
    """Fraction of variance unexplained: sum (x_hat - x)^2 / sum (x - mean_B x)^2."""
    mse: Tensor
    """Mean squared error per element, for logging (not in total)."""
    aux: Tensor
    """AuxK loss, unweighted; 0 when no latent is dead."""
    l1: Tensor
    """Mean over rows of sum_F z * ||W_dec row||, unweighted; 0 for the TopK architectures."""
    l0: Tensor
    """Mean number of active latents per row, for logging (no gradient)."""
    penalty: Tensor
    """jumprelu: its L0 penalty, unweighted; matryoshka: the sum of its smaller prefixes' FVUs; 0 otherwise."""


def auxk_loss(
    pre_BF: Tensor,
    residual_BD: Tensor,
    W_dec_FD: Tensor,
    dead_F: Tensor,
    aux_k: int,
    batch: BatchScope = HERE,
) -> Tensor:
    """Reconstruct the residual x - x_hat from the top aux_k pre-activations among dead latents.

    Normalised by the residual's variance over the whole batch (Gao et al.'s normalised MSE), and exactly
    zero when no latent is dead. Only dead latents' encoder and decoder rows get gradients; the residual is a
    fixed target.
    """
    residual_BD = residual_BD.detach().float()
    masked_BF = torch.where(dead_F, pre_BF.float(), torch.full_like(pre_BF, -torch.inf, dtype=torch.float32))
    vals_BK, idx_BK = masked_BF.topk(min(aux_k, pre_BF.shape[-1]), dim=-1, sorted=False)
    # Fewer than aux_k dead latents: the rest are -inf and ReLU to 0, contributing nothing.
    z_BF = torch.zeros_like(masked_BF).scatter(-1, idx_BK, vals_BK.relu())
    e_hat_BD = z_BF @ W_dec_FD.float()
    aux = (e_hat_BD - residual_BD).pow(2).sum() / batch.moments(residual_BD).var_sum
    # Multiplying by the flag instead of branching on it avoids a host sync on GPU.
    return aux * dead_F.any()


def sae_loss(sae: SAE, x_BD: Tensor, out: ForwardOutput) -> LossOutput:
    """All loss terms for `out = sae(x_BD, t_B)`; x_BD is the same (normalised) input the SAE saw.

    Each term is a sum over the rows here divided by a normaliser of the whole batch (`sae.batch`), so when
    the batch is split across processes, their terms (and gradients) sum to the whole batch's."""
    cfg = sae.cfg
    x_BD, x_hat_BD = x_BD.float(), out.x_hat_BD.float()
    moments = sae.batch.moments(x_BD)
    sq_err = (x_hat_BD - x_BD).pow(2)
    fvu = sq_err.sum() / moments.var_sum
    aux = fvu.new_zeros(())
    if sae.arch.uses_auxk and cfg.aux_coeff > 0:
        aux = auxk_loss(
            out.pre_BF, x_BD - x_hat_BD, sae.W_dec, sae.dead_mask(), cfg.effective_aux_k, sae.batch
        )
    own = sae.arch.loss_terms(sae, x_BD, out, moments)
    total = fvu + cfg.aux_coeff * aux + own.weighted
    l0 = ((out.z_BF > 0).float().sum() / moments.rows).detach()
    mse = sq_err.sum() / (moments.rows * x_BD.shape[-1])
    return LossOutput(total, fvu, mse, aux, own.l1, l0, own.penalty)

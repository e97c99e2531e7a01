"""What an SAE computes over its whole training batch, wherever the batch's rows are.

Shape key: B batch rows (this process's), D model width, F SAE latents, N values.

A training step's batch may be split across processes (`tide train` under torchrun: each rank holds a share
of the rows, train/fit/distributed.py). Whatever is defined over the batch must then be computed over all
of it, not over a share: BatchTopK's k * B largest pre-activations, which latents fired (AuxK's dead
counts), and the loss's normalisers (the batch's variance for the FVU, its row count for the means). An SAE
reaches them through `sae.batch`, a `BatchScope`; `HERE` (the default) is a batch whose rows are all in this
process, so that every reduction is the local one. A loss built from these is a sum of per-row terms
divided by batch-wide normalisers, so the ranks' gradients sum to the gradient of the whole batch's loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Kept(NamedTuple):
    """This process's entries among the batch's largest values (BatchTopK)."""

    idx: Tensor
    """Indices into this process's flat values."""
    smallest: Tensor
    """The smallest positive value kept over the whole batch (inf when none is positive), float32 scalar."""


class Moments(NamedTuple):
    """Batch-wide row count and spread of a (B, D) tensor, float32 scalars."""

    rows: Tensor
    """Rows in the whole batch."""
    var_sum: Tensor
    """sum over the whole batch of ||x - mean x||^2 (clamped to 1e-12, so that a ratio stays finite)."""


class BatchScope:
    """A batch whose rows are all in this process: every batch-wide quantity is the local one.

    A subclass over several processes overrides `sum` and `top` (train/fit/distributed.py)."""

    def sum(self, t: Tensor) -> Tensor:
        """The sum over processes of each one's `t` (partial sums of the batch), the same on every process."""
        return t

    def top(self, values_N: Tensor, per_row: int, rows: int) -> Kept:
        """This process's share of the batch's per_row * (batch rows) largest of `values_N` (ReLU'd values
        of `rows` rows, flattened)."""
        vals, idx = values_N.topk(per_row * rows, sorted=False)
        return Kept(idx, smallest_positive(vals.detach()))

    def any(self, flags_F: Tensor) -> Tensor:
        """Flags set in any process's share of the batch."""
        return self.sum(flags_F.to(torch.int32)) > 0

    def moments(self, x_BD: Tensor) -> Moments:
        """Row count and sum of squared deviations from the batch mean, from one reduction in float64."""
        x_BD = x_BD.detach()
        parts = torch.cat(
            [
                x_BD.new_full((1,), x_BD.shape[0], dtype=torch.float64),
                x_BD.sum(0, dtype=torch.float64),
                x_BD.pow(2).sum(dtype=torch.float64)[None],
            ]
        )
        total = self.sum(parts)
        rows, sum_D, sq = total[0], total[1:-1], total[-1]
        # One pass (sum ||x||^2 - ||sum x||^2 / n) loses digits only when the mean dwarfs the spread; the
        # trainer's inputs are centred per step, and float64 keeps 16 digits.
        var_sum = (sq - sum_D.pow(2).sum() / rows.clamp_min(1)).clamp_min(1e-12)
        return Moments(rows.float(), var_sum.float())


def smallest_positive(vals_N: Tensor) -> Tensor:
    """Smallest positive value, inf when none, as a float32 scalar; no host sync."""
    inf = vals_N.new_full((1,), math.inf)  # also the answer for no values at all
    return torch.cat([torch.where(vals_N > 0, vals_N, inf), inf]).min().float()


HERE = BatchScope()
"""The batch scope of a single process."""

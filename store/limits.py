"""Bounds on the numbers a user gives tide, shared by every config (harvest, train, the demo model).

Every config also sets pydantic's `allow_inf_nan=False`, so no float setting takes NaN or infinity; the
types here add the bounds that keep a finite number from being absurd, each refusal naming the setting, the
value and what to give instead.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo

SEED_MAX = 2**32 - 1
"""Seeds go to torch's and numpy's generators and, as `seed + sample index`, into a store's int64 `seed`
array; 0..2**32-1 is every seed people type, far inside what each of those takes."""

LR_MAX = 1.0
"""AdamW moves every weight by about lr per step whatever its gradient, and SAE decoder rows have unit
norm: above 1 each step overshoots the weights it updates, and training turns to NaN."""


def _seed(value: int, info: ValidationInfo) -> int:
    if not 0 <= value <= SEED_MAX:
        raise ValueError(
            f"{info.field_name}={value} is not a seed: a seed is a whole number from 0 to {SEED_MAX} (2**32 - 1); "
            "use e.g. 0"
        )
    return value


def _lr(value: float, info: ValidationInfo) -> float:
    if not (math.isfinite(value) and 0 < value <= LR_MAX):
        raise ValueError(
            f"{info.field_name}={value} is not a learning rate AdamW can train with: it must be a number in "
            f"(0, {LR_MAX:g}]; 1e-3 is the usual one"
        )
    return value


Seed = Annotated[int, AfterValidator(_seed)]
"""A seed: 0..SEED_MAX."""
LearningRate = Annotated[float, AfterValidator(_lr)]
"""A peak learning rate: finite, in (0, LR_MAX]."""

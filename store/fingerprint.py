"""The fingerprint of a diffusion transformer's weights, recorded in a store as `ModelInfo.fingerprint`.

Whatever later loads "the model that made this store" from its recorded path (`tide train --init-modulation
adaln`) compares fingerprints first: the folder may since hold other weights under the same name.

    sha256 over: the transformer's config as JSON (sorted keys, without diffusers' private "_" keys such
    as _name_or_path, so a moved folder keeps its fingerprint), then, for each state_dict entry in name
    order, its name, dtype, shape and raw bytes, floating tensors cast to the dtype the harvest ran the
    model in (HarvestConfig.model_dtype).

Casting a float32 load to that dtype gives the same tensors as loading in it (diffusers casts each
parameter the same way), so a reader loads in float32 and passes the store's model_dtype.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def fingerprint(transformer: nn.Module, dtype: torch.dtype | None = None) -> str:
    """`sha256:<hex>` of `transformer`'s config and weights (floating tensors cast to `dtype` when given)."""
    import torch

    h = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(transformer, "config", {})).items() if not str(k).startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = transformer.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return f"sha256:{h.hexdigest()}"


def check_same_model(
    store_model, found: str | None, source: str, purpose: str, fix: str, error: type[Exception] = ValueError
) -> None:
    """Raise `error` when the weights at `source` (fingerprint `found`) are not the store's model's.

    `store_model` is the store's `ModelInfo`. A store made before fingerprints, or a model whose fingerprint
    was not taken, cannot be checked and passes. The message names both models and ends with `fix`."""
    recorded = store_model.fingerprint
    if recorded is None or found is None or recorded == found:
        return
    raise error(
        f"{purpose}: {source} holds other weights (fingerprint {found[:19]}...) than the model the store was "
        f"harvested with ({store_model.id}, fingerprint {recorded[:19]}...); {fix}"
    )

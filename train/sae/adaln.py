"""Start tide SAEs' timestep modulation from the source DiT's own adaLN (`tide train --init-modulation adaln`).

Shape key: D model width, N samples.

The SAE gets the modulation that READS the captured activations in diffusers' DiT (adaLN-zero blocks):

    captured at block l             read by                                         rows copied
    resid, delta, mlp               block l+1's norm1: LayerNorm of its input       shift_msa, scale_msa
    attn                            block l's norm2: LayerNorm after attention      shift_mlp, scale_mlp
    resid, delta, mlp of the last   the output layer: norm_out, then proj_out_1     shift, scale
      block                         (fed by block 0's embedding)

delta_l and mlp_l are parts of the residual that block l+1 reads (mlp after its gate_mlp), so block l+1's
per-channel scale and shift act on them too; attn_l joins the residual (after gate_msa) that block l's own
norm2 reads. The last block's output has no reading block, but the DiT's output adaLN modulates it.

Class: the DiT conditions on (timestep embedding + class embedding) before the SiLU; the SAE's modulation
sees t only, so one embedding is folded in: for the cond branch the mean class embedding of the training
samples' labels (the SiLU makes this an approximation of their mean modulation), for the uncond branch the
null label's row; none for models without a class embedder.

Normalisation (not adapted, on purpose): the SAE modulates x_n - b_dec with x_n = (x - mean[step]) / s,
the DiT modulates LayerNorm(x) = (x - m(x)) / sigma(x) per token. The scale is a dimensionless per-channel
factor and is copied as is. The shift is in LayerNorm units; both inputs have mean squared norm D
(||LayerNorm(x)||^2 = D exactly, E||x_n||^2 = D by the choice of s), so copying it keeps the shift's size
relative to the whole input what it is in the DiT. Rescaling it to the centred part instead would
multiply it by sigma / s, measured 1.0 (t near 0) to 1.5 (high noise) on the demo model's residuals, since
LayerNorm keeps the per-step mean that x_n removes; that factor depends on t, and the t-dependent offset
mean[step] * (1 + scale) / sigma of the DiT's modulated input has no counterpart in x_n anyway. The copy is
a starting point the optimiser adapts, not an equivalence.

Only `train/` code: the transformer is loaded with diffusers directly (`load_transformer`), never through
harvest/.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tide.store.fingerprint import check_same_model, fingerprint
from tide.store.schema import StoreMeta
from tide.train.sae.model import SAE, init_modulation_from_adaln, init_modulation_from_final_adaln
from torch import Tensor, nn


class AdaLNInitError(ValueError):
    """The store's source DiT cannot be loaded or has no adaLN-zero modulation to copy."""


def load_transformer(meta: StoreMeta, log: Callable[[str], None] = print) -> nn.Module:
    """The transformer the store was harvested from: diffusers, the recorded local folder, float32, eval mode.

    Its fingerprint must be the one the store recorded: the folder may hold other weights by now. A store
    made before fingerprints were recorded cannot be checked; `log` gets a warning and loading goes on.
    """
    import diffusers

    folder = Path(meta.model.path)
    if not (folder / "transformer").is_dir():
        raise AdaLNInitError(
            f"--init-modulation adaln copies the adaLN of the DiT this store was harvested from, but its "
            f"folder {folder / 'transformer'} (the store's model.path, from {meta.model.id!r}) is not there: "
            "the model moved or was deleted. Put it back at that path, or train with --init-modulation zero"
        )
    cls = getattr(diffusers, meta.model.transformer_class, None)
    if cls is None:
        raise AdaLNInitError(
            f"the store's transformer class {meta.model.transformer_class!r} is not in diffusers "
            f"{diffusers.__version__}; train with --init-modulation zero"
        )
    with torch.random.fork_rng(devices=[]):  # loading must not move the training run's RNG
        try:
            model = cls.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise AdaLNInitError(
                f"could not load {meta.model.transformer_class} from {folder / 'transformer'}: {e}; "
                "fix the model folder or train with --init-modulation zero"
            ) from e
    recorded = meta.model.fingerprint
    if recorded is None:
        log(
            f"warning: the store records no fingerprint of its model (it predates them), so tide cannot check "
            f"that {folder / 'transformer'} still holds the weights that made it; copying its adaLN anyway"
        )
        return model.eval()
    dtype = getattr(torch, str(meta.harvest_config.get("model_dtype", "float32")), torch.float32)
    check_same_model(
        meta.model, fingerprint(model, dtype), str(folder),
        "cannot copy the model's adaLN modulation into the SAE",
        "put the original model back at that path, or train with --init-modulation zero", AdaLNInitError,
    )  # fmt: skip
    return model.eval()


def _blocks(transformer: nn.Module) -> nn.ModuleList:
    blocks = getattr(transformer, "transformer_blocks", None)
    kinds = sorted({str(getattr(b, "norm_type", type(b).__name__)) for b in blocks or []})
    if not blocks or kinds != ["ada_norm_zero"]:
        raise AdaLNInitError(
            f"{type(transformer).__name__} has no adaLN-zero blocks (its blocks have norm_type {kinds or 'none'}); "
            "--init-modulation adaln copies the per-block timestep modulation of diffusers' DiT "
            "(DiTTransformer2DModel, norm_type='ada_norm_zero'). Train with --init-modulation zero"
        )
    return blocks


def class_embedding(emb: nn.Module, labels_N: np.ndarray | None, branch: str) -> Tensor | None:
    """The class embedding folded into the modulation (see the module docstring), or None."""
    embedder = getattr(emb, "class_embedder", None)
    if embedder is None or labels_N is None:
        return None
    table = embedder.embedding_table.weight  # (classes [+ null], D)
    if branch == "uncond":
        if table.shape[0] <= embedder.num_classes:
            raise AdaLNInitError("the store has an uncond branch but the model has no null-label embedding")
        return table[embedder.num_classes]
    return table[torch.as_tensor(labels_N, dtype=torch.long)].mean(0)


@torch.no_grad()
def init_from_dit(
    sae: SAE, transformer: nn.Module, site: str, layer: int, branch: str, labels_N: np.ndarray | None
) -> str:
    """Initialise sae.modulation from the adaLN that reads `site` of block `layer`; returns what was copied."""
    blocks = _blocks(transformer)
    if not 0 <= layer < len(blocks):
        raise AdaLNInitError(
            f"layer {layer} is not a block of {type(transformer).__name__} (0..{len(blocks) - 1})"
        )
    try:
        if site == "attn":
            block = blocks[layer]
            init_modulation_from_adaln(
                sae, block, class_embedding(block.norm1.emb, labels_N, branch), rows="mlp"
            )
            return f"block {layer}'s (shift_mlp, scale_mlp)"
        if layer + 1 < len(blocks):
            block = blocks[layer + 1]
            init_modulation_from_adaln(sae, block, class_embedding(block.norm1.emb, labels_N, branch))
            return f"block {layer + 1}'s (shift_msa, scale_msa)"
        emb = blocks[0].norm1.emb
        init_modulation_from_final_adaln(sae, transformer, class_embedding(emb, labels_N, branch))
        return "the output layer's (shift, scale) (proj_out_1, block 0's embedding)"
    except AdaLNInitError:
        raise
    except ValueError as e:
        raise AdaLNInitError(f"{e}; or train with --init-modulation zero") from e

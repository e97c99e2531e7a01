"""What an SAE is.

`model.py` holds the SAE module (the timestep-modulated TIDE encoder and the shared encode/decode path),
`archs.py` one class per architecture (topk, batchtopk, relu, jumprelu, matryoshka and their tide-modulated
forms), `loss.py` the reconstruction, AuxK and per-architecture losses, `adaln.py` the start of a tide SAE's
modulation from the source DiT's adaLN, and `export.py` the SAELens folder format in both directions.
Nothing here reads a store or runs a diffusion model.
"""

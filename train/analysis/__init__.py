"""Reading what a trained SAE learned, from the store alone.

`eval.py` gives reconstruction and sparsity on held-out samples, overall and per timestep bucket;
`features.py` is one streaming pass collecting per-latent statistics (activation rates, timestep profiles,
top rows, class scores); `report.py` renders that pass as static HTML from the `templates/` folder, with the
top samples' images from the store, or redrawn from their seeds through loop/rerun.py when it has none.
"""

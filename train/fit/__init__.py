"""Fitting SAEs from a tide store.

`config.py` is the frozen training configuration (TrainConfig, and the SAE specs it expands to),
`data.py` streams shuffled, resumable (x, t) batches of whole store chunks, `trainer.py` is `train(cfg)`:
several SAEs side by side on one stream of batches, and `checkpoint.py` what a run leaves on disk (SAE
folders, the resume state) and how it is read back.
"""

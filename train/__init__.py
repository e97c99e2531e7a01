"""Fit SAEs on a tide store, read what they learned, and put them back inside the denoising loop.

    sae/        what an SAE is: the architectures, their losses, adaLN initialisation, SAELens export/import
    fit/        fitting SAEs from a store: the config, the shuffled chunk loader, the trainer, checkpoints
    analysis/   reading what a trained SAE learned: per-timestep eval, the feature pass and its HTML report
    loop/       the one place that runs the DiT again: splicing reconstructions in, steering through latents

Data flows one way: store/ -> fit/ -> sae/ folders -> analysis/ and loop/. One module imports harvest/:
loop/rerun.py, which runs a store's model again (analysis/ redraws top images through it too);
tests/test_layout.py holds every module to that.
"""

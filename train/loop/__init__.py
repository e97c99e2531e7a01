"""SAEs back inside the denoising loop: the only part of train/ that runs the DiT again.

`rerun.py` is its one way into harvest/: it loads a store's model (fingerprint checked) and samples any of
the store's samples again, with edits at chosen sites. On it, `splice.py` samples with an SAE's
reconstruction substituted for the activations it reads and measures the fidelity recovered
(`splice_report.py` prints and draws it), `steer.py` edits images through one latent (`tide steer`), and
`steer_classes.py` is the class-steering sweep (`python -m tide.train.loop.steer_classes`).
"""

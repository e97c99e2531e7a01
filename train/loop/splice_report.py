"""The splice report: fidelity recovered, the printed tables and the image grid of `tide splice`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def fidelity_recovered(m: dict, abl: dict, clean: dict) -> dict[str, float | None]:
    """1 - (spliced - clean) / (ablated - clean) per metric; None where the ablation changes nothing."""

    def fr(key: str, clean_v: float) -> float | None:
        if m[key] is None or abl[key] is None or abl[key] == clean_v:
            return None
        return 1 - (m[key] - clean_v) / (abl[key] - clean_v)

    return {
        "output": fr("output_rel_error", 0.0),
        "image": fr("image_mse", 0.0),
        "accuracy": fr("accuracy", clean["accuracy"]) if clean["accuracy"] is not None else None,
    }


def build_report(cfg, planned, saes, ablations, conds, tallies, steps, buckets, clf) -> dict[str, Any]:
    """What report.json holds: every condition's metrics, fidelity recovered per SAE, the buckets."""
    from tide.train.loop.splice import sae_target  # here: splice imports this module

    has = clf is not None
    metrics = {c.name: tallies[c.name].metrics(has) for c in conds}
    main = {c.name: metrics[c.name] for c in conds if "#b" not in c.name}
    clean = main["clean"]
    planned.model.set_schedule(planned.meta.num_inference_steps)  # as the sampler set it
    t_S = planned.model.scheduler.timesteps.tolist()
    report: dict[str, Any] = {
        "model": planned.model.info.id,
        "num_samples": planned.meta.num_samples,
        "num_steps": planned.meta.num_inference_steps,
        "guidance_scale": planned.meta.guidance_scale,
        "steps": None if steps is None else [min(steps), max(steps) + 1],
        "rows": cfg.rows,
        "timesteps": t_S,
        "conditions": main,
        "saes": {},
        "buckets": [],
    }
    for s in saes:
        t = sae_target(s)
        abl = ablations[(t.site, t.layer)]
        report["saes"][s.folder.name] = {
            "site": t.site,
            "layer": t.layer,
            "arch": s.meta.sae.arch,
            "k": s.meta.sae.k,
            "fidelity_recovered": {
                n: fidelity_recovered(main[s.folder.name], main[n], clean) for n, _ in abl
            },
        }
    for k, bucket in enumerate(buckets):
        row: dict[str, Any] = {
            "steps": [min(bucket), max(bucket) + 1],
            "t": [t_S[min(bucket)], t_S[max(bucket)]],
        }
        row["conditions"] = {n[: -len(f"#b{k}")]: m for n, m in metrics.items() if n.endswith(f"#b{k}")}
        row["fidelity_recovered"] = {
            s.folder.name: fidelity_recovered(
                row["conditions"][s.folder.name],
                row["conditions"][ablations[sae_target(s)[:2]][1][0]],
                clean,
            )
            for s in saes
        }
        report["buckets"].append(row)
    return report


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_report(r: dict[str, Any]) -> str:
    """The splice table and the per-bucket table, as printed by `tide splice`."""
    lines = [
        f"{r['model']}: {r['num_samples']} samples, {r['num_steps']} steps, guidance {r['guidance_scale']:g}, "
        f"rows {r['rows']}, spliced at steps {r['steps'] or 'all'}",
        f"{'condition':<28}{'out rel err':>12}{'image MSE':>11}{'accuracy':>10}",
    ]
    for name, m in r["conditions"].items():
        lines.append(
            f"{name:<28}{m['output_rel_error']:>12.4f}{m['image_mse']:>11.5f}{_f(m['accuracy']):>10}"
        )
    lines += ["", "fidelity recovered = 1 - (spliced - clean) / (ablated - clean): output / image / accuracy"]
    for name, s in r["saes"].items():
        for abl, fr in s["fidelity_recovered"].items():
            lines.append(
                f"{name:<28}vs {abl:<24}{_f(fr['output']):>8}{_f(fr['image']):>8}{_f(fr['accuracy']):>8}"
            )
    if r["buckets"]:
        lines += [
            "",
            "spliced inside one bucket only: image MSE / accuracy / fidelity recovered (image) vs mean",
        ]
        for b in r["buckets"]:
            cells = [
                f"{n}: {_f(b['conditions'][n]['image_mse'], '.5f')} / {_f(b['conditions'][n]['accuracy'])} / "
                f"{_f(b['fidelity_recovered'][n]['image'])}"
                for n in r["saes"]
            ]
            lines.append(
                f"steps {b['steps'][0]:>3}:{b['steps'][1]:<3} t {b['t'][0]:>6g}..{b['t'][1]:<6g} "
                + "; ".join(cells)
            )
    return "\n".join(lines)


def grid_caption(shown: int, total: int) -> str:
    """The line above a grid saying which samples it shows."""
    which = f"all {total} samples" if shown >= total else f"the first {shown} of {total} samples"
    return f"{which}, one per column (the same seed down each column)"


def save_grid(path: Path, rows: list[tuple[str, np.ndarray]], cols: int = 8) -> None:
    """A PNG with one row of images (B, H, W, C) uint8 per condition, the first `cols` samples each, the
    condition's name written at the row's left and `grid_caption` above the rows."""
    from PIL import Image, ImageDraw, ImageFont

    h, w, c = rows[0][1].shape[1:]
    scale = max(1, 64 // max(h, w))
    pad, size_h, size_w = 4, h * scale, w * scale
    n = min(cols, len(rows[0][1]))
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption = grid_caption(n, len(rows[0][1]))
    label_w = pad + max(int(measure.textlength(name, font)) for name, _ in rows)
    head = 2 * pad + int(font.getbbox(caption)[3])
    width = max(label_w + n * (size_w + pad) + pad, 2 * pad + int(measure.textlength(caption, font)))
    grid = Image.new("RGB", (width, head + len(rows) * (size_h + pad) + pad), color=(255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((pad, pad), caption, fill=(0, 0, 0), font=font)
    for i, (name, images) in enumerate(rows):
        top = head + pad + i * (size_h + pad)
        draw.text((pad, top + size_h // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
        for j, img in enumerate(images[:n]):
            cell = (
                Image.fromarray(img[..., 0] if c == 1 else img)
                .convert("RGB")
                .resize((size_w, size_h), Image.NEAREST)
            )
            grid.paste(cell, (label_w + pad + j * (size_w + pad), top))
    grid.save(path)

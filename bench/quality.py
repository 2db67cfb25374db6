"""Patch quality control (pathgen.wsi.quality): recall and precision per reason, and cost per patch.

    python bench/quality.py [--per-class 120] [--seed 0] [--demo-scale 1.0 0.35]

1. Synthetic known-answer set (pathgen.demo.artefacts.qc_patches): `per-class` 336 px patches of
   each class (clean tissue of six textures, glass with 0-20 % tissue, green / blue / black marker
   strokes covering >= 8 %, fold bands covering >= 10 %, defocus of Gaussian sigma 1.4-3.4 px at
   336 px), JPEG q85 decoded at half scale as the pipeline's tile reader does. Prints, at the
   default thresholds (quality.THRESHOLDS), the confusion of planted class x reason, recall and
   precision per reason, recall per ink and per blur radius, each measure's range per class (to
   recalibrate the thresholds), and ms per patch of `measure` + `qc_reasons` on batches of 64.
2. The demo slides at each `--demo-scale` (built into a temporary directory): the tile step's
   tissue patches (params.yaml `tile`), read at 336 px through the embed reader's path
   (`Slide.read_patch_scaled`), and per slide how many fall in the planted pen stroke and
   out-of-focus block and what QC says of them and of the rest.

Figures on this machine (2 busy cores, x86-64), `python bench/quality.py` at the defaults:
see the module docstring of pathgen/wsi/quality.py, which quotes this script's output.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pathgen.demo import artefacts  # noqa: E402
from pathgen.demo import slides as demo  # noqa: E402
from pathgen.wsi import quality  # noqa: E402

EXPECTED = {"clean": None, "background": "background", "pen": "pen", "fold": "fold", "blur": "blur"}
BATCH = 64
REPEATS = 3


def _binned(name: str, values: list[float], hits: list[bool], edges: list[float]) -> str:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [h for v, h in zip(values, hits) if lo <= v < hi]
        if sel:
            out.append(f"[{lo:g}, {hi:g}) {np.mean(sel):.2f} (n={len(sel)})")
    return f"  {name}: " + ", ".join(out)


def synthetic(per_class: int, seed: int, severity: str) -> None:
    t0 = time.perf_counter()
    data = list(artefacts.qc_patches(per_class, seed=seed, severity=severity))
    print(f"\n=== synthetic set, {severity} artefacts ({artefacts.SEVERITY[severity]}):")
    print(f"{len(data)} patches ({per_class} per class), generated in {time.perf_counter() - t0:.1f} s")
    labels = [d[0] for d in data]
    details = [d[1] for d in data]
    x = np.stack([d[2] for d in data])
    runs = []
    for _ in range(REPEATS):
        measure_s = 0.0
        parts = []
        reasons: list[str | None] = []
        for i in range(0, len(x), BATCH):
            t = time.perf_counter()
            m = quality.measure(x[i : i + BATCH])
            r = quality.qc_reasons(m)
            measure_s += time.perf_counter() - t
            parts.append(m)
            reasons.extend(r)
        runs.append(1000 * measure_s / len(x))
    m = {k: np.concatenate([p[k] for p in parts]) for k in quality.MEASURES}
    print(f"measure + qc_reasons: {min(runs):.2f} ms per 336 px patch, best of {REPEATS} passes "
          f"(median {float(np.median(runs)):.2f}; batches of {BATCH}, one thread)")
    print(f"thresholds: {quality.THRESHOLDS}")

    cols = [*quality.REASONS, None]
    print("\nplanted \\ reason  " + "".join(f"{str(c):>11}" for c in cols))
    for label in artefacts.QC_CLASSES:
        got = Counter(r for lab, r in zip(labels, reasons) if lab == label)
        print(f"{label:>16}  " + "".join(f"{got.get(c, 0):>11}" for c in cols))
    print("\nreason       recall  precision")
    for label, reason in EXPECTED.items():
        if reason is None:
            clean = [r for lab, r in zip(labels, reasons) if lab == "clean"]
            print(f"{'(clean kept)':<12} {sum(r is None for r in clean) / len(clean):6.3f}")
            continue
        planted = [r for lab, r in zip(labels, reasons) if lab == label]
        flagged = [lab for lab, r in zip(labels, reasons) if r == reason]
        recall = sum(r == reason for r in planted) / len(planted)
        precision = sum(lab == label for lab in flagged) / max(1, len(flagged))
        print(f"{reason:<12} {recall:6.3f}  {precision:9.3f}")
    print("\npen recall by ink: " + ", ".join(
        f"{ink} {np.mean([r == 'pen' for lab, d, r in zip(labels, details, reasons) if lab == 'pen' and d['ink'] == ink]):.3f}"
        for ink in artefacts.INKS))
    radii = sorted({d["radius"] for lab, d in zip(labels, details) if lab == "blur"})
    print("blur recall by box radius (level-0 px; sigma at 336 px): " + ", ".join(
        f"{r} ({np.sqrt(2 * r * (r + 1) / 3) / 2:.1f}) {np.mean([x == 'blur' for lab, d, x in zip(labels, details, reasons) if lab == 'blur' and d['radius'] == r]):.3f}"
        for r in radii))
    print("recall by severity:")
    for label, key, edges in (("background", "tissue_fraction", [0, 0.1, 0.2, 0.3, 0.4, 0.5]),
                              ("pen", "cover", [0, 0.02, 0.04, 0.06, 0.08, 0.2, 1.0]),
                              ("fold", "cover", [0, 0.05, 0.075, 0.1, 0.2, 1.0])):
        sel = [(d[key], r == EXPECTED[label]) for lab, d, r in zip(labels, details, reasons) if lab == label]
        print(_binned(f"{label} by {key}", [v for v, _ in sel], [h for _, h in sel], edges))
    names = {c: demo.TEXTURES[c] for c in demo.TEXTURES}
    print("\nmeasure ranges per class (min / median / max):")
    for k in quality.MEASURES:
        print(f"  {k}")
        for label in artefacts.QC_CLASSES:
            v = m[k][np.array(labels) == label]
            print(f"    {label:<11} {v.min():10.3f} {np.median(v):10.3f} {v.max():10.3f}")
    print("  clean tissue by texture (background_fraction max, laplacian_variance min):")
    for c, name in names.items():
        sel = np.array([lab == "clean" and d["tissue"] == c for lab, d in zip(labels, details)])
        if sel.any():
            print(f"    {name:<11} {m['background_fraction'][sel].max():8.3f} {m['laplacian_variance'][sel].min():10.1f}")


def demo_counts(scale: float) -> None:
    from pathgen.config import load_params
    from pathgen.steps.tile import tile_slide
    from pathgen.store.seeds import derive_seed
    from pathgen.wsi.slide import Slide

    params = load_params(ROOT / "params.yaml")["tile"]
    cell = demo.DEMO_CELL_PX
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        demo.make_demo(Path(tmp), seed=0, scale=scale)
        print(f"\ndemo slides at scale {scale}: built in {time.perf_counter() - t0:.1f} s")
        rows, cols = demo.demo_grid(scale)
        for spec in demo.DEMO_SLIDES:
            label_map = demo.blob_label_map(rows, cols, list(spec.classes), seed=derive_seed(0, spec.slide_id, "labels"))
            pens, boxes = demo.demo_artefacts(spec, label_map)
            with Slide(Path(tmp) / f"data/demo/{spec.slide_id}.svs", spec.slide_id) as slide:
                grid, _, _ = tile_slide(slide, params)
                patches = []
                for x, y, level, read_size in zip(grid["x"], grid["y"], grid["level"], grid["read_size"]):
                    img = slide.read_patch_scaled(int(x), int(y), int(level), int(read_size), 336)
                    if img is None:
                        img = slide.read_patch(int(x), int(y), int(level), int(read_size), 336)
                    patches.append(np.asarray(img.convert("RGB")))
            reasons = quality.qc_reasons(quality.measure(np.stack(patches)))
            coords = np.arange(cell, dtype=np.float64) + 0.5
            where = []
            for x, y in zip(grid["x"].to_list(), grid["y"].to_list()):
                cover = 0.0
                for s in pens:
                    a = artefacts.segment_alpha(coords + x, coords + y, (s.x0, s.y0), (s.x1, s.y1), s.half_width)
                    cover = max(cover, float((a >= 128).mean()))
                inside = any(b.x0 <= x and x + cell <= b.x1 and b.y0 <= y and y + cell <= b.y1 for b in boxes)
                part = any(b.x0 < x + cell and x < b.x1 and b.y0 < y + cell and y < b.y1 for b in boxes)
                where.append("pen >= 10 %" if cover >= 0.1 else "pen < 10 %" if cover > 0 else
                             "defocus (whole)" if inside else "defocus (part)" if part else "elsewhere")
            print(f"  {spec.slide_id}: {len(grid)} tissue patches; pen {[s.ink for s in pens]}, defocus boxes {len(boxes)}")
            for place in ("pen >= 10 %", "pen < 10 %", "defocus (whole)", "defocus (part)", "elsewhere"):
                got = Counter(r for w, r in zip(where, reasons) if w == place)
                if got:
                    print(f"    {place:<16} {sum(got.values()):4d} patches: " + ", ".join(f"{k or 'kept'} {v}" for k, v in sorted(got.items(), key=lambda kv: str(kv[0]))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--severity", nargs="*", default=["clear", "mild"], choices=sorted(artefacts.SEVERITY))
    ap.add_argument("--demo-scale", type=float, nargs="*", default=[1.0, 0.35])
    args = ap.parse_args()
    for severity in args.severity:
        synthetic(args.per_class, args.seed, severity)
    for scale in args.demo_scale:
        demo_counts(scale)


if __name__ == "__main__":
    main()

"""Slide job status records: whether a slide's job ran on its input or quarantined the slide.

A slide job (rule `embed`: tile + embed; rule `select`: prompts + select +
patches) writes one record, `data/tiles/{slide}.status.json` and
`data/patches/{slide}.status.json`:

    {"slide_id": "S12", "status": "ok", "step": "patches", "reason": null}
    {"slide_id": "S12", "status": "quarantined", "step": "tile",
     "reason": "slide 'S12' (slides/S12.svs): not a slide format OpenSlide can read"}

A step that meets an input error of its slide (unreadable or truncated file,
no mpp where mpp is needed, a report that cannot be read) quarantines it: it
writes its outputs empty and the record, and exits 0, so the slide's shard and
the dataset go on without it. Later steps given the record (`--after`) pass the
quarantine on without touching the slide. `assemble` gathers the records into
`data/dataset/failures.tsv` and `metrics.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathgen.errors import PathgenError
from pathgen.store.io import write_json

if TYPE_CHECKING:
    from PIL import Image

OK = "ok"
QUARANTINED = "quarantined"
MODES = ("quarantine", "fail")  # params.yaml on_slide_error


def record(slide_id: str, step: str, reason: str | None = None) -> dict[str, Any]:
    """A status record: quarantined at `step` for `reason`, or ok after `step` when there is no reason."""
    return {"slide_id": slide_id, "status": QUARANTINED if reason else OK, "step": step,
            "reason": " ".join(reason.split()) if reason else None}


def write_status(rec: dict[str, Any], path: str | Path) -> None:
    write_json(rec, path)


def read_status(path: str | Path) -> dict[str, Any]:
    """A status record; PathgenError naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PathgenError(f"slide status {path} not found; run the slide's job first") from None
    except (OSError, ValueError) as exc:
        raise PathgenError(f"slide status {path} cannot be read: {exc}") from None
    if not isinstance(rec, dict) or rec.get("status") not in (OK, QUARANTINED) or not rec.get("slide_id"):
        raise PathgenError(f"slide status {path} is not a status record")
    return rec


def upstream_quarantine(paths: list[str | Path]) -> dict[str, Any] | None:
    """The first quarantine recorded in `paths` (the earlier jobs and steps of a slide), else None."""
    for path in paths:
        rec = read_status(path)
        if rec["status"] == QUARANTINED:
            return rec
    return None


def placeholder_picture(size: int = 128) -> "Image.Image":
    """The thumbnail/overlay of a quarantined slide: grey with a red cross (deterministic bytes)."""
    import numpy as np  # here, not at import: the Snakefile imports this module on every start
    from PIL import Image

    pixels = np.full((size, size, 3), 200, np.uint8)
    idx = np.arange(size)
    for offset in (-1, 0, 1):
        j = np.clip(idx + offset, 0, size - 1)
        pixels[idx, j] = (200, 30, 30)
        pixels[idx, size - 1 - j] = (200, 30, 30)
    return Image.fromarray(pixels)


def quarantined(slide_ids: list[str], data_dir: str | Path = "data") -> list[dict[str, Any]]:
    """The quarantine records of `slide_ids` (their select job's, else their embed job's), sorted by slide."""
    found = []
    for slide_id in sorted(slide_ids):
        for path in (Path(data_dir) / "patches" / f"{slide_id}.status.json",
                     Path(data_dir) / "tiles" / f"{slide_id}.status.json"):
            if path.is_file():
                rec = read_status(path)
                if rec["status"] == QUARANTINED:
                    found.append(rec)
                break
    return found


def run_summary(slide_ids: list[str], data_dir: str | Path = "data", incomplete: dict[str, str] | None = None,
                shown: int = 20) -> str:
    """The lines a run ends with: quarantined slides (the first `shown`) and shards left out of the dataset."""
    records = quarantined(slide_ids, data_dir)
    lines = []
    if records:
        lines.append(f"pathgen: {len(records)} of {len(slide_ids)} slide(s) quarantined "
                     f"(listed in {Path(data_dir) / 'dataset' / 'failures.tsv'}):")
        lines += [f"  {r['slide_id']} [{r['step']}]: {r['reason']}" for r in records[:shown]]
        if len(records) > shown:
            lines.append(f"  ... and {len(records) - shown} more")
    for shard, why in sorted((incomplete or {}).items()):
        lines.append(f"pathgen: shard {shard} left out of the dataset: {why}")
    return "\n".join(lines)

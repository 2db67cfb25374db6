"""The per-slide patch tars (`data/patches/{slide}.tar`): member names, and reading a shard's patches back."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathgen.errors import PathgenError
from pathgen.store.io import read_tar
from pathgen.store.shards import pair_key

MEMBER = re.compile(r"^x(\d+)_y(\d+)\.jpg$")


@dataclass(frozen=True)
class Patch:
    """One patch of a shard: its key, slide, position, tissue and JPEG bytes."""

    key: str
    slide_id: str
    x: int
    y: int
    tissue: str
    image: bytes


def shard_patches(patch_tars: list[str | Path], slides: list[dict[str, Any]]) -> list[Patch]:
    """Every patch of the shard's per-slide tars, sorted by key."""
    tissue = {s["slide_id"]: s["tissue"] for s in slides}
    patches = []
    for tar in patch_tars:
        slide_id = Path(tar).name.removesuffix(".tar")
        if slide_id not in tissue:
            raise PathgenError(f"{tar}: slide '{slide_id}' is not in this shard's slide list")
        for name, data in read_tar(tar).items():
            match = MEMBER.match(name)
            if not match:
                raise PathgenError(f"{tar}: unexpected member '{name}'")
            x, y = int(match.group(1)), int(match.group(2))
            patches.append(Patch(pair_key(slide_id, x, y), slide_id, x, y, tissue[slide_id], data))
    return sorted(patches, key=lambda p: p.key)


def member_name(x: int, y: int) -> str:
    """Tar member name of the patch whose level-0 top-left is (x, y)."""
    return f"x{x:07d}_y{y:07d}.jpg"

"""Shards: fixed groups of consecutive manifest slides, the unit of model-bound work.

Shard i holds manifest rows [i*k, (i+1)*k) for k = `shards.slides_per_shard`,
so appending slides to the manifest adds shards and leaves existing ones
untouched. Shard ids are zero-padded (`00000`), as WebDataset shard names are.

A pair's key is `{slide_id}/x{X:07d}_y{Y:07d}` (level-0 coordinates): unique,
readable, and a valid WebDataset key (no dot after the last slash).
"""

from __future__ import annotations


def shard_id(index: int) -> str:
    """The zero-padded id of shard `index`."""
    return f"{index:05d}"


def shard_slides(slide_ids: list[str], slides_per_shard: int) -> dict[str, list[str]]:
    """Shard id -> slide ids, in manifest order."""
    if slides_per_shard < 1:
        raise ValueError("slides_per_shard must be >= 1")
    return {
        shard_id(i // slides_per_shard): slide_ids[i : i + slides_per_shard]
        for i in range(0, len(slide_ids), slides_per_shard)
    }


def pair_key(slide_id: str, x: int, y: int) -> str:
    """The dataset key of the patch of `slide_id` whose level-0 top-left is (x, y)."""
    return f"{slide_id}/x{x:07d}_y{y:07d}"

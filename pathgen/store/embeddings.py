"""The embeddings store contract: `data/embeddings/{slide}.zarr` (Zarr v3).

Arrays `features` (N × D float16, L2-normalised, rows in tile-grid order) and
`coords` (N × 2 int64, level-0 x, y); attrs name the model (architecture,
fingerprint, checkpoint sha256), input size, mpp and patch geometry. The group
`quality` holds one float64 array of N per patch-quality measure
(`pathgen.wsi.quality.MEASURES`), taken on the pixels the model saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import zarr
from zarr.codecs import ZstdCodec

from pathgen.store.io import atomic_path

CHUNK_ROWS = 4096


def write_embeddings(path: str | Path, features: np.ndarray, grid: pl.DataFrame, attrs: dict[str, Any],
                     quality: dict[str, np.ndarray] | None = None) -> None:
    """Write the Zarr v3 store (features float16, coords int64, quality measures float64, attrs) atomically."""
    n, dim = features.shape
    coords = grid.select("x", "y").to_numpy().astype(np.int64).reshape(n, 2)
    with atomic_path(path) as tmp:
        root = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
        root.attrs.update(attrs)
        chunk = max(1, min(n, CHUNK_ROWS))
        arr = root.create_array("features", shape=(n, dim), chunks=(chunk, dim), dtype="float16",
                                compressors=ZstdCodec(level=3), fill_value=0)
        arr[:] = features.astype(np.float16)
        arr = root.create_array("coords", shape=(n, 2), chunks=(chunk, 2), dtype="int64",
                                compressors=ZstdCodec(level=3), fill_value=0)
        arr[:] = coords
        if quality is not None:
            group = root.create_group("quality")
            for name, values in sorted(quality.items()):
                arr = group.create_array(name, shape=(n,), chunks=(chunk,), dtype="float64",
                                         compressors=ZstdCodec(level=3), fill_value=0.0)
                arr[:] = np.asarray(values, np.float64)


def read_quality(path: str | Path) -> dict[str, np.ndarray] | None:
    """The store's patch-quality measures by name (float64, N each), or None if it has none."""
    root = zarr.open_group(store=str(path), mode="r", zarr_format=3)
    if "quality" not in root:
        return None
    group = root["quality"]
    return {name: np.asarray(group[name][:], np.float64) for name in sorted(group.array_keys())}


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features float32 N × D, coords int64 N × 2, attrs) of an embeddings store."""
    root = zarr.open_group(store=str(path), mode="r", zarr_format=3)
    return (np.asarray(root["features"][:], dtype=np.float32), np.asarray(root["coords"][:]), dict(root.attrs))

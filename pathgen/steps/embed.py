"""embed: CLIP image features of every tissue patch of a slide, into a Zarr store.

Patches are read by DataLoader worker processes, each with its own OpenSlide
handle, and preprocessed with the model's own transform (resize to the model
input, 336 px for PathGen-CLIP-L_init). Features are L2-normalised and stored
as float16 (N × D) with the patch coordinates; the attrs carry the model
fingerprint so a store can always be traced to the weights that made it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pathgen.errors import SlideError
from pathgen.models.clip import ClipModel, encode_images, load_clip
from pathgen.store.embeddings import write_embeddings
from pathgen.wsi.slide import Slide


class PatchDataset(Dataset):
    """Grid patches of one slide, preprocessed for the model; read errors come back as data."""

    def __init__(self, wsi: str | Path, slide_id: str, mpp_override: float | None, grid: pl.DataFrame, transform):
        self.wsi, self.slide_id, self.mpp_override = str(wsi), slide_id, mpp_override
        self.rows = grid.select("x", "y", "level", "read_size", "out_size").to_numpy()
        self.transform = transform
        self._slide: Slide | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> Slide:
        # One handle per process: OpenSlide handles must not cross a fork.
        if self._slide is None or self._pid != os.getpid():
            self._slide = Slide(self.wsi, self.slide_id, self.mpp_override)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        x, y, level, read_size, out_size = (int(v) for v in self.rows[index])
        try:
            image = self._open().read_patch(x, y, level, read_size, out_size)
        except SlideError as exc:
            return index, None, str(exc)
        return index, self.transform(image), None


def _collate(items):
    errors = [err for _, _, err in items if err is not None]
    if errors:
        return None, None, errors[0]
    indices = torch.tensor([i for i, _, _ in items])
    return indices, torch.stack([t for _, t, _ in items]), None


def embed_patches(clip: ClipModel, dataset: PatchDataset, batch_size: int, num_workers: int,
                  progress: bool = True) -> np.ndarray:
    """Features (N × D float32, L2-normalised) of every patch of `dataset`, in grid order."""
    dim = clip.model.visual.output_dim
    features = np.zeros((len(dataset), dim), np.float32)
    if len(dataset) == 0:
        return features
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=clip.device.type == "cuda",
        persistent_workers=False,
    )
    bar = tqdm(total=len(dataset), desc=f"embed {dataset.slide_id}", unit="patch", file=sys.stderr,
               disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        for indices, batch, error in loader:
            if error is not None:
                raise SlideError(error)
            features[indices.numpy()] = encode_images(clip, batch)
            bar.update(len(indices))
    finally:
        bar.close()
    return features


def run_embed(wsi: str | Path, slide_id: str, grid_path: str | Path, clip_cfg: dict[str, Any],
              embed_cfg: dict[str, Any], out: str | Path, mpp_override: float | None = None,
              threads: int | None = None, progress: bool = True) -> np.ndarray:
    """The embed step: features of every grid patch of one slide into `out` (Zarr)."""
    if threads:
        torch.set_num_threads(threads)
    grid = pl.read_parquet(grid_path)
    clip = load_clip(clip_cfg, embed_cfg["device"])
    # Open once in this process so that a broken slide fails here, named, before workers start.
    with Slide(wsi, slide_id, mpp_override) as slide:
        mpp = slide.mpp
    dataset = PatchDataset(wsi, slide_id, mpp_override, grid, clip.preprocess)
    workers = min(embed_cfg["num_workers"], max(0, len(dataset) // embed_cfg["batch_size"]))
    features = embed_patches(clip, dataset, embed_cfg["batch_size"], workers, progress)
    geometry = grid.select("size", "level", "read_size", "out_size").unique().sort("size").to_dicts()
    write_embeddings(out, features, grid, {
        "slide_id": slide_id,
        "model": clip.name,
        "model_fingerprint": clip.fingerprint,
        "checkpoint_sha256": clip.checkpoint_sha256,
        "input_size": clip.input_size,
        "mpp": mpp,
        "patch": geometry[0] if geometry else None,
        "normalized": True,
        "n_patches": int(features.shape[0]),
        "dim": int(features.shape[1]),
    })
    return features


def write_quarantined_embeddings(slide_id: str, reason: str, out: str | Path) -> None:
    """The embeddings store of a quarantined slide: no rows, attrs naming the reason (no model is loaded)."""
    empty = pl.DataFrame(schema={"x": pl.Int64, "y": pl.Int64})
    write_embeddings(out, np.zeros((0, 0), np.float32), empty,
                     {"slide_id": slide_id, "quarantined": reason, "n_patches": 0, "dim": 0})

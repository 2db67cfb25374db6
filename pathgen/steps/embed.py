"""embed: CLIP image features of every tissue patch of a slide, into a Zarr store.

Patches are read by DataLoader worker processes (`readers`, from the job's resources: they change
no byte), each with its own slide handle, while the main process runs the forward pass. A reader
hands over the patch at the model's input size as uint8 pixels; the model's own normalisation
(open_clip's ToTensor + Normalize, the same float32 operations) is applied on the model's device.

How a patch reaches the input size is `embed.reader`:

* `tiles` (default): the slide's stored JPEG tiles are decoded directly, at the libjpeg DCT scale
  that lands on the input size (a 672 px patch decodes at 1/2 for a 336 px model), then reduced by
  an exact box filter if an integer factor remains (`Slide.read_patch_scaled`). Formats or regions
  the tiles cannot serve fall back to the reference path, patch by patch.
* `openslide`: the reference path: OpenSlide `read_patch` and open_clip's preprocess (bicubic
  resize, centre crop).

The forward pass runs at `embed.precision`: on the CPU `auto` is float64 weights and activations
(`fp64`), whose results are the same float16 bytes on every CPU (the other precisions' float32
rounding differs between AVX2 and AVX-512 kernels and thread counts); on CUDA it is bf16/fp16
autocast. Features are L2-normalised and stored as float16 (N × D) with the patch coordinates; the attrs carry the model
fingerprint, precision and reader so a store can always be traced to what made it.

Each reader also measures the patch's quality on the pixels the model sees (`pathgen.wsi.quality`:
open glass, marker ink, folds, focus), stored beside the features; select applies the thresholds
(`select.qc`), so changing them re-runs select only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pathgen.errors import ModelError, SlideError
from pathgen.models.clip import ClipModel, encode_images, load_clip, with_dtype
from pathgen.models.device import resolve_device
from pathgen.store.embeddings import write_embeddings
from pathgen.wsi.quality import MEASURES, measure
from pathgen.wsi.slide import Slide

DEFAULT_READERS = 2
READERS = ("tiles", "openslide")
PRECISIONS = {"fp64": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # -> autocast dtype
PREFETCH_BATCHES = 4  # batches each reader keeps ready ahead of the forward pass


def resolve_precision(precision: str, device: torch.device) -> str:
    """embed.precision as run: `auto` is bf16 on CUDA where supported (else fp16), fp64 on CPU."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp64"
    if precision not in PRECISIONS:
        raise ModelError(f"params.yaml embed.precision is '{precision}'; expected auto, {', '.join(PRECISIONS)}")
    return precision


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype of the CLIP's weights at a resolved `precision`: float64 for fp64, else float32
    (fp16 and bf16 are autocast over float32 weights)."""
    return torch.float64 if precision == "fp64" else torch.float32


class ModelInput:
    """The model's preprocess split in two: geometry (PIL, before ToTensor) and normalisation (mean, std).

    `geometry(image)` then `normalize(uint8 NHWC batch)` (on the model's device) or `pixels_to_input`
    (one patch, in a reader process, through a per-channel table of the 256 values) gives, bit for bit,
    `preprocess(image)`: the same float32 operations (x / 255 - mean) / std on the same values.
    """

    def __init__(self, preprocess: Callable, size: int):
        transforms = list(getattr(preprocess, "transforms", []))
        names = [type(t).__name__ for t in transforms]
        if len(names) < 2 or names[-1] != "Normalize" or not names[-2].endswith("ToTensor"):
            raise ModelError(f"the CLIP's image transform ends in {names[-2:]}, not ToTensor + Normalize: "
                             "cannot split it into geometry and normalisation")
        self.size = size
        self._geometry = transforms[:-2]
        normalize = transforms[-1]
        self.mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)
        levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256)
        self._table = self.normalize(levels.permute(0, 2, 3, 1), torch.device("cpu"))[0, :, 0].numpy().copy()

    def geometry(self, image):
        for transform in self._geometry:
            image = transform(image)
        return image

    def normalize(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 (N, H, W, 3) pixels -> the model's float32 (N, 3, H, W) input, on `device`."""
        mean, std = (self.mean, self.std) if device.type == "cpu" else (self.mean.to(device), self.std.to(device))
        batch = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        return batch.float().div(255).sub(mean).div(std)

    def pixels_to_input(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) pixels -> the model's float32 (3, H, W) input: a table lookup per channel."""
        return torch.from_numpy(np.stack([self._table[c][pixels[..., c]] for c in range(3)]))


class PatchDataset(Dataset):
    """Grid patches of one slide at the model's input size; read errors come back as data.

    Items are (index, pixels, quality, error): uint8 (H, W, 3) pixels, normalised later on the
    model's device, or with `normalize=True` the model's float32 (3, H, W) input already (on CPU,
    where the main process should do nothing but the forward pass); the patch's quality measures
    (float64, MEASURES order) taken on the uint8 pixels; the error message of a failed read.
    """

    def __init__(self, wsi: str | Path, slide_id: str, mpp_override: float | None, grid: pl.DataFrame,
                 model_input: ModelInput, reader: str = "tiles", normalize: bool = False):
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got '{reader}'")
        self.wsi, self.slide_id, self.mpp_override = str(wsi), slide_id, mpp_override
        self.rows = grid.select("x", "y", "level", "read_size", "out_size").to_numpy()
        self.model_input, self.reader, self.normalize = model_input, reader, normalize
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

    def read(self, index: int):
        """Patch `index` as a PIL image at the model's input size (SlideError on a read failure)."""
        x, y, level, read_size, out_size = (int(v) for v in self.rows[index])
        slide = self._open()
        if self.reader == "tiles":
            image = slide.read_patch_scaled(x, y, level, read_size, self.model_input.size)
            if image is not None:
                return image
        return self.model_input.geometry(slide.read_patch(x, y, level, read_size, out_size))

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]:
        try:
            image = self.read(index)
        except SlideError as exc:
            return index, None, None, str(exc)
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        size = self.model_input.size
        if pixels.shape != (size, size, 3):
            raise AssertionError(f"patch {index} of {self.slide_id} came out {pixels.shape}, not {size} x {size} RGB")
        values = measure(pixels)
        quality = torch.tensor([values[name] for name in MEASURES], dtype=torch.float64)
        if self.normalize:
            return index, self.model_input.pixels_to_input(pixels), quality, None
        return index, torch.from_numpy(pixels.copy()), quality, None


def _collate(items):
    errors = [err for *_, err in items if err is not None]
    if errors:
        return None, None, None, errors[0]
    indices = torch.tensor([i for i, *_ in items])
    quality = torch.stack([q for _, _, q, _ in items])
    tensors = [t for _, t, _, _ in items]
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # In a reader process: stack straight into shared memory, as torch's default_collate does, so the
        # batch is not copied again on its way to the main process.
        storage = tensors[0]._typed_storage()._new_shared(len(tensors) * tensors[0].numel(), device="cpu")
        out = tensors[0].new(storage).resize_(len(tensors), *tensors[0].shape)
    return indices, torch.stack(tensors, out=out), quality, None


def embed_patches(clip: ClipModel, dataset: PatchDataset, batch_size: int, readers: int,
                  precision: str = "fp32", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features (N × D float32, L2-normalised) and quality measures (N × len(MEASURES) float64) of
    every patch of `dataset`, in grid order.

    `readers` worker processes decode patches ahead of the forward pass (`PREFETCH_BATCHES` batches
    each); batches are pinned and copied with non_blocking on CUDA, and a batch's features are
    fetched from the device only after the next batch has been launched. Workers are not persistent:
    the loader makes one pass over one slide. The forward pass runs on weights of `precision`'s
    dtype (`weights_dtype`; a converted copy when `clip`'s are another).
    """
    clip = with_dtype(clip, weights_dtype(precision))
    dim = clip.model.visual.output_dim
    features = np.zeros((len(dataset), dim), np.float32)
    quality = np.zeros((len(dataset), len(MEASURES)), np.float64)
    if len(dataset) == 0:
        return features, quality
    autocast_dtype = PRECISIONS[precision]
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=readers,
        collate_fn=_collate,
        pin_memory=clip.device.type == "cuda",
        prefetch_factor=PREFETCH_BATCHES if readers > 0 else None,
        persistent_workers=False,
    )
    bar = tqdm(total=len(dataset), desc=f"embed {dataset.slide_id}", unit="patch", file=sys.stderr,
               disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def collect() -> None:
        indices, batch_features = pending
        features[indices.numpy()] = batch_features.cpu().numpy()
        bar.update(len(indices))

    try:
        for indices, batch, batch_quality, error in loader:
            if error is not None:
                raise SlideError(error)
            quality[indices.numpy()] = batch_quality.numpy()
            if batch.dtype == torch.uint8:
                batch = dataset.model_input.normalize(batch, clip.device)
            launched = (indices, encode_images(clip, batch, autocast_dtype, to_numpy=False))
            if pending is not None:
                collect()
            pending = launched
        if pending is not None:
            collect()
    finally:
        bar.close()
    return features, quality


def run_embed(wsi: str | Path, slide_id: str, grid_path: str | Path, clip_cfg: dict[str, Any],
              embed_cfg: dict[str, Any], out: str | Path, mpp_override: float | None = None,
              threads: int | None = None, progress: bool = True, readers: int | None = None) -> np.ndarray:
    """The embed step: features of every grid patch of one slide into `out` (Zarr).

    `threads`: torch threads of the forward pass; `readers`: patch-reading processes besides
    (DEFAULT_READERS when None). Neither changes a byte of the output.
    """
    if threads:
        torch.set_num_threads(threads)
    readers = DEFAULT_READERS if readers is None else readers
    if readers < 0:
        raise ValueError(f"readers must be >= 0, got {readers}")
    grid = pl.read_parquet(grid_path)
    precision = resolve_precision(embed_cfg["precision"], resolve_device(embed_cfg["device"]))
    clip = load_clip(clip_cfg, embed_cfg["device"], dtype=weights_dtype(precision))
    model_input = ModelInput(clip.preprocess, clip.input_size)
    # Open once in this process so that a broken slide fails here, named, before workers start.
    with Slide(wsi, slide_id, mpp_override) as slide:
        mpp = slide.mpp
    dataset = PatchDataset(wsi, slide_id, mpp_override, grid, model_input, embed_cfg["reader"],
                           normalize=clip.device.type == "cpu")
    workers = min(readers, max(0, len(dataset) // embed_cfg["batch_size"]))
    features, quality = embed_patches(clip, dataset, embed_cfg["batch_size"], workers, precision, progress)
    geometry = grid.select("size", "level", "read_size", "out_size").unique().sort("size").to_dicts()
    write_embeddings(out, features, grid, {
        "slide_id": slide_id,
        "model": clip.name,
        "model_fingerprint": clip.fingerprint,
        "checkpoint_sha256": clip.checkpoint_sha256,
        "input_size": clip.input_size,
        "precision": precision,
        "reader": embed_cfg["reader"],
        "mpp": mpp,
        "patch": geometry[0] if geometry else None,
        "normalized": True,
        "n_patches": int(features.shape[0]),
        "dim": int(features.shape[1]),
    }, quality={name: quality[:, i] for i, name in enumerate(MEASURES)})
    return features


def write_quarantined_embeddings(slide_id: str, reason: str, out: str | Path) -> None:
    """The embeddings store of a quarantined slide: no rows, attrs naming the reason (no model is loaded)."""
    empty = pl.DataFrame(schema={"x": pl.Int64, "y": pl.Int64})
    write_embeddings(out, np.zeros((0, 0), np.float32), empty,
                     {"slide_id": slide_id, "quarantined": reason, "n_patches": 0, "dim": 0})

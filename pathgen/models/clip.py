"""Loading the retrieval CLIP (PathGen-CLIP-L_init, or the tiny offline stand-in).

One code path for both: an optional open_clip model config is registered,
then `open_clip.create_model_and_transforms(model, pretrained=<local file>)`
builds the architecture and loads the checkpoint. Nothing is fetched from a hub.

On the CPU the model runs in float64 (`CPU_DTYPE`) unless asked otherwise: its results then
differ between CPUs (AVX2 or AVX-512 kernels, BLAS code paths, thread counts) only in float64
rounding, which the float32 and float16 values it is stored as never show. Text features are
always computed on the CPU, so their bytes are the same on every machine.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import open_clip
import torch

from pathgen.errors import ModelError
from pathgen.models.device import resolve_device
from pathgen.models.fingerprint import file_sha256, hash_store
from pathgen.store.cache import ItemCache

TEXT_CACHE_AGENT = "clip-text"  # item cache agent of text features: fingerprint = the CLIP's, payload = the text
CPU_DTYPE = torch.float64  # the CPU's reproducible mode (module docstring)


@dataclass
class ClipModel:
    """A loaded CLIP: model in eval mode, its image transform and tokenizer."""

    name: str
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    input_size: int
    fingerprint: str  # sha256 over architecture name, config and checkpoint bytes
    checkpoint_sha256: str
    dtype: torch.dtype = torch.float32  # of the weights; inputs are cast to it


def clip_fingerprint(cfg: dict[str, Any], store: str | Path | None = None) -> tuple[str, str]:
    """(fingerprint, checkpoint sha256) of the CLIP named by params.yaml's `clip` section.

    The checkpoint's sha256 is read from the hash store `store` (pathgen.models.fingerprint.hash_store)
    while the file's identity is unchanged, so a job does not re-hash a 1.7 GB checkpoint; the value
    is the content hash either way, so jobs with and without a store agree.
    """
    checkpoint = Path(cfg["checkpoint"])
    if not checkpoint.is_file():
        raise ModelError(
            f"CLIP checkpoint {checkpoint} not found (params.yaml clip.checkpoint); "
            "run `pathgen models tiny` for the offline demo model or place the PathGen-CLIP-L weights there"
        )
    ckpt_sha = file_sha256(checkpoint, store)
    digest = hashlib.sha256()
    digest.update(json.dumps({k: cfg[k] for k in ("model", "force_quick_gelu", "input_size")}, sort_keys=True).encode())
    if cfg.get("config"):
        digest.update(Path(cfg["config"]).read_bytes())
    digest.update(ckpt_sha.encode())
    return digest.hexdigest(), ckpt_sha


def load_clip(cfg: dict[str, Any], device: str = "cpu", store: str | Path | None = None,
              dtype: torch.dtype | None = None) -> ClipModel:
    """Build and load the CLIP named by params.yaml's `clip` section; ModelError names the file.

    `store`: the checkpoint hash store for the fingerprint (`clip_fingerprint`). `dtype` of the
    weights: None is `CPU_DTYPE` on the CPU, float32 elsewhere (where autocast may lower it)."""
    if cfg.get("config"):
        config_path = Path(cfg["config"])
        if not config_path.is_file():
            raise ModelError(f"open_clip model config {config_path} not found (params.yaml clip.config)")
        if config_path.stem != cfg["model"]:
            # open_clip registers a config under its file name.
            raise ModelError(f"params.yaml clip.config {config_path} must be named '{cfg['model']}.json' (clip.model)")
        try:
            open_clip.add_model_config(config_path)
        except (json.JSONDecodeError, OSError) as exc:
            raise ModelError(f"open_clip model config {config_path} is not valid JSON: {exc}") from None
    if open_clip.get_model_config(cfg["model"]) is None:
        raise ModelError(f"unknown open_clip architecture '{cfg['model']}' (params.yaml clip.model)")
    fingerprint, ckpt_sha = clip_fingerprint(cfg, store)
    torch_device = resolve_device(device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg["model"],
            pretrained=str(cfg["checkpoint"]),
            force_quick_gelu=cfg["force_quick_gelu"],
            device=torch_device,
        )
    except Exception as exc:  # open_clip raises RuntimeError/KeyError/pickle errors for a bad file
        raise ModelError(f"cannot load CLIP checkpoint {cfg['checkpoint']} as '{cfg['model']}': {exc}") from None
    dtype = dtype or (CPU_DTYPE if torch_device.type == "cpu" else torch.float32)
    model = model.to(dtype).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    if size != cfg["input_size"]:
        raise ModelError(f"params.yaml clip.input_size is {cfg['input_size']} but '{cfg['model']}' takes {size} px")
    return ClipModel(
        name=cfg["model"],
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(cfg["model"]),
        device=torch_device,
        input_size=size,
        fingerprint=fingerprint,
        checkpoint_sha256=ckpt_sha,
        dtype=dtype,
    )


def with_dtype(clip: ClipModel, dtype: torch.dtype) -> ClipModel:
    """`clip` with weights of `dtype`: itself when they already are, else a converted copy (the
    model is not changed in place, so `clip` stays what it says it is)."""
    if clip.dtype == dtype:
        return clip
    return dataclasses.replace(clip, model=copy.deepcopy(clip.model).to(dtype), dtype=dtype)


@torch.inference_mode()
def encode_images(clip: ClipModel, batch: torch.Tensor, autocast_dtype: torch.dtype | None = None,
                  to_numpy: bool = True) -> np.ndarray | torch.Tensor:
    """L2-normalised image features (float32) of a preprocessed batch.

    The batch is cast to the model's dtype. With `autocast_dtype` (torch.bfloat16 or torch.float16)
    the forward pass runs under torch.autocast on the model's device; the features are normalised in
    the model's dtype (at least float32), then returned as float32. `to_numpy=False` leaves
    them on the device (no synchronisation), for a caller that overlaps batches.
    """
    batch = batch.to(clip.device, non_blocking=True).to(clip.dtype)
    if autocast_dtype is None:
        features = clip.model.encode_image(batch)
    else:
        with torch.autocast(device_type=clip.device.type, dtype=autocast_dtype):
            features = clip.model.encode_image(batch)
    features = torch.nn.functional.normalize(features.to(clip.dtype), dim=-1).float()
    return features.cpu().numpy() if to_numpy else features


@torch.inference_mode()
def encode_texts(clip: ClipModel, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised text features (float32, computed in the model's dtype), one row per text."""
    dim = clip.model.text_projection.shape[1] if hasattr(clip.model, "text_projection") else None
    if not texts:
        return np.zeros((0, dim or 0), np.float32)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = clip.tokenizer(texts[start : start + batch_size]).to(clip.device)
        out.append(clip.model.encode_text(tokens, normalize=True).float().cpu().numpy())
    return np.concatenate(out)


class LazyClip:
    """The CLIP of a `clip` section, loaded on the first `get()` only; `loaded` says whether it was."""

    def __init__(self, cfg: dict[str, Any], device: str = "cpu", store: str | Path | None = None):
        self.cfg, self.device, self.store = cfg, device, store
        self._clip: ClipModel | None = None

    @property
    def loaded(self) -> bool:
        return self._clip is not None

    def get(self) -> ClipModel:
        if self._clip is None:
            self._clip = load_clip(self.cfg, self.device, self.store)
        return self._clip


def _vector_value(vector: np.ndarray) -> str:
    """A text feature as a cache value: base64 of its exact little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _vector_from_value(value: Any) -> np.ndarray | None:
    """The float32 vector of a cache value, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None
    if not raw or len(raw) % 4:
        return None
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def cached_text_features(clip: LazyClip, fingerprint: str, texts: list[str],
                         cache: ItemCache | None) -> np.ndarray:
    """L2-normalised text features (float32, one row per text), read from `cache` where it holds them.

    `cache`: a pathgen.store.cache.ItemCache under `text_cache_fingerprint(fingerprint)` (agent
    TEXT_CACHE_AGENT), or None.
    Its key is the CLIP's `fingerprint` and the text; its value is the vector's exact float32 bytes, so
    a cached row is the computed row, byte for byte. The CLIP is loaded only when some text is missing.
    A missing text is encoded alone (a batch of one), so its vector does not depend on which other
    texts happened to be cached.
    """
    if not texts:
        return np.zeros((0, 0), np.float32)
    found = cache.get_many(texts) if cache is not None else [None] * len(texts)
    rows: list[np.ndarray | None] = [_vector_from_value(v) for v in found]
    if len({len(r) for r in rows if r is not None}) > 1:
        rows = [None] * len(texts)  # inconsistent widths: trust none of them
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        model = clip.get()
        if model.fingerprint != fingerprint:
            raise ModelError(f"CLIP checkpoint {clip.cfg['checkpoint']} changed while the job ran (fingerprint)")
        for i in missing:
            rows[i] = encode_texts(model, [texts[i]])[0]
            if cache is not None:
                cache.put(texts[i], _vector_value(rows[i]))
    return np.stack(rows).astype(np.float32, copy=False)


def text_cache_fingerprint(fingerprint: str) -> str:
    """The item cache fingerprint of a CLIP's text features: its `fingerprint` and how they are computed
    (on the CPU, in `CPU_DTYPE`), so rows computed another way are never taken for these."""
    return hashlib.sha256(f"{fingerprint}\x1fcpu\x1f{CPU_DTYPE}".encode()).hexdigest()


def cached_clip_texts(clip_cfg: dict[str, Any], fingerprint: str, texts: list[str], cache_dir: str | Path | None,
                      flush_every: int = 32, info: dict[str, Any] | None = None) -> np.ndarray:
    """CLIP text features of `texts` (float32 rows), through the item cache under `cache_dir` (None: not
    cached); the CLIP (on CPU: the text tower is cheap and CPU rows are reproducible) is loaded only
    for texts the cache lacks. `info` receives the cache counters and whether the CLIP was loaded."""
    clip = LazyClip(clip_cfg, "cpu", hash_store(cache_dir) if cache_dir is not None else None)
    cache = (ItemCache(cache_dir, TEXT_CACHE_AGENT, text_cache_fingerprint(fingerprint), flush_every)
             if cache_dir is not None else None)
    try:
        features = cached_text_features(clip, fingerprint, texts, cache)
    finally:
        if cache is not None:
            cache.close()
    if info is not None:
        info.update(cache=cache.stats.as_dict() if cache is not None else None, clip_loaded=clip.loaded)
    return features

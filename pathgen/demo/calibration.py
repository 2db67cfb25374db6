"""Calibrating a random-weight CLIP's image features so they spread like a trained one's.

An untrained ViT maps every H&E patch to nearly the same direction (cosine
≈ 0.99 between any two), which would make the near-duplicate filter drop
almost every patch and k-means meaningless. Calibration centres and partially
whitens the image features on a set of patches, and folds that affine map into
the model's own parameters (`ln_post.bias` and `proj`), so the result is a
standard open_clip checkpoint that loads through the unchanged code path.

Everything here is float64 (the forward pass on a float64 copy of the model, the statistics, the
eigendecomposition), so the result differs between CPUs only in float64 rounding, far below the
float32 the parameters are stored in: the calibrated checkpoint is the same bytes on every CPU
(a float32 forward pass gave different checkpoints under AVX2 and AVX-512 kernels).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def raw_image_features(model: torch.nn.Module, preprocess: Callable, images: list[Image.Image]) -> np.ndarray:
    """Un-normalised image features (N × D), computed in float64 on a float64 copy of `model`."""
    batch = torch.stack([preprocess(image) for image in images]).double()
    return copy.deepcopy(model).double().encode_image(batch, normalize=False).numpy()


@torch.no_grad()
def whiten_image_features(model: torch.nn.Module, preprocess: Callable, images: list[Image.Image],
                          shrinkage: float) -> None:
    """Fold centring and shrunk whitening of the features of `images` into the visual tower, in place.

    The whitening matrix is (Σ + shrinkage · tr(Σ)/D · I)^(-1/2): shrinkage → ∞ only
    centres, 0 fully whitens (every pair of patches near orthogonal).
    """
    visual = model.visual
    features = raw_image_features(model, preprocess, images)
    mean = features.mean(axis=0)
    cov = np.cov((features - mean).T)
    ridge = shrinkage * np.trace(cov) / cov.shape[0]
    values, vectors = np.linalg.eigh(cov + ridge * np.eye(cov.shape[0]))
    whitening = vectors @ np.diag(values**-0.5) @ vectors.T
    proj = visual.proj.double().numpy()
    # features = ln_post(x) @ proj; want (features - mean) @ W = (ln_post(x) - c) @ (proj @ W) with c @ proj = mean.
    shift = mean @ np.linalg.pinv(proj)
    visual.ln_post.bias -= torch.from_numpy(shift).to(visual.ln_post.bias.dtype)
    visual.proj.copy_(torch.from_numpy(proj @ whitening).to(visual.proj.dtype))

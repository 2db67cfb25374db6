"""Seeds derived from (global seed, slide id, purpose), never from order or time."""

import hashlib

import numpy as np


def derive_seed(seed: int, *keys: str) -> int:
    """A 63-bit seed that depends only on the global seed and the given keys."""
    text = "\x1f".join([str(seed), *keys])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A NumPy generator seeded by `derive_seed(seed, *keys)`."""
    return np.random.default_rng(derive_seed(seed, *keys))

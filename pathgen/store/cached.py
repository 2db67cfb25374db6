"""Run a model over items, calling it only for the items the cache does not hold."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pathgen.store.cache import ItemCache


def cached_map(cache: ItemCache, payloads: Sequence[bytes], compute: Callable[[list[int]], list[Any]],
               batch_size: int) -> list[Any]:
    """Results for every payload: cached ones read back, the rest computed by `compute`
    (called with batches of item indices, in order) and stored as they come."""
    results = cache.get_many(list(payloads))
    missing = [i for i, value in enumerate(results) if value is None]
    for start in range(0, len(missing), batch_size):
        batch = missing[start : start + batch_size]
        for index, value in zip(batch, compute(batch), strict=True):
            results[index] = value
            cache.put(payloads[index], value)
    return results

"""Ask an agent only for the items the cache does not hold."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pathgen.store.cache import ItemCache


def cached_answers(cache: ItemCache, payloads: Sequence[bytes], requests: Callable[[int], Any],
                   agent: Any) -> list[dict[str, Any]]:
    """The answer record for every payload: cached ones read back, the rest asked of `agent`
    (`requests(i)` builds item i's request; only misses are built and sent) and stored as each
    answer arrives, so a job killed mid-shard keeps what it had finished."""
    results = cache.get_many(list(payloads))
    missing = [i for i, value in enumerate(results) if value is None]
    if missing:
        for j, answer in agent.stream([requests(i) for i in missing]):
            record = answer.record()
            results[missing[j]] = record
            cache.put(payloads[missing[j]], record)
    return results

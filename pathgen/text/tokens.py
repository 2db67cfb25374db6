"""CLIP token counts: the unit every caption length limit is stated in."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import open_clip

CONTEXT_LENGTH = 77  # CLIP's text context (start and end tokens included)


@cache
def clip_token_counter(model_name: str) -> Callable[[str], int]:
    """A function counting the CLIP tokens of a text, start and end tokens included."""
    tokenizer = open_clip.get_tokenizer(model_name)
    return lambda text: len(tokenizer.encode(text)) + 2

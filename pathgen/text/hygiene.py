"""Text hygiene for model outputs: what reaches a caption is printable, single-spaced Unicode."""

from __future__ import annotations

import unicodedata


def clean_generated_text(text: str) -> str:
    """`text` without control/format/private-use characters or U+FFFD, whitespace runs made one space.

    Models decode stray byte tokens into such characters (a random tiny model
    does so often); a caption must not carry them into the dataset.
    """
    kept = (" " if ch.isspace() else ch for ch in text
            if ch.isspace() or (ch != "\ufffd" and not unicodedata.category(ch).startswith("C")))
    return " ".join("".join(kept).split())

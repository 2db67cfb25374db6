"""Sentence splitting for reports and model text: abbreviations, decimals and list markers kept whole."""

from __future__ import annotations

import re

DEFAULT_MAX_WORDS = 50


# Words ending in "." that never end a sentence (compared in lower case).
ABBREVIATIONS = frozenset(
    """
    e.g. i.e. eg. ie. approx. appr. ca. cf. vs. viz. al. esp. incl. resp. dept.
    dr. drs. mr. mrs. ms. prof. jr. sr. st. inc. ltd. co. corp.
    """.split()
)


# Words ending in "." that do not end a sentence when a number follows ("No. 5").
NUMBER_ABBREVIATIONS = frozenset("no. nos. fig. figs. vol. ref. pg. art. sec.".split())


_CLOSERS = "\"')]}»”’"


_OPENERS = "\"'([{«“‘"


_LETTER_DOTS = re.compile(r"(?:[^\W\d_]\.){2,}")  # e.g. i.e. u.s. a.m.


_LIST_MARKER = re.compile(r"(?:\d{1,3}|[^\W\d_])\.")  # "1." "b." at the start of an item


def normalize_whitespace(text: str) -> str:
    """`text` with every whitespace run made one space, and no leading/trailing space."""
    return " ".join(text.split())


def _ends_sentence(word: str, following: str | None, item_start: bool) -> bool:
    """Whether a sentence ends after `word` (the next word is `following`)."""
    core = word.rstrip(_CLOSERS)
    if not core:
        return False
    if core[-1] in "!?…":
        return True
    if core[-1] != ".":
        return False
    if following is not None:
        head = following.lstrip(_OPENERS)
        if head[:1].islower():
            return False  # "approx. three", "cf. the": a sentence does not start lower case
    bare = core.lstrip(_OPENERS).lower()
    if bare in ABBREVIATIONS or _LETTER_DOTS.fullmatch(bare):
        return False
    if bare in NUMBER_ABBREVIATIONS and following is not None and following.lstrip("#(")[:1].isdigit():
        return False
    if item_start and _LIST_MARKER.fullmatch(bare):
        return False  # "1. Lung ...", "A. Margins ...": a list marker, not a sentence
    return True


def _sentences(words: list[str]) -> list[list[str]]:
    sentences: list[list[str]] = []
    current: list[str] = []
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else None
        item_start = not current or current[-1].endswith(":")
        current.append(word)
        if _ends_sentence(word, following, item_start):
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, whitespace normalised (abbreviations and decimals kept whole)."""
    return [" ".join(words) for words in _sentences(normalize_whitespace(text).split())]


def _split_long(words: list[str], max_words: int) -> list[list[str]]:
    """Cut one over-long sentence into chunks of <= max_words words.

    Each cut is after the last comma/semicolon that fits, provided that keeps
    at least half of max_words in the chunk; otherwise at max_words words.
    """
    chunks: list[list[str]] = []
    rest = words
    shortest = max(1, (max_words + 1) // 2)
    while len(rest) > max_words:
        cut = max_words
        for k in range(max_words, shortest - 1, -1):
            if rest[k - 1].endswith((",", ";")):
                cut = k
                break
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    return chunks


def split_report(text: str, max_words: int = DEFAULT_MAX_WORDS) -> list[str]:
    """Cut a report into parts of at most `max_words` words, at sentence boundaries.

    Whole sentences are packed greedily; a sentence longer than `max_words`
    is cut at a comma/semicolon, else between words. Parts are non-empty and
    " ".join(parts) == normalize_whitespace(text). Empty text gives [].
    """
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"max_words must be a positive integer, got {max_words!r}")
    words = text.split()
    parts: list[list[str]] = []
    current: list[str] = []
    for sentence in _sentences(words):
        if len(sentence) > max_words:
            if current:
                parts.append(current)
            *whole, current = _split_long(sentence, max_words)
            parts.extend(whole)
        elif len(current) + len(sentence) <= max_words:
            current = current + sentence
        else:
            parts.append(current)
            current = sentence
    if current:
        parts.append(current)
    return [" ".join(part) for part in parts]

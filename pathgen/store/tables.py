"""Checks on tables read back from disk, with errors that name where the table came from."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pathgen.errors import PathgenError

if TYPE_CHECKING:
    import polars as pl


def require_columns(available: Iterable[str], columns: Iterable[str], where: str) -> None:
    """PathgenError "`where` lacks column(s) ..." unless every one of `columns` is available."""
    present = set(available)
    missing = [c for c in columns if c not in present]
    if missing:
        raise PathgenError(f"{where} lacks column(s) {', '.join(missing)}")


def require_unique(frame: pl.DataFrame, column: str, where: str) -> None:
    """PathgenError "`where` has <column> 'v' more than once" naming the smallest repeated value."""
    import polars as pl

    repeated = frame.filter(pl.col(column).is_duplicated())[column]
    if len(repeated):
        raise PathgenError(f"{where} has {column} '{repeated.sort()[0]}' more than once")

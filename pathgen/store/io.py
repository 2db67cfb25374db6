"""Deterministic, atomic writers for every file the pipeline produces.

Every output is written to a temporary sibling and renamed into place only
when complete, so an interrupted job never leaves a file that looks done.
Writers fix every setting that could vary between runs (compression level,
tar member metadata, JSON key order), so the same content gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the item cache writes through this module without them
    import polars as pl
    from PIL import Image

PARQUET_SETTINGS = dict(compression="zstd", compression_level=3, statistics=True, row_group_size=65536)


def temp_sibling(directory: Path, stem: str) -> Path:
    """A unique temporary name in `directory`: hidden and marked `.tmp-`, so never taken for an output."""
    return directory / f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` on success.

    Works for files and directories. On an exception the temporary is removed
    and `path` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final.parent, final.name)
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes(text.encode("utf-8"), path)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` as sorted, indented JSON, atomically."""
    write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", path)


def write_parquet(frame: pl.DataFrame, path: str | os.PathLike) -> None:
    """Write a polars frame with fixed settings, atomically."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, **PARQUET_SETTINGS)


def write_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write a PIL image as PNG (no timestamp chunks), atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    write_bytes(buf.getvalue(), path)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Encode RGB `image` as baseline JPEG with fixed settings."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with fixed owner, mode and mtime: only name and size vary."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(members: dict[str, bytes], path: str | os.PathLike) -> None:
    """Write `members` (name -> bytes) as a tar in sorted name order, atomically."""
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(members):
                data = members[name]
                tar.addfile(tar_member(name, len(data)), io.BytesIO(data))


def read_tar(path: str | os.PathLike) -> dict[str, bytes]:
    """Read every regular member of a tar into memory, by name."""
    out: dict[str, bytes] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if info.isfile():
                out[info.name] = tar.extractfile(info).read()
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()

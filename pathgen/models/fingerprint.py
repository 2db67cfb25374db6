"""Agent fingerprints: what decides a model call's result, hashed.

A fingerprint covers the checkpoint bytes, the prompt template, the generation
settings and the backend's name and version. It keys the item cache and is
recorded next to every output the agent made.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from pathgen.errors import ModelError
from pathgen.store.io import sha256_file


@cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file, hashed once per process while its size and mtime stay the same."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def checkpoint_files(path: str | Path, what: str) -> list[Path]:
    """The files of a checkpoint (a file, or every file under a directory), sorted; ModelError if absent."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if files:
            return files
    raise ModelError(f"{what} checkpoint {path} not found; run `pathgen models tiny` or place the weights there")


def agent_fingerprint(backend: str, version: str, checkpoint: str | Path, settings: dict[str, Any], what: str) -> str:
    """sha256 over backend, version, checkpoint file names and bytes, and the settings (templates included)."""
    root = Path(checkpoint)
    digest = hashlib.sha256()
    digest.update(json.dumps({"backend": backend, "version": version, "settings": settings}, sort_keys=True).encode())
    for file in checkpoint_files(root, what):
        name = file.name if file == root else file.relative_to(root).as_posix()
        digest.update(name.encode() + b"\0" + file_sha256(file).encode())
    return digest.hexdigest()

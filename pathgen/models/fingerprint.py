"""Checkpoint content hashes, computed once per file version.

An agent's fingerprint (pathgen.models.engine.agent_fingerprint) covers the
sha256 of every checkpoint file. Hashing a 26 GB LLaVA takes 30-60 s, so a
hash is kept, per process and in a hash store shared by jobs (a directory,
by default under the item cache root), under the file's identity: absolute
path, size, mtime and inode. A file replaced or rewritten gets a new
identity and is hashed again; the fingerprint stays content-based. (Like
DVC's own state database, this trusts that a file whose size, mtime and
inode are unchanged holds the same bytes.)
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from pathgen.errors import ModelError
from pathgen.store.io import sha256_file, write_text

HASH_STORE_DIR = ".checkpoint-hashes"  # under the item cache root (hidden: not an agent's directory)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_known: dict[tuple[str, int, int, int], str] = {}  # this process's hashes, by file identity


def hash_store(cache_root: str | Path) -> Path:
    """The hash store kept beside an item cache: jobs sharing the cache share the hashes."""
    return Path(cache_root) / HASH_STORE_DIR


def file_identity(path: str | Path) -> tuple[str, int, int, int]:
    """(absolute path, size, mtime_ns, inode): what must hold for a recorded hash to be reused."""
    absolute = os.path.abspath(path)
    stat = os.stat(absolute)
    return absolute, stat.st_size, stat.st_mtime_ns, stat.st_ino


def file_sha256(path: str | Path, store: str | Path | None = None) -> str:
    """sha256 of a checkpoint file: from this process's memory or `store` when the file's identity
    is unchanged, else read (once) and recorded in both."""
    identity = file_identity(path)
    if identity in _known:
        return _known[identity]
    record = None
    if store is not None:
        name = hashlib.sha256("\0".join(map(str, identity)).encode()).hexdigest()
        record = Path(store) / name[:2] / f"{name}.sha256"
        try:
            text = record.read_text().strip()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            text = ""
        if _SHA256.match(text):
            _known[identity] = text
            return text
    digest = sha256_file(identity[0])
    _known[identity] = digest
    if record is not None:
        try:
            write_text(digest + "\n", record)
        except OSError:
            pass  # a read-only store only costs the next job a re-hash
    return digest


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

"""Item-level, content-addressed cache for model calls, shared by concurrent jobs.

Every model call (embed a patch, caption an image, revise a caption, summarise
or clean a text) is keyed by `item_key(fingerprint, payload)`: the sha256 of
the agent's fingerprint (checkpoints, prompt template, generation settings,
backend) and the exact input bytes. A parameter tweak upstream, a re-sharding
or a preempted cluster job then costs only the items not yet computed.

On disk (safe for many writers, also on NFS: files are only ever created by
atomic rename and deleted, never modified)::

    <root>/<agent>/<fingerprint dir>/fingerprint.txt       the full fingerprint
    <root>/<agent>/<fingerprint dir>/seg-<sha256[:32]>.jsonl

The fingerprint dir is the fingerprint's first 24 characters when it is a
lowercase hex digest (the usual case), else the first 24 hex digits of its
sha256. A segment holds one `{"k": key, "v": value}` JSON line per item,
sorted by key, and is named by the sha256 of its bytes: two writers writing
the same items write the same file. Temporaries start with "." and never
match the segment name.

A writer buffers items and writes a segment every `flush_every` items, on
`flush`/`close`/context exit, at normal interpreter exit and on SIGTERM (SLURM
preemption). A SIGKILL loses at most the fewer than `flush_every` unflushed
items. `compact` merges a directory's segments into one; `prune` drops
fingerprints that are no longer in use.

Costs: a reader indexes (key -> file offset, values stay on disk) every
segment up to `SCAN_LIMIT_BYTES` on its first lookup and new ones on each
miss; larger segments (compacted ones) are binary-searched per lookup. So
compact a cache with many small segments before a large run. If two writers
computed the same item with different values, a reader returns the first copy
it indexed and `compact` keeps the smallest line: both are valid results.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from pathgen.errors import PathgenError
from pathgen.store.io import temp_sibling, write_bytes
from pathgen.store.shutdown import on_shutdown

FINGERPRINT_FILE = "fingerprint.txt"
SEGMENT_GLOB = "seg-*.jsonl"
# Segments above this size are not read into the in-memory index but searched
# by bisection over their sorted lines, so a job opening a large compacted
# cache reads a few kilobytes per lookup instead of the whole file.
SCAN_LIMIT_BYTES = 4 << 20
COMPACT_FAN_IN = 64  # segments merged at once: bounds open files and memory
STALE_TEMP_AGE_S = 3600.0  # temporaries older than this belong to dead writers

_AGENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEX_FINGERPRINT_RE = re.compile(r"[0-9a-f]{24,}")
_SEGMENT_RE = re.compile(r"seg-[0-9a-f]{32}\.jsonl")
_HEX64_RE = re.compile(rb"[0-9a-f]{64}")
_LINE_HEAD, _LINE_MID, _LINE_TAIL = b'{"k":"', b'","v":', b"}\n"
_KEY_END = len(_LINE_HEAD) + 64
_VALUE_START = _KEY_END + len(_LINE_MID)
_BISECT_WINDOW = 4096
_MISSING = object()


# --- keys and lines -------------------------------------------------------------


def item_key(fingerprint: str, payload: bytes | str) -> str:
    """Hex sha256 of the fingerprint, a NUL separator and the payload (str is UTF-8 encoded).

    The separator keeps the key injective: fingerprints cannot contain NUL.
    """
    _check_fingerprint(fingerprint)
    data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
    return hashlib.sha256(fingerprint.encode("utf-8") + b"\0" + data).hexdigest()


def fingerprint_dir_name(fingerprint: str) -> str:
    """The directory name of `fingerprint`: its first 24 characters if hex, else those of its sha256."""
    _check_fingerprint(fingerprint)
    if _HEX_FINGERPRINT_RE.fullmatch(fingerprint):
        return fingerprint[:24]
    # Arbitrary strings may hold "/" or share long prefixes: hash them.
    return hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:24]


def _check_fingerprint(fingerprint: str) -> None:
    if not isinstance(fingerprint, str) or not fingerprint or any(c in fingerprint for c in "\0\n\r"):
        raise ValueError(f"cache fingerprint must be a non-empty one-line string, got {fingerprint!r}")


def _check_agent(agent: str) -> None:
    if not isinstance(agent, str) or not _AGENT_RE.fullmatch(agent):
        raise ValueError(f"cache agent name must match {_AGENT_RE.pattern}, got {agent!r}")


def _encode_line(key: str, value: Any) -> bytes:
    """One segment line; fixed key order and separators so equal items give equal bytes."""
    if value is None:
        raise ValueError("None cannot be cached: get() returns None for a miss")
    text = json.dumps({"k": key, "v": value}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def _line_key(line: bytes) -> bytes | None:
    """The key of a well-formed, complete line (cheap shape check), else None."""
    if (len(line) <= _VALUE_START + len(_LINE_TAIL) or not line.startswith(_LINE_HEAD)
            or line[_KEY_END:_VALUE_START] != _LINE_MID or not line.endswith(_LINE_TAIL)):
        return None
    key = line[len(_LINE_HEAD):_KEY_END]
    return key if _HEX64_RE.fullmatch(key) else None


def _decode_line(line: bytes, key: str) -> Any:
    """The value of `line` if it parses and belongs to `key`, else `_MISSING`."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return _MISSING
    if not isinstance(obj, dict) or obj.keys() != {"k", "v"} or obj["k"] != key or obj["v"] is None:
        return _MISSING
    return obj["v"]


# --- segment files ----------------------------------------------------------------


def _list_segments(directory: Path) -> list[tuple[str, int]]:
    """(name, size) of the segments in `directory`, sorted by name; [] when it does not exist."""
    found = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if _SEGMENT_RE.fullmatch(entry.name):
                    try:
                        found.append((entry.name, entry.stat().st_size))
                    except FileNotFoundError:  # removed by a compaction since the listing
                        continue
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found)


def _publish_segment(directory: Path, chunks: Iterable[bytes]) -> str | None:
    """Write `chunks` as a segment named by their hash (temp file + fsync + rename); its name.

    Returns None, writing nothing, when the chunks are empty. The name is only
    known once every byte is hashed, so the temporary is named independently.
    """
    tmp = temp_sibling(directory, "seg")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                digest.update(chunk)
                fh.write(chunk)
                size += len(chunk)
            fh.flush()
            # Durable before it is visible: a compaction deletes the inputs next.
            os.fsync(fh.fileno())
        if size == 0:
            tmp.unlink()
            return None
        name = f"seg-{digest.hexdigest()[:32]}.jsonl"
        os.replace(tmp, directory / name)
        return name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _valid_lines(fh: IO[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(key, line) of every valid line of a segment, in strictly increasing key order.

    Lines that are damaged, out of order or repeated are skipped: segments are
    sorted by construction, so only damage produces them.
    """
    previous = b""
    for line in fh:  # binary iteration splits on b"\n" only
        key = _line_key(line)
        if key is None or key <= previous or _decode_line(line, key.decode("ascii")) is _MISSING:
            continue
        previous = key
        yield key, line


def _bisect_segment(fh: IO[bytes], size: int, key: bytes) -> bytes | None:
    """The line of `key` in a sorted segment, by binary search over byte offsets, or None."""
    lo, hi = 0, size  # invariant: the line of `key`, if any, starts in [lo, hi); lo starts a line
    while hi - lo > _BISECT_WINDOW:
        mid = (lo + hi) // 2
        fh.seek(mid - 1)
        fh.readline()  # to the first line starting at or after mid
        start = fh.tell()
        if start >= hi:
            hi = mid
            continue
        line = fh.readline()
        found = _line_key(line)
        if found is None:
            break  # a damaged line: finish with a linear scan of [lo, hi)
        if found < key:
            lo = start + len(line)
        elif found > key:
            hi = start
        else:
            return line
    fh.seek(lo)
    pos = lo
    while pos < hi:
        line = fh.readline()
        if not line:
            break
        found = _line_key(line)
        if found == key:
            return line
        if found is not None and found > key:
            break
        pos += len(line)
    return None


def _read_fingerprint(directory: Path) -> str | None:
    try:
        text = (directory / FINGERPRINT_FILE).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    return text or None


# --- the cache --------------------------------------------------------------------


@dataclass
class CacheCounters:
    """What this process did with one cache: lookups that hit or missed, puts, segments written."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    flushes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ItemCache:
    """Content-addressed cache of one agent's results under one fingerprint.

    `get`/`get_many` see every segment of the fingerprint, including those that
    other processes wrote after this one opened (the directory is re-listed on
    a miss, and only new segments are read). `put` buffers; a segment is
    written every `flush_every` items and on `flush`, `close`, context exit,
    interpreter exit and SIGTERM. Values are JSON values other than None
    (tuples come back as lists). Thread-safe.
    """

    def __init__(self, root: str | os.PathLike, agent: str, fingerprint: str, flush_every: int = 32):
        _check_agent(agent)
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.root = Path(root)
        self.agent = agent
        self.fingerprint = fingerprint
        self.directory = self.root / agent / fingerprint_dir_name(fingerprint)
        self.flush_every = flush_every
        self.stats = CacheCounters()
        self._scan_limit = SCAN_LIMIT_BYTES
        self._pending: dict[str, bytes] = {}  # key -> encoded line, not yet on disk
        self._lock = threading.RLock()  # reentrant: the SIGTERM handler may flush mid-flush
        self._pid = os.getpid()
        self._closed = False
        self._fingerprint_checked = False
        self._reset_index()
        _register(self)

    # The index: what this process knows of the segments on disk.
    def _reset_index(self) -> None:
        self._loaded = False
        self._stale = False  # a known segment vanished (compaction): rebuild before trusting
        self._seen: set[str] = set()
        self._index: dict[str, tuple[str, int, int]] = {}  # key -> (segment, offset, length)
        self._more: dict[str, list[tuple[str, int, int]]] = {}  # further copies of a key
        self._large: list[tuple[str, int]] = []  # (segment, size) searched by bisection

    def __enter__(self) -> ItemCache:
        return self

    def __exit__(self, *exc) -> None:
        # Flush on errors too: every item buffered is a finished, valid result.
        self.close()

    def __repr__(self) -> str:
        return f"ItemCache({str(self.directory)!r}, pending={len(self._pending)})"

    def key(self, payload: bytes | str) -> str:
        """The item key of `payload` under this cache's fingerprint."""
        return item_key(self.fingerprint, payload)

    def get(self, payload: bytes | str) -> Any | None:
        """The cached value for `payload`, or None on a miss; counts a hit or a miss."""
        return self.get_many([payload])[0]

    def get_many(self, payloads: Sequence[bytes | str]) -> list[Any | None]:
        """Cached values (None for misses) for `payloads`, in order; one directory listing at most."""
        keys = [self.key(p) for p in payloads]
        with self._lock:
            found = self._lookup(keys)
            values = [found.get(k) for k in keys]
            hits = sum(v is not None for v in values)
            self.stats.hits += hits
            self.stats.misses += len(values) - hits
        return values

    def put(self, payload: bytes | str, value: Any) -> None:
        """Store `value` for `payload`; buffered, written every `flush_every` puts."""
        key = self.key(payload)
        line = _encode_line(key, value)  # fails here, not at flush, if not JSON-serialisable
        with self._lock:
            if self._closed:
                raise ValueError(f"put on a closed cache {self.directory}")
            self.stats.puts += 1
            if key in self._index and not self._stale:
                return  # already on disk: keep the first value, write nothing
            self._pending[key] = line
            if len(self._pending) >= self.flush_every:
                self.flush()

    def flush(self) -> None:
        """Write the buffered items as one segment (nothing when none are buffered)."""
        with self._lock:
            if not self._pending:
                return
            # Remove items from the buffer only once written: a SIGTERM arriving
            # mid-flush flushes them again (same bytes, same name) rather than losing them.
            items = dict(self._pending)
            keys = sorted(items)
            data = b"".join(items[k] for k in keys)
            self._ensure_directory()
            name = _publish_segment(self.directory, [data])
            self.stats.flushes += 1
            if self._loaded and name not in self._seen:
                self._seen.add(name)
                offset = 0
                for k in keys:
                    self._add_location(k, (name, offset, len(items[k])))
                    offset += len(items[k])
            for k in keys:
                if self._pending.get(k) is items[k]:
                    del self._pending[k]

    def close(self) -> None:
        """Flush and stop accepting puts; idempotent."""
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._closed = True
            _OPEN.pop(id(self), None)

    def _ensure_directory(self) -> None:
        # Checked at every flush (one stat): a prune may have removed the directory.
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / FINGERPRINT_FILE
        if not path.exists():
            write_bytes((self.fingerprint + "\n").encode("utf-8"), path)
        elif not self._fingerprint_checked:
            stored = _read_fingerprint(self.directory)
            if stored is not None and stored != self.fingerprint:
                raise PathgenError(f"cache directory {self.directory} belongs to fingerprint {stored!r}, "
                                   f"not {self.fingerprint!r}")
        self._fingerprint_checked = True

    def _lookup(self, keys: list[str]) -> dict[str, Any]:
        """Values found for `keys`: buffer first, then known segments, then new segments."""
        found: dict[str, Any] = {}
        missing = []
        for k in keys:
            value = _decode_line(self._pending[k], k) if k in self._pending else _MISSING
            if value is _MISSING:
                missing.append(k)
            else:
                found[k] = value
        if missing and self._loaded and not self._stale:
            found.update(self._find_stored(missing))
            missing = [k for k in missing if k not in found]
        # One listing per lookup; more only when a compaction elsewhere deleted
        # segments under us (then the index is rebuilt).
        for attempt in range(3):
            if not missing or (attempt and not self._stale):
                break
            if self._stale:
                self._reset_index()
            if not self._refresh():
                break  # nothing new on disk: a true miss
            found.update(self._find_stored(missing))
            missing = [k for k in missing if k not in found]
        return found

    def _refresh(self) -> bool:
        """Index segments not seen yet; True if the index changed (or was built for the first time)."""
        changed = not self._loaded
        self._loaded = True
        for _ in range(3):
            vanished = False
            for name, size in _list_segments(self.directory):
                if name in self._seen:
                    continue
                self._seen.add(name)
                if size > self._scan_limit:
                    self._large.append((name, size))
                    changed = True
                elif self._index_segment(name):
                    changed = True
                else:
                    vanished = True
            if not vanished:
                break
            # A segment went between listing and reading: a compaction wrote its
            # merged replacement first, so list again to pick that up.
        return changed

    def _index_segment(self, name: str) -> bool:
        """Add a small segment's valid lines to the index; False if it is gone."""
        try:
            data = (self.directory / name).read_bytes()
        except FileNotFoundError:
            return False
        pos = 0
        while (end := data.find(b"\n", pos)) >= 0:
            line = data[pos:end + 1]
            key = _line_key(line)
            if key is not None:
                self._add_location(key.decode("ascii"), (name, pos, len(line)))
            pos = end + 1
        return True  # a tail without a newline is a truncated line: ignored

    def _find_stored(self, keys: list[str]) -> dict[str, Any]:
        """Values of `keys` from indexed and large segments; marks the index stale if one vanished."""
        found: dict[str, Any] = {}
        todo = [k for k in keys if k in self._index]
        while todo:
            retry = []
            by_segment: dict[str, list[str]] = {}
            for k in todo:
                by_segment.setdefault(self._index[k][0], []).append(k)
            for name, seg_keys in by_segment.items():
                try:
                    with open(self.directory / name, "rb") as fh:
                        for k in sorted(seg_keys, key=lambda k: self._index[k][1]):
                            _, offset, length = self._index[k]
                            fh.seek(offset)
                            value = _decode_line(fh.read(length), k)
                            if value is not _MISSING:
                                found[k] = value
                            elif self._next_location(k):  # a damaged line: try another copy
                                retry.append(k)
                except FileNotFoundError:
                    self._stale = True
            todo = retry
        rest = [k for k in keys if k not in found and k not in self._index]
        for name, size in self._large if rest else ():
            try:
                with open(self.directory / name, "rb") as fh:
                    for k in rest:
                        if k in found:
                            continue
                        line = _bisect_segment(fh, size, k.encode("ascii"))
                        value = _MISSING if line is None else _decode_line(line, k)
                        if value is not _MISSING:
                            found[k] = value
            except FileNotFoundError:
                self._stale = True
        return found

    def _add_location(self, key: str, location: tuple[str, int, int]) -> None:
        if key in self._index:
            # Kept in case the first copy turns out damaged; duplicates are rare.
            self._more.setdefault(key, []).append(location)
        else:
            self._index[key] = location

    def _next_location(self, key: str) -> bool:
        """Drop `key`'s current (damaged) location; True if another copy is indexed."""
        others = self._more.get(key)
        if not others:
            del self._index[key]
            return False
        self._index[key] = others.pop(0)
        if not others:
            del self._more[key]
        return True


# --- flushing at exit and on SIGTERM --------------------------------------------

# Open caches, held strongly so that an unclosed cache is still flushed at exit.
_OPEN: dict[int, ItemCache] = {}


def _register(cache: ItemCache) -> None:
    _OPEN[id(cache)] = cache
    on_shutdown(_flush_open_caches)


def _flush_open_caches() -> bool:
    """Flush every open cache of this process (not of a parent it was forked from); whether it had any."""
    mine = [cache for cache in list(_OPEN.values()) if cache._pid == os.getpid()]
    for cache in mine:
        try:
            cache.flush()
        except Exception as exc:  # at exit or in a signal handler: report, never mask the exit
            print(f"pathgen.store.cache: could not flush {cache.directory}: {exc}", file=sys.stderr)
    return bool(mine)


# --- maintenance: stats, compact, prune -------------------------------------------


def _fingerprint_dirs(root: str | os.PathLike, agent: str | None) -> list[tuple[str, Path]]:
    """(agent, directory) of every fingerprint directory under `root`, for `agent` or all."""
    root = Path(root)
    if agent is not None:
        _check_agent(agent)
        agents = [root / agent]
    else:
        try:
            agents = sorted(p for p in root.iterdir() if p.is_dir() and _AGENT_RE.fullmatch(p.name))
        except FileNotFoundError:
            return []
    dirs = []
    for agent_dir in agents:
        try:
            dirs.extend((agent_dir.name, d) for d in sorted(agent_dir.iterdir())
                        if d.is_dir() and not d.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return dirs


def cache_stats(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Per agent and fingerprint: agent, fingerprint (None if unnamed), dir, segments, items, bytes.

    `items` counts distinct keys over all segments; `bytes` is the segments' total size.
    """
    rows = []
    for agent, directory in _fingerprint_dirs(root, None):
        keys: set[bytes] = set()
        segments = size = 0
        for name, seg_size in _list_segments(directory):
            try:
                with open(directory / name, "rb") as fh:
                    keys.update(key for line in fh if (key := _line_key(line)) is not None)
            except FileNotFoundError:
                continue
            segments += 1
            size += seg_size
        rows.append({"agent": agent, "fingerprint": _read_fingerprint(directory), "dir": directory.name,
                     "segments": segments, "items": len(keys), "bytes": size})
    return rows


def verify(root: str | os.PathLike) -> dict[str, Any]:
    """Check every entry of the cache at `root` against its content address.

    A fingerprint directory must be named by its `fingerprint.txt` (`fingerprint_dir_name`); a
    segment must be named by the sha256 of its bytes, and every line of it must be a well-formed
    item (a 64-hex key, a JSON value) in strictly increasing key order. So a value is served only
    under the key the writer computed from (fingerprint, input bytes), and bit rot, truncation or
    a hand edit are found. Returns {"segments", "items", "bytes", "problems": [one line each]}.
    """
    problems: list[str] = []
    segments = items = size = 0
    root = Path(root)
    for agent, directory in _fingerprint_dirs(root, None):
        where = f"{agent}/{directory.name}"
        fingerprint = _read_fingerprint(directory)
        if fingerprint is None:
            problems.append(f"{where}: no {FINGERPRINT_FILE}")
        elif fingerprint_dir_name(fingerprint) != directory.name:
            problems.append(f"{where}: {FINGERPRINT_FILE} names another directory ({fingerprint_dir_name(fingerprint)})")
        for name, seg_size in _list_segments(directory):
            try:
                data = (directory / name).read_bytes()
            except FileNotFoundError:
                continue  # removed by a compaction since the listing
            segments += 1
            size += seg_size
            if f"seg-{hashlib.sha256(data).hexdigest()[:32]}.jsonl" != name:
                problems.append(f"{where}/{name}: its bytes do not hash to its name (damaged or edited)")
                continue
            lines = data.split(b"\n")
            if lines[-1]:
                problems.append(f"{where}/{name}: the last line is not terminated")
                continue
            previous = b""
            for number, line in enumerate(lines[:-1], 1):
                line += b"\n"
                key = _line_key(line)
                if key is None or _decode_line(line, key.decode("ascii")) is _MISSING:
                    problems.append(f"{where}/{name}: line {number} is not a cache item")
                    break
                if key <= previous:
                    problems.append(f"{where}/{name}: line {number} is out of key order")
                    break
                previous = key
                items += 1
    return {"segments": segments, "items": items, "bytes": size, "problems": problems}


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_stats(rows: Sequence[dict[str, Any]]) -> str:
    """`cache_stats` rows as an aligned text table, with a total line."""
    header = ("agent", "fingerprint", "segments", "items", "size")
    body = [(r["agent"], (r["fingerprint"] or f"? ({r['dir']})")[:24], str(r["segments"]), str(r["items"]),
             _human_bytes(r["bytes"])) for r in rows]
    body.append(("total", "", str(sum(r["segments"] for r in rows)), str(sum(r["items"] for r in rows)),
                 _human_bytes(sum(r["bytes"] for r in rows))))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    right = {2, 3, 4}
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in [header, *body]]
    return "\n".join(lines)


def _merge_segments(directory: Path, names: Sequence[str]) -> tuple[str | None, list[str]]:
    """Merge segments into one new segment; (its name or None if empty, the names actually read).

    A segment gone before it could be opened is skipped (another compaction
    merged it). For a key held with different values, the smallest line wins,
    so the result depends only on the set of input lines.
    """
    files: list[IO[bytes]] = []
    read: list[str] = []
    try:
        for name in names:
            try:
                files.append(open(directory / name, "rb"))
            except FileNotFoundError:
                continue
            read.append(name)

        def merged() -> Iterator[bytes]:
            last = None
            for key, line in heapq.merge(*(_valid_lines(fh) for fh in files)):
                if key != last:
                    last = key
                    yield line

        return _publish_segment(directory, merged()), read
    finally:
        for fh in files:
            fh.close()


def _remove_stale_temps(directory: Path) -> int:
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(".") and ".tmp-" in entry.name:
            try:
                if now - entry.stat().st_mtime > STALE_TEMP_AGE_S:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


def _compact_directory(directory: Path) -> dict[str, int]:
    """Merge the segments listed now into one, `COMPACT_FAN_IN` at a time.

    Safe alongside readers and writers: a segment is deleted only after a
    segment holding all its items has been written and synced, and segments
    written after the listing are not touched.
    """
    temps = _remove_stale_temps(directory)
    current = [name for name, _ in _list_segments(directory)]
    before, written, removed = len(current), 0, 0
    while len(current) > 1:
        merged_round = []
        for i in range(0, len(current), COMPACT_FAN_IN):
            group = current[i:i + COMPACT_FAN_IN]
            if len(group) == 1:
                merged_round.append(group[0])
                continue
            out, read = _merge_segments(directory, group)
            if out is not None:
                merged_round.append(out)
                written += out not in read
            for name in read:
                if name != out:
                    try:
                        (directory / name).unlink()
                        removed += 1
                    except FileNotFoundError:
                        pass
        current = merged_round
    return {"segments_before": before, "segments_after": len(_list_segments(directory)),
            "segments_written": written, "segments_removed": removed, "temps_removed": temps}


def compact(root: str | os.PathLike, agent: str | None = None) -> dict[str, int]:
    """Merge each fingerprint directory's segments into one (for `agent` or all); summed counts.

    Also removes temporaries older than `STALE_TEMP_AGE_S` left by killed
    writers. Idempotent; safe while other processes read and write.
    """
    totals = {"dirs": 0, "segments_before": 0, "segments_after": 0, "segments_written": 0,
              "segments_removed": 0, "temps_removed": 0}
    for _, directory in _fingerprint_dirs(root, agent):
        totals["dirs"] += 1
        for name, count in _compact_directory(directory).items():
            totals[name] += count
    return totals


def prune(root: str | os.PathLike, keep: Iterable[str] = (), agent: str | None = None,
          dry_run: bool = False) -> list[Path]:
    """Delete fingerprint directories (of `agent`, or all) whose fingerprint is not in `keep`.

    Returns the directories removed, or that would be with `dry_run`. A
    directory is kept when its fingerprint.txt names a kept fingerprint or its
    name is that of a kept fingerprint (so one whose fingerprint.txt is not
    written yet is kept too).
    """
    keep = set(keep)
    keep_dirs = {fingerprint_dir_name(f) for f in keep}
    removed = []
    for _, directory in _fingerprint_dirs(root, agent):
        if directory.name in keep_dirs or _read_fingerprint(directory) in keep:
            continue
        removed.append(directory)
        if not dry_run:
            shutil.rmtree(directory, ignore_errors=True)
    return removed

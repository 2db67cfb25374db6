"""The item cache: round trips, flushing, cross-process visibility, crashes, damage, compact, prune."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pathgen.store.cache as cache
from pathgen.store.cache import (
    ItemCache,
    cache_stats,
    compact,
    fingerprint_dir_name,
    format_stats,
    item_key,
    prune,
)

ROOT = Path(__file__).resolve().parents[1]
FP = hashlib.sha256(b"tiny-captioner v1").hexdigest()
FP2 = hashlib.sha256(b"tiny-captioner v2").hexdigest()

# Run by child processes: `python -c CHILD <role> <root> <fingerprint> <args...>`.
CHILD = r"""
import os, signal, sys, time
from pathlib import Path
from pathgen.store.cache import ItemCache

def payload(i): return f"payload-{i}".encode()
def value(i): return {"i": i, "caption": f"item {i} \u00e9", "vec": [i, i / 2]}

role, root, fp = sys.argv[1:4]
args = [int(a) if a.lstrip("-").isdigit() else a for a in sys.argv[4:]]

if role == "write":  # start stop flush_every go_file: get-or-compute like a pipeline step
    start, stop, k, go = args
    while not os.path.exists(go):
        time.sleep(0.005)
    with ItemCache(root, "agent", fp, flush_every=k) as c:
        for i in range(start, stop):
            got = c.get(payload(i))
            if got is None:
                c.put(payload(i), value(i))
            elif got != value(i):
                sys.exit(f"wrong value for {i}: {got!r}")
elif role == "kill":  # n flush_every kill_after
    n, k, m = args
    c = ItemCache(root, "agent", fp, flush_every=k)
    for i in range(n):
        c.put(payload(i), value(i))
        if i + 1 == m:
            os.kill(os.getpid(), signal.SIGKILL)
elif role == "kill_in_write":  # die after the temp file is written, before its rename
    real = os.replace
    def replace(src, dst):
        if Path(dst).name.startswith("seg-"):
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.replace = replace
    c = ItemCache(root, "agent", fp, flush_every=4)
    for i in range(4):
        c.put(payload(i), value(i))
elif role in ("term", "term_chain"):  # n: put n items (never flushed by count), wait for SIGTERM
    n, marker = args
    if role == "term_chain":
        signal.signal(signal.SIGTERM, lambda s, f: Path(marker).write_text("previous handler ran"))
    c = ItemCache(root, "agent", fp, flush_every=1000)
    for i in range(n):
        c.put(payload(i), value(i))
    print("ready", flush=True)
    time.sleep(30)
    sys.exit("SIGTERM did not end the process")
elif role == "exit":  # n: put n items and exit without closing
    c = ItemCache(root, "agent", fp, flush_every=1000)
    for i in range(args[0]):
        c.put(payload(i), value(i))
"""


def payload(i: int) -> bytes:
    return f"payload-{i}".encode()


def value(i: int) -> dict:
    return {"i": i, "caption": f"item {i} \u00e9", "vec": [i, i / 2]}


def child(role: str, root: Path, *args, fingerprint: str = FP, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CHILD, role, str(root), fingerprint, *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, **popen)


def fp_dir(root: Path, fingerprint: str = FP, agent: str = "agent") -> Path:
    return root / agent / fingerprint_dir_name(fingerprint)


def segments(root: Path, fingerprint: str = FP, agent: str = "agent") -> list[Path]:
    return sorted(fp_dir(root, fingerprint, agent).glob(cache.SEGMENT_GLOB))


def assert_segments_intact(directory: Path) -> None:
    """Every segment: named by its hash, sorted unique keys, every line valid JSON with a hex key."""
    for path in directory.glob(cache.SEGMENT_GLOB):
        data = path.read_bytes()
        assert path.name == f"seg-{hashlib.sha256(data).hexdigest()[:32]}.jsonl"
        keys = []
        for line in data.split(b"\n")[:-1]:
            obj = json.loads(line)
            assert set(obj) == {"k", "v"} and len(obj["k"]) == 64
            keys.append(obj["k"])
        assert data.endswith(b"\n") and keys == sorted(set(keys))


def read_all(root: Path, indices, fingerprint: str = FP) -> list:
    with ItemCache(root, "agent", fingerprint) as c:
        return c.get_many([payload(i) for i in indices])


# --- keys, round trips, counters ---------------------------------------------------


def test_item_key_is_sha256_of_fingerprint_and_payload():
    assert item_key(FP, b"abc") == hashlib.sha256(FP.encode() + b"\0abc").hexdigest()
    assert item_key(FP, "é") == item_key(FP, "é".encode())
    assert item_key("ab", b"c") != item_key("a", b"bc")  # the separator keeps it injective
    with pytest.raises(ValueError):
        item_key("", b"x")
    with pytest.raises(ValueError):
        item_key("two\nlines", b"x")


def test_put_get_round_trip_and_counters(tmp_path):
    with ItemCache(tmp_path, "agent", FP) as c:
        assert c.get(payload(1)) is None
        c.put(payload(1), value(1))
        c.put(payload(2), "a caption")
        assert c.get(payload(1)) == value(1)  # from the buffer
        assert c.get_many([payload(2), payload(3)]) == ["a caption", None]
        assert c.stats.as_dict() == {"hits": 2, "misses": 2, "puts": 2, "flushes": 0}
    assert c.stats.flushes == 1
    with ItemCache(tmp_path, "agent", FP) as c:
        assert c.get_many([payload(1), payload(2), payload(3)]) == [value(1), "a caption", None]
        assert (c.stats.hits, c.stats.misses) == (2, 1)


def test_fingerprint_and_agent_separate_items(tmp_path):
    with ItemCache(tmp_path, "agent", FP) as c:
        c.put(payload(1), value(1))
    with ItemCache(tmp_path, "agent", FP2) as other_fp, ItemCache(tmp_path, "other", FP) as other_agent:
        assert other_fp.get(payload(1)) is None
        assert other_agent.get(payload(1)) is None
        other_agent.put(payload(1), "other agent's value")
    assert read_all(tmp_path, [1]) == [value(1)]
    with ItemCache(tmp_path, "other", FP) as c:
        assert c.get(payload(1)) == "other agent's value"


def test_values_must_be_json_and_not_none(tmp_path):
    with ItemCache(tmp_path, "agent", FP) as c:
        with pytest.raises(ValueError):
            c.put(b"x", None)
        with pytest.raises(TypeError):
            c.put(b"x", {1, 2})
        with pytest.raises(ValueError):
            c.put(b"x", float("nan"))
        c.put(b"x", (1, 2))
        assert c.get(b"x") == [1, 2]
        assert c.stats.puts == 1
    with pytest.raises(ValueError):
        c.put(b"y", 1)  # closed
    with pytest.raises(ValueError):
        ItemCache(tmp_path, "../escape", FP)


def test_flush_every_k_items(tmp_path):
    k = 4
    c = ItemCache(tmp_path, "agent", FP, flush_every=k)
    for i in range(k - 1):
        c.put(payload(i), value(i))
    assert segments(tmp_path) == []
    c.put(payload(k - 1), value(k - 1))
    assert len(segments(tmp_path)) == 1 and c.stats.flushes == 1
    for i in range(k, 2 * k + 1):
        c.put(payload(i), value(i))
    assert len(segments(tmp_path)) == 2
    c.close()
    assert len(segments(tmp_path)) == 3
    assert read_all(tmp_path, range(2 * k + 1)) == [value(i) for i in range(2 * k + 1)]


def test_on_disk_layout_is_deterministic(tmp_path):
    for name, order in (("a", range(10)), ("b", reversed(range(10)))):
        with ItemCache(tmp_path / name, "agent", FP, flush_every=100) as c:
            for i in order:
                c.put(payload(i), value(i))
    (seg_a,), (seg_b,) = segments(tmp_path / "a"), segments(tmp_path / "b")
    assert seg_a.name == seg_b.name and seg_a.read_bytes() == seg_b.read_bytes()
    assert seg_a.parent == tmp_path / "a" / "agent" / FP[:24]
    assert (seg_a.parent / "fingerprint.txt").read_text() == FP + "\n"
    lines = seg_a.read_bytes().decode().splitlines()
    assert lines[0] == json.dumps(json.loads(lines[0]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert [json.loads(line)["k"] for line in lines] == sorted(item_key(FP, payload(i)) for i in range(10))
    assert "é" in lines[0]  # UTF-8, not \u escapes
    assert_segments_intact(seg_a.parent)


def test_non_hex_fingerprint_gets_a_hashed_directory(tmp_path):
    fingerprint = "backend=tiny/v1 prompt=abc"
    with ItemCache(tmp_path, "agent", fingerprint) as c:
        c.put(b"x", 1)
    directory = tmp_path / "agent" / hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
    assert (directory / "fingerprint.txt").read_text() == fingerprint + "\n"
    assert cache_stats(tmp_path)[0]["fingerprint"] == fingerprint


# --- visibility across instances and processes ---------------------------------------


def test_second_instance_sees_items_flushed_after_it_opened(tmp_path):
    reader = ItemCache(tmp_path, "agent", FP)
    assert reader.get(payload(0)) is None  # index built, nothing there
    with ItemCache(tmp_path, "agent", FP, flush_every=2) as writer:
        writer.put(payload(0), value(0))
        writer.put(payload(1), value(1))
        assert reader.get(payload(0)) == value(0)  # re-listed on the miss
        writer.put(payload(2), value(2))
        assert reader.get(payload(2)) is None  # still in the writer's buffer
    assert reader.get(payload(2)) == value(2)
    assert reader.stats.as_dict() == {"hits": 2, "misses": 2, "puts": 0, "flushes": 0}
    reader.close()


def test_concurrent_writer_processes(tmp_path):
    """Four processes get-or-put overlapping ranges at once: every item right, no damage, exact counts."""
    go = tmp_path / "go"
    procs = [child("write", tmp_path, 60 * w, 60 * w + 120, 3 + w, go) for w in range(4)]
    time.sleep(0.2)  # let them all start, then release them together
    go.touch()
    for p in procs:
        assert p.wait(timeout=60) == 0
    n = 60 * 3 + 120
    assert read_all(tmp_path, range(n)) == [value(i) for i in range(n)]
    assert_segments_intact(fp_dir(tmp_path))
    (row,) = cache_stats(tmp_path)
    assert (row["agent"], row["fingerprint"], row["items"]) == ("agent", FP, n)
    assert row["segments"] == len(segments(tmp_path))
    assert row["bytes"] == sum(p.stat().st_size for p in segments(tmp_path))


def test_writers_and_compaction_at_once(tmp_path):
    """Compaction running while processes write and this one reads loses nothing."""
    go = tmp_path / "go"
    procs = [child("write", tmp_path, 100 * w, 100 * w + 150, 2, go) for w in range(4)]
    reader = ItemCache(tmp_path, "agent", FP)
    go.touch()
    rounds = 0
    while any(p.poll() is None for p in procs):
        compact(tmp_path)
        reader.get_many([payload(i) for i in range(0, 450, 7)])
        rounds += 1
    assert all(p.returncode == 0 for p in procs) and rounds > 1
    n = 100 * 3 + 150
    assert reader.get_many([payload(i) for i in range(n)]) == [value(i) for i in range(n)]
    compact(tmp_path)
    assert len(segments(tmp_path)) == 1
    assert_segments_intact(fp_dir(tmp_path))
    assert read_all(tmp_path, range(n)) == [value(i) for i in range(n)]
    reader.close()


# --- crashes ---------------------------------------------------------------------------


def test_sigkill_loses_only_the_unflushed_items(tmp_path):
    n, k, m = 100, 5, 23
    proc = child("kill", tmp_path, n, k, m)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    got = read_all(tmp_path, range(n))
    kept = m - m % k
    assert got[:kept] == [value(i) for i in range(kept)]
    assert got[kept:] == [None] * (n - kept)
    assert len(segments(tmp_path)) == m // k


def test_kill_during_a_write_leaves_a_temp_that_is_never_read(tmp_path):
    assert child("kill_in_write", tmp_path).wait(timeout=30) == -signal.SIGKILL
    directory = fp_dir(tmp_path)
    temps = [p for p in directory.iterdir() if p.name.startswith(".")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    assert not temps[0].match(cache.SEGMENT_GLOB) and segments(tmp_path) == []
    assert read_all(tmp_path, range(4)) == [None] * 4
    assert cache_stats(tmp_path)[0]["items"] == 0
    assert compact(tmp_path)["temps_removed"] == 0  # too young: may belong to a live writer
    old = time.time() - cache.STALE_TEMP_AGE_S - 10
    os.utime(temps[0], (old, old))
    assert compact(tmp_path)["temps_removed"] == 1 and not temps[0].exists()


def test_sigterm_flushes_pending_items(tmp_path):
    proc = child("term", tmp_path, 7, tmp_path / "unused", stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # still dies by the signal
    assert read_all(tmp_path, range(7)) == [value(i) for i in range(7)]


def test_sigterm_chains_to_the_previous_handler(tmp_path):
    marker = tmp_path / "marker"
    proc = child("term_chain", tmp_path, 5, marker, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert marker.read_text() == "previous handler ran"
    assert read_all(tmp_path, range(5)) == [value(i) for i in range(5)]


def test_normal_exit_flushes_unclosed_caches(tmp_path):
    assert child("exit", tmp_path, 3).wait(timeout=30) == 0
    assert read_all(tmp_path, range(3)) == [value(i) for i in range(3)]


# --- damage -------------------------------------------------------------------------


def write_segment(directory: Path, lines: list[bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = b"".join(lines)
    path = directory / f"seg-{hashlib.sha256(data).hexdigest()[:32]}.jsonl"
    path.write_bytes(data)
    return path


def line(i: int, v=None) -> bytes:
    return cache._encode_line(item_key(FP, payload(i)), value(i) if v is None else v)


@pytest.mark.parametrize("bisect", [False, True], ids=["indexed", "bisected"])
def test_damaged_lines_are_skipped_never_returned(tmp_path, monkeypatch, bisect):
    if bisect:
        monkeypatch.setattr(cache, "SCAN_LIMIT_BYTES", 0)
        monkeypatch.setattr(cache, "_BISECT_WINDOW", 1)
    bad_value = line(1).replace(b'"vec":', b'"vec":[[')  # right shape, JSON does not parse
    bad_key = b'{"k":"X' + line(2)[7:]  # not a hex key
    truncated = line(4)[:-9]
    lines = sorted([line(0), bad_value, bad_key, line(3)], key=lambda b: b[6:70]) + [truncated]
    write_segment(fp_dir(tmp_path), lines)
    assert read_all(tmp_path, range(5)) == [value(0), None, None, value(3), None]
    with ItemCache(tmp_path, "agent", FP) as c:  # a damaged item can be computed again
        assert c.get(payload(1)) is None
        c.put(payload(1), value(1))
    assert read_all(tmp_path, [1]) == [value(1)]
    assert cache_stats(tmp_path)[0]["items"] == 3  # keys 0, 1 (damaged and rewritten: one key), 3
    compact(tmp_path)
    assert_segments_intact(fp_dir(tmp_path))
    assert read_all(tmp_path, range(5)) == [value(0), value(1), None, value(3), None]


@pytest.mark.parametrize("size", [10, 1 << 40], ids=["small", "large"])
def test_segment_gone_between_listing_and_reading(tmp_path, monkeypatch, size):
    with ItemCache(tmp_path, "agent", FP) as c:
        c.put(payload(0), value(0))
    real = cache._list_segments
    ghost = "seg-" + "0" * 32 + ".jsonl"
    monkeypatch.setattr(cache, "_list_segments", lambda d: sorted(real(d) + [(ghost, size)]))
    assert read_all(tmp_path, [0, 1]) == [value(0), None]
    assert cache_stats(tmp_path)[0]["items"] == 1


def test_reader_survives_compaction_of_its_indexed_segments(tmp_path):
    with ItemCache(tmp_path, "agent", FP, flush_every=2) as c:
        for i in range(10):
            c.put(payload(i), value(i))
    reader = ItemCache(tmp_path, "agent", FP)
    assert reader.get(payload(0)) == value(0)  # index points into the small segments
    compact(tmp_path)
    assert reader.get_many([payload(i) for i in range(11)]) == [value(i) for i in range(10)] + [None]
    reader.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(present=st.sets(st.integers(0, 300), max_size=60), probe=st.lists(st.integers(0, 300), max_size=20),
       text=st.text(max_size=30))
def test_bisection_finds_exactly_the_present_keys(tmp_path_factory, present, probe, text):
    root = tmp_path_factory.mktemp("bisect")
    with ItemCache(root, "agent", FP, flush_every=1000) as c:
        for i in present:
            c.put(payload(i), {"text": text + "\u2028\n", "i": i})
    with mock.patch.object(cache, "SCAN_LIMIT_BYTES", 0), mock.patch.object(cache, "_BISECT_WINDOW", 1):
        with ItemCache(root, "agent", FP) as c:
            got = c.get_many([payload(i) for i in probe])
    assert got == [{"text": text + "\u2028\n", "i": i} if i in present else None for i in probe]


# --- compact, stats, prune -------------------------------------------------------------------


def test_compact_merges_segments_and_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "COMPACT_FAN_IN", 3)  # several merge rounds
    with ItemCache(tmp_path, "agent", FP, flush_every=2) as c:
        for i in range(21):
            c.put(payload(i), value(i))
    with ItemCache(tmp_path, "agent", FP, flush_every=3) as c:  # overlapping duplicates
        for i in range(10, 16):
            c.put(payload(i), value(i))
    assert len(segments(tmp_path)) == 13
    result = compact(tmp_path)
    assert result["dirs"] == 1 and result["segments_before"] == 13 and result["segments_after"] == 1
    (merged,) = segments(tmp_path)
    assert_segments_intact(merged.parent)
    assert len(merged.read_bytes().splitlines()) == 21
    assert read_all(tmp_path, range(22)) == [value(i) for i in range(21)] + [None]
    again = compact(tmp_path)
    assert again["segments_written"] == again["segments_removed"] == 0
    assert segments(tmp_path) == [merged]


def test_compact_keeps_a_segment_written_after_its_listing(tmp_path, monkeypatch):
    with ItemCache(tmp_path, "agent", FP, flush_every=2) as c:
        for i in range(6):
            c.put(payload(i), value(i))
    late = ItemCache(tmp_path, "agent", FP, flush_every=100)
    late.put(payload(100), value(100))
    real, calls = cache._list_segments, []

    def listing_then_write(directory):
        listed = real(directory)
        if not calls:
            calls.append(directory)
            late.flush()  # lands right after compact listed the directory
        return listed

    monkeypatch.setattr(cache, "_list_segments", listing_then_write)
    compact(tmp_path)
    monkeypatch.undo()
    assert len(segments(tmp_path)) == 2
    assert read_all(tmp_path, [*range(6), 100]) == [value(i) for i in [*range(6), 100]]
    late.close()


def test_stats_count_distinct_items_and_format(tmp_path):
    with ItemCache(tmp_path, "agent", FP, flush_every=2) as c:
        for i in range(5):
            c.put(payload(i), value(i))
    with ItemCache(tmp_path, "agent", FP, flush_every=2) as c2:
        c2.put(payload(0), value(0))  # a key already stored, unseen by this writer: written twice
    with ItemCache(tmp_path, "other", FP2) as c3:
        c3.put(b"x", "y")
    rows = cache_stats(tmp_path)
    assert [(r["agent"], r["fingerprint"], r["segments"], r["items"]) for r in rows] == [
        ("agent", FP, 4, 5), ("other", FP2, 1, 1)]
    table = format_stats(rows)
    assert table.splitlines()[0].split() == ["agent", "fingerprint", "segments", "items", "size"]
    assert FP[:24] in table and "other" in table and table.splitlines()[-1].split()[:3] == ["total", "5", "6"]
    assert cache_stats(tmp_path / "missing") == []


def test_prune_keeps_listed_fingerprints(tmp_path):
    for agent, fingerprint in [("agent", FP), ("agent", FP2), ("other", FP2), ("other", "free text fp")]:
        with ItemCache(tmp_path, agent, fingerprint) as c:
            c.put(b"x", 1)
    everything = sorted(p for a in tmp_path.iterdir() for p in a.iterdir())
    would = prune(tmp_path, keep=[FP], dry_run=True)
    assert sorted(would) == sorted([fp_dir(tmp_path, FP2), fp_dir(tmp_path, FP2, "other"),
                                    fp_dir(tmp_path, "free text fp", "other")])
    assert sorted(p for a in tmp_path.iterdir() for p in a.iterdir()) == everything
    assert prune(tmp_path, keep=[FP, "free text fp"], agent="other") == [fp_dir(tmp_path, FP2, "other")]
    assert prune(tmp_path, keep=[FP]) == [fp_dir(tmp_path, FP2), fp_dir(tmp_path, "free text fp", "other")]
    assert [r["fingerprint"] for r in cache_stats(tmp_path)] == [FP]
    with ItemCache(tmp_path, "agent", FP) as c:
        assert c.get(b"x") == 1


def test_verify_checks_every_entry_against_its_content_address(tmp_path):
    with ItemCache(tmp_path, "agent", FP, flush_every=2) as c:
        for i in range(5):
            c.put(payload(i), value(i))
    with ItemCache(tmp_path, "other", "free text fp") as c:
        c.put(b"x", "y")
    report = cache.verify(tmp_path)
    assert (report["segments"], report["items"], report["problems"]) == (4, 6, [])

    segment = sorted((tmp_path / "agent" / FP[:24]).glob("seg-*.jsonl"))[0]
    data = segment.read_bytes()
    segment.write_bytes(data.replace(b'"v":', b'"v": ', 1))  # still JSON, no longer the bytes that were named
    (tmp_path / "other" / fingerprint_dir_name("free text fp") / cache.FINGERPRINT_FILE).write_text(FP2)
    problems = cache.verify(tmp_path)["problems"]
    assert problems == [f"agent/{FP[:24]}/{segment.name}: its bytes do not hash to its name (damaged or edited)",
                        f"other/{fingerprint_dir_name('free text fp')}: fingerprint.txt names another directory "
                        f"({FP2[:24]})"]
    # A segment renamed to the hash of damaged bytes is caught by its lines instead.
    segment.unlink()
    bad = data.replace(b'{"k":', b'{"K":', 1)
    (segment.parent / f"seg-{hashlib.sha256(bad).hexdigest()[:32]}.jsonl").write_bytes(bad)
    assert any("line 1 is not a cache item" in line for line in cache.verify(tmp_path)["problems"])


def test_cache_verify_command_exits_1_on_damage(tmp_path):
    with ItemCache(tmp_path, "agent", FP) as c:
        c.put(b"x", "y")
    cli = [sys.executable, "-m", "pathgen", "cache", "verify", "--root", str(tmp_path)]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and "1 segments, 1 items checked" in ok.stdout and "0 problem(s)" in ok.stdout
    segment = next((tmp_path / "agent").glob("*/seg-*.jsonl"))
    segment.write_bytes(segment.read_bytes()[:-1])
    bad = subprocess.run(cli, capture_output=True, text=True)
    assert bad.returncode == 1 and f"{segment.name}: its bytes do not hash to its name" in bad.stderr

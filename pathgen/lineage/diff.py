"""diff: compare two versions of the assembled dataset of a git + DVC repository.

`pathgen diff [REV_A] [REV_B]` reads `data/dataset/manifest.parquet` of both
versions through `dvc.api.DVCFileSystem` (REV_A defaults to HEAD; without REV_B
the workspace is read, so an uncommitted build can be compared), joins the
image-caption pairs by `key` and reports, overall and per tissue:

- `added` / `removed`: keys only in B / only in A;
- `caption_changed`: same key, different `summary` (the caption CLIP trains on);
- `image_changed`: same key, different `image_sha256`;
- `unchanged`: same key, same summary and same image.

A pair whose caption and image both changed counts in both. Per tissue, a pair
is counted under B's tissue when B has it, else under A's; `pairs_a` and
`pairs_b` count each side under its own tissue.

Output: a text summary (default), one JSON object (`--json`, keys sorted, with
the full sorted key lists) and/or a self-contained HTML page (`--html FILE`)
showing each example's patch of A beside that of B (embedded from the shard
tars) with the captions and their word diff. Everything is sorted by key and
carries no timestamp or absolute path, so the same two versions give the same
bytes. Differences are not errors: the exit status is 0.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import io
import json
import sys
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl

from pathgen.errors import PathgenError
from pathgen.reporting.html import esc, page, table
from pathgen.store.io import write_text
from pathgen.store.tables import require_columns, require_unique

DATASET_DIR = "data/dataset"
MANIFEST = f"{DATASET_DIR}/manifest.parquet"
WORKSPACE = "workspace"  # the label of REV_B when it is omitted
COLUMNS = ("key", "shard", "tissue", "summary", "image_sha256")
COUNT_KEYS = ("pairs_a", "pairs_b", "added", "removed", "unchanged", "caption_changed", "image_changed")
KEY_LISTS = ("added", "removed", "caption_changed", "image_changed")
NO_TISSUE = "(none)"
DEFAULT_EXAMPLES = 5
HTML_MAX_EXAMPLES = 24  # examples whose patches are embedded in the HTML page ...
HTML_MAX_IMAGE_BYTES = 6_000_000  # ... and the most JPEG bytes embedded in all; later examples show text only


# -- reading a version ----------------------------------------------------------------------------

@dataclass
class Version:
    """One side of the diff: its label (the rev, or "workspace"), its file system and its manifest."""

    label: str
    fs: Any  # dvc.api.DVCFileSystem
    manifest: pl.DataFrame  # COLUMNS, sorted by key, keys unique


def _dvc_errors() -> tuple[type[Exception], type[Exception]]:
    """DVC's base exception and dvc-data's index error (imported late: dvc is slow to import)."""
    from dvc.exceptions import DvcException
    from dvc_data.index.index import DataIndexError

    return DvcException, DataIndexError


@contextmanager
def _open_file(fs: Any, path: str, label: str) -> Iterator[BinaryIO]:
    """`path` of one version, open for reading; PathgenError naming the version and the path when absent."""
    from dvc.scm import RevError

    dvc_error, index_error = _dvc_errors()
    not_cached = (f"{label}: {{}} is tracked by DVC but its data is not in the DVC cache "
                  "(dvc pull, or dvc commit before git commit)")
    try:
        fs.info(path)  # not exists(): it answers False for a bad revision or a directory missing from the cache
    except RevError:
        raise PathgenError(f"revision '{label}' not found") from None
    except FileNotFoundError:
        why = "not built" if label == WORKSPACE else "not built or not committed with dvc commit"
        raise PathgenError(f"{label} has no {path} ({why})") from None
    except index_error:  # the .dvc file names a directory whose listing is not in the cache
        raise PathgenError(not_cached.format(DATASET_DIR)) from None
    except dvc_error as exc:
        raise PathgenError(f"{label}: cannot read {path}: {exc}") from None
    try:
        fh = fs.open(path, "rb")
    except FileNotFoundError:  # the directory listing names the file, but its object is not in the cache
        raise PathgenError(not_cached.format(path)) from None
    except (index_error, dvc_error) as exc:
        raise PathgenError(f"{label}: cannot read {path}: {exc}") from None
    with fh:
        yield fh


def read_manifest(fs: Any, label: str) -> pl.DataFrame:
    """The COLUMNS of `data/dataset/manifest.parquet` in `fs`, sorted by key; PathgenError if unusable."""
    with _open_file(fs, MANIFEST, label) as fh:
        data = fh.read()
    try:
        require_columns(pl.read_parquet_schema(io.BytesIO(data)), COLUMNS, f"{label}: {MANIFEST}")
        frame = pl.read_parquet(io.BytesIO(data), columns=list(COLUMNS))
    except pl.exceptions.PolarsError as exc:
        raise PathgenError(f"{label}: {MANIFEST} is not a readable parquet file ({exc})") from None
    require_unique(frame, "key", f"{label}: {MANIFEST}")
    return frame.with_columns(pl.col("tissue").fill_null(NO_TISSUE)).sort("key")


@contextmanager
def open_version(repo: str | Path, rev: str | None) -> Iterator[Version]:
    """Open one version of the dataset of `repo`: `rev` (any git revision) or, when None, the workspace.

    The workspace view reads the files in the working tree (falling back to the
    DVC cache only for files missing there); a revision reads git's copy of the
    `.dvc` files and the DVC cache. The file system is closed on exit.
    """
    from dvc.api import DVCFileSystem

    label = WORKSPACE if rev is None else rev
    if rev is not None and not rev.strip():
        raise PathgenError("empty revision (omit REV_B to compare with the workspace)")
    if not Path(repo).is_dir():  # DVCFileSystem would take a missing directory for a URL to clone
        raise PathgenError(f"repository {repo} not found")
    dvc_error, _ = _dvc_errors()
    try:
        fs = DVCFileSystem(str(repo), rev=rev)
    except dvc_error as exc:
        raise PathgenError(f"{label}: cannot open repository {repo}: {exc}") from None
    try:
        yield Version(label, fs, read_manifest(fs, label))
    finally:
        fs.close()


# -- comparing ------------------------------------------------------------------------------------

def _word_matcher(old: str | None, new: str | None) -> difflib.SequenceMatcher:
    """difflib's matcher over the whitespace-split words of two captions."""
    return difflib.SequenceMatcher(None, (old or "").split(), (new or "").split(), autojunk=False)


def word_ops(old: str | None, new: str | None) -> list[tuple[str, str, str]]:
    """(tag, old words, new words) of a word-level diff (difflib opcodes on whitespace-split words)."""
    matcher = _word_matcher(old, new)
    a, b = matcher.a, matcher.b
    return [(tag, " ".join(a[i1:i2]), " ".join(b[j1:j2])) for tag, i1, i2, j1, j2 in matcher.get_opcodes()]


def word_change(old: str | None, new: str | None) -> float:
    """The share of words that differ between two captions: 1 - difflib's ratio over their words."""
    matcher = _word_matcher(old, new)
    return 1.0 - matcher.ratio() if matcher.a or matcher.b else 0.0


def word_diff(old: str | None, new: str | None) -> str:
    """The word diff as text: kept words as they are, `[-removed words-]`, `{+added words+}`."""
    parts = []
    for tag, a, b in word_ops(old, new):
        if tag == "equal":
            parts.append(a)
        else:
            parts.append((f"[-{a}-]" if a else "") + (f"{{+{b}+}}" if b else ""))
    return " ".join(parts)


def diff_manifests(a: pl.DataFrame, b: pl.DataFrame, label_a: str, label_b: str,
                   examples: int = DEFAULT_EXAMPLES) -> dict[str, Any]:
    """The diff report of two manifests (COLUMNS, unique keys): counts, per-tissue counts, keys, examples."""
    if examples < 0:
        raise PathgenError(f"--examples must be >= 0, got {examples}")
    side = ("tissue", "summary", "image_sha256", "shard")
    joined = (
        a.select("key", *[pl.col(c).alias(f"{c}_a") for c in side], pl.lit(True).alias("in_a"))
        .join(b.select("key", *[pl.col(c).alias(f"{c}_b") for c in side], pl.lit(True).alias("in_b")),
              on="key", how="full", coalesce=True)
        .with_columns(pl.col("in_a").fill_null(False), pl.col("in_b").fill_null(False))
        .sort("key")
    )
    both = pl.col("in_a") & pl.col("in_b")
    joined = joined.with_columns(
        pl.when(pl.col("in_b")).then(pl.col("tissue_b")).otherwise(pl.col("tissue_a")).alias("tissue"),
        (pl.col("in_b") & ~pl.col("in_a")).alias("added"),
        (pl.col("in_a") & ~pl.col("in_b")).alias("removed"),
        (both & pl.col("summary_a").ne_missing(pl.col("summary_b"))).alias("caption_changed"),
        (both & pl.col("image_sha256_a").ne_missing(pl.col("image_sha256_b"))).alias("image_changed"),
    ).with_columns((both & ~pl.col("caption_changed") & ~pl.col("image_changed")).alias("unchanged"))

    flags = ("added", "removed", "unchanged", "caption_changed", "image_changed")
    sides = {"pairs_a": dict(a.group_by("tissue").agg(pl.len()).iter_rows()),
             "pairs_b": dict(b.group_by("tissue").agg(pl.len()).iter_rows())}
    sums = {r["tissue"]: r for r in joined.group_by("tissue").agg(pl.col(f).sum() for f in flags).iter_rows(named=True)}
    tissues = {
        t: {**{k: int(v.get(t, 0)) for k, v in sides.items()},
            **{f: int(sums[t][f]) if t in sums else 0 for f in flags}}
        for t in sorted(set(sides["pairs_a"]) | set(sides["pairs_b"]))
    }
    counts = {"pairs_a": a.height, "pairs_b": b.height, **{f: int(joined[f].sum()) for f in flags}}

    keys = {name: joined.filter(pl.col(name))["key"].to_list() for name in KEY_LISTS}
    shown = sorted({k for name in KEY_LISTS for k in keys[name][:examples]})
    rows = {r["key"]: r for r in joined.filter(pl.col("key").is_in(shown)).iter_rows(named=True)}
    return {
        "a": label_a,
        "b": label_b,
        "dataset": DATASET_DIR,
        "counts": counts,
        "tissues": tissues,
        "keys": keys,
        "examples": {
            "caption_changed": [
                {"key": k, "tissue": rows[k]["tissue"], "old": rows[k]["summary_a"], "new": rows[k]["summary_b"],
                 "diff": word_diff(rows[k]["summary_a"], rows[k]["summary_b"])}
                for k in keys["caption_changed"][:examples]],
            "image_changed": [
                {"key": k, "tissue": rows[k]["tissue"], "image_sha256_a": rows[k]["image_sha256_a"],
                 "image_sha256_b": rows[k]["image_sha256_b"]}
                for k in keys["image_changed"][:examples]],
            "added": [{"key": k, "tissue": rows[k]["tissue"], "summary": rows[k]["summary_b"]}
                      for k in keys["added"][:examples]],
            "removed": [{"key": k, "tissue": rows[k]["tissue"], "summary": rows[k]["summary_a"]}
                        for k in keys["removed"][:examples]],
        },
    }


def dataset_diff(repo: str | Path, rev_a: str = "HEAD", rev_b: str | None = None,
                 examples: int = DEFAULT_EXAMPLES) -> dict[str, Any]:
    """The diff report (see `diff_manifests`) of the datasets of `repo` at `rev_a` and `rev_b` (None: workspace)."""
    with open_version(repo, rev_a) as a, open_version(repo, rev_b) as b:
        return diff_manifests(a.manifest, b.manifest, a.label, b.label, examples)


# -- text -----------------------------------------------------------------------------------------

COLUMN_LABELS = {"pairs_a": "A", "pairs_b": "B", "added": "added", "removed": "removed", "unchanged": "unchanged",
                 "caption_changed": "caption changed", "image_changed": "image changed"}


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Aligned plain-text table: first column left-aligned, the others right-aligned."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()
            for row in cells]


def format_text(report: dict[str, Any]) -> str:
    """The human-readable report: summary table, per-tissue table, examples."""
    counts, ex = report["counts"], report["examples"]
    lines = [f"dataset diff: A = {report['a']}, B = {report['b']} ({report['dataset']})", ""]
    summary = [[f"A ({report['a']})", counts["pairs_a"]], [f"B ({report['b']})", counts["pairs_b"]]]
    summary += [[COLUMN_LABELS[k], counts[k]] for k in COUNT_KEYS[2:]]
    lines += _table(["", "pairs"], summary) + [""]
    lines += _table(["tissue"] + [COLUMN_LABELS[k] for k in COUNT_KEYS],
                    [[t] + [c[k] for k in COUNT_KEYS] for t, c in report["tissues"].items()])

    def heading(name: str, title: str) -> None:
        total, shown = len(report["keys"][name]), len(ex[name])
        lines.extend(["", f"{title}: {total}" + (f" (first {shown} by key)" if shown < total else "")])

    heading("caption_changed", "Changed captions")
    for e in ex["caption_changed"]:
        lines += [f"  {e['key']}  [{e['tissue']}]", f"    A: {e['old']}", f"    B: {e['new']}",
                  f"    diff: {e['diff']}"]
    heading("image_changed", "Changed images")
    lines += [f"  {e['key']}  [{e['tissue']}]  {e['image_sha256_a']} -> {e['image_sha256_b']}"
              for e in ex["image_changed"]]
    for name, title in (("added", "Added"), ("removed", "Removed")):
        heading(name, title)
        lines += [f"  {e['key']}  [{e['tissue']}]  {e['summary']}" for e in ex[name]]
    return "\n".join(lines) + "\n"


# -- HTML -----------------------------------------------------------------------------------------

STYLE = """
* { box-sizing: border-box; }
body { margin: 0; padding: 16px 20px; color: #1f2328;
       font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 24px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
.lead, .note { color: #59636e; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
table { border-collapse: collapse; margin: 4px 0 8px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #d8dee4; text-align: right; font-variant-numeric: tabular-nums; }
th:first-child, td:first-child { text-align: left; }
.pair { display: grid; grid-template-columns: minmax(240px, 420px) 1fr; gap: 16px; padding: 12px; margin: 0 0 12px;
        border: 1px solid #d0d7de; border-radius: 6px; background: #f6f8fa; }
.images { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; align-content: start; }
.images figure { margin: 0; }
.images img { display: block; width: 100%; height: auto; border: 1px solid #d0d7de; border-radius: 4px; }
.images figcaption { color: #59636e; font-size: 12px; }
.texts { display: grid; gap: 8px; min-width: 0; align-content: start; }
.texts p { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.texts h3 { font-size: 12px; text-transform: uppercase; color: #59636e; margin: 0 0 2px; }
del { background: #ffebe9; color: #82071e; }
ins { background: #dafbe1; color: #116329; text-decoration: none; }
"""


def word_diff_html(old: str | None, new: str | None) -> str:
    """The word diff as escaped HTML: removed words in `<del>`, added words in `<ins>`."""
    parts = []
    for tag, a, b in word_ops(old, new):
        if tag == "equal":
            parts.append(esc(a))
        else:
            parts.append((f"<del>{esc(a)}</del>" if a else "") + (f"<ins>{esc(b)}</ins>" if b else ""))
    return " ".join(parts)


def read_images(version: Version, keys: list[str]) -> dict[str, bytes]:
    """The `{key}.jpg` member of each key's shard tar in `version` (each tar streamed once, in order)."""
    shards = dict(version.manifest.filter(pl.col("key").is_in(keys)).select("key", "shard").iter_rows())
    by_shard: dict[str, set[str]] = {}
    for key in keys:
        by_shard.setdefault(shards[key], set()).add(f"{key}.jpg")
    images: dict[str, bytes] = {}
    for shard in sorted(by_shard):
        wanted, path = set(by_shard[shard]), f"{DATASET_DIR}/{shard}.tar"
        with _open_file(version.fs, path, version.label) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for info in tar:
                if info.isfile() and info.name in wanted:
                    images[info.name.removesuffix(".jpg")] = tar.extractfile(info).read()
                    wanted.discard(info.name)
                    if not wanted:
                        break
        if wanted:
            raise PathgenError(f"{version.label}: no member {min(wanted)} in {path}")
    return images


def _figure(side: str, label: str, image: bytes | None) -> str:
    if image is None:
        return f'<figure><p class="note">{esc(side)} · {esc(label)}: image left out (page size cap)</p></figure>'
    uri = "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{esc(side)}: {esc(label)}">'
            f"<figcaption>{esc(side)} · {esc(label)}</figcaption></figure>")


def format_html(report: dict[str, Any], images_a: dict[str, bytes], images_b: dict[str, bytes]) -> str:
    """The self-contained HTML page of `report`, with the patches of `images_a` / `images_b` (key -> JPEG)."""
    counts, ex = report["counts"], report["examples"]
    a, b = report["a"], report["b"]
    parts = [
        f"<h1>Dataset diff</h1>\n<p class=\"lead\">A = <code>{esc(a)}</code> ({counts['pairs_a']} pairs), "
        f"B = <code>{esc(b)}</code> ({counts['pairs_b']} pairs), <code>{esc(report['dataset'])}</code>; "
        "pairs joined by key.</p>\n",
        "<h2>Summary</h2>\n",
        table(["", "pairs"], [[COLUMN_LABELS[k], counts[k]] for k in COUNT_KEYS]),
        "<h2>Per tissue</h2>\n",
        table(["tissue"] + [COLUMN_LABELS[k] for k in COUNT_KEYS],
                    [[t] + [c[k] for k in COUNT_KEYS] for t, c in report["tissues"].items()]),
    ]

    def card(key: str, tissue: str, figures: list[str], texts: list[tuple[str, str]]) -> str:
        sections = "".join(f"<section><h3>{esc(title)}</h3><p>{body}</p></section>\n" for title, body in texts)
        return (f'<article class="pair" data-key="{esc(key)}">\n<div class="images">{"".join(figures)}</div>\n'
                f'<div class="texts"><p><code>{esc(key)}</code> · {esc(tissue)}</p>\n{sections}</div>\n</article>\n')

    sections = [("caption_changed", "Changed captions"), ("image_changed", "Changed images"),
                ("added", "Added"), ("removed", "Removed")]
    for name, title in sections:
        total = len(report["keys"][name])
        parts.append(f"<h2>{esc(title)}: {total}</h2>\n")
        if total > len(ex[name]):
            parts.append(f'<p class="note">The first {len(ex[name])} by key.</p>\n')
        for e in ex[name]:
            key = e["key"]
            fig_a = _figure("A", a, images_a.get(key))
            fig_b = _figure("B", b, images_b.get(key))
            if name == "caption_changed":
                texts = [(f"A · {a}", esc(e["old"])), (f"B · {b}", esc(e["new"])),
                         ("word diff", word_diff_html(e["old"], e["new"]))]
                parts.append(card(key, e["tissue"], [fig_a, fig_b], texts))
            elif name == "image_changed":
                texts = [("image sha256", f"<del>{esc(e['image_sha256_a'])}</del><br>"
                                          f"<ins>{esc(e['image_sha256_b'])}</ins>")]
                parts.append(card(key, e["tissue"], [fig_a, fig_b], texts))
            else:
                side = (f"B · {b}", fig_b) if name == "added" else (f"A · {a}", fig_a)
                parts.append(card(key, e["tissue"], [side[1]], [(side[0], esc(e["summary"]))]))
    body = "".join(parts)
    return page(f"Dataset diff: {a} → {b}", body, STYLE)


def html_images(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(side "a" or "b", key) of the patches the page embeds, in page order: at most HTML_MAX_EXAMPLES examples."""
    sides = {"caption_changed": "ab", "image_changed": "ab", "added": "b", "removed": "a"}
    examples = [(name, e["key"]) for name in sides for e in report["examples"][name]][:HTML_MAX_EXAMPLES]
    return [(side, key) for name, key in examples for side in sides[name]]


def render_html(report: dict[str, Any], a: Version, b: Version) -> str:
    """The HTML page of `report`, with the example patches read from versions `a` and `b`.

    Patches are embedded in page order while they fit HTML_MAX_IMAGE_BYTES in
    all; the rest of the examples show their text only.
    """
    wanted = html_images(report)
    read = {side: read_images(version, [k for s, k in wanted if s == side]) for side, version in (("a", a), ("b", b))}
    kept: dict[str, dict[str, bytes]] = {"a": {}, "b": {}}
    total = 0
    for side, key in wanted:
        image = read[side][key]
        if total + len(image) <= HTML_MAX_IMAGE_BYTES:
            kept[side][key] = image
            total += len(image)
    return format_html(report, kept["a"], kept["b"])


# -- command line ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """`pathgen diff` (its arguments: pathgen.cli): print text or JSON, write the HTML page if asked. 0 on success."""
    examples = DEFAULT_EXAMPLES if args.examples is None else args.examples
    if examples < 0:
        raise PathgenError(f"--examples must be >= 0, got {examples}")
    with ExitStack() as stack:
        a = stack.enter_context(open_version(args.repo, args.rev_a))
        b = stack.enter_context(open_version(args.repo, args.rev_b))
        report = diff_manifests(a.manifest, b.manifest, a.label, b.label, examples)
        if args.html:
            page = render_html(report, a, b)
            write_text(page, args.html)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_text(report))
    return 0

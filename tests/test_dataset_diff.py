"""`pathgen diff`: two versions of a dataset assembled by pathgen.steps.assemble, committed to a temporary git + DVC repo."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image
from test_assemble import assemble_params, write_store

from pathgen.cli import build_parser
from pathgen.errors import PathgenError
from pathgen.lineage.diff import HTML_MAX_EXAMPLES, html_images, run, word_diff
from pathgen.steps.assemble import PART_SCHEMA, assemble_dataset, assemble_shard
from pathgen.store.io import encode_jpeg, write_json, write_parquet, write_tar
from pathgen.store.manifest import SlideEntry
from pathgen.store.patch_tars import member_name
from pathgen.store.shards import pair_key

BIN = Path(sys.executable).parent
ENV = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0")
SHARDS = {"00000": [SlideEntry("A", "slides/A.svs", "breast"), SlideEntry("B", "slides/B.svs", "breast")],
          "00001": [SlideEntry("L", "slides/L.svs", "lung", project="TCGA-LUAD")]}

OLD_CAPTION = "Dense stroma with scattered lymphocytes and mild atypia."
NEW_CAPTION = "Dense fibrous stroma with many lymphocytes and mild atypia."
SCRIPT_CAPTION = "Tumour cells <script>alert(1)</script> & necrosis."


def k(slide: str, x: int, y: int) -> str:
    return pair_key(slide, x, y)


def caption(key: str) -> str:
    return f"Patch {key}: eosinophilic stroma with scattered nuclei."


# key -> (summary, image seed). v1 -> v2: 2 removed, 3 added, 3 captions changed (one also its image),
# 2 images changed (one also its caption), 3 unchanged; in two tissues.
V1 = {key: (caption(key), i) for i, key in enumerate([
    k("A", 0, 0), k("A", 672, 0), k("A", 1344, 0), k("A", 0, 672), k("B", 0, 0), k("B", 672, 0),
    k("L", 0, 0), k("L", 672, 0), k("L", 1344, 0)])}
V1[k("A", 672, 0)] = (OLD_CAPTION, V1[k("A", 672, 0)][1])
V2 = {key: value for key, value in V1.items() if key not in (k("A", 0, 672), k("L", 1344, 0))}
V2.update({k("B", 1344, 0): (caption(k("B", 1344, 0)), 20), k("L", 0, 672): (caption(k("L", 0, 672)), 21),
           k("L", 672, 672): (caption(k("L", 672, 672)), 22)})
V2[k("A", 672, 0)] = (NEW_CAPTION, V1[k("A", 672, 0)][1])
V2[k("A", 1344, 0)] = ("A rewritten summary.", 30)
V2[k("L", 0, 0)] = (SCRIPT_CAPTION, V1[k("L", 0, 0)][1])
V2[k("B", 672, 0)] = (V1[k("B", 672, 0)][0], 31)
# Uncommitted workspace build: one pair removed, one caption changed.
V3 = {key: value for key, value in V2.items() if key != k("B", 0, 0)}
V3[k("L", 672, 0)] = ("Lung parenchyma, now described differently.", V2[k("L", 672, 0)][1])

ADDED = sorted([k("B", 1344, 0), k("L", 0, 672), k("L", 672, 672)])
REMOVED = sorted([k("A", 0, 672), k("L", 1344, 0)])
CAPTION_CHANGED = sorted([k("A", 672, 0), k("A", 1344, 0), k("L", 0, 0)])
IMAGE_CHANGED = sorted([k("A", 1344, 0), k("B", 672, 0)])


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_jpeg(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), 90)


def write_upstream(data: Path, shard: str, pairs: dict[str, tuple[str, int]], clip: dict) -> None:
    """The inputs assemble_shard reads (patch tars, selection, tile info, embeddings of `clip`, captions,
    revisions, summaries)."""
    rows = [(key, key.split("/")[0], *(int(v[1:]) for v in key.split("/")[1].split("_")), summary, seed)
            for key, (summary, seed) in sorted(pairs.items())]
    for entry in SHARDS[shard]:
        mine = [r for r in rows if r[1] == entry.slide_id]
        write_tar({member_name(x, y): jpeg(seed) for _, _, x, y, _, seed in mine},
                  data / "patches" / f"{entry.slide_id}.tar")
        write_parquet(pl.DataFrame(
            [{"x": x, "y": y, "kept": True, "level": 0, "size": 672, "reasons": "cluster", "report_score": 0.5,
              "attribute_score": None, "cluster": 0, "drop_reason": None} for _, _, x, y, _, _ in mine],
            schema={"x": pl.Int64, "y": pl.Int64, "kept": pl.Boolean, "level": pl.Int32, "size": pl.Int32,
                    "reasons": pl.String, "report_score": pl.Float32, "attribute_score": pl.Float32,
                    "cluster": pl.Int32, "drop_reason": pl.String}), data / "selection" / f"{entry.slide_id}.parquet")
        write_json({"slide_id": entry.slide_id, "mpp": 0.25}, data / "tiles" / f"{entry.slide_id}.json")
        write_store(data, entry.slide_id, [(x, y) for _, _, x, y, _, _ in mine], clip)
    keys = [r[0] for r in rows]
    write_parquet(pl.DataFrame({
        "key": keys, "slide_id": [r[1] for r in rows], "x": [r[2] for r in rows], "y": [r[3] for r in rows],
        "description": [f"Description of {key}." for key in keys], "describe_engine": ["transformers"] * len(rows),
        "describe_finish": ["stop"] * len(rows), "describe_tokens": [4] * len(rows),
        "describe_fingerprint": ["d" * 8] * len(rows),
    }, schema_overrides={"x": pl.Int64, "y": pl.Int64, "describe_tokens": pl.Int32}),
        data / "captions" / f"{shard}.parquet")
    write_parquet(pl.DataFrame({
        "key": keys, "ops": ["[]"] * len(rows), "revised": [f"Description of {key}." for key in keys],
        "revise_status": ["unchanged"] * len(rows), "revise_engine": ["transformers"] * len(rows),
        "revise_constrained": [True] * len(rows), "revise_finish": ["stop"] * len(rows),
        "revise_fingerprint": ["r" * 8] * len(rows),
    }), data / "revised" / f"{shard}.parquet")
    write_parquet(pl.DataFrame({
        "key": keys, "summary": [r[4] for r in rows], "summary_tokens": [len(r[4].split()) for r in rows],
        "summary_cut": [False] * len(rows), "summarize_engine": ["llama_cpp"] * len(rows),
        "summarize_finish": ["stop"] * len(rows), "summarize_fingerprint": ["s" * 8] * len(rows),
    }, schema_overrides={"summary_tokens": pl.Int32}), data / "summaries" / f"{shard}.parquet")


def build(repo: Path, upstream: Path, pairs: dict[str, tuple[str, int]], clip: dict) -> None:
    """Assemble `pairs` into repo/data/dataset with the pipeline's own assemble steps."""
    out = repo / "data" / "dataset"
    shutil.rmtree(out, ignore_errors=True)
    for shard in SHARDS:
        slides = {e.slide_id for e in SHARDS[shard]}
        mine = {key: v for key, v in pairs.items() if key.split("/")[0] in slides}
        write_upstream(upstream / shard, shard, mine, clip)
        assemble_shard(shard, SHARDS[shard], upstream / shard, out, assemble_params(clip))
    assemble_dataset(out, list(SHARDS))


def sh(repo: Path, *cmd: str) -> str:
    """Run a git or dvc command in `repo`; DVC's per-repo site cache goes beside it, not to /var/tmp/dvc."""
    env = dict(ENV, DVC_SITE_CACHE_DIR=str(repo.parent / "dvc-site-cache"))
    proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def commit(repo: Path, message: str) -> None:
    sh(repo, str(BIN / "dvc"), "add", "-q", "data/dataset")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, random_tiny_clip) -> Path:
    """HEAD~2: no dataset; HEAD~1: V1; HEAD: V2; workspace: V3, built but not added (do not modify)."""
    root = tmp_path_factory.mktemp("diff")
    repo = root / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "config", "user.email", "test@example.com")
    sh(repo, "git", "config", "user.name", "Test")
    sh(repo, str(BIN / "dvc"), "init", "-q")
    # DVC keeps per-repo indexes (directory listings included) in a site cache dir, /var/tmp/dvc by default;
    # the DVCFileSystem of the tests reads this setting.
    sh(repo, str(BIN / "dvc"), "config", "--local", "core.site_cache_dir", str(root / "dvc-site-cache"))
    sh(repo, "git", "commit", "-q", "-m", "dvc init")
    build(repo, root / "upstream-v1", V1, random_tiny_clip)
    commit(repo, "v1")
    build(repo, root / "upstream-v2", V2, random_tiny_clip)
    commit(repo, "v2")
    build(repo, root / "upstream-v3", V3, random_tiny_clip)
    return repo


def diff(capsys, repo: Path, *argv: str) -> str:
    """Run `pathgen diff ARGV --repo REPO` through the CLI's own parser; its stdout."""
    capsys.readouterr()
    assert run(build_parser().parse_args(["diff", *argv, "--repo", str(repo)])) == 0
    return capsys.readouterr().out


def diff_json(capsys, repo: Path, *argv: str) -> dict:
    return json.loads(diff(capsys, repo, *argv, "--json"))


def test_manifest_has_the_assembled_schema(repo):
    # The fixture is the pipeline's real layout: manifest with PART_SCHEMA, shard tars of {key}.jpg/.json/.txt.
    manifest = pl.read_parquet(repo / "data" / "dataset" / "manifest.parquet")
    assert manifest.schema == pl.Schema(PART_SCHEMA)
    assert sorted(manifest["key"]) == sorted(V3)
    with tarfile.open(repo / "data" / "dataset" / "00001.tar") as tar:
        assert f"{k('L', 0, 0)}.jpg" in tar.getnames() and f"{k('L', 0, 0)}.txt" in tar.getnames()


def test_counts_and_keys_between_two_commits(capsys, repo):
    report = diff_json(capsys, repo, "HEAD~1", "HEAD")
    assert (report["a"], report["b"], report["dataset"]) == ("HEAD~1", "HEAD", "data/dataset")
    assert report["counts"] == {"pairs_a": 9, "pairs_b": 10, "added": 3, "removed": 2, "unchanged": 3,
                                "caption_changed": 3, "image_changed": 2}
    assert report["keys"] == {"added": ADDED, "removed": REMOVED, "caption_changed": CAPTION_CHANGED,
                              "image_changed": IMAGE_CHANGED}


def test_counts_per_tissue(capsys, repo):
    report = diff_json(capsys, repo, "HEAD~1", "HEAD")
    assert report["tissues"] == {
        "breast": {"pairs_a": 6, "pairs_b": 6, "added": 1, "removed": 1, "unchanged": 2, "caption_changed": 2,
                   "image_changed": 2},
        "lung": {"pairs_a": 3, "pairs_b": 4, "added": 2, "removed": 1, "unchanged": 1, "caption_changed": 1,
                 "image_changed": 0},
    }


def test_word_diff():
    assert word_diff(OLD_CAPTION, NEW_CAPTION) == \
        "Dense {+fibrous+} stroma with [-scattered-]{+many+} lymphocytes and mild atypia."
    assert word_diff("a b c", "a c") == "a [-b-] c"
    assert word_diff("same  words", "same words") == "same words"  # whitespace-split: spacing is not a change
    assert word_diff("", "new") == "{+new+}"


def test_examples_in_text_and_json(capsys, repo):
    report = diff_json(capsys, repo, "HEAD~1", "HEAD")
    examples = report["examples"]["caption_changed"]
    assert [e["key"] for e in examples] == CAPTION_CHANGED  # sorted by key
    assert examples[0] == {"key": k("A", 672, 0), "tissue": "breast", "old": OLD_CAPTION, "new": NEW_CAPTION,
                           "diff": "Dense {+fibrous+} stroma with [-scattered-]{+many+} lymphocytes and mild atypia."}
    assert examples[2]["tissue"] == "lung" and examples[2]["new"] == SCRIPT_CAPTION
    assert [e["key"] for e in report["examples"]["added"]] == ADDED
    assert [e["key"] for e in report["examples"]["removed"]] == REMOVED

    text = diff(capsys, repo, "HEAD~1", "HEAD")
    assert "Dense {+fibrous+} stroma with [-scattered-]{+many+} lymphocytes and mild atypia." in text
    lines = text.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith(("tissue", "breast", "lung"))}
    assert rows == {"tissue": ["A", "B", "added", "removed", "unchanged", "caption", "changed", "image", "changed"],
                    "breast": ["6", "6", "1", "1", "2", "2", "2"], "lung": ["3", "4", "2", "1", "1", "1", "0"]}
    assert any(line.split() == ["caption", "changed", "3"] for line in lines)
    assert all(key in text for key in ADDED + REMOVED)
    assert str(repo) not in text


def test_examples_cap_keeps_full_key_lists(capsys, repo):
    report = diff_json(capsys, repo, "HEAD~1", "HEAD", "--examples", "1")
    assert [e["key"] for e in report["examples"]["caption_changed"]] == CAPTION_CHANGED[:1]
    assert [e["key"] for e in report["examples"]["added"]] == ADDED[:1]
    assert report["keys"]["added"] == ADDED and report["keys"]["caption_changed"] == CAPTION_CHANGED


def test_json_is_sorted_and_stable(capsys, repo):
    out = diff(capsys, repo, "HEAD~1", "HEAD", "--json")
    report = json.loads(out)
    assert list(report) == sorted(report) == ["a", "b", "counts", "dataset", "examples", "keys", "tissues"]
    assert out == json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert diff(capsys, repo, "HEAD~1", "HEAD", "--json") == out


def test_workspace_is_the_default_second_version(capsys, repo):
    report = diff_json(capsys, repo)  # HEAD against the uncommitted build in the workspace
    assert (report["a"], report["b"]) == ("HEAD", "workspace")
    assert report["counts"] == {"pairs_a": 10, "pairs_b": 9, "added": 0, "removed": 1, "unchanged": 8,
                                "caption_changed": 1, "image_changed": 0}
    assert report["keys"]["removed"] == [k("B", 0, 0)]
    assert report["keys"]["caption_changed"] == [k("L", 672, 0)]
    assert diff_json(capsys, repo, "HEAD~1")["counts"]["pairs_b"] == 9  # REV_A given, REV_B still the workspace


def test_html_page(capsys, repo, tmp_path):
    page_path = tmp_path / "diff.html"
    diff(capsys, repo, "HEAD~1", "HEAD", "--html", str(page_path))
    page = page_path.read_text(encoding="utf-8")

    def uri(key: str, pairs: dict) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(jpeg(pairs[key][1])).decode("ascii")

    changed = k("B", 672, 0)  # same caption, new image: A's and B's patch side by side
    assert uri(changed, V1) != uri(changed, V2)
    assert uri(changed, V1) in page and uri(changed, V2) in page
    both = k("A", 1344, 0)
    assert uri(both, V1) in page and uri(both, V2) in page
    assert uri(k("L", 0, 672), V2) in page and uri(k("A", 0, 672), V1) in page  # added / removed: one image
    assert "<del>scattered</del><ins>many</ins>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; necrosis." in page
    assert "<script" not in page
    assert str(repo) not in page and str(tmp_path) not in page
    assert not [p for p in tmp_path.iterdir() if p.name != "diff.html"]  # atomic write left no temporary

    again = tmp_path / "again.html"
    diff(capsys, repo, "HEAD~1", "HEAD", "--html", str(again))
    assert again.read_bytes() == page_path.read_bytes()


def test_html_embeds_a_capped_number_of_examples(capsys, repo):
    report = {"examples": {"caption_changed": [{"key": f"c{i:02d}"} for i in range(20)],
                           "image_changed": [], "added": [{"key": f"a{i:02d}"} for i in range(10)], "removed": []}}
    wanted = html_images(report)
    assert HTML_MAX_EXAMPLES == 24
    assert wanted[:2] == [("a", "c00"), ("b", "c00")]  # changed pairs: A's patch and B's
    assert wanted[40:] == [("b", "a00"), ("b", "a01"), ("b", "a02"), ("b", "a03")]  # added pairs: B's only
    with pytest.raises(PathgenError, match=r"^--examples must be >= 0, got -1$"):
        diff(capsys, repo, "HEAD~1", "HEAD", "--examples", "-1")


def test_unknown_revision(capsys, repo):
    with pytest.raises(PathgenError, match=r"^revision 'v9' not found$"):
        diff(capsys, repo, "v9", "HEAD")


def test_revision_without_dataset(capsys, repo):
    with pytest.raises(PathgenError) as err:
        diff(capsys, repo, "HEAD~2", "HEAD")
    assert str(err.value) == ("HEAD~2 has no data/dataset/manifest.parquet "
                              "(not built or not committed with dvc commit)")


def test_dataset_not_in_the_dvc_cache(capsys, repo, tmp_path):
    """HEAD's .dvc file committed, but (part of) its data missing from the cache; HEAD~1's still there."""
    clone = tmp_path / "clone"
    shutil.copytree(repo, clone, symlinks=True)
    objects = clone / ".dvc" / "cache" / "files" / "md5"
    dir_md5 = yaml.safe_load(sh(clone, "git", "show", "HEAD:data/dataset.dvc"))["outs"][0]["md5"]
    listing = objects / dir_md5[:2] / dir_md5[2:]
    listing_bytes = listing.read_bytes()
    listing.unlink()  # no listing of the directory: "dvc commit" never ran, or nothing pulled
    with pytest.raises(PathgenError) as err:
        diff(capsys, clone, "HEAD~1", "HEAD")
    assert str(err.value) == ("HEAD: data/dataset is tracked by DVC but its data is not in the DVC cache "
                              "(dvc pull, or dvc commit before git commit)")
    listing.write_bytes(listing_bytes)  # the listing, but not the manifest's own object
    manifest_md5 = next(e["md5"] for e in json.loads(listing_bytes) if e["relpath"] == "manifest.parquet")
    (objects / manifest_md5[:2] / manifest_md5[2:]).unlink()
    with pytest.raises(PathgenError) as err:
        diff(capsys, clone, "HEAD~1", "HEAD")
    assert str(err.value) == ("HEAD: data/dataset/manifest.parquet is tracked by DVC but its data is not in the "
                              "DVC cache (dvc pull, or dvc commit before git commit)")


def test_module_entry_point(repo):
    cmd = [sys.executable, "-m", "pathgen", "diff", "HEAD~1", "HEAD", "--repo", str(repo), "--json"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["keys"]["removed"] == REMOVED
    proc = subprocess.run(cmd[:4] + ["nope"] + cmd[6:], env=ENV, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "pathgen diff: error: revision 'nope' not found\n"

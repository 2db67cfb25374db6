"""Known answers for patch selection: top-k, k-means sampling, the near-duplicate filter, seeding."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from conftest import BIN, ROOT, forbid_clip_loading
from pathgen.errors import PathgenError
from pathgen.models import fingerprint as fingerprint_module
from pathgen.models.clip import TEXT_CACHE_AGENT, LazyClip, cached_text_features, clip_fingerprint, encode_texts
from pathgen.steps.prompts import PROMPT_SCHEMA
from pathgen.steps.select import (
    _centre_sums,
    cluster_sample,
    combine_scores,
    drop_probability,
    kmeans,
    kmeans_labels,
    near_duplicate_filter,
    QC_COLOURS,
    run_select,
    select_patches,
    top_k,
)
from pathgen.store.cache import ItemCache
from pathgen.store.embeddings import write_embeddings
from pathgen.wsi.quality import MEASURES, THRESHOLDS

PARAMS = {
    "report_top_k": 64,
    "attribute_top_k": 64,
    "combine": "max",
    "cluster_samples": 256,
    "kmeans_n_init": 1,
    "kmeans_max_iter": 100,
    "kmeans_tol": 1e-4,
    "device": "cpu",
    "similarity_threshold": 0.88,
    "drop_exponent": 1.0,
    "qc": dict(THRESHOLDS),
}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def blobs(n: int, centres: int, dim: int = 16, spread: float = 0.6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, dim)) * 3
    return unit(centre[rng.integers(0, centres, n)] + rng.normal(scale=spread, size=(n, dim))).astype(np.float32)


def test_top_k_picks_exactly_the_k_best_scores():
    scores = np.random.default_rng(1).permutation(1000).astype(np.float32)  # distinct
    picked = top_k(scores, 64)
    assert len(picked) == 64
    assert set(picked) == set(np.argsort(scores)[-64:])
    assert list(scores[picked]) == sorted(scores[picked], reverse=True)


def test_top_k_breaks_ties_by_index_and_handles_small_and_empty():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert list(top_k(scores, 2)) == [1, 2]
    assert list(top_k(scores, 10)) == [1, 2, 4, 3, 0]
    assert len(top_k(None, 64)) == 0
    assert len(top_k(scores, 0)) == 0


def test_combine_scores_max_and_mean():
    sim = np.array([[0.1, 0.9], [0.5, 0.5]])
    assert list(combine_scores(sim, "max")) == [0.9, 0.5]
    assert list(combine_scores(sim, "mean")) == [0.5, 0.5]
    assert combine_scores(np.zeros((2, 0)), "max") is None


def test_kmeans_uses_ceil_sqrt_n_clusters():
    features = blobs(300, 12)
    labels = kmeans_labels(features, seed=3, n_init=1, max_iter=100)
    assert len(np.unique(labels)) == math.ceil(math.sqrt(300)) == 18


@pytest.mark.parametrize("n", [1000, 300])
def test_cluster_sampling_is_uniform_over_large_clusters(n):
    labels = np.repeat(np.arange(10), n // 10)  # 10 equal clusters
    picked = cluster_sample(labels, 256, np.random.default_rng(0))
    assert len(picked) == 256 == len(set(picked))
    counts = np.bincount(labels[picked], minlength=10)
    assert counts.max() - counts.min() <= 1


def test_cluster_sampling_takes_everything_when_small_and_fills_from_big_clusters():
    labels = np.array([0] * 5 + [1] * 200 + [2] * 200)
    picked = cluster_sample(labels, 256, np.random.default_rng(0))
    counts = np.bincount(labels[picked])
    assert counts[0] == 5  # exhausted
    assert abs(counts[1] - counts[2]) <= 1 and counts.sum() == 256
    assert len(cluster_sample(np.zeros(100, int), 256, np.random.default_rng(0))) == 100


def test_drop_probability_is_zero_at_threshold_and_one_at_identity():
    p = drop_probability(np.array([0.5, 0.88, 0.91, 0.94, 0.97, 1.0]), 0.88, 1.0)
    assert p[0] == 0 and p[1] == 0 and p[-1] == pytest.approx(1.0)
    assert p[3] == pytest.approx(0.5)
    assert np.all(np.diff(p) >= 0)
    assert drop_probability(0.94, 0.88, 2.0) == pytest.approx(0.25)


def planted_pair(similarity: float, dim: int = 32) -> np.ndarray:
    """Two unit vectors with the given cosine, plus three far-apart others."""
    a = np.zeros(dim)
    a[0] = 1
    b = np.zeros(dim)
    b[0], b[1] = similarity, math.sqrt(1 - similarity**2)
    others = np.eye(dim)[2:5]
    return np.vstack([a, b, others]).astype(np.float32)


def test_filter_drops_planted_duplicate_with_documented_probability():
    features = planted_pair(0.97)
    expected = float(drop_probability(0.97, 0.88, 1.0))  # 0.75
    trials = 800
    drops = 0
    for seed in range(trials):
        verdict = near_duplicate_filter(features, np.arange(5), 0.88, 1.0, np.random.default_rng(seed))
        kept = verdict["kept"]
        assert kept[2:].all()  # the unrelated ones are never touched
        assert kept[0] or kept[1]  # never both of a pair
        if not kept.all():
            drops += 1
            assert not kept[1] and verdict["duplicate_of"][1] == 0  # the lower-priority one goes
            assert verdict["probability"][1] == pytest.approx(expected)
    sigma = math.sqrt(expected * (1 - expected) / trials)
    assert abs(drops / trials - expected) < 4 * sigma


def test_filter_never_drops_below_threshold():
    features = planted_pair(0.87)
    for seed in range(300):
        verdict = near_duplicate_filter(features, np.arange(5), 0.88, 1.0, np.random.default_rng(seed))
        assert verdict["kept"].all()


def test_filter_always_drops_identical_pair():
    features = np.vstack([planted_pair(0.9)[:1]] * 2 + [np.eye(32, dtype=np.float32)[5]])
    for seed in range(50):
        assert verdict_kept(features, seed).sum() == 2


def verdict_kept(features, seed):
    return near_duplicate_filter(features, np.arange(len(features)), 0.88, 1.0, np.random.default_rng(seed))["kept"]


def make_inputs():
    features = blobs(600, 15, seed=5)
    coords = np.stack(np.meshgrid(np.arange(30), np.arange(20)), -1).reshape(-1, 2) * 672
    report = unit(np.random.default_rng(7).normal(size=(3, 16))).astype(np.float32)
    attribute = unit(np.random.default_rng(8).normal(size=(20, 16))).astype(np.float32)
    return features, coords, report, attribute


def test_selection_union_reasons_and_counts():
    features, coords, report, attribute = make_inputs()
    sel = select_patches(features, coords, report, attribute, PARAMS, 1, "s1", None)
    report_scores = (features @ report.T).max(1)
    assert set(sel.filter("by_report")["tile"]) == set(np.argsort(-report_scores)[:64])
    assert sel["by_report"].sum() == 64 and sel["by_attribute"].sum() == 64 and sel["by_cluster"].sum() == 256
    assert sel["tile"].is_unique().all() and sel["tile"].is_sorted()
    assert sel.height <= 384
    reasons = sel.select("reasons").to_series().to_list()
    assert all(r for r in reasons)
    dropped = sel.filter(~sel["kept"])
    assert (dropped["duplicate_similarity"] > 0.88).all()
    assert dropped["drop_reason"].to_list() == ["near-duplicate"] * dropped.height
    assert set(dropped["duplicate_of"]) <= set(sel.filter("kept")["tile"]) | set(dropped["tile"])
    assert (sel["x"].to_numpy() == coords[sel["tile"].to_numpy(), 0]).all()


def test_selection_without_report_has_no_report_reason():
    features, coords, _, attribute = make_inputs()
    sel = select_patches(features, coords, np.zeros((0, 16), np.float32), attribute, PARAMS, 1, "s1", None)
    assert not sel["by_report"].any()
    assert sel["report_score"].null_count() == sel.height


def test_selection_is_seeded_by_seed_and_slide():
    features, coords, report, attribute = make_inputs()
    a = select_patches(features, coords, report, attribute, PARAMS, 1, "s1", None)
    b = select_patches(features, coords, report, attribute, PARAMS, 1, "s1", None)
    c = select_patches(features, coords, report, attribute, PARAMS, 2, "s1", None)
    d = select_patches(features, coords, report, attribute, PARAMS, 1, "s2", None)
    assert a.equals(b)
    assert not a.equals(c)
    assert not a.select("tile", "kept").equals(d.select("tile", "kept"))


def test_quality_control_leaves_failing_patches_out_of_retrieval_clustering_and_the_filter():
    features, coords, report, attribute = make_inputs()
    n = len(features)
    full = select_patches(features, coords, report, attribute, PARAMS, 1, "s1", None)
    # fail the ten best report matches, and a few others, with different reasons
    best = np.argsort(-(features @ report.T).max(1), kind="stable")[:10]
    qc = [None] * n
    for i, tile in enumerate(best.tolist() + [3, 77, 500]):
        qc[tile] = ("pen", "blur", "fold", "background")[i % 4]
    sel = select_patches(features, coords, report, attribute, PARAMS, 1, "s1", None, qc=qc)
    failed = sel.filter(pl.col("drop_reason").str.starts_with("qc:"))
    assert sorted(failed["tile"].to_list()) == sorted(i for i, r in enumerate(qc) if r)
    assert failed["drop_reason"].to_list() == [f"qc:{qc[t]}" for t in failed["tile"]]
    assert not failed["kept"].any() and not failed["by_report"].any() and not failed["by_cluster"].any()
    assert set(best) <= set(full.filter("by_report")["tile"])  # they would have been retrieved
    others = sel.filter(~pl.col("drop_reason").str.starts_with("qc:").fill_null(False))
    assert not set(others["tile"]) & set(failed["tile"])
    assert others["by_report"].sum() == 64 and others["tile"].is_sorted() and sel["tile"].is_unique().all()
    # the rest is exactly the selection among the passing patches, mapped back to grid rows
    eligible = np.array([i for i in range(n) if qc[i] is None])
    sub = select_patches(features[eligible], coords[eligible], report, attribute, PARAMS, 1, "s1", None)
    assert others["tile"].to_list() == eligible[sub["tile"].to_numpy()].tolist()
    assert others.drop("tile", "duplicate_of").equals(sub.drop("tile", "duplicate_of"))
    dup = sub["duplicate_of"].to_list()
    assert others["duplicate_of"].to_list() == [None if d is None else int(eligible[d]) for d in dup]
    assert others["cluster"].max() < math.ceil(math.sqrt(len(eligible)))
    # a patch list with no failure changes nothing
    assert select_patches(features, coords, report, attribute, PARAMS, 1, "s1", None, qc=[None] * n).equals(full)


def test_selection_of_empty_slide_is_empty():
    sel = select_patches(np.zeros((0, 16), np.float32), np.zeros((0, 2), np.int64), np.zeros((0, 16), np.float32),
                         np.zeros((3, 16), np.float32), PARAMS, 1, "empty", None)
    assert sel.height == 0


# --- k-means: float32, one seeded k-means++ init, chunked -----------------------------------------------


def test_kmeans_is_the_same_for_the_same_seed_and_any_thread_count():
    features = blobs(2000, 20, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kmeans(features, seed=11, n_init=1, max_iter=100)
        torch.set_num_threads(2)
        two = kmeans(features, seed=11, n_init=1, max_iter=100)
    finally:
        torch.set_num_threads(threads)
    again = kmeans(features, seed=11, n_init=1, max_iter=100)
    other = kmeans(features, seed=12, n_init=1, max_iter=100)
    assert one.labels.tobytes() == two.labels.tobytes() == again.labels.tobytes()
    assert one.inertia == again.inertia and one.device == "cpu" and one.iterations >= 1
    assert other.labels.tobytes() != one.labels.tobytes()


def test_kmeans_clusters_never_straddle_planted_blobs_and_match_sklearn_quality():
    from sklearn.cluster import KMeans

    features = blobs(1600, 10, spread=0.3, seed=4)  # 10 tight blobs, k = 40: each cluster inside one blob
    truth = KMeans(n_clusters=10, n_init=10, random_state=0).fit_predict(features.astype(np.float64))
    result = kmeans(features, seed=5, n_init=1, max_iter=100)
    assert len(np.unique(result.labels)) == 40
    for c in np.unique(result.labels):
        assert len(np.unique(truth[result.labels == c])) == 1
    reference = KMeans(n_clusters=40, n_init=1, random_state=5).fit(features.astype(np.float64))
    assert result.inertia <= 1.02 * reference.inertia_


def test_kmeans_more_inits_never_end_worse():
    features = blobs(900, 40, spread=1.5, seed=6)
    one, three = kmeans(features, seed=3, n_init=1), kmeans(features, seed=3, n_init=3)
    assert three.inertia <= one.inertia


def test_the_cuda_centre_sums_agree_with_index_add():
    # The CUDA path sums one-hot blocks (deterministic); on CPU index_add_. Same sums, run on CPU here.
    x = torch.from_numpy(blobs(1000, 7, seed=1))
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 32, 1000))
    index_add = _centre_sums(x, labels, 32, chunk=64)
    onehot = torch.zeros_like(index_add)
    for start in range(0, 1000, 64):
        block = torch.nn.functional.one_hot(labels[start:start + 64], 32).to(x.dtype)
        onehot.addmm_(block.T, x[start:start + 64])
    assert torch.allclose(index_add, onehot, atol=1e-5)
    expected = np.stack([x.numpy()[labels.numpy() == c].sum(0) for c in range(32)])
    assert np.allclose(index_add.numpy(), expected, atol=1e-5)


def test_kmeans_device_names_the_setting_when_cuda_is_absent():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(Exception, match="select.device"):
        kmeans(blobs(50, 3), seed=0, device="cuda")


MEMORY_PROBE = textwrap.dedent("""
    import json, math, resource, sys
    import numpy as np
    from pathgen.steps.select import select_patches
    n, dim = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, dim), dtype=np.float32)
    features = np.empty((n, dim), np.float32)
    for s in range(0, n, 4096):
        m = min(4096, n - s)
        b = centres[rng.integers(0, 64, m)] + 0.5 * rng.standard_normal((m, dim), dtype=np.float32)
        features[s:s + m] = (b / np.linalg.norm(b, axis=1, keepdims=True)).astype(np.float16)
    coords = np.zeros((n, 2), np.int64)
    text = rng.standard_normal((30, dim), dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    params = json.loads(sys.argv[3])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sel = select_patches(features, coords, text[:10], text[10:], params, 0, "probe", None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak, "clusters": int(sel["cluster"].max()) + 1,
                      "candidates": sel.height}))
""")


def test_select_memory_above_the_features_is_bounded():
    """Peak RSS of select_patches, in its own process, above what the process held with the features in
    memory: at most the features' size again (a float32 copy at most) plus 160 MiB (distance blocks of
    32 MiB, scores, ranks). At N = 100,000, D = 768 that is a bound of 300 MB + 160 MiB over a baseline
    of ~0.8 GB: under 2 GB (bench/selection.py measures that case itself)."""
    n, dim = 20000, 768
    params = {**PARAMS, "kmeans_max_iter": 5}  # memory does not grow with iterations; time does
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(n), str(dim), json.dumps(params)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["clusters"] == math.ceil(math.sqrt(n)) and got["candidates"] > 256
    feature_bytes = n * dim * 4
    assert got["peak"] - got["before"] <= feature_bytes + (160 << 20), got


def test_cluster_sample_of_a_100k_patch_slide_takes_one_patch_from_each_of_256_clusters():
    # k = 317 clusters > 256 samples: the first round alone fills the sample (bench/selection.py times it).
    labels = np.random.default_rng(0).integers(0, 317, 100_000)
    picked = cluster_sample(labels, 256, np.random.default_rng(1))
    assert len(picked) == 256 == len(np.unique(labels[picked]))
    assert np.array_equal(picked, cluster_sample(labels, 256, np.random.default_rng(1)))


# --- prompt text features through the item cache ---------------------------------------------------------


def clean_quality(n: int) -> dict[str, np.ndarray]:
    """Quality measures of n patches that pass every check."""
    values = {"background_fraction": 0.0, "glass_fraction": 0.1, "pen_fraction": 0.0, "dark_fraction": 0.0,
              "laplacian_variance": 900.0}
    return {name: np.full(n, values[name]) for name in MEASURES}


def slide_inputs(tmp_path: Path, clip_cfg: dict, n: int = 300, fingerprint: str | None = None,
                 quality: dict[str, np.ndarray] | None = None, with_quality: bool = True) -> dict:
    """An embeddings store, prompts, thumbnail and tile info for one synthetic slide."""
    dim = 64
    features = blobs(n, 8, dim=dim, seed=9)
    side = math.ceil(math.sqrt(n))
    grid = pl.DataFrame({"x": (np.arange(n) % side) * 672, "y": (np.arange(n) // side) * 672})
    attrs = {"slide_id": "s1", "model_fingerprint": fingerprint or clip_fingerprint(clip_cfg)[0],
             "patch": {"size": 672, "level": 0, "read_size": 672, "out_size": 336}}
    write_embeddings(tmp_path / "s1.zarr", features, grid, attrs,
                     quality=(quality or clean_quality(n)) if with_quality else None)
    texts = [("report", "Invasive ductal carcinoma with a desmoplastic stroma."),
             ("report", "Lymphovascular invasion is present."),
             ("attribute", "An H&E image of breast tissue showing tumour nests."),
             ("attribute", "An H&E image of breast tissue showing adipose tissue.")]
    pl.DataFrame([("s1", kind, i, text, "test") for i, (kind, text) in enumerate(texts)], schema=PROMPT_SCHEMA,
                 orient="row").write_parquet(tmp_path / "prompts.parquet")
    Image.new("RGB", (side * 4, side * 4), "white").save(tmp_path / "thumb.png")
    info = {"thumbnail_scale": [168.0, 168.0]}
    (tmp_path / "info.json").write_text(json.dumps(info))
    return {"embeddings": tmp_path / "s1.zarr", "prompts": tmp_path / "prompts.parquet",
            "thumbnail": tmp_path / "thumb.png", "info": info, "texts": [t for _, t in texts]}


def select_params(clip_cfg: dict) -> dict:
    return {"seed": 0, "clip": clip_cfg, "select": PARAMS}


def test_cached_text_features_are_the_computed_bytes_and_need_no_model(random_tiny_clip, tmp_path):
    texts = ["Tumour cells in sheets.", "Necrosis.", "Tumour cells in sheets."]
    fingerprint = clip_fingerprint(random_tiny_clip)[0]
    with ItemCache(tmp_path / "cache", TEXT_CACHE_AGENT, fingerprint) as cache:
        first = LazyClip(random_tiny_clip)
        computed = cached_text_features(first, fingerprint, texts, cache)
    assert first.loaded and computed.dtype == np.float32 and computed.shape[0] == 3
    alone = encode_texts(first.get(), [texts[1]])[0]
    assert computed[1].tobytes() == alone.tobytes()
    with ItemCache(tmp_path / "cache", TEXT_CACHE_AGENT, fingerprint) as cache:
        second = LazyClip({**random_tiny_clip, "checkpoint": str(tmp_path / "absent.pt")})  # loading it would fail
        cached = cached_text_features(second, fingerprint, texts, cache)
        assert cache.stats.hits == 3 and cache.stats.misses == 0
    assert not second.loaded and cached.tobytes() == computed.tobytes()
    # Another fingerprint is another key: nothing found, the model is needed.
    with ItemCache(tmp_path / "cache", TEXT_CACHE_AGENT, "f" * 64) as cache:
        with pytest.raises(Exception, match="absent.pt"):
            cached_text_features(LazyClip({**random_tiny_clip, "checkpoint": str(tmp_path / "absent.pt")}), "f" * 64,
                                 texts, cache)


def test_a_select_whose_prompts_are_cached_loads_no_clip_and_selects_the_same_bytes(random_tiny_clip, tmp_path,
                                                                                   monkeypatch):
    inputs = slide_inputs(tmp_path, random_tiny_clip)
    params = select_params(random_tiny_clip)
    cache = tmp_path / "cache"

    def run(name, cache_dir):
        info = {}
        run_select("s1", inputs["embeddings"], inputs["prompts"], inputs["thumbnail"], inputs["info"], params,
                   tmp_path / f"{name}.parquet", tmp_path / f"{name}.png", cache_dir=cache_dir, info=info)
        return info, (tmp_path / f"{name}.parquet").read_bytes()

    uncached_info, uncached = run("uncached", None)
    assert uncached_info["clip_loaded"] is True and uncached_info["cache"] is None
    monkeypatch.setattr(fingerprint_module, "_known", {})  # a fresh job: this process hashed it already
    first_info, first = run("first", cache)
    assert first_info["clip_loaded"] is True and first_info["cache"]["misses"] == 4
    assert (cache / ".checkpoint-hashes").is_dir() and (cache / TEXT_CACHE_AGENT).is_dir()

    # The second job: no CLIP may be built, and the checkpoint hash comes from the hash store.
    forbid_clip_loading(monkeypatch)
    second_info, second = run("second", cache)
    assert second_info["clip_loaded"] is False
    assert (second_info["cache"]["hits"], second_info["cache"]["misses"], second_info["cache"]["puts"]) == (4, 0, 0)
    assert second == first == uncached
    assert pl.read_parquet(tmp_path / "second.parquet")["by_report"].sum() == PARAMS["report_top_k"]


def test_select_refuses_features_of_another_clip_in_one_line(random_tiny_clip, tmp_path):
    inputs = slide_inputs(tmp_path, random_tiny_clip, fingerprint="0" * 64)
    with pytest.raises(PathgenError, match="s1.zarr: embedded with a different CLIP") as err:
        run_select("s1", inputs["embeddings"], inputs["prompts"], inputs["thumbnail"], inputs["info"],
                   select_params(random_tiny_clip), tmp_path / "o.parquet", tmp_path / "o.png")
    assert "\n" not in str(err.value)


def test_select_applies_the_stored_quality_measures_and_crosses_failures_out_on_the_overlay(random_tiny_clip, tmp_path):
    n = 300
    quality = clean_quality(n)
    quality["pen_fraction"][[5, 6]] = 0.2           # > max_pen_fraction 0.05
    quality["laplacian_variance"][40] = 20.0       # < min_laplacian_variance 150
    quality["background_fraction"][41] = 0.9       # > max_background_fraction 0.5
    inputs = slide_inputs(tmp_path, random_tiny_clip, n=n, quality=quality)
    params = select_params(random_tiny_clip)
    sel = run_select("s1", inputs["embeddings"], inputs["prompts"], inputs["thumbnail"], inputs["info"], params,
                     tmp_path / "o.parquet", tmp_path / "o.png", cache_dir=tmp_path / "cache")
    failed = sel.filter(pl.col("drop_reason").str.starts_with("qc:")).sort("tile")
    assert dict(zip(failed["tile"], failed["drop_reason"])) == {5: "qc:pen", 6: "qc:pen", 40: "qc:blur",
                                                                 41: "qc:background"}
    overlay = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    scale = inputs["info"]["thumbnail_scale"][0]
    for tile, reason in zip(failed["tile"], failed["drop_reason"]):
        row = sel.filter(pl.col("tile") == tile).row(0, named=True)
        x0, y0 = int(row["x"] / scale), int(row["y"] / scale)
        box = overlay[y0:y0 + 4, x0:x0 + 4].reshape(-1, 3)
        assert (box == QC_COLOURS[reason.split(":")[1]]).all(axis=1).any(), (tile, reason)
    # thresholds are params: switched off, the same store fails nothing
    params["select"] = {**PARAMS, "qc": {**THRESHOLDS, "enabled": False}}
    sel = run_select("s1", inputs["embeddings"], inputs["prompts"], inputs["thumbnail"], inputs["info"], params,
                     tmp_path / "o2.parquet", tmp_path / "o2.png", cache_dir=tmp_path / "cache")
    assert not sel["drop_reason"].fill_null("").str.starts_with("qc:").any()


def test_select_without_quality_measures_asks_for_embed_in_one_line(random_tiny_clip, tmp_path):
    inputs = slide_inputs(tmp_path, random_tiny_clip, with_quality=False)
    with pytest.raises(PathgenError, match="s1.zarr: no patch quality measures .*re-run embed") as err:
        run_select("s1", inputs["embeddings"], inputs["prompts"], inputs["thumbnail"], inputs["info"],
                   select_params(random_tiny_clip), tmp_path / "o.parquet", tmp_path / "o.png")
    assert "\n" not in str(err.value)


def test_the_select_command_writes_stats_and_a_cached_rerun_builds_no_clip(random_tiny_clip, tmp_path):
    """As the rule runs it: `pathgen select ... --cache-dir`. The rerun's stats say loaded: false, and
    to prove it the checkpoint is overwritten with garbage of the same identity (size, mtime, inode):
    building the CLIP from it would fail."""
    checkpoint = tmp_path / "clip.pt"
    checkpoint.write_bytes(Path(random_tiny_clip["checkpoint"]).read_bytes())
    clip_cfg = {**random_tiny_clip, "checkpoint": str(checkpoint)}
    inputs = slide_inputs(tmp_path, clip_cfg)
    (tmp_path / "info.json").write_text(json.dumps(inputs["info"]))

    def argv(name):
        return [str(BIN / "pathgen"), "select", "--slide-id", "s1", "--embeddings", str(inputs["embeddings"]),
                "--prompts", str(inputs["prompts"]), "--thumbnail", str(inputs["thumbnail"]),
                "--info", str(tmp_path / "info.json"), "--params-json", json.dumps(select_params(clip_cfg)),
                "--cache-dir", str(tmp_path / "cache"), "--flush-every", "32",
                "--out", str(tmp_path / f"{name}.parquet"), "--overlay", str(tmp_path / f"{name}.png"),
                "--stats", str(tmp_path / f"{name}.stats.json")]

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv("first"), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    first = json.loads((tmp_path / "first.stats.json").read_text())
    assert first["clip_loaded"] is True and first["cache"]["misses"] == 4 and first["kmeans_device"] == "cpu"

    st = os.stat(checkpoint)
    with open(checkpoint, "r+b") as f:
        f.write(os.urandom(st.st_size))
    os.utime(checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(checkpoint).st_ino == st.st_ino
    proc = subprocess.run(argv("again"), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again.stats.json").read_text())
    assert again["clip_loaded"] is False and (again["cache"]["hits"], again["cache"]["misses"]) == (4, 0)
    assert (tmp_path / "again.parquet").read_bytes() == (tmp_path / "first.parquet").read_bytes()

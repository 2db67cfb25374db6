"""Known answers for patch selection: top-k, k-means sampling, the near-duplicate filter, seeding."""

import math

import numpy as np
import pytest

from pathgen.steps.select import (
    cluster_sample,
    combine_scores,
    drop_probability,
    kmeans_labels,
    near_duplicate_filter,
    select_patches,
    top_k,
)

PARAMS = {
    "report_top_k": 64,
    "attribute_top_k": 64,
    "combine": "max",
    "cluster_samples": 256,
    "kmeans_n_init": 1,
    "kmeans_max_iter": 100,
    "similarity_threshold": 0.88,
    "drop_exponent": 1.0,
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


def test_selection_of_empty_slide_is_empty():
    sel = select_patches(np.zeros((0, 16), np.float32), np.zeros((0, 2), np.int64), np.zeros((0, 16), np.float32),
                         np.zeros((3, 16), np.float32), PARAMS, 1, "empty", None)
    assert sel.height == 0

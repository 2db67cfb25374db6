"""select: representative patches of a slide (PathGen-1.6M section 3.2, steps 1–2).

1. Prompt retrieval: the top `report_top_k` patches for the report prompts and,
   independently, the top `attribute_top_k` for the attribute prompts. A patch's
   score for a kind is its cosine similarity to the prompts of that kind,
   combined by `combine`: `max` (default: a patch that matches any one finding
   ranks high) or `mean` (favours patches matching many prompts at once).
2. Diversity: k-means on all patch features with k = ⌈√N⌉, and
   `cluster_samples` patches drawn round-robin over the clusters in a seeded
   order, so cluster counts differ by at most one unless a cluster runs out.
3. The union of the three sets, every reason recorded.
4. Near-duplicate filter: pairs of candidates with cosine similarity s above
   the threshold t are visited from the most similar down; while both are
   still kept, one of them is dropped with probability

       p(s) = ((s - t) / (1 - t)) ** drop_exponent

   which is 0 at the threshold and 1 for identical features (linear by
   default). The one dropped is the less supported: fewer reasons, then
   cluster-only before retrieved, then the larger grid index.

All randomness comes from (seed, slide id), so a slide's selection never
depends on which other slides are in the run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image, ImageDraw
from sklearn.cluster import KMeans

from pathgen.errors import PathgenError
from pathgen.models.clip import clip_fingerprint, encode_texts, load_clip
from pathgen.store.embeddings import read_embeddings
from pathgen.store.io import write_parquet, write_png
from pathgen.store.seeds import derive_seed, rng_for
from pathgen.store.status import placeholder_picture

SELECTION_SCHEMA = {
    "slide_id": pl.String,
    "tile": pl.Int32,  # row of the tile grid / embeddings store
    "x": pl.Int64,
    "y": pl.Int64,
    "size": pl.Int32,
    "level": pl.Int32,
    "read_size": pl.Int32,
    "out_size": pl.Int32,
    "by_report": pl.Boolean,
    "by_attribute": pl.Boolean,
    "by_cluster": pl.Boolean,
    "reasons": pl.String,  # "report+attribute+cluster" subset, in that order
    "report_score": pl.Float32,
    "report_rank": pl.Int32,  # 0 = best over all patches of the slide
    "attribute_score": pl.Float32,
    "attribute_rank": pl.Int32,
    "cluster": pl.Int32,
    "cluster_size": pl.Int32,
    "nn_similarity": pl.Float32,  # highest cosine similarity to another candidate
    "kept": pl.Boolean,
    "duplicate_of": pl.Int32,  # the tile it was judged a near-duplicate of
    "duplicate_similarity": pl.Float32,
    "drop_probability": pl.Float32,
    "drop_reason": pl.String,
}

REASON_COLOURS = {"report": (220, 40, 40), "attribute": (245, 150, 20), "cluster": (40, 110, 235), "multi": (160, 40, 200)}
DROPPED_COLOUR = (120, 120, 120)


def combine_scores(similarity: np.ndarray, how: str) -> np.ndarray | None:
    """Per-patch score from an N × P similarity matrix; None when there are no prompts."""
    if similarity.shape[1] == 0:
        return None
    if how == "max":
        return similarity.max(axis=1)
    if how == "mean":
        return similarity.mean(axis=1)
    raise ValueError(f"unknown combine '{how}'")


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Indices from best to worst score; ties go to the lower index."""
    return np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))


def top_k(scores: np.ndarray | None, k: int) -> np.ndarray:
    """Indices of the k best scores, best first (fewer when N < k; none without scores)."""
    if scores is None or k <= 0:
        return np.zeros(0, np.int64)
    return rank_order(scores)[:k]


def kmeans_labels(features: np.ndarray, seed: int, n_init: int, max_iter: int) -> np.ndarray:
    """Cluster labels from k-means with k = ⌈√N⌉ (paper: clusters grow with slide size)."""
    n = len(features)
    if n == 0:
        return np.zeros(0, np.int64)
    k = math.ceil(math.sqrt(n))
    if k == 1:
        return np.zeros(n, np.int64)
    km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed % (2**32))
    return km.fit_predict(features.astype(np.float64)).astype(np.int64)


def cluster_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """min(n, N) indices spread round-robin over the clusters, in a seeded order.

    Each cluster's members are shuffled; round r takes the r-th member of every
    cluster that still has one, clusters visited in one seeded permutation.
    """
    if n <= 0 or len(labels) == 0:
        return np.zeros(0, np.int64)
    clusters = np.unique(labels)
    visit = {int(c): pos for pos, c in enumerate(rng.permutation(clusters))}
    round_of = np.empty(len(labels), np.int64)
    for c in clusters:
        members = np.flatnonzero(labels == c)
        round_of[rng.permutation(members)] = np.arange(len(members))
    order = np.lexsort((np.array([visit[int(c)] for c in labels]), round_of))
    return np.sort(order[: min(n, len(labels))])


def drop_probability(similarity: np.ndarray | float, threshold: float, exponent: float) -> np.ndarray:
    """p(s) = ((s - t) / (1 - t)) ** exponent above the threshold t, 0 at or below it."""
    s = np.asarray(similarity, dtype=np.float64)
    span = max(1.0 - threshold, 1e-12)
    frac = np.clip((s - threshold) / span, 0.0, 1.0)
    return np.where(s > threshold, frac**exponent, 0.0)


def near_duplicate_filter(features: np.ndarray, priority: np.ndarray, threshold: float, exponent: float,
                          rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Drop near-duplicates among candidate `features` (M × D, normalised).

    `priority`: lower keeps preference. Returns per-candidate arrays `kept`,
    `duplicate_of` (candidate position or -1), `similarity`, `probability`,
    and `nn_similarity`.
    """
    m = len(features)
    kept = np.ones(m, bool)
    duplicate_of = np.full(m, -1, np.int64)
    dup_sim = np.full(m, np.nan)
    dup_prob = np.full(m, np.nan)
    nn = np.full(m, np.nan)
    if m >= 2:
        sim = features.astype(np.float64) @ features.T.astype(np.float64)
        np.fill_diagonal(sim, -np.inf)
        nn = sim.max(axis=1)
        ii, jj = np.nonzero(np.triu(sim > threshold, k=1))
        order = np.lexsort((jj, ii, -sim[ii, jj]))
        for i, j in zip(ii[order], jj[order]):
            if not (kept[i] and kept[j]):
                continue
            s = float(sim[i, j])
            p = float(drop_probability(s, threshold, exponent))
            if rng.random() < p:
                loser, winner = (j, i) if priority[j] > priority[i] else (i, j)
                kept[loser] = False
                duplicate_of[loser], dup_sim[loser], dup_prob[loser] = winner, s, p
    return {"kept": kept, "duplicate_of": duplicate_of, "similarity": dup_sim, "probability": dup_prob,
            "nn_similarity": nn}


def select_patches(features: np.ndarray, coords: np.ndarray, report_text: np.ndarray, attribute_text: np.ndarray,
                   params: dict[str, Any], seed: int, slide_id: str, geometry: dict[str, int] | None) -> pl.DataFrame:
    """Candidates of one slide with reasons, scores, clusters and the filter's verdict.

    `params` is params.yaml's `select` section; text features are L2-normalised.
    """
    n = len(features)
    report_scores = combine_scores(features @ report_text.T, params["combine"]) if len(report_text) else None
    attribute_scores = combine_scores(features @ attribute_text.T, params["combine"]) if len(attribute_text) else None
    by_report = top_k(report_scores, params["report_top_k"])
    by_attribute = top_k(attribute_scores, params["attribute_top_k"])
    labels = kmeans_labels(features, derive_seed(seed, slide_id, "kmeans"), params["kmeans_n_init"],
                           params["kmeans_max_iter"])
    by_cluster = cluster_sample(labels, params["cluster_samples"], rng_for(seed, slide_id, "cluster-sample"))

    candidates = np.unique(np.concatenate([by_report, by_attribute, by_cluster])).astype(np.int64)
    flags = {name: np.isin(candidates, chosen) for name, chosen in
             (("report", by_report), ("attribute", by_attribute), ("cluster", by_cluster))}
    n_reasons = sum(f.astype(int) for f in flags.values()) if len(candidates) else np.zeros(0, int)
    retrieved = flags["report"] | flags["attribute"]
    priority = np.lexsort((candidates, ~retrieved, -n_reasons)).argsort()
    verdict = near_duplicate_filter(features[candidates], priority, params["similarity_threshold"],
                                    params["drop_exponent"], rng_for(seed, slide_id, "near-duplicate"))

    def ranks(scores):
        if scores is None:
            return [None] * len(candidates), [None] * len(candidates)
        rank = np.empty(n, np.int64)
        rank[rank_order(scores)] = np.arange(n)
        return scores[candidates].tolist(), rank[candidates].tolist()

    report_score, report_rank = ranks(report_scores)
    attribute_score, attribute_rank = ranks(attribute_scores)
    cluster_sizes = np.bincount(labels) if n else np.zeros(0, np.int64)
    dup_tile = [int(candidates[d]) if d >= 0 else None for d in verdict["duplicate_of"]]
    geometry = geometry or {"size": 0, "level": 0, "read_size": 0, "out_size": 0}
    m = len(candidates)
    return pl.DataFrame(
        {
            "slide_id": [slide_id] * m,
            "tile": candidates,
            "x": coords[candidates, 0] if m else [],
            "y": coords[candidates, 1] if m else [],
            "size": [geometry["size"]] * m,
            "level": [geometry["level"]] * m,
            "read_size": [geometry["read_size"]] * m,
            "out_size": [geometry["out_size"]] * m,
            "by_report": flags["report"],
            "by_attribute": flags["attribute"],
            "by_cluster": flags["cluster"],
            "reasons": ["+".join(r for r in ("report", "attribute", "cluster") if flags[r][i]) for i in range(m)],
            "report_score": report_score,
            "report_rank": report_rank,
            "attribute_score": attribute_score,
            "attribute_rank": attribute_rank,
            "cluster": labels[candidates],
            "cluster_size": cluster_sizes[labels[candidates]] if m else [],
            "nn_similarity": [None if np.isnan(v) else float(v) for v in verdict["nn_similarity"]],
            "kept": verdict["kept"],
            "duplicate_of": dup_tile,
            "duplicate_similarity": [None if np.isnan(v) else float(v) for v in verdict["similarity"]],
            "drop_probability": [None if np.isnan(v) else float(v) for v in verdict["probability"]],
            "drop_reason": [None if t is None else "near-duplicate" for t in dup_tile],
        },
        schema=SELECTION_SCHEMA,
    )


def draw_overlay(thumbnail: Image.Image, scale: tuple[float, float], selection: pl.DataFrame) -> Image.Image:
    """Thumbnail with candidates outlined by reason (one reason: its colour; several: purple; dropped: grey)."""
    image = thumbnail.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    for row in selection.iter_rows(named=True):
        x0, y0 = row["x"] / scale[0], row["y"] / scale[1]
        x1, y1 = (row["x"] + row["size"]) / scale[0], (row["y"] + row["size"]) / scale[1]
        reasons = row["reasons"].split("+")
        colour = REASON_COLOURS[reasons[0] if len(reasons) == 1 else "multi"]
        if not row["kept"]:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=DROPPED_COLOUR, width=1)
            draw.line([x0, y0, x1 - 1, y1 - 1], fill=DROPPED_COLOUR)
        else:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=2)
    legend = [("report", REASON_COLOURS["report"]), ("attribute", REASON_COLOURS["attribute"]),
              ("cluster", REASON_COLOURS["cluster"]), ("several", REASON_COLOURS["multi"]), ("dropped", DROPPED_COLOUR)]
    for i, (name, colour) in enumerate(legend):
        draw.rectangle([4, 4 + 12 * i, 12, 12 + 12 * i], fill=colour)
        draw.text((16, 2 + 12 * i), name, fill=(0, 0, 0))
    return image


def run_select(slide_id: str, embeddings: str | Path, prompts: str | Path, thumbnail: str | Path,
               tile_info: dict[str, Any], params: dict[str, Any], out: str | Path, overlay_out: str | Path) -> pl.DataFrame:
    """The select step: read features and prompts, write the selection parquet and overlay PNG.

    `params` holds the `seed`, `clip` and `select` sections of params.yaml.
    """
    features, coords, attrs = read_embeddings(embeddings)
    fingerprint, _ = clip_fingerprint(params["clip"])
    if attrs.get("model_fingerprint") != fingerprint:
        raise PathgenError(f"{embeddings}: embedded with a different CLIP than params.yaml clip names; re-run embed")
    prompt_rows = pl.read_parquet(prompts)
    report = prompt_rows.filter(pl.col("kind") == "report")["text"].to_list()
    attribute = prompt_rows.filter(pl.col("kind") == "attribute")["text"].to_list()
    dim = features.shape[1]
    if report or attribute:
        clip = load_clip(params["clip"], "cpu")
        report_text, attribute_text = encode_texts(clip, report), encode_texts(clip, attribute)
    else:
        report_text = attribute_text = np.zeros((0, dim), np.float32)
    selection = select_patches(features, coords, report_text.reshape(-1, dim), attribute_text.reshape(-1, dim),
                               params["select"], params["seed"], slide_id, attrs.get("patch"))
    scale = tuple(tile_info["thumbnail_scale"])
    write_png(draw_overlay(Image.open(thumbnail), scale, selection), overlay_out)
    write_parquet(selection, out)
    return selection


def write_quarantined_selection(out: str | Path, overlay_out: str | Path) -> None:
    """The selection outputs of a quarantined slide: no candidates, a placeholder overlay."""
    write_png(placeholder_picture(), overlay_out)
    write_parquet(pl.DataFrame(schema=SELECTION_SCHEMA), out)

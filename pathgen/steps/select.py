"""select: representative patches of a slide (PathGen-1.6M section 3.2, steps 1–2).

0. Quality control (ours; the paper stresses clarity, appendix A.1): patches whose
   quality measures, taken by embed on the pixels the model saw, fail a check of
   `select.qc` (open glass, marker ink, folds, defocus: `pathgen.wsi.quality`)
   take no part in what follows; they are rows with `drop_reason` "qc:<reason>".
1. Prompt retrieval: the top `report_top_k` patches for the report prompts and,
   independently, the top `attribute_top_k` for the attribute prompts. A patch's
   score for a kind is its cosine similarity to the prompts of that kind,
   combined by `combine`: `max` (default: a patch that matches any one finding
   ranks high) or `mean` (favours patches matching many prompts at once).
2. Diversity: k-means on all (passing) patch features with k = ⌈√N⌉, and
   `cluster_samples` patches drawn round-robin over the clusters in a seeded
   order, so cluster counts differ by at most one unless a cluster runs out.
   k-means (`kmeans`) is Lloyd's algorithm after a greedy k-means++ init
   (sklearn's), in torch on `select.device` (float64 on the CPU, float32 on
   CUDA), with distances computed in chunks of rows so memory stays bounded
   (N x D features plus ~32 MiB).
3. The union of the three sets, every reason recorded.
4. Near-duplicate filter: pairs of candidates with cosine similarity s above
   the threshold t are visited from the most similar down; while both are
   still kept, one of them is dropped with probability

       p(s) = ((s - t) / (1 - t)) ** drop_exponent

   which is 0 at the threshold and 1 for identical features (linear by
   default). The one dropped is the less supported: fewer reasons, then
   cluster-only before retrieved, then the larger grid index.

All randomness comes from (seed, slide id), so a slide's selection never
depends on which other slides are in the run. On the CPU every similarity,
score and distance is computed in float64, so the selection is the same bytes
on every CPU, for any thread count (float32 GEMMs round differently under AVX2
and AVX-512 kernels and flip near-ties); a CUDA run may differ from a CPU run
where float32 rounding flips a near-tie.

Prompt text features are read from the item cache (agent `clip-text`, keyed
by the CLIP fingerprint and the text, values the exact float32 bytes): a slide
whose prompts were all seen before loads no CLIP.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import torch
from PIL import Image, ImageDraw

from pathgen.errors import PathgenError
from pathgen.models.clip import cached_clip_texts, clip_fingerprint
from pathgen.models.device import resolve_device
from pathgen.models.fingerprint import hash_store
from pathgen.store.embeddings import read_embeddings, read_quality
from pathgen.store.io import write_parquet, write_png
from pathgen.store.seeds import derive_seed, rng_for
from pathgen.store.status import placeholder_picture
from pathgen.wsi.quality import QC_PREFIX, qc_reasons

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
    "drop_reason": pl.String,  # "near-duplicate", or "qc:<reason>" for a patch that failed quality control
}

REASON_COLOURS = {"report": (220, 40, 40), "attribute": (245, 150, 20), "cluster": (40, 110, 235), "multi": (160, 40, 200)}
DROPPED_COLOUR = (120, 120, 120)
QC_COLOURS = {"background": (0, 200, 200), "pen": (0, 140, 0), "fold": (0, 0, 0), "blur": (230, 0, 230)}
KMEANS_CHUNK_BYTES = 32 << 20  # distance block (rows x k) per step: bounds k-means memory

log = logging.getLogger(__name__)


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


@dataclass
class KMeansResult:
    labels: np.ndarray  # int64, N
    inertia: float  # sum of squared distances to the assigned centres
    iterations: int  # Lloyd iterations of the kept init
    device: str


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1)


def _assign(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest centre, squared distance) of every row; ties go to the lower centre index."""
    c_sq = _sq_norms(centres)
    labels = torch.empty(len(x), dtype=torch.int64, device=x.device)
    dist = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for start in range(0, len(x), chunk):
        block = torch.addmm(c_sq[None, :], x[start:start + chunk], centres.T, beta=1.0, alpha=-2.0)
        block += x_sq[start:start + chunk, None]
        dist[start:start + chunk], labels[start:start + chunk] = block.min(1)
    return labels, dist.clamp_(min=0)


def _centre_sums(x: torch.Tensor, labels: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Per-cluster sums of rows. index_add_ is deterministic on CPU; on CUDA it uses float atomics, so
    there the sums are one-hot matrix products (deterministic), chunk by chunk."""
    sums = torch.zeros((k, x.shape[1]), dtype=x.dtype, device=x.device)
    if x.device.type == "cpu":
        return sums.index_add_(0, labels, x)
    for start in range(0, len(x), chunk):
        onehot = torch.nn.functional.one_hot(labels[start:start + chunk], k).to(x.dtype)
        sums.addmm_(onehot.T, x[start:start + chunk])
    return sums


def _kmeans_pp(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii; sklearn's variant): each new centre is the best of
    2 + ⌊ln k⌋ candidates drawn with probability proportional to the squared distance to the nearest
    centre so far. Draws come from a CPU generator, so they do not depend on the device."""
    n = len(x)
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    closest = (x_sq - 2 * (x @ x[first]) + x_sq[first]).clamp_(min=0)
    potential = closest.double().sum()
    for _ in range(1, k):
        draws = torch.rand(trials, generator=gen, dtype=torch.float64).to(x.device) * potential
        candidates = torch.searchsorted(torch.cumsum(closest.double(), 0), draws).clamp_(max=n - 1)
        # In place: this step reads all of x once per centre, so its temporaries are what is left to save.
        dist = torch.addmm(x_sq[candidates][None, :], x, x[candidates].T, beta=1.0, alpha=-2.0)
        dist.add_(x_sq[:, None]).clamp_(min=0)
        torch.minimum(dist, closest[:, None], out=dist)
        potentials = dist.sum(0, dtype=torch.float64)
        best = int(torch.argmin(potentials))
        closest, potential = dist[:, best].contiguous(), potentials[best]
        chosen.append(int(candidates[best]))
    return x[chosen].clone()


def _lloyd(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float,
           chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd iterations until the labels stop changing, the centres move less than `tol` (total squared
    shift) or `max_iter`; the labels returned are those of the centres returned."""
    k = len(centres)
    labels, dist = _assign(x, x_sq, centres, chunk)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        counts = torch.bincount(labels, minlength=k)
        new = _centre_sums(x, labels, k, chunk) / counts.clamp(min=1)[:, None].to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # An empty cluster takes the rows farthest from their centres (sklearn does the same).
            far = torch.sort(dist, descending=True, stable=True).indices[: len(empty)]
            new[empty] = x[far]
        shift = float(((new - centres) ** 2).sum())
        centres = new
        new_labels, dist = _assign(x, x_sq, centres, chunk)
        unchanged = bool(torch.equal(new_labels, labels))
        labels = new_labels
        if unchanged or shift <= tol:
            break
    return labels, dist, iterations


def kmeans(features: np.ndarray, seed: int, n_init: int = 1, max_iter: int = 100, tol: float = 1e-4,
           device: str = "cpu") -> KMeansResult:
    """k-means with k = ⌈√N⌉ (paper: clusters grow with slide size), in float64 on the CPU and float32 on CUDA.

    `n_init` seeded k-means++ inits, each refined by Lloyd; the lowest inertia wins (the first on a tie).
    `tol` is relative to the mean per-dimension variance, as in sklearn. `device`: 'auto', 'cpu', 'cuda'.
    """
    n = len(features)
    if n == 0:
        return KMeansResult(np.zeros(0, np.int64), 0.0, 0, "cpu")
    k = math.ceil(math.sqrt(n))
    if k == 1:
        return KMeansResult(np.zeros(n, np.int64), 0.0, 0, "cpu")
    torch_device = resolve_device(device, "select.device")
    variance = _mean_variance(features)
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    dtype = np.float64 if torch_device.type == "cpu" else np.float32
    chunk = max(1, KMEANS_CHUNK_BYTES // (np.dtype(dtype).itemsize * k))
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=dtype)).to(torch_device)
        x_sq = _sq_norms(x)
        best: KMeansResult | None = None
        for _ in range(n_init):
            centres = _kmeans_pp(x, x_sq, k, gen)
            labels, dist, iterations = _lloyd(x, x_sq, centres, max_iter, tol * variance, chunk)
            inertia = float(dist.double().sum())
            if best is None or inertia < best.inertia:
                best = KMeansResult(labels.cpu().numpy(), inertia, iterations, torch_device.type)
    return best


def _mean_variance(features: np.ndarray, rows: int = 8192) -> float:
    """Mean over dimensions of the per-dimension variance, in float64, a block of rows at a time."""
    total = np.zeros(features.shape[1])
    squares = np.zeros(features.shape[1])
    for start in range(0, len(features), rows):
        block = features[start:start + rows].astype(np.float64)
        total += block.sum(0)
        squares += (block * block).sum(0)
    mean = total / len(features)
    return float(np.mean(np.maximum(squares / len(features) - mean * mean, 0.0)))


def kmeans_labels(features: np.ndarray, seed: int, n_init: int, max_iter: int, tol: float = 1e-4,
                  device: str = "cpu") -> np.ndarray:
    """Cluster labels of `kmeans` (k = ⌈√N⌉)."""
    return kmeans(features, seed, n_init, max_iter, tol, device).labels


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
    visit_of = np.zeros(int(clusters.max()) + 1, np.int64)
    visit_of[clusters] = [visit[int(c)] for c in clusters]
    order = np.lexsort((visit_of[labels], round_of))
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
                   params: dict[str, Any], seed: int, slide_id: str, geometry: dict[str, int] | None,
                   info: dict[str, Any] | None = None, qc: Sequence[str | None] | None = None) -> pl.DataFrame:
    """Candidates of one slide with reasons, scores, clusters and the filter's verdict.

    `params` is params.yaml's `select` section; text features are L2-normalised. `info`, when given,
    receives the k-means device, iterations and inertia. `qc`: per patch, the quality check it
    failed (`pathgen.wsi.quality.qc_reasons`) or None; failing patches take no part in retrieval,
    clustering or the filter (ranks, k and cluster sizes are over the others) and come back as
    rows with `kept` false and `drop_reason` "qc:<reason>".
    """
    features = np.ascontiguousarray(features, dtype=np.float64)  # float16 values: exact
    n = len(features)
    if qc is not None and any(r is not None for r in qc):
        if len(qc) != n:
            raise ValueError(f"qc has {len(qc)} entries for {n} patches")
        eligible = np.array([i for i, r in enumerate(qc) if r is None], np.int64)
        chosen = select_patches(features[eligible], coords[eligible], report_text, attribute_text, params, seed,
                                slide_id, geometry, info)
        chosen = chosen.with_columns(
            pl.Series("tile", eligible[chosen["tile"].to_numpy()], pl.Int32),
            pl.Series("duplicate_of", [None if d is None else int(eligible[d]) for d in chosen["duplicate_of"]],
                      pl.Int32))
        failed = np.array([i for i, r in enumerate(qc) if r is not None], np.int64)
        return pl.concat([chosen, qc_rows(slide_id, failed, coords, geometry, [qc[i] for i in failed])]).sort("tile")
    report_scores = (combine_scores(features @ report_text.T.astype(np.float64), params["combine"])
                     if len(report_text) else None)
    attribute_scores = (combine_scores(features @ attribute_text.T.astype(np.float64), params["combine"])
                        if len(attribute_text) else None)
    by_report = top_k(report_scores, params["report_top_k"])
    by_attribute = top_k(attribute_scores, params["attribute_top_k"])
    clustering = kmeans(features, derive_seed(seed, slide_id, "kmeans"), params["kmeans_n_init"],
                        params["kmeans_max_iter"], params["kmeans_tol"], params["device"])
    labels = clustering.labels
    if info is not None:
        info.update(kmeans_device=clustering.device, kmeans_iterations=clustering.iterations,
                    kmeans_inertia=clustering.inertia)
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


def qc_rows(slide_id: str, tiles: np.ndarray, coords: np.ndarray, geometry: dict[str, int] | None,
            reasons: list[str]) -> pl.DataFrame:
    """Selection rows of the patches that failed quality control: not candidates, not kept, and why."""
    geometry = geometry or {"size": 0, "level": 0, "read_size": 0, "out_size": 0}
    m = len(tiles)
    columns = {name: [None] * m for name in SELECTION_SCHEMA}
    columns.update({
        "slide_id": [slide_id] * m, "tile": tiles, "x": coords[tiles, 0] if m else [],
        "y": coords[tiles, 1] if m else [], **{k: [geometry[k]] * m for k in ("size", "level", "read_size", "out_size")},
        "by_report": [False] * m, "by_attribute": [False] * m, "by_cluster": [False] * m, "reasons": [""] * m,
        "kept": [False] * m, "drop_reason": [f"{QC_PREFIX}{r}" for r in reasons],
    })
    return pl.DataFrame(columns, schema=SELECTION_SCHEMA)


def draw_overlay(thumbnail: Image.Image, scale: tuple[float, float], selection: pl.DataFrame) -> Image.Image:
    """Thumbnail with candidates outlined by reason (one reason: its colour; several: purple; dropped: grey)
    and the patches that failed quality control crossed out in their reason's colour."""
    image = thumbnail.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    for row in selection.iter_rows(named=True):
        x0, y0 = row["x"] / scale[0], row["y"] / scale[1]
        x1, y1 = (row["x"] + row["size"]) / scale[0], (row["y"] + row["size"]) / scale[1]
        if (row["drop_reason"] or "").startswith(QC_PREFIX):
            colour = QC_COLOURS[row["drop_reason"][len(QC_PREFIX):]]
            draw.line([x0, y0, x1 - 1, y1 - 1], fill=colour, width=2)
            draw.line([x0, y1 - 1, x1 - 1, y0], fill=colour, width=2)
            continue
        reasons = row["reasons"].split("+")
        colour = REASON_COLOURS[reasons[0] if len(reasons) == 1 else "multi"]
        if not row["kept"]:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=DROPPED_COLOUR, width=1)
            draw.line([x0, y0, x1 - 1, y1 - 1], fill=DROPPED_COLOUR)
        else:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=2)
    legend = [("report", REASON_COLOURS["report"]), ("attribute", REASON_COLOURS["attribute"]),
              ("cluster", REASON_COLOURS["cluster"]), ("several", REASON_COLOURS["multi"]), ("dropped", DROPPED_COLOUR),
              *((f"qc: {name}", colour) for name, colour in QC_COLOURS.items())]
    for i, (name, colour) in enumerate(legend):
        draw.rectangle([4, 4 + 12 * i, 12, 12 + 12 * i], fill=colour)
        draw.text((16, 2 + 12 * i), name, fill=(0, 0, 0))
    return image


def run_select(slide_id: str, embeddings: str | Path, prompts: str | Path, thumbnail: str | Path,
               tile_info: dict[str, Any], params: dict[str, Any], out: str | Path, overlay_out: str | Path,
               cache_dir: str | Path | None = None, flush_every: int = 32,
               info: dict[str, Any] | None = None) -> pl.DataFrame:
    """The select step: read features and prompts, write the selection parquet and overlay PNG.

    `params` holds the `seed`, `clip` and `select` sections of params.yaml. Prompt features come
    through the item cache under `cache_dir` (`cached_clip_texts`); the CLIP's fingerprint reads the
    checkpoint hash from the hash store there. `info` (a dict) receives counters: cache hits and
    misses, clip_loaded, k-means device and iterations.
    """
    info = {} if info is None else info
    features, coords, attrs = read_embeddings(embeddings)
    qc = None
    if params["select"]["qc"]["enabled"] and len(features):
        measures = read_quality(embeddings)
        if measures is None:
            raise PathgenError(f"{embeddings}: no patch quality measures (embedded before quality control); "
                               "re-run embed")
        qc = qc_reasons(measures, params["select"]["qc"])
        info["qc_excluded"] = {r: qc.count(r) for r in sorted({r for r in qc if r is not None})}
    fingerprint, _ = clip_fingerprint(params["clip"], hash_store(cache_dir) if cache_dir is not None else None)
    if attrs.get("model_fingerprint") != fingerprint:
        raise PathgenError(f"{embeddings}: embedded with a different CLIP than params.yaml clip names; re-run embed")
    prompt_rows = pl.read_parquet(prompts)
    report = prompt_rows.filter(pl.col("kind") == "report")["text"].to_list()
    attribute = prompt_rows.filter(pl.col("kind") == "attribute")["text"].to_list()
    dim = features.shape[1]
    texts = report + attribute if len(features) else []  # no patches: nothing to retrieve, no model
    text_features = cached_clip_texts(params["clip"], fingerprint, texts, cache_dir, flush_every, info)
    if len(text_features) and text_features.shape[1] != dim:
        raise PathgenError(f"{embeddings}: features have {dim} dimensions but the CLIP's text features "
                           f"{text_features.shape[1]}; re-run embed")
    if not len(text_features):
        text_features = np.zeros((0, dim), np.float32)
    report_text, attribute_text = text_features[: len(report)], text_features[len(report):]
    selection = select_patches(features, coords, report_text, attribute_text, params["select"], params["seed"],
                               slide_id, attrs.get("patch"), info, qc)
    scale = tuple(tile_info["thumbnail_scale"])
    write_png(draw_overlay(Image.open(thumbnail), scale, selection), overlay_out)
    write_parquet(selection, out)
    return selection


def write_quarantined_selection(out: str | Path, overlay_out: str | Path) -> None:
    """The selection outputs of a quarantined slide: no candidates, a placeholder overlay."""
    write_png(placeholder_picture(), overlay_out)
    write_parquet(pl.DataFrame(schema=SELECTION_SCHEMA), out)

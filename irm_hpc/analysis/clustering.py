"""Cross-run correlation of per-index profiles and clustering of runs.

* Correlation (n_runs, n_runs): Pearson (``numpy.corrcoef``) and Spearman (Pearson of average ranks,
  ``scipy.stats.rankdata``) between runs' per-index profiles (hidden,).
* Agglomerative clustering (``sklearn.cluster.AgglomerativeClustering``, ``metric="precomputed"``,
  average linkage) on the distance 1 - Pearson r; the dendrogram uses the same linkage
  (``scipy.cluster.hierarchy.linkage(method="average")``).
* KMeans (``sklearn.cluster.KMeans``, ``n_init=10``) on the profiles standardised per run (so that
  Euclidean distance is monotone in 1 - r).
* Agreement with a grouping (alignment, seed, layer set): adjusted Rand index
  (``sklearn.metrics.adjusted_rand_score``), clustering into as many clusters as the grouping has labels.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from irm_hpc.analysis.stats import spearman_ranks

ARI_GROUPED = 0.5  # ARI above which runs are said to "group by" a factor


def _safe_corr(x: np.ndarray) -> np.ndarray:
    """np.corrcoef of rows with NaN (constant rows) set to 0 and the diagonal to 1."""
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(x) if len(x) > 1 else np.ones((1, 1))
    c = np.nan_to_num(np.atleast_2d(c), nan=0.0)
    np.fill_diagonal(c, 1.0)
    return c


def correlations(profiles: np.ndarray) -> dict[str, np.ndarray]:
    """Pearson and Spearman correlation matrices (n_runs, n_runs) of ``profiles`` (n_runs, hidden)."""
    p = np.asarray(profiles, np.float64)
    return {"pearson": _safe_corr(p), "spearman": _safe_corr(spearman_ranks(p))}


def linkage_matrix(pearson: np.ndarray) -> Optional[np.ndarray]:
    """scipy average-linkage matrix on 1 - r (None for fewer than 2 runs)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    if len(pearson) < 2:
        return None
    d = np.clip(1.0 - pearson, 0.0, 2.0)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return linkage(squareform(d, checks=False), method="average")


def _standardize_rows(x: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=1, keepdims=True)
    sd = x.std(axis=1, keepdims=True)
    return np.divide(x - mu, sd, out=np.zeros_like(x), where=sd > 0)


def cluster(profiles: np.ndarray, pearson: np.ndarray, n_clusters: int, seed: int) -> Optional[dict]:
    """Agglomerative (1 - r, average) and KMeans labels for ``n_clusters`` clusters, or None if it
    cannot be done (fewer than 3 runs or n_clusters outside [2, n_runs - 1])."""
    from sklearn.cluster import AgglomerativeClustering, KMeans

    n = len(profiles)
    if n < 3 or not 2 <= n_clusters <= n - 1:
        return None
    d = np.clip(1.0 - pearson, 0.0, 2.0)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    agg = AgglomerativeClustering(n_clusters=n_clusters, metric="precomputed", linkage="average").fit(d)
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(_standardize_rows(np.asarray(profiles, np.float64)))
    return {"n_clusters": int(n_clusters), "agglomerative": [int(v) for v in agg.labels_],
            "kmeans": [int(v) for v in km.labels_]}


def ari(labels: list, truth: list) -> Optional[float]:
    """Adjusted Rand index of two labelings (None when ``truth`` has a single label)."""
    from sklearn.metrics import adjusted_rand_score

    if len(set(truth)) < 2:
        return None
    return float(adjusted_rand_score(truth, labels))


def grouping_analysis(profiles: np.ndarray, pearson: np.ndarray, factors: dict[str, list], n_clusters: int,
                      seed: int) -> dict:
    """Cluster runs and compare with each factor (e.g. alignment, seed, layer_set).

    Returns ``{"main": {labels..., "ari": {factor: {agglomerative, kmeans}}}, "by_factor": {factor:
    {n_clusters, ari_agglomerative, ari_kmeans, labels}}, "groups_by": factor | "neither" | None}``.
    ``main`` uses ``n_clusters`` (0 = number of alignments); ``by_factor`` clusters into as many groups as
    the factor has labels, so alignment and seed are compared on equal terms. ``groups_by`` is the factor
    with the highest agglomerative ARI if it exceeds ARI_GROUPED.
    """
    n_align = len(set(factors.get("alignment", [])))
    k = n_clusters or n_align
    main = cluster(profiles, pearson, k, seed)
    if main is not None:
        main["ari"] = {f: {"agglomerative": ari(main["agglomerative"], lab), "kmeans": ari(main["kmeans"], lab)}
                       for f, lab in factors.items()}
    by_factor = {}
    for f, lab in factors.items():
        nf = len(set(lab))
        res = cluster(profiles, pearson, nf, seed)
        if res is None:
            continue
        by_factor[f] = {"n_clusters": nf, "ari_agglomerative": ari(res["agglomerative"], lab),
                        "ari_kmeans": ari(res["kmeans"], lab), "agglomerative": res["agglomerative"],
                        "kmeans": res["kmeans"]}
    scored = [(v["ari_agglomerative"], f) for f, v in by_factor.items() if v["ari_agglomerative"] is not None]
    groups_by = None
    if scored:
        best, f = max(scored)
        groups_by = f if best > ARI_GROUPED else "neither"
    return {"main": main, "by_factor": by_factor, "groups_by": groups_by}


def block_means(pearson: np.ndarray, labels: list) -> dict:
    """Mean off-diagonal correlation within and between groups of ``labels`` (None if no such pair)."""
    lab = np.asarray([str(v) for v in labels])
    same = lab[:, None] == lab[None, :]
    off = ~np.eye(len(lab), dtype=bool)
    w, b = pearson[same & off], pearson[~same & off]
    return {"within": float(w.mean()) if w.size else None, "between": float(b.mean()) if b.size else None}

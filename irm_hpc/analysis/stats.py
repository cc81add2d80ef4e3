"""Per-run striation statistics: top-k membership, vertical continuity, column score, permutation null.

Definitions (one run, ``M`` = (n_inj, hidden) mean |injection| per injection layer and index):

* **top-k membership** (n_inj, hidden) bool: index i is in layer l's top k if ``M[l, i]`` is strictly
  greater than the layer's (k+1)-th largest value, k = max(1, round(top_k_frac * hidden)). Ties at the
  boundary are excluded, so a constant layer (e.g. a zero-initialised IRM output at step 0) has no
  members instead of k arbitrary ones.
* **vertical continuity** (hidden,) in [0, 1]: fraction of injection layers in which the index is a
  top-k member -- the paper's "striation" (arXiv 2407.03621: one index, 1512 on Llama-2-7B-chat, large
  across most layers) made a number.
* **column score** (hidden,): column mean of per-layer z-scores ``(M[l, i] - mean_l) / std_l``
  (std over indices, ddof 0; a layer with std 0 contributes 0).
* **permutation null**: indices shuffled independently per layer (each layer's membership row permuted
  uniformly at random); the statistic is the number of layers in which an index is a member. Under this
  null all indices have the same distribution, so the per-index null is pooled over the ``hidden``
  columns of each permutation (n_permutations x hidden samples); the max over indices of each permutation
  gives the family-wise (max-T, Westfall-Young) null. The null depends on the data only through the
  member count of each layer, so it is computed once per (hidden, member counts) and cached. When every
  layer has exactly k members it equals Binomial(n_inj, k / hidden) (Poisson-binomial in general), which
  `exact_pmf` gives for the cross-check.
* p-values: ``p_raw = (1 + #{null >= obs}) / (1 + N)`` (Phipson & Smyth 2010), Benjamini-Hochberg
  adjusted across indices with ``scipy.stats.false_discovery_control(method="bh")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

NULL_BATCH = 64  # permutations per vectorised batch (memory: batch x n_inj x hidden float32 keys)


def top_k(hidden: int, top_k_frac: float) -> int:
    """k = max(1, round(top_k_frac * hidden)), capped at hidden - 1."""
    return int(min(max(1, round(top_k_frac * hidden)), max(1, hidden - 1)))


def descending_ranks(x: np.ndarray) -> np.ndarray:
    """Rank of each entry of ``x`` (n,), 1 = largest (ties in ``np.argsort`` order)."""
    r = np.empty(len(x), int)
    r[np.argsort(-np.asarray(x))] = np.arange(1, len(x) + 1)
    return r


def topk_membership(m: np.ndarray, k: int) -> np.ndarray:
    """(n_inj, hidden) bool: strictly above the layer's (k+1)-th largest value (ties excluded).

    ``m``: (n_inj, hidden) float, NaN treated as -inf. Raises ValueError for k outside [1, hidden)."""
    m = np.asarray(m, dtype=np.float64)
    h = m.shape[1]
    if not 1 <= k < h:
        raise ValueError(f"top-k with k={k} needs 1 <= k < hidden={h}")
    m = np.where(np.isnan(m), -np.inf, m)
    thresh = np.partition(m, h - k - 1, axis=1)[:, h - k - 1]
    return m > thresh[:, None]


def continuity(member: np.ndarray) -> np.ndarray:
    """(hidden,) fraction of layers in which each index is a top-k member."""
    return member.mean(axis=0)


def column_score(m: np.ndarray) -> np.ndarray:
    """(hidden,) column mean of per-layer z-scores of ``m`` (n_inj, hidden); constant layers give 0."""
    m = np.asarray(m, dtype=np.float64)
    mu = m.mean(axis=1, keepdims=True)
    sd = m.std(axis=1, keepdims=True)
    z = np.divide(m - mu, sd, out=np.zeros_like(m), where=sd > 0)
    return z.mean(axis=0)


@dataclass(frozen=True)
class NullDist:
    """Permutation null of the per-index member count.

    hist: (n_inj + 1,) int64 pooled counts of the statistic c = 0..n_inj over n_permutations x hidden
    samples; max_hist: (n_inj + 1,) int64 counts of the per-permutation maximum over indices.
    """

    hidden: int
    members: tuple[int, ...]
    n_permutations: int
    hist: np.ndarray
    max_hist: np.ndarray

    @property
    def n_samples(self) -> int:
        return int(self.hist.sum())

    def sf(self) -> np.ndarray:
        """(n_inj + 2,) #{pooled null >= c} for c = 0..n_inj+1."""
        return np.concatenate([np.cumsum(self.hist[::-1])[::-1], [0]])

    def sf_max(self) -> np.ndarray:
        return np.concatenate([np.cumsum(self.max_hist[::-1])[::-1], [0]])

    def pmf(self) -> np.ndarray:
        return self.hist / max(1, self.n_samples)


@lru_cache(maxsize=64)
def permutation_null(hidden: int, members: tuple[int, ...], n_permutations: int, seed: int) -> NullDist:
    """Null of the member count under independent per-layer shuffles of the index axis.

    ``members``: member count of each layer (k unless ties). Each permutation draws, per layer, a
    uniformly random set of ``members[l]`` indices (``argpartition`` of uniform keys == the members'
    positions after a uniform permutation), vectorised over batches of permutations; column sums via
    ``np.bincount``. Deterministic in (hidden, members, n_permutations, seed); cached.
    """
    n_inj = len(members)
    rng = np.random.default_rng([int(seed), int(hidden), *map(int, members)])
    hist = np.zeros(n_inj + 1, np.int64)
    max_hist = np.zeros(n_inj + 1, np.int64)
    groups: dict[int, int] = {}
    for m in members:
        groups[int(m)] = groups.get(int(m), 0) + 1
    done = 0
    while done < n_permutations:
        b = min(NULL_BATCH, n_permutations - done)
        counts = np.zeros(b * hidden, np.int64)
        for m, rows in groups.items():
            if m <= 0:
                continue
            if m >= hidden:
                counts += rows
                continue
            keys = rng.random((b, rows, hidden), dtype=np.float32)
            idx = np.argpartition(keys, m - 1, axis=-1)[..., :m]
            flat = (idx + (np.arange(b) * hidden)[:, None, None]).ravel()
            counts += np.bincount(flat, minlength=b * hidden)
        counts = counts.reshape(b, hidden)
        hist += np.bincount(counts.ravel(), minlength=n_inj + 1)
        max_hist += np.bincount(counts.max(axis=1), minlength=n_inj + 1)
        done += b
    return NullDist(hidden, tuple(members), n_permutations, hist, max_hist)


def exact_pmf(hidden: int, members: tuple[int, ...]) -> np.ndarray:
    """(n_inj + 1,) exact null pmf of the member count: Poisson-binomial with p_l = members[l] / hidden
    (Binomial(n_inj, k / hidden) when all layers have k members), by convolution."""
    pmf = np.array([1.0])
    for m in members:
        p = m / hidden
        pmf = np.convolve(pmf, [1.0 - p, p])
    return pmf


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (``scipy.stats.false_discovery_control(p, method="bh")``)."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=np.float64)
    return false_discovery_control(p, method="bh") if p.size else p


@dataclass
class RunStats:
    """Striation statistics of one (n_inj, hidden) matrix. Arrays are (hidden,) unless noted.

    k: top-k size; members: (n_inj,) member count per layer; count: members per index (int);
    continuity = count / n_inj; column_score; p_raw / p_bh / p_fwer: permutation p-values (raw,
    Benjamini-Hochberg, max-T family-wise); p_exact: Poisson-binomial tail (cross-check);
    significant: p_bh < alpha.
    """

    k: int
    members: np.ndarray
    count: np.ndarray
    continuity: np.ndarray
    column_score: np.ndarray
    p_raw: np.ndarray
    p_bh: np.ndarray
    p_fwer: np.ndarray
    p_exact: np.ndarray
    significant: np.ndarray
    null: NullDist

    @property
    def n_inj(self) -> int:
        return len(self.members)


def striation_stats(m: np.ndarray, *, top_k_frac: float, n_permutations: int, alpha: float,
                    seed: int = 0) -> RunStats:
    """All per-index statistics of ``m`` (n_inj, hidden) mean |injection|; see the module docstring."""
    m = np.asarray(m, dtype=np.float64)
    hidden = m.shape[1]
    k = top_k(hidden, top_k_frac)
    member = topk_membership(m, k)
    members = member.sum(axis=1)
    count = member.sum(axis=0)
    null = permutation_null(hidden, tuple(int(x) for x in members), int(n_permutations), int(seed))
    sf, sf_max = null.sf(), null.sf_max()
    p_raw = (1.0 + sf[count]) / (1.0 + null.n_samples)
    p_fwer = (1.0 + sf_max[count]) / (1.0 + n_permutations)
    pmf = exact_pmf(hidden, tuple(int(x) for x in members))
    tail = np.concatenate([np.cumsum(pmf[::-1])[::-1], [0.0]])
    p_exact = np.clip(tail[count], 0.0, 1.0)
    p_bh = benjamini_hochberg(p_raw)
    return RunStats(k, members, count, count / m.shape[0], column_score(m), p_raw, p_bh, p_fwer, p_exact,
                    p_bh < alpha, null)


def null_crosscheck(null: NullDist) -> dict:
    """Permutation null vs the exact (Poisson-)binomial pmf: max |CDF difference| and both pmfs."""
    exact = exact_pmf(null.hidden, null.members)
    perm = null.pmf()
    return {"max_abs_cdf_diff": float(np.max(np.abs(np.cumsum(perm) - np.cumsum(exact)))),
            "pmf_permutation": [float(x) for x in perm], "pmf_exact": [float(x) for x in exact]}


def spearman_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (``scipy.stats.rankdata``), for Spearman correlation."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def corr_with_p(x: np.ndarray, y: np.ndarray) -> Optional[dict]:
    """Pearson and Spearman correlation of two (n,) vectors with p-values (``scipy.stats.pearsonr``,
    ``spearmanr``); None if either is constant or n < 3."""
    from scipy.stats import pearsonr, spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    pr, sr = pearsonr(x, y), spearmanr(x, y)
    return {"pearson": float(pr.statistic), "pearson_p": float(pr.pvalue), "spearman": float(sr.statistic),
            "spearman_p": float(sr.pvalue), "n": int(len(x))}

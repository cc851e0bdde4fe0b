"""Rank statistics for small studies, in NumPy (scipy is not a dependency): Spearman's rho with ties, its
two-sided permutation p-value (exact when every permutation can be listed), a bootstrap interval, and a
partial rho given a confounder."""

from __future__ import annotations

import itertools
import math

import numpy as np


def average_ranks(values) -> np.ndarray:
    """Ranks 1..n of `values`, tied values sharing the mean of the ranks they span."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of each row of `x` with `y` (NaN where a row or `y` is constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean()
    denominator = np.sqrt((xc**2).sum(axis=-1) * (yc**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (xc * yc).sum(axis=-1) / np.where(denominator > 0, denominator, 1), np.nan)


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's r of the average ranks (so ties are handled); NaN when either is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of one length, got {len(x)} and {len(y)}")
    return float(_pearson_rows(average_ranks(x)[None], average_ranks(y))[0])


def permutation_pvalue(x, y, permutations: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of Spearman's rho under random pairing of `x` with `y`.

    Exact when n! <= `permutations` (the share of all n! pairings with |rho| at least the observed one),
    else Monte Carlo: (1 + #{|rho_b| >= |rho|}) / (1 + B) over B = `permutations` seeded shuffles of `x`.
    """
    rx, ry = average_ranks(x), average_ranks(y)
    observed = abs(_pearson_rows(rx[None], ry)[0])
    if math.isnan(observed):
        return float("nan")
    tolerance = 1e-12  # rho of equal rank vectors computed in another order differs in the last bits
    n = len(rx)
    if math.factorial(n) <= permutations:
        shuffled = rx[np.array(list(itertools.permutations(range(n))))]
        return float(np.mean(np.abs(_pearson_rows(shuffled, ry)) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.broadcast_to(rx, (permutations, n)), axis=1)
    hits = int(np.sum(np.abs(_pearson_rows(shuffled, ry)) >= observed - tolerance))
    return (1 + hits) / (1 + permutations)


def bootstrap_interval(x, y, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of Spearman's rho over resamples of the (x, y) pairs; resamples in which either is
    constant have no rho and are skipped."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(resamples):
        pick = rng.integers(0, len(x), len(x))
        rho = spearman(x[pick], y[pick])
        if not math.isnan(rho):
            rhos.append(rho)
    if not rhos:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(rhos, [tail, 100 - tail])
    return float(low), float(high)


def partial_spearman(x, y, z) -> float:
    """Spearman's rho of `x` and `y` with `z` held fixed: Pearson's r of the residuals of the ranks of `x` and `y`
    after a least-squares line on the ranks of `z`. NaN when `z`'s ranks determine those of `x` or `y` (nothing is
    left to correlate once `z` is held fixed)."""
    rx, ry, rz = average_ranks(x), average_ranks(y), average_ranks(z)
    design = np.stack([np.ones_like(rz), rz], axis=1)

    def residual(r):
        coefficients, *_ = np.linalg.lstsq(design, r, rcond=None)
        left = r - design @ coefficients
        return None if np.linalg.norm(left) <= 1e-9 * max(np.linalg.norm(r - r.mean()), 1.0) else left

    rx, ry = residual(rx), residual(ry)
    if rx is None or ry is None:
        return float("nan")
    return float(_pearson_rows(rx[None], ry)[0])


def seed_noise_ratio(values_per_variant: list[list[float]]) -> float:
    """The spread of the variants' means over the noise expected in a mean of their seeds: the sd of the means
    divided by (the pooled within-variant sd / sqrt(seeds)). Near 1, the differences between variants are what
    seed noise alone would give; NaN with one seed (no within-variant spread to measure)."""
    groups = [np.asarray(v, dtype=float) for v in values_per_variant if len(v)]
    groups = [g[~np.isnan(g)] for g in groups]
    groups = [g for g in groups if len(g)]
    if len(groups) < 2 or max(len(g) for g in groups) < 2:
        return float("nan")
    means = np.array([g.mean() for g in groups])
    within = [((g - g.mean()) ** 2).sum() for g in groups if len(g) > 1]
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    pooled_sd = math.sqrt(sum(within) / dof)
    seeds = np.mean([len(g) for g in groups])
    noise = pooled_sd / math.sqrt(seeds)
    if noise == 0:
        return float("inf")
    return float(means.std(ddof=1) / noise)

"""Counterfactual ("ground truth by retraining") metrics of data attribution.

Conventions. A score matrix ``scores`` is (Q, N) over Q queries and N training examples,
higher = more helpful: training on example i is predicted to LOWER query q's loss (i is a
proponent of q), so removing i is predicted to RAISE it. Retraining measurements are query
LOSSES (sum over the counted tokens), lower = better. A subset is a boolean mask (N,) of the
training examples a model was retrained on.

Every function here is pure numpy / scipy on arrays of results; retraining itself lives in
:mod:`influence.lab.retrain`. Intervals are percentile bootstraps over queries
(:func:`bootstrap_ci`): they include query sampling, not retraining-seed noise (compare with
:func:`noise_ceiling` for that).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata


def _array(x, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim or 0 in a.shape:
        raise ValueError(f"{name} has shape {a.shape}; expected a non-empty {ndim}-d array")
    return a


def bootstrap_ci(
    values,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    stat: Callable = np.mean,
) -> list[float]:
    """[lo, hi] percentile bootstrap interval of ``stat`` over the finite entries of ``values``.

    NaN entries are dropped first (a query whose correlation is undefined); with none left the
    interval is [nan, nan]. Each of the ``n_boot`` replicates resamples the remaining values
    with replacement (numpy Generator seeded by ``seed``); lo, hi are the (1 -+ level) / 2
    quantiles of the replicates' statistic. ``stat`` must take ``axis=`` (np.mean, np.median).
    """
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"n_boot={n_boot}, level={level}; expected n_boot >= 1, 0 < level < 1")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))  # (B, n)
    reps = stat(v[idx], axis=1)  # (B,)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _column_corr(a: np.ndarray, b: np.ndarray, ranks: bool) -> np.ndarray:
    """(Q,) Pearson (or Spearman, average ranks for ties) correlation of the columns of two
    (M, Q) arrays; NaN where either column is constant."""
    if a.shape != b.shape:
        raise ValueError(f"shapes {a.shape} and {b.shape} differ")
    constant = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)
    if ranks:
        a, b = rankdata(a, axis=0), rankdata(b, axis=0)
    a, b = a - a.mean(0), b - b.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))
    return np.where(constant, np.nan, r)


def _summary(per_query: np.ndarray, n_boot: int, seed: int, level: float) -> dict:
    """{"mean", "ci", "per_query", "n_nan"} of per-query values, NaN queries left out."""
    n_nan = int(np.isnan(per_query).sum())
    mean = float(np.nanmean(per_query)) if n_nan < per_query.size else float("nan")
    return {
        "mean": mean,
        "ci": bootstrap_ci(per_query, n_boot, seed, level),
        "per_query": [float(x) for x in per_query],
        "n_nan": n_nan,
    }


def subset_masks(n: int, m: int, alpha: float, seed: int) -> np.ndarray:
    """(m, n) bool: m independent uniformly random subsets of exactly round(alpha n) of the n
    training examples each (Python's round, half to even), from a numpy Generator seeded by
    ``seed``. True = kept for retraining."""
    if n < 2:
        raise ValueError(f"n={n}; need at least 2 training examples")
    if m < 1:
        raise ValueError(f"m={m}; need at least 1 subset")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}; the kept share must be strictly between 0 and 1")
    k = round(alpha * n)
    if not 0 < k < n:
        raise ValueError(
            f"round(alpha * n) = round({alpha} * {n}) = {k}; choose alpha so 0 < k < n"
        )
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n), dtype=bool)
    for row in masks:
        row[rng.choice(n, size=k, replace=False)] = True
    return masks


def predicted_effects(scores, masks) -> np.ndarray:
    """(M, Q) datamodel prediction ``masks @ scores.T``: the summed scores of each subset's
    examples for each query; higher = a lower query loss expected for the subset's model."""
    scores, masks = _array(scores, "scores", 2), _array(masks, "masks", 2)
    if masks.shape[1] != scores.shape[1]:
        raise ValueError(f"masks have N={masks.shape[1]} columns; scores have N={scores.shape[1]}")
    return masks @ scores.T


def lds(scores, masks, losses, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Linear datamodeling score (Park et al. 2023, TRAK).

    Args:
        scores: (Q, N), higher = proponent.
        masks: (M, N) bool, the retrained subsets (:func:`subset_masks`).
        losses: (M, Q) query losses of the model retrained on each subset.

    Per query q: Spearman correlation over the M subsets between ``predicted_effects[:, q]``
    and ``-losses[:, q]`` (1 = the summed scores order the subsets exactly as retraining does).
    Returns {"mean": over the queries, "ci": [lo, hi] bootstrap over queries, "per_query": (Q,)
    list, "n_nan": queries left out because a column is constant (their correlation is NaN)}.
    """
    predicted = predicted_effects(scores, masks)  # (M, Q)
    losses = _array(losses, "losses", 2)
    if losses.shape != predicted.shape:
        raise ValueError(f"losses have shape {losses.shape}; expected (M, Q) = {predicted.shape}")
    return _summary(_column_corr(predicted, -losses, ranks=True), n_boot, seed, level)


def noise_ceiling(
    losses_a, losses_b, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """LDS of a second retraining seed: per query, Spearman over the M subsets between
    ``-losses_b`` (the "prediction", same masks, another seed) and ``-losses_a``.

    How well a retraining predicts another retraining of the same subsets: about the most an
    attribution method can reach against ``losses_a`` given retraining noise. Both (M, Q);
    output as :func:`lds`.
    """
    a, b = _array(losses_a, "losses_a", 2), _array(losses_b, "losses_b", 2)
    return _summary(_column_corr(-b, -a, ranks=True), n_boot, seed, level)


def seed_average_ceiling(losses, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Leave-one-seed-out ceiling for (S, M, Q) losses of S >= 2 retraining seeds, same masks.

    Per query: the mean over seeds s of the Spearman correlation over subsets between seed s's
    losses and the mean of the other S - 1 seeds' losses (NaN if any of the S is). It measures
    how well an average of S - 1 retrainings predicts a new one; with S = 2 it equals
    :func:`noise_ceiling`. Output as :func:`lds`.
    """
    losses = _array(losses, "losses", 3)
    s = losses.shape[0]
    if s < 2:
        raise ValueError(f"losses have S={s} seeds; the ceiling needs at least 2")
    others = (losses.sum(0) - losses) / (s - 1)  # (S, M, Q): mean of the other seeds
    per_seed = [_column_corr(others[i], losses[i], ranks=True) for i in range(s)]  # S x (Q,)
    return _summary(np.mean(per_seed, axis=0), n_boot, seed, level)


def removal_effect(
    base_loss,
    removed_losses,
    random_losses,
    *,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Rise of the query losses when a method's top-k proponents of each query are removed,
    against removing k random examples.

    Args:
        base_loss: (Q,) loss of the model retrained on all examples (same seed policy).
        removed_losses: (Q,) loss after removing query q's top-k proponents and retraining.
        random_losses: (R, Q) loss after removing k random examples, R repeats.

    Returns {"rise": mean over queries of removed - base, "random_rise": of mean_r random -
    base, "excess": rise - random_rise, "win_rate": share of queries where removed > mean_r
    random, and "ci", "random_ci", "excess_ci": bootstrap intervals over queries}. Positive
    excess = the method's proponents matter more than random examples.
    """
    base = _array(base_loss, "base_loss", 1)
    removed = _array(removed_losses, "removed_losses", 1)
    random = _array(random_losses, "random_losses", 2)
    if removed.shape != base.shape or random.shape[1:] != base.shape:
        raise ValueError(
            f"base_loss {base.shape}, removed_losses {removed.shape}, random_losses "
            f"{random.shape}; expected (Q,), (Q,), (R, Q)"
        )
    random_mean = random.mean(0)  # (Q,)
    rise, random_rise, excess = removed - base, random_mean - base, removed - random_mean
    return {
        "rise": float(rise.mean()),
        "ci": bootstrap_ci(rise, n_boot, seed, level),
        "random_rise": float(random_rise.mean()),
        "random_ci": bootstrap_ci(random_rise, n_boot, seed, level),
        "excess": float(excess.mean()),
        "excess_ci": bootstrap_ci(excess, n_boot, seed, level),
        "win_rate": float((removed > random_mean).mean()),
    }


def loo_agreement(predicted, actual) -> dict:
    """Agreement of predicted and measured leave-one-out changes of a query loss.

    Args:
        predicted: (K,) predicted loss changes from removing single examples (positive = the
            loss rises: a removed proponent, e.g. score / N for a mean-loss objective).
        actual: (K,) measured changes (loss after retraining without the example - before).

    Returns {"pearson", "spearman" (NaN if either is constant), "sign_agreement" (share of
    pairs of the same sign among those where neither is exactly 0; NaN if none), "slope"
    (least squares of actual on predicted through the origin: 1 = right scale), "n": K}.
    """
    p, a = _array(predicted, "predicted", 1), _array(actual, "actual", 1)
    if p.shape != a.shape:
        raise ValueError(f"predicted {p.shape} and actual {a.shape} differ")
    nonzero = (p != 0) & (a != 0)
    same = np.sign(p[nonzero]) == np.sign(a[nonzero])
    return {
        "pearson": float(_column_corr(p[:, None], a[:, None], ranks=False)[0]),
        "spearman": float(_column_corr(p[:, None], a[:, None], ranks=True)[0]),
        "sign_agreement": float(same.mean()) if same.size else float("nan"),
        "slope": float(p @ a / (p @ p)) if p.any() else float("nan"),
        "n": int(p.size),
    }

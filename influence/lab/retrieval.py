"""Retrieving a fact's source documents by a score: candidate pools, MRR and recall@k.

Paper A (2505.05017) judges an attribution method by whether it ranks the pre-training
documents that state a fact above the others, for a query about that fact (notebook 09).

- ``candidate_pool``: the ground-truth documents first, then fresh documents from each source
  (e.g. BM25's top hits, documents naming the fact's subject or object: hard negatives) up to
  a quota each, then random documents up to the pool's size.
- ``ranks_of``: the rank (1 = best) of each ground-truth document among the scored
  candidates; a tie counts as the expected rank over random tie-breaking, #higher + (#tied +
  1) / 2 (the document itself counted among the tied), so constant scores earn no credit.
- ``pool_metrics``: per query, the reciprocal rank of the best-ranked ground-truth document
  (averaged over queries: MRR) and the share of ground-truth documents in the top k
  (recall@k), each within the query's pool.
- ``full_corpus_reciprocal_rank``: the same reciprocal rank among all documents.
- ``paired_difference``: the mean of a per-query difference between two methods and its
  percentile bootstrap interval over the queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def candidate_pool(
    ground_truth: Sequence[int],
    sources: Sequence[tuple[Sequence[int], int]],
    size: int,
    n_docs: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """(pool, n_gt): the ``ground_truth`` document indices, then from each (candidates, k) of
    ``sources`` in turn its first k candidates not yet taken, then random documents of
    ``range(n_docs)`` not yet taken until the pool holds ``size``; n_gt = len(ground_truth).

    The ground truth comes first in the pool, so ``pool_metrics`` finds it at positions
    ``:n_gt``. The random fill draws one permutation of ``n_docs`` from ``rng``.
    """
    gt = [int(i) for i in ground_truth]
    if not gt:
        raise ValueError("a pool needs at least one ground-truth document")
    if len(set(gt)) != len(gt):
        raise ValueError(f"the ground truth repeats a document: {gt}")
    if size < len(gt) or size > n_docs:
        raise ValueError(
            f"pool size {size} must lie between the {len(gt)} ground-truth documents and the "
            f"{n_docs} documents"
        )
    taken, pool = set(gt), list(gt)

    def add(candidates, k: int) -> None:
        fresh = [int(c) for c in candidates if int(c) not in taken][: max(k, 0)]
        taken.update(fresh)
        pool.extend(fresh)

    for candidates, k in sources:
        add(candidates, min(k, size - len(pool)))
    add(rng.permutation(n_docs).tolist(), size - len(pool))
    return np.array(pool), len(gt)


def ranks_of(values, rows) -> np.ndarray:
    """Ranks (1 = highest) of ``values[rows]`` among all of ``values`` (1-D), ties at their
    expected rank: #higher + (#equal + 1) / 2, the entry itself among the equal."""
    v = np.asarray(values, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.int64)
    if v.ndim != 1 or rows.ndim != 1 or rows.size == 0:
        raise ValueError(f"need 1-D values and rows, got shapes {v.shape} and {rows.shape}")
    if np.isnan(v).any():
        raise ValueError("the scores hold NaN: a rank is undefined")
    picked = v[rows][:, None]
    return (v > picked).sum(axis=1) + ((v == picked).sum(axis=1) + 1) / 2


def pool_metrics(scores, pools: Sequence[tuple[np.ndarray, int]], k: int = 10) -> dict:
    """{"mrr": (Q,), f"recall@{k}": (Q,)} of the (Q, N) ``scores`` within each query's pool
    (``candidate_pool``'s (pool, n_gt), ground truth first): the reciprocal rank of the best
    ground-truth document and the share of ground-truth documents ranked <= k."""
    s = np.asarray(scores)
    if s.ndim != 2 or len(pools) < s.shape[0]:
        raise ValueError(f"need (Q, N) scores and a pool per query: {s.shape}, {len(pools)} pools")
    rr, recall = [], []
    for row, (pool, n_gt) in zip(s, pools, strict=False):
        ranks = ranks_of(row[pool], np.arange(n_gt))
        rr.append(1.0 / ranks.min())
        recall.append(float(np.mean(ranks <= k)))
    return {"mrr": np.array(rr), f"recall@{k}": np.array(recall)}


def full_corpus_reciprocal_rank(scores, ground_truth: Sequence[Sequence[int]]) -> np.ndarray:
    """(Q,) reciprocal rank of each query's best-ranked ground-truth document among all N
    documents of the (Q, N) ``scores``; ``ground_truth[j]``: query j's document indices."""
    return np.array(
        [
            1.0 / ranks_of(row, gt).min()
            for row, gt in zip(np.asarray(scores), ground_truth, strict=True)
        ]
    )


def paired_difference(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list:
    """[mean, lo, hi] of the per-query differences a - b (two (Q,) arrays over the same
    queries): the mean and its percentile bootstrap interval (queries resampled)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two (Q,) arrays of one shape, got shapes {a.shape} and {b.shape}")
    d = a - b
    boot = np.random.default_rng(seed).choice(d, size=(n_boot, d.size)).mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return [float(d.mean()), float(lo), float(hi)]

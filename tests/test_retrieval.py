"""Retrieval metrics of notebook 09 (influence.lab.retrieval) on hand-computed cases."""

import numpy as np
import pytest

from influence.lab.retrieval import (
    candidate_pool,
    full_corpus_reciprocal_rank,
    paired_difference,
    pool_metrics,
    ranks_of,
)


def test_ranks_count_ties_at_their_expected_rank():
    values = np.array([5.0, 3.0, 5.0, 1.0, 3.0, 3.0])
    # 5, 5 share ranks 1-2 -> 1.5; the three 3s share ranks 3-5 -> 4; 1 is 6th
    assert ranks_of(values, [0, 1, 2, 3]).tolist() == [1.5, 4.0, 1.5, 6.0]
    assert ranks_of(np.zeros(4), [0]).tolist() == [2.5]  # constant scores: no credit
    with pytest.raises(ValueError, match="NaN"):
        ranks_of(np.array([1.0, np.nan]), [0])


def test_pool_metrics_by_hand():
    # Query 0: pool (4, 1, 2, 0), ground truth 4 and 1; scores put 1 first and 4 third.
    # Query 1: pool (3, 0, 1, 2), ground truth 3, scored last.
    scores = np.array([[0.0, 9.0, 5.0, 0.0, 1.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    pools = [(np.array([4, 1, 2, 0]), 2), (np.array([3, 0, 1, 2]), 1)]
    got = pool_metrics(scores, pools, k=2)
    assert got["mrr"].tolist() == [1.0, 0.25]
    assert got["recall@2"].tolist() == [0.5, 0.0]
    # among all 5 documents: query 0's doc 1 ranks 1st; query 1's doc 3 ranks 4th
    full = full_corpus_reciprocal_rank(scores, [[4, 1], [3]])
    assert full.tolist() == [1.0, 0.25]
    with pytest.raises(ValueError, match="pool per query"):
        pool_metrics(scores, pools[:1])


def test_candidate_pool_order_quotas_and_fill():
    rng = np.random.default_rng(0)
    pool, n_gt = candidate_pool([7, 3], [([3, 5, 6, 8], 2), ([5, 1], 1)], 8, 20, rng)
    assert n_gt == 2
    # ground truth first; source 1 skips the taken 3 and gives 5, 6; source 2 skips 5: 1
    assert pool[:5].tolist() == [7, 3, 5, 6, 1]
    assert len(pool) == 8 and len(set(pool.tolist())) == 8  # random fill, no repeat
    again, _ = candidate_pool([7, 3], [([3, 5, 6, 8], 2), ([5, 1], 1)], 8, 20,
                              np.random.default_rng(0))  # fmt: skip
    assert again.tolist() == pool.tolist()  # seeded
    # the quotas never push the pool past its size
    small, _ = candidate_pool([0], [(range(1, 10), 5)], 3, 10, rng)
    assert small.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="pool size"):
        candidate_pool([0, 1], [], 1, 10, rng)
    with pytest.raises(ValueError, match="repeats"):
        candidate_pool([2, 2], [], 4, 10, rng)


def test_paired_difference_interval_covers_mean_and_shrinks_to_a_point():
    a = np.array([1.0, 0.5, 0.25, 1.0])
    b = np.array([0.5, 0.5, 0.5, 0.5])
    mean, lo, hi = paired_difference(a, b, n_boot=500, seed=1)
    assert mean == pytest.approx(0.1875)
    assert lo < mean < hi
    assert paired_difference(a, a - 0.5) == pytest.approx([0.5, 0.5, 0.5])  # no spread
    with pytest.raises(ValueError, match="shape"):
        paired_difference(a, b[:2])

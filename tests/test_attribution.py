"""Paper B's attribution metrics on hand-made score matrices, and the seed bootstrap."""

import itertools

import numpy as np
import pytest
import torch

from influence.lab.attribution import (
    default_k,
    group_means,
    paper_table,
    rank_metrics,
    row_spearman,
    summarize,
    tidy,
)

TRAIN = np.array(["a", "b", "c"] * 4)  # N = 12, 4 per class -> k = 4
QUERY = np.array(["a", "b", "c", "a"])


def class_scores(train, query, rng):
    """(Q, N) distinct scores, every same-class example above every other one."""
    noise = rng.uniform(0, 0.5, size=(len(query), len(train)))
    return (train[None, :] == query[:, None]) + noise


def test_perfect_and_reversed_rankings():
    scores = class_scores(TRAIN, QUERY, np.random.default_rng(0))
    m = rank_metrics(scores, TRAIN, QUERY, recall_at=(2, 4))
    assert set(m) == {"accuracy", "coverage", "auc", "recall@2", "recall@4"}
    for name in ("accuracy", "coverage", "auc", "recall@4"):
        np.testing.assert_array_equal(m[name], np.ones(4), err_msg=name)
    np.testing.assert_array_equal(m["recall@2"], np.full(4, 0.5))  # 2 of the class's 4
    r = rank_metrics(-scores, TRAIN, QUERY, recall_at=(4,))
    for name in ("accuracy", "coverage", "auc", "recall@4"):
        np.testing.assert_array_equal(r[name], np.zeros(4), err_msg=name)


def test_random_scores_give_chance_level():
    # Q = 3,000 queries, N = 60 (3 classes): per-query AUC has sd ~0.08, so the mean's sd
    # is ~0.0015 and 0.01 is ~7 sd; accuracy and coverage have chance 1/3.
    rng = np.random.default_rng(1)
    train = np.repeat([0, 1, 2], 20)
    query = rng.integers(0, 3, size=3000)
    m = rank_metrics(rng.normal(size=(3000, 60)), train, query)
    assert abs(m["auc"].mean() - 0.5) < 0.01
    assert abs(m["accuracy"].mean() - 1 / 3) < 0.03  # sd of the mean ~0.009
    assert abs(m["coverage"].mean() - 1 / 3) < 0.01  # k = 20, sd of the mean ~0.002


def test_ties_hand_computed():
    train = np.array(["a", "a", "b", "b"])
    scores = np.array([[2.0, 1.0, 1.0, 0.0]])  # the k = 2 boundary ties an "a" and a "b"
    e = rank_metrics(scores, train, ["a"])
    assert e["coverage"][0] == 0.75  # 1 sure hit + 1 slot * 1/2
    assert e["auc"][0] == 0.875  # pairs (2>1, 2>0, 1=1 half, 1>0) = 3.5 / 4
    i = rank_metrics(scores, train, ["a"], ties="index")
    assert i["coverage"][0] == 1.0  # index 1 ("a") wins the tie
    flat = rank_metrics(np.ones((1, 4)), train, ["b"], recall_at=(1, 3))
    for name, want in [("accuracy", 0.5), ("coverage", 0.5), ("auc", 0.5), ("recall@3", 0.75)]:
        assert flat[name][0] == want, name
    assert rank_metrics(np.ones((1, 4)), train, ["b"], ties="index")["accuracy"][0] == 0.0


def test_expected_ties_equal_the_average_over_all_training_orders():
    # Oracle: "index" tie-breaking averaged over all 6! orders of the training set.
    rng = np.random.default_rng(2)
    train = np.array([0, 1, 2, 0, 1, 2])
    query = np.array([0, 1, 2, 2, 0])
    scores = rng.integers(0, 3, size=(5, 6)).astype(float)  # many ties
    want = {name: np.zeros(5) for name in ("accuracy", "coverage", "recall@3")}
    perms = list(itertools.permutations(range(6)))
    for p in perms:
        p = list(p)
        got = rank_metrics(scores[:, p], train[p], query, k=2, recall_at=(3,), ties="index")
        for name in want:
            want[name] += got[name] / len(perms)
    exp = rank_metrics(scores, train, query, k=2, recall_at=(3,))
    for name in want:
        np.testing.assert_allclose(exp[name], want[name], rtol=0, atol=1e-12, err_msg=name)


def test_auc_equals_pairwise_win_rate():
    rng = np.random.default_rng(3)
    train = np.array([0, 0, 1, 1, 1, 2, 2])
    query = np.array([0, 1, 2])
    scores = rng.integers(0, 4, size=(3, 7)).astype(float)
    auc = rank_metrics(scores, train, query)["auc"]
    for q in range(3):
        pos, neg = scores[q, train == query[q]], scores[q, train != query[q]]
        wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        assert auc[q] == pytest.approx(wins.mean(), abs=1e-12)


def test_default_k_rounds_down():
    assert default_k(["a"] * 4 + ["b"] * 3 + ["c"] * 3) == 3  # 10 / 3 = 3.33
    assert default_k(["a", "b", "c", "c", "c"]) == 1  # 5 / 3 = 1.67
    train = np.array(["a"] * 4 + ["b"] * 3 + ["c"] * 3)
    # Query "a": ranks a, a, b, a, ... -> coverage over k = 3 is 2/3, over k = 4 it is 3/4.
    scores = np.array([[9, 8, 5, 1, 7, 0, 0, 0, 0, 0]], dtype=float)
    assert rank_metrics(scores, train, ["a"])["coverage"][0] == pytest.approx(2 / 3)
    assert rank_metrics(scores, train, ["a"], k=4)["coverage"][0] == 0.75


def test_backdoor_per_trigger_coverage():
    # 4 clean + 2 x 4 poisoned; triggered queries find their own poison, clean ones do not.
    train = np.array(["clean"] * 4 + ["trigger_a"] * 4 + ["trigger_b"] * 4)
    query = np.array(["clean", "trigger_a", "trigger_a", "trigger_b"])
    scores = class_scores(train, query, np.random.default_rng(4))
    scores[0] = -scores[0]  # the clean query ranks the clean examples last
    k = default_k(train)
    assert k == 4
    poisoned = query != "clean"
    m = rank_metrics(scores[poisoned], train, query[poisoned], k=k)
    assert m["coverage"].mean() == 1.0
    per = group_means(rank_metrics(scores, train, query), query)
    assert per["clean"]["coverage"] == 0.0 and per["trigger_b"]["coverage"] == 1.0


def test_torch_input_and_integer_labels():
    scores = class_scores(TRAIN, QUERY, np.random.default_rng(5))
    ints = {"a": 0, "b": 1, "c": 2}
    t = rank_metrics(
        torch.tensor(scores, requires_grad=True),
        torch.tensor([ints[x] for x in TRAIN]),
        torch.tensor([ints[x] for x in QUERY]),
    )
    np.testing.assert_array_equal(t["auc"], np.ones(4))


def test_clear_errors():
    s = np.zeros((4, 12))
    with pytest.raises(ValueError, match=r"shape \(1, 4, 12\).*\(Q, N\)"):
        rank_metrics(s[None], TRAIN, QUERY)
    with pytest.raises(ValueError, match="non-empty"):
        rank_metrics(np.zeros((0, 12)), TRAIN, QUERY[:0])
    with pytest.raises(ValueError, match="train_labels has shape"):
        rank_metrics(s, TRAIN[:11], QUERY)
    with pytest.raises(ValueError, match="query_labels has shape"):
        rank_metrics(s, TRAIN, QUERY[:3])
    bad = s.copy()
    bad[1, 3] = bad[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"2 queries are NaN.*rows \[1, 3\]"):
        rank_metrics(bad, TRAIN, QUERY)
    with pytest.raises(ValueError, match=r"\['d'\] have no training example"):
        rank_metrics(s, TRAIN, ["a", "d", "c", "a"])
    with pytest.raises(ValueError, match="1 class"):
        rank_metrics(s, ["a"] * 12, ["a"] * 4)
    with pytest.raises(ValueError, match="k=13 is outside 1..N=12"):
        rank_metrics(s, TRAIN, QUERY, k=13)
    with pytest.raises(ValueError, match="recall_at=0"):
        rank_metrics(s, TRAIN, QUERY, recall_at=(0,))
    with pytest.raises(ValueError, match="ties="):
        rank_metrics(s, TRAIN, QUERY, ties="random")


def seeds_of(n_queries, rng, n_seeds=3):
    return [
        {
            "accuracy": rng.binomial(1, 0.6, n_queries).astype(float),
            "auc": rng.uniform(size=n_queries),
        }
        for _ in range(n_seeds)
    ]


def test_summarize_mean_interval_and_determinism():
    per_seed = seeds_of(200, np.random.default_rng(6))
    per_seed[1] = {k: v[:150] for k, v in per_seed[1].items()}  # seeds may differ in Q
    s = summarize(per_seed, n_boot=500, seed=0)
    for m in ("accuracy", "auc"):
        # Each seed weighs the same, whatever its number of queries.
        assert s[m]["mean"] == pytest.approx(np.mean([d[m].mean() for d in per_seed]))
        assert s[m]["lo"] < s[m]["mean"] < s[m]["hi"]
    assert summarize(per_seed, n_boot=500, seed=0) == s
    assert summarize(per_seed, n_boot=500, seed=1) != s


def test_summarize_interval_shrinks_with_more_queries():
    rng = np.random.default_rng(7)
    width = {}
    for q in (50, 5000):
        s = summarize(seeds_of(q, rng), n_boot=300)["accuracy"]
        width[q] = s["hi"] - s["lo"]
    # Query noise dominates here: width ~ 1/sqrt(Q), 10x fewer queries -> ~3x wider.
    assert width[50] > 4 * width[5000]


def test_summarize_resamples_seeds():
    # Queries are constant within a seed: the whole interval comes from the seed level.
    per_seed = [{"coverage": np.full(10, c)} for c in (0.2, 0.5, 0.8)]
    s = summarize(per_seed, n_boot=1000)["coverage"]
    assert s["mean"] == pytest.approx(0.5)
    # P(a replicate draws seed 0 three times) = 1/27 > 2.5%, so lo is 0.2 (up to rounding).
    assert s["lo"] == pytest.approx(0.2) and s["hi"] == pytest.approx(0.8)
    one = summarize(per_seed[:1])["coverage"]
    assert list(one.values()) == pytest.approx([0.2, 0.2, 0.2])


def test_summarize_errors():
    with pytest.raises(ValueError, match="per_seed is empty"):
        summarize([])
    with pytest.raises(ValueError, match="seed 1 has metrics"):
        summarize([{"auc": np.ones(3)}, {"accuracy": np.ones(3)}])
    with pytest.raises(ValueError, match=r"seed 0 metric 'auc' has NaN at \[1\]"):
        summarize([{"auc": np.array([1.0, np.nan])}])
    with pytest.raises(ValueError, match=r"seed 0 metric 'auc' has shape \(0,\)"):
        summarize([{"auc": np.ones(0)}])


RESULTS = {
    "emotion": {
        "DataInf": {"accuracy": {"mean": 0.5, "lo": 0.4, "hi": 0.6}, "coverage": 0.25},
        "RepSim": {"accuracy": 1.0, "coverage": 0.875},
    },
    "backdoor": {"DataInf": {"accuracy": 0.125, "coverage": 0.5, "auc": 0.5}},
}


def test_tidy_and_paper_table():
    df = tidy(RESULTS)
    assert list(df.columns) == ["task", "method", "metric", "mean", "lo", "hi"]
    assert len(df) == 7
    row = df[(df.task == "emotion") & (df.method == "DataInf") & (df.metric == "accuracy")]
    assert row[["mean", "lo", "hi"]].values.tolist() == [[0.5, 0.4, 0.6]]
    assert df[df.metric == "auc"]["lo"].isna().all()
    t = paper_table(RESULTS, digits=2)
    assert list(t.index) == ["DataInf", "RepSim"]
    assert list(t.columns) == [
        ("emotion", "accuracy"), ("emotion", "coverage"),
        ("backdoor", "accuracy"), ("backdoor", "coverage"),
    ]  # fmt: skip
    assert t.loc["DataInf", ("emotion", "accuracy")] == "0.50 [0.40, 0.60]"
    assert t.loc["RepSim", ("emotion", "coverage")] == "0.88"
    assert t.loc["RepSim", ("backdoor", "accuracy")] == ""  # not run
    with pytest.raises(ValueError, match="no metric"):
        paper_table(RESULTS, metrics=("mrr",))


def test_row_spearman_equals_scipy_per_row():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 30))
    b = a + rng.normal(size=(5, 30))
    b[0, :3] = b[0, 3]  # ties get average ranks
    expected = [spearmanr(x, y)[0] for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(row_spearman(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(row_spearman(a, -a), -1.0)
    np.testing.assert_allclose(row_spearman(torch.tensor(a), a), 1.0)

"""Attribution benchmark metrics of paper B (arXiv 2409.19998), with seed-level intervals.

Input: a score matrix ``scores`` (Q, N) over Q queries (test examples) and N training
examples, higher = more helpful (the project's sign: positive = proponent), the training
labels (N,) and the query labels (Q,). Training examples are ranked per query, most helpful
first. Per query q with label c (values whose mean over queries is the benchmark number):

- ``accuracy``: 1 when the top-1 training example has class c, else 0.
- ``coverage``: share of the top-k training examples that have class c, with
  k = floor(N / n_classes) by default (n_classes = distinct *training* labels).
- ``auc``: ROC-AUC of the scores as a detector of "class c" vs "another class" among the
  N training examples; ties count as half a win (average ranks, Mann-Whitney U / (P * M)),
  whatever ``ties`` says.
- ``recall@k``: share of the training examples of class c found in the top k.

Ties. By default (``ties="expected"``) a top-k statistic is its expectation over a uniformly
random order of tied scores: if the k-th largest score t is shared by n_eq examples, m_eq of
them of class c, and only s of them fit in the top k, the tie contributes s * m_eq / n_eq
hits. This is deterministic, independent of the order of the training set, and equals 1/2
accuracy for a query whose two best examples tie across classes. ``ties="index"`` breaks ties
by training index instead (lower index first), which reproduces one run of a sort-based code.

As published. plumprc/Failures-of-Influence-Functions-in-LLMs, ``utils.check_acc_cov``:
rows of the influence table are test examples, columns training examples; it negates the
stored value (stored = -g_test^T H^-1 g_train), so it ranks by g_test^T H^-1 g_train
descending, the same sign as here. k = ``int(len(train) / len(set(train['variation'])))``,
i.e. floor(N / n_classes) over the training labels (350 for the 700-example backdoor task,
clean + poisoned, as its comment notes). Top-k = ``np.argpartition(s, -k)[-k:]``, put in
descending order by the default (unstable) ``np.argsort(...)[::-1]``; top-1 = the first.
Accuracy = hits@1 / Q; coverage = total same-class hits in the top k / (Q * k), i.e. the
mean of our per-query coverage. Ties are not handled: which tied example enters the top k
or becomes top-1 is left to numpy's introselect / introsort, so published numbers can
depend on it when scores tie (rare with float scores, common with quantised or zero
gradients). Our ``expected`` mode is the tie-robust version of the same definitions;
without ties both modes equal theirs. The published check scores every test query against
the global k, the clean backdoor prompts included; for per-trigger numbers restrict the
queries (see :func:`rank_metrics`).
AUC and recall@k are not in paper B; they are our additions (AUC uses the whole ranking,
recall@k the class's size instead of a fixed k).

Intervals (:func:`summarize`): a two-level bootstrap. Each replicate draws S seeds with
replacement from the S fine-tuning seeds and, for every drawn seed independently, Q_s queries
with replacement from that seed's queries; the replicate's statistic is the mean over the drawn
seeds of their resampled query means (each seed weighs the same). The point estimate is the
mean over seeds of the per-seed mean; the interval is the (1 -+ level) / 2 quantiles of the
replicates (2.5% and 97.5% by default). With 3 seeds the seed level takes only 10
distinct multisets, so the interval is coarse; one seed gives a query-only interval
(model-seed noise not included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def default_k(train_labels) -> int:
    """Paper B's k = floor(N / n_classes), n_classes = distinct training labels."""
    labels = _as_numpy(train_labels)
    n_classes = len(np.unique(labels))
    k = len(labels) // max(n_classes, 1)
    if k < 1:
        raise ValueError(f"k = {len(labels)} // {n_classes} classes = 0; give k explicitly")
    return k


def _check(scores, train_labels, query_labels):
    scores = _as_numpy(scores).astype(np.float64)
    train = _as_numpy(train_labels)
    query = _as_numpy(query_labels)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores has shape {scores.shape}; expected a non-empty (Q, N) matrix")
    q, n = scores.shape
    if train.shape != (n,):
        raise ValueError(f"train_labels has shape {train.shape}; scores has N={n} columns")
    if query.shape != (q,):
        raise ValueError(f"query_labels has shape {query.shape}; scores has Q={q} rows")
    bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
    if bad.size:
        raise ValueError(
            f"scores of {bad.size} queries are NaN or infinite (rows {bad[:10].tolist()}"
            f"{', ...' if bad.size > 10 else ''}); check the solver (damping, divergence)"
        )
    classes = np.unique(train)
    if len(classes) < 2:
        raise ValueError(f"training labels have {len(classes)} class; the metrics need >= 2")
    missing = sorted(set(np.unique(query).tolist()) - set(classes.tolist()))
    if missing:
        raise ValueError(f"query classes {missing} have no training example; drop those queries")
    return scores, train, query


def _top_hits(scores: np.ndarray, same: np.ndarray, k: int, ties: str) -> np.ndarray:
    """(Q,) number of same-class examples among the top k (expected over ties, or by index)."""
    if ties == "index":
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k), lower index first
        return np.take_along_axis(same, order, axis=1).sum(axis=1).astype(np.float64)
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]  # (Q, 1) k-th largest score
    above, tied = scores > kth, scores == kth  # (Q, N)
    slots = k - above.sum(axis=1)  # (Q,) places left in the top k for the tied examples
    tied_same = (tied & same).sum(axis=1) / tied.sum(axis=1)  # (Q,) class share among ties
    return (above & same).sum(axis=1) + slots * tied_same


def rank_metrics(
    scores,
    train_labels,
    query_labels,
    k: int | None = None,
    recall_at: Sequence[int] = (),
    ties: str = "expected",
) -> dict[str, np.ndarray]:
    """Per-query attribution metrics; the benchmark number is each array's mean.

    Args:
        scores: (Q, N) numpy array or torch tensor, higher = more helpful.
        train_labels: (N,) class of each training example (ints or strings).
        query_labels: (Q,) class of each query; every one must occur in train_labels.
        k: coverage's k; default floor(N / n_classes) as in paper B.
        recall_at: the k's of recall@k entries.
        ties: "expected" (average over random tie orders) or "index" (lower index first).

    Returns {"accuracy", "coverage", "auc", "recall@k"...}: float64 arrays of shape (Q,).
    For paper B's backdoor numbers restrict the queries and keep the global k, e.g.
    ``m = trigger == "trigger_a"; rank_metrics(scores[m], train_labels, query_labels[m],
    k=default_k(train_labels))`` scores how well trigger_a's prompts find trigger_a's poison.
    """
    if ties not in ("expected", "index"):
        raise ValueError(f"ties={ties!r}; expected 'expected' or 'index'")
    scores, train, query = _check(scores, train_labels, query_labels)
    n = scores.shape[1]
    k = default_k(train) if k is None else k
    for name, value in [("k", k)] + [("recall_at", r) for r in recall_at]:
        if not 1 <= value <= n:
            raise ValueError(f"{name}={value} is outside 1..N={n}")
    same = train[None, :] == query[:, None]  # (Q, N) same class as the query
    n_pos = same.sum(axis=1)  # (Q,) >= 1, checked above
    n_neg = n - n_pos  # (Q,) >= 1: at least two classes
    ranks = rankdata(scores, axis=1)  # (Q, N) ascending, ties get their average rank
    u = (ranks * same).sum(axis=1) - n_pos * (n_pos + 1) / 2  # Mann-Whitney U of the class
    out = {
        "accuracy": _top_hits(scores, same, 1, ties),
        "coverage": _top_hits(scores, same, k, ties) / k,
        "auc": u / (n_pos * n_neg),
    }
    for r in recall_at:
        out[f"recall@{r}"] = _top_hits(scores, same, r, ties) / n_pos
    return out


def row_spearman(a, b) -> np.ndarray:
    """(Q,) Spearman correlation of ``a[q]`` and ``b[q]`` for two (Q, N) score matrices (how
    alike two methods, checkpoints or seeds rank the training set for each query; average
    ranks for ties)."""
    ra, rb = rankdata(_as_numpy(a), axis=1), rankdata(_as_numpy(b), axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    return (ra * rb).sum(1) / np.sqrt((ra**2).sum(1) * (rb**2).sum(1))


def group_means(per_query: Mapping[str, np.ndarray], query_labels) -> dict:
    """{label: {metric: mean over that label's queries}}, e.g. coverage per trigger."""
    labels = _as_numpy(query_labels)
    return {
        lab: {name: float(np.mean(v[labels == lab])) for name, v in per_query.items()}
        for lab in np.unique(labels).tolist()
    }


def summarize(
    per_seed: Sequence[Mapping[str, np.ndarray]],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Mean and two-level bootstrap interval of each metric (scheme in the module docstring).

    Args:
        per_seed: one dict per fine-tuning seed, {metric: (Q_s,) per-query values}, e.g. the
            output of :func:`rank_metrics`; the same metrics in every seed.
        n_boot: number of bootstrap replicates.
        seed: seed of the numpy Generator; the result is a function of the inputs and it.
        level: coverage of the percentile interval.

    Returns {metric: {"mean", "lo", "hi"}}.
    """
    if not per_seed:
        raise ValueError("per_seed is empty; pass one dict of per-query metrics per seed")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"n_boot={n_boot}, level={level}; expected n_boot >= 1, 0 < level < 1")
    names = list(per_seed[0])
    values = []  # per seed: (M, Q_s)
    for s, metrics in enumerate(per_seed):
        if list(metrics) != names:
            raise ValueError(f"seed {s} has metrics {list(metrics)}; seed 0 has {names}")
        arrays = [np.asarray(metrics[m], dtype=np.float64) for m in names]
        for m, a in zip(names, arrays, strict=True):
            if a.ndim != 1 or a.size == 0 or a.shape != arrays[0].shape:
                raise ValueError(f"seed {s} metric {m!r} has shape {a.shape}; expected (Q,)")
            nan = np.flatnonzero(np.isnan(a))
            if nan.size:
                raise ValueError(f"seed {s} metric {m!r} has NaN at {nan[:10].tolist()}")
        values.append(np.stack(arrays))
    n_seeds = len(values)
    rng = np.random.default_rng(seed)
    stats = np.zeros((n_boot, len(names)))  # (B, M)
    pick = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # (B, S) seeds of each replicate
    for slot in range(n_seeds):
        for s, v in enumerate(values):
            reps = np.flatnonzero(pick[:, slot] == s)  # replicates that drew seed s here
            q = v.shape[1]
            # Resampling Q_s queries with replacement = multinomial counts over the queries.
            counts = rng.multinomial(q, np.full(q, 1 / q), size=reps.size)  # (b, Q_s)
            stats[reps] += counts @ v.T / q  # (b, M)
    stats /= n_seeds
    mean = np.mean([v.mean(axis=1) for v in values], axis=0)  # (M,)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2], axis=0)  # (M,) each
    return {
        m: {"mean": float(mean[i]), "lo": float(lo[i]), "hi": float(hi[i])}
        for i, m in enumerate(names)
    }


def tidy(results: Mapping[str, Mapping[str, Mapping]]) -> pd.DataFrame:
    """{task: {method: {metric: float or {"mean", "lo", "hi"}}}} -> long DataFrame with
    columns task, method, metric, mean, lo, hi (lo, hi NaN for plain floats)."""
    rows = []
    for task, methods in results.items():
        for method, metrics in methods.items():
            for metric, v in metrics.items():
                v = v if isinstance(v, Mapping) else {"mean": v}
                lo, hi = v.get("lo", np.nan), v.get("hi", np.nan)
                rows.append((task, method, metric, float(v["mean"]), float(lo), float(hi)))
    return pd.DataFrame(rows, columns=["task", "method", "metric", "mean", "lo", "hi"])


def paper_table(
    results: Mapping[str, Mapping[str, Mapping]],
    metrics: Sequence[str] = ("accuracy", "coverage"),
    digits: int = 3,
) -> pd.DataFrame:
    """Paper-style table: one row per method, columns (task, metric), cells "mean [lo, hi]".

    Rows and columns keep the order of `results`; print it with ``print(t.to_string())``.
    """
    df = tidy(results)
    df = df[df.metric.isin(metrics)]
    if df.empty:
        raise ValueError(f"no metric among {list(metrics)} in results")

    def cell(r) -> str:
        text = f"{r['mean']:.{digits}f}"
        return text if np.isnan(r["lo"]) else f"{text} [{r['lo']:.{digits}f}, {r['hi']:.{digits}f}]"

    df = df.assign(cell=df.apply(cell, axis=1))
    table = df.pivot(index="method", columns=["task", "metric"], values="cell")
    methods = list(dict.fromkeys(df.method))
    columns = [(t, m) for t in results for m in metrics if (t, m) in table.columns]
    return table.loc[methods, columns].fillna("")

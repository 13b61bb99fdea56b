"""Ground truth by retraining for one zoo model: every method's scores against what removing
training data does (notebook 11).

:func:`attribute` scores the queries of a task with every benchmark method (at the shared
damping rule, ``influence.damping``) and with three methods that need several models: EK-FAC
and TRAK ensembled over fine-tuning seeds, and TracIn over checkpoints. :func:`run` then
retrains the zoo model (``influence.lab.retrain``) and measures:

- **LDS** (Park et al. 2023): ``m`` random subsets of ``alpha`` N examples, retrained with two
  seeds; per query, the Spearman correlation over subsets between the summed scores of each
  subset and minus the retrained query loss; mean over queries with a bootstrap interval,
  against the first seed's losses and against the mean of the seeds.
- **Noise ceiling**: the same statistic with the second seed's losses as the "prediction": how
  much of the first seed's outcome is predictable at all.
- **Class margin** (``Setting.margin``; ``influence.lab.behaviour``): a behaviour beside the
  loss, scored by every method through its own query gradient (the curvatures and training
  gradients shared) and measured on the same retrains: its LDS, its noise ceiling, the LDS of
  the loss's scores at predicting it, and how closely it follows the loss over the subsets.
- **Removal**: each query's top-k proponents of a method removed and the model retrained; the
  rise of the query's loss against removing k random examples.
- **LOO**: single examples ranked top and bottom by EK-FAC removed one at a time; actual change
  of the query loss against each method's prediction (score / N: the first-order change of a
  mean-loss objective when one of N examples is dropped).
- **PBRF** (Bae et al. 2022) for the same pairs: the response that influence functions
  approximate without the non-convexity and non-convergence of training; a method's agreement
  with PBRF measures its iHVP error, PBRF's agreement with LOO what influence functions cannot
  see.

All retrains share the zoo model's recipe (``retrain`` module docstring) and are cached, so a
rerun only recomputes scores and statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
from scipy import stats

from influence import baselines
from influence.gradients import collect_grads
from influence.lab import attribution, behaviour, benchmark, counterfactual, pbrf, zoo
from influence.lab.notebook import figure
from influence.lab.retrain import Retrainer
from influence.lab.tasks import load_task
from influence.lab.tokenizer import make_batches
from influence.modules import flatten

ENSEMBLED = ("EK-FAC (seed ensemble)", "TRAK (seed ensemble)", "TracIn (checkpoints)")
METHODS = (*benchmark.METHODS, *ENSEMBLED)


@dataclass(frozen=True)
class Setting:
    """One ground-truth experiment (see the module docstring for each measurement)."""

    task: str
    mode: str
    profile: str = "default"
    n_query: int = 24
    m: int = 50  # LDS subsets
    alpha: float = 0.5  # share of the training set each subset keeps
    small_alpha: float | None = None  # a second, smaller share (first seed only)
    seeds: tuple[int, ...] = (0, 1)  # retraining seeds of the LDS subsets (>= 2: noise ceiling)
    ensemble_seeds: tuple[int, ...] = (0, 1, 2)  # fine-tunes of the seed ensembles
    trak_dim: int = 1024
    tracin_checkpoints: int = 4  # evenly spaced over training, the last one included
    removal_methods: tuple[str, ...] = ("RepSim", "Gradient dot", "EK-FAC")
    removal_k: tuple[float, ...] = (0.1,)  # shares of N removed
    removal_queries: int = 4
    random_repeats: int = 3
    loo_queries: int = 2
    loo_per_side: int = 2  # top and bottom examples per query
    pbrf_pairs: int = 1  # LOO pairs also scored by PBRF (the first ones)
    pbrf_steps: int = 10  # L-BFGS iterations (each a pass over the training set)
    margin: bool = False  # also attribute and measure the class margin (``behaviour``)


def training_set(s: Setting) -> list[dict]:
    """The examples the zoo model of `s` was trained on (a profile may cut the list)."""
    limit = zoo.specs(s.profile)[f"gpt2-{s.task}-{s.mode}"].train.limit
    return load_task(s.task, "train")[:limit]


def _grads(model, tok, layers, examples, batch_size=32) -> torch.Tensor:
    """(n, P) flat per-example gradients of the tracked layers (loss on the response)."""
    return flatten(collect_grads(model, make_batches(tok, examples, batch_size), layers=layers,
                                 progress=False))  # fmt: skip


def measures(s: Setting) -> dict[str, Callable | None]:
    """{measure: query gradients (model, tok, layers, queries) -> LayerGrads, None for the
    loss}: "loss", and "margin" (``behaviour.margin_grads``) when ``s.margin``."""
    out: dict[str, Callable | None] = {"loss": None}
    if s.margin:
        responses = behaviour.class_responses(training_set(s))
        out["margin"] = partial(behaviour.margin_grads, responses=responses)
    return out


def attribute(s: Setting) -> tuple[dict[str, dict[str, np.ndarray]], list[dict], dict]:
    """({measure: {method: (Q, N) scores}}, queries, info) for the zoo model of `s` (seed 0);
    one set of scores per measure of ``measures`` (the curvatures and training gradients are
    shared, only the query gradients differ)."""
    train = training_set(s)
    queries = benchmark.select_queries(
        load_task(s.task, "test"), [ex["label"] for ex in train], s.n_query
    )
    grads = measures(s)
    scores: dict = {k: {} for k in grads}
    ekfac: dict = {k: [] for k in grads}
    trak_query: dict = {k: [] for k in grads}
    trak_train = []
    for seed in s.ensemble_seeds:
        path = benchmark.model_path(s.task, s.mode, seed, s.profile)
        model, tok, layers = benchmark.load(path, s.mode)
        first = seed == s.ensemble_seeds[0]
        methods = benchmark.METHODS if first else ("EK-FAC",)
        prep = benchmark.prepare(model, tok, layers, train, queries, seed=seed, methods=methods)
        if first:
            damping = prep.damping(benchmark.FACTOR)
        for measure, fn in grads.items():
            p = (
                prep
                if fn is None
                else benchmark.with_queries(prep, fn(model, tok, layers, queries))
            )
            if first:
                scores[measure] = {m: benchmark.method_scores(p, m) for m in methods}
            ekfac[measure].append(benchmark.method_scores(p, "EK-FAC"))
            trak_query[measure].append(flatten(p.query_g))
        trak_train.append(prep.train_flat)
        del prep, p
    checkpoints = tracin(s, train, queries, grads)
    for measure in grads:
        scores[measure][ENSEMBLED[0]] = np.mean(ekfac[measure], axis=0)
        scores[measure][ENSEMBLED[1]] = baselines.trak_scores(
            trak_train, trak_query[measure], dim=s.trak_dim
        ).numpy()
        scores[measure][ENSEMBLED[2]] = checkpoints[measure]
    return scores, queries, {"damping": damping}


def tracin(
    s: Setting, train: Sequence[dict], queries: Sequence[dict], grads: dict | None = None
) -> dict[str, np.ndarray]:
    """TracInCP: sum over checkpoints of (learning rate x steps since the previous one) x
    query . training gradients, on the seed-0 fine-tune saved at evenly spaced steps; one
    (Q, N) matrix per measure of `grads` (``measures``; default the loss)."""
    grads = grads or {"loss": None}
    cfg = zoo.specs(s.profile)[f"gpt2-{s.task}-{s.mode}"].train
    total = cfg.steps
    steps = [round(total * (c + 1) / s.tracin_checkpoints) for c in range(s.tracin_checkpoints)]
    path = benchmark.model_path(s.task, s.mode, 0, s.profile, checkpoints=steps)
    train_g, lrs, previous = [], [], 0
    query_g: dict = {k: [] for k in grads}
    for step in steps:
        model, tok, layers = benchmark.load(path, s.mode, step)
        train_g.append(_grads(model, tok, layers, train))
        for measure, fn in grads.items():
            query_g[measure].append(
                _grads(model, tok, layers, queries)
                if fn is None
                else flatten(fn(model, tok, layers, queries))
            )
        lrs.append(cfg.lr * zoo.lr_factor(step - 1, total, cfg.warmup) * (step - previous))
        previous = step
    return {k: baselines.tracin_scores(train_g, q, lrs).numpy() for k, q in query_g.items()}


def run(s: Setting, scores: dict[str, dict[str, np.ndarray]], queries: list[dict]) -> dict:
    """Every retraining measurement of `s` for the (Q, N) scores of each method and measure
    (``attribute``): LDS, its ceilings, removal and leave-one-out for the loss; LDS and its
    ceiling for the class margin when scored (``margin``)."""
    measured, scores = scores, scores["loss"]
    r = Retrainer(s.task, s.mode, s.profile)
    n, clock = r.n, time.perf_counter()
    full = np.ones(n, bool)
    base = r.losses(full[None], 0, queries, progress=False)[0]  # (Q,) the zoo model itself
    masks = counterfactual.subset_masks(n, s.m, s.alpha, seed=0)
    losses = np.stack([r.losses(masks, seed, queries) for seed in s.seeds])  # (S, M, Q)
    retrain_seconds = [r.seconds(mask, seed) for seed in s.seeds for mask in masks]
    out = {
        "setting": asdict(s),
        "n_train": n,
        "queries": [q["id"] for q in queries],
        "retrains_per_minute": 60 / float(np.mean(retrain_seconds)),
        "noise_ceiling": ceilings(losses),
        "seed_average_ceiling": counterfactual.seed_average_ceiling(losses),
        "lds": {m: counterfactual.lds(sc, masks, losses[0]) for m, sc in scores.items()},
        "lds_seed_mean": {
            m: counterfactual.lds(sc, masks, losses.mean(0)) for m, sc in scores.items()
        },  # fmt: skip
    }
    if s.small_alpha:
        small = counterfactual.subset_masks(n, s.m, s.small_alpha, seed=1)
        small_losses = r.losses(small, s.seeds[0], queries)
        out["lds_small_alpha"] = {m: counterfactual.lds(sc, small, small_losses)
                                  for m, sc in scores.items()}  # fmt: skip
    if "margin" in measured:
        out["margin"] = margin(s, r, measured, queries, masks, losses[0])
    out["removal"] = removal(s, r, scores, queries, base)
    out["loo"] = loo(s, r, scores, queries, base)
    out["seconds"] = time.perf_counter() - clock
    return out


def margin(s: Setting, r: Retrainer, scores: dict, queries: list[dict], masks, losses) -> dict:
    """LDS of the class margin: the retrains of the LDS subsets measured by minus the margin
    (a quantity to lower, as the loss), predicted by the margin's scores and, for comparison,
    by the loss's (does attributing the loss suffice to predict the behaviour?)."""
    responses = behaviour.class_responses(training_set(s))

    def minus_margin(model):
        return -behaviour.margins(model, r.tokenizer, queries, responses)

    values = np.stack([r.measure(masks, seed, minus_margin, progress=False) for seed in s.seeds])
    base = -r.measure(np.ones((1, r.n), bool), 0, minus_margin, progress=False)[0]
    return {
        "zoo_margin": float(base.mean()),  # mean margin (nats) of the queries, zoo model
        "noise_ceiling": ceilings(values),
        "lds": {m: counterfactual.lds(sc, masks, values[0]) for m, sc in scores["margin"].items()},
        "lds_of_loss_scores": {
            m: counterfactual.lds(sc, masks, values[0]) for m, sc in scores["loss"].items()
        },
        # per query, Spearman over the subsets between minus the margin and the loss
        "agreement_with_loss": counterfactual.noise_ceiling(values[0], losses),
    }


def ceilings(losses: np.ndarray) -> dict:
    """The noise ceiling of LDS from (S, M, Q) retrained losses (S >= 2 seeds).

    ``mean``/``ci``/``per_query``: seed 1's losses as the prediction of seed 0's (the issue's
    definition). That is a *noisy* predictor of a noisy target; a noise-free predictor of the
    expected loss does better. Under the additive model loss = signal + seed noise, with r the
    seed-to-seed correlation, a perfect predictor reaches sqrt(r) against one seed
    (``noise_free``) and sqrt(r_S), r_S = S r / (1 + (S - 1) r) (Spearman-Brown), against the
    mean of S seeds (``noise_free_seed_mean``): the ceilings to compare ``lds`` and
    ``lds_seed_mean`` with (Spearman read as Pearson: an approximation)."""
    out = counterfactual.noise_ceiling(losses[0], losses[1])
    r, k = max(out["mean"], 0.0), len(losses)
    out["noise_free"] = float(np.sqrt(r))
    out["noise_free_seed_mean"] = float(np.sqrt(k * r / (1 + (k - 1) * r)))
    return out


def removal(s: Setting, r: Retrainer, scores, queries, base) -> dict:
    """{method: {k: removal_effect}} for the first ``removal_queries`` queries."""
    qs = range(min(s.removal_queries, len(queries)))
    rng = np.random.default_rng(1)
    out: dict = {}
    for share in s.removal_k:
        k = max(1, round(share * r.n))
        random = np.ones((s.random_repeats, r.n), bool)
        for row in random:
            row[rng.choice(r.n, k, replace=False)] = False
        random_losses = r.losses(random, 0, [queries[q] for q in qs], progress=False)
        for method in s.removal_methods:
            removed = []
            for q in qs:
                mask = np.ones(r.n, bool)
                mask[np.argsort(-scores[method][q])[:k]] = False  # the k strongest proponents
                removed.append(r.losses(mask[None], 0, [queries[q]], progress=False)[0, 0])
            out.setdefault(method, {})[f"{share:g}"] = {
                "k": k,
                **counterfactual.removal_effect(base[list(qs)], np.array(removed), random_losses),
            }
    return out


def loo(s: Setting, r: Retrainer, scores, queries, base) -> dict:
    """Leave-one-out for the top and bottom ``loo_per_side`` examples of EK-FAC per query:
    actual change of the query loss against each method's predicted change (score / N)."""
    pairs = []
    for q in range(min(s.loo_queries, len(queries))):
        order = np.argsort(-scores["EK-FAC"][q])
        for side, idx in (("top", order[: s.loo_per_side]), ("bottom", order[-s.loo_per_side :])):
            for i in idx:
                mask = np.ones(r.n, bool)
                mask[i] = False
                after = r.losses(mask[None], 0, [queries[q]], progress=False)[0, 0]
                pairs.append(dict(query=q, example=int(i), side=side,
                                  actual=float(after - base[q])))  # fmt: skip
    actual = np.array([p["actual"] for p in pairs])
    predicted = {m: np.array([sc[p["query"], p["example"]] / r.n for p in pairs])
                 for m, sc in scores.items()}  # fmt: skip
    noise = r.losses(np.ones((1, r.n), bool), 1, queries, progress=False)[0] - base
    return {
        "pairs": pairs,
        "predicted": {m: p.tolist() for m, p in predicted.items()},
        "agreement": {m: counterfactual.loo_agreement(p, actual) for m, p in predicted.items()},
        "seed_noise": float(np.abs(noise[: s.loo_queries]).mean()),  # |seed 1 - seed 0| loss
        "mean_abs_actual": float(np.abs(actual).mean()),
    }


def label_metrics(s: Setting, scores: dict[str, np.ndarray], queries: list[dict]) -> dict:
    """{method: {accuracy, coverage, auc}} (means over the queries) of notebooks 03-05's
    class-label proxy for the same model, queries and scores."""
    train_labels = np.array([ex["label"] for ex in training_set(s)])
    query_labels = np.array([q["label"] for q in queries])
    out = {}
    for method, sc in scores.items():
        m = attribution.rank_metrics(sc, train_labels, query_labels)
        out[method] = {k: float(m[k].mean()) for k in ("accuracy", "coverage", "auc")}
    return out


def verdict_agreement(lds: dict, labels: dict) -> dict:
    """Spearman correlation, over methods, between the LDS ranking and each class-label
    metric's ranking: do the proxy and the ground truth order the methods alike?"""
    methods = sorted(lds)
    truth = [lds[m]["mean"] for m in methods]
    return {metric: float(stats.spearmanr(truth, [labels[m][metric] for m in methods])[0])
            for metric in ("accuracy", "coverage", "auc")}  # fmt: skip


def plot_lds(results: dict, methods: Sequence[str]):
    """One panel per (task, mode) and measure (the loss; the class margin where measured): LDS
    of each method with its 95% interval, the noise ceiling (a second seed predicting the first)
    as a shaded band, the ceiling of a noise-free predictor (dashed; :func:`ceilings`), and 0."""
    cols = [(t, m, k) for t in results for m in results[t] for k in ("loss", "margin")
            if k == "loss" or k in results[t][m]]  # fmt: skip
    fig, axes = figure(height=0.45 * len(methods) + 1.2, ncols=len(cols), sharey=True,
                       squeeze=False)  # fmt: skip
    y = np.arange(len(methods))
    for ax, (t, m, measure) in zip(axes[0], cols, strict=True):
        r = results[t][m] if measure == "loss" else results[t][m][measure]
        mean = np.array([r["lds"][k]["mean"] for k in methods])
        ci = np.array([r["lds"][k]["ci"] for k in methods])
        ax.errorbar(mean, y, xerr=[mean - ci[:, 0], ci[:, 1] - mean], fmt="o", color="C0",
                    capsize=3, label="LDS (seed 0)")  # fmt: skip
        ceiling = r["noise_ceiling"]
        ax.axvspan(*ceiling["ci"], color="C2", alpha=0.25, label="seed 1 predicting seed 0")
        ax.axvline(ceiling["mean"], color="C2")
        ax.axvline(ceiling["noise_free"], color="C2", ls="--", label="noise-free predictor")
        ax.axvline(0, color="0.5", lw=0.8)
        ax.set_title(f"{t}, {m}: query {'loss' if measure == 'loss' else 'class margin'}",
                     fontsize=9)  # fmt: skip
        ax.set_xlabel("LDS (Spearman)")
    axes[0, 0].set_yticks(y, methods)
    axes[0, 0].invert_yaxis()
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    fig.set_layout_engine("tight", rect=(0, 0.06, 1, 1))
    return fig


def plot_removal(results: dict, share: str):
    """Rise of the query loss when each method's top-k proponents are removed and the model
    retrained, against removing k random examples (bars: mean over queries, 95% intervals)."""
    cols = [(t, m) for t in results for m in results[t]]
    fig, axes = figure(height=3.2, ncols=len(cols), squeeze=False)
    for ax, (t, m) in zip(axes[0], cols, strict=True):
        rem = results[t][m]["removal"]
        names = list(rem)
        first = rem[names[0]][share]
        rows = [("random", first["random_rise"], first["random_ci"])]
        rows += [(k, rem[k][share]["rise"], rem[k][share]["ci"]) for k in names]
        x = np.arange(len(rows))
        mean = np.array([r[1] for r in rows])
        ci = np.array([r[2] for r in rows])
        ax.bar(x, mean, color=["0.6"] + [f"C{i}" for i in range(len(names))])
        ax.errorbar(x, mean, yerr=[mean - ci[:, 0], ci[:, 1] - mean], fmt="none", color="k",
                    capsize=3)  # fmt: skip
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(x, [r[0] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("rise of the query loss (nats)")
        ax.set_title(f"{t}, {m}: top {first['k']} of each ranking removed, retrained", fontsize=9)
    return fig


def plot_loo(results: dict, methods: Sequence[str]):
    """Leave-one-out for the first (task, mode): actual change of the query loss against each
    method's prediction (score / N), one marker per (query, removed example), one panel per
    method; the grey band is the mean seed-to-seed change of the query loss (retraining
    noise)."""
    t = next(iter(results))
    m = next(iter(results[t]))
    r = results[t][m]["loo"]
    actual = np.array([p["actual"] for p in r["pairs"]])
    top = np.array([p["side"] == "top" for p in r["pairs"]])
    ncols = 2
    nrows = -(-len(methods) // ncols)
    fig, axes = figure(height=2.4 * nrows + 0.6, nrows=nrows, ncols=ncols, squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        pred = np.array(r["predicted"][method])
        ax.axhspan(-r["seed_noise"], r["seed_noise"], color="0.88", label="seed-to-seed change")
        ax.scatter(pred[top], actual[top], color="C3", s=18, label="EK-FAC's top examples")
        ax.scatter(pred[~top], actual[~top], color="C0", s=18, label="EK-FAC's bottom examples")
        ax.axhline(0, color="0.4", lw=0.8)
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_title(method, fontsize=9)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(methods) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("predicted change (score / N, nats)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("actual change (nats)", fontsize=8)
    fig.suptitle(f"Leave-one-out, {t}, {m}", fontsize=9)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    fig.set_layout_engine("tight", rect=(0, 0.07, 1, 1))
    return fig


def _best(lds: dict) -> str:
    return max(lds, key=lambda k: lds[k]["mean"])


def verdict(results: dict) -> dict:
    """Per (task, mode): the best method by LDS (``best``) and the checked cell's statements,
    each a comparison with a margin (an interval, a factor of 2, or a rank correlation of 0.8)
    that a different outcome would flip."""
    out: dict = {"best": {}, "statements": []}
    say = out["statements"].append
    for t in results:
        for m, r in results[t].items():
            lds, ceiling, loo = r["lds"], r["noise_ceiling"], r["loo"]
            best = _best(lds)
            out["best"].setdefault(t, {})[m] = best
            top_hi = max(v["ci"][1] for v in lds.values())
            say(f"{t} {m}: best LDS above 0.05 (interval): {lds[best]['ci'][0] > 0.05}")
            say(f"{t} {m}: best LDS above the seed-to-seed ceiling: "
                f"{lds[best]['mean'] > ceiling['mean']}")  # fmt: skip
            say(f"{t} {m}: every LDS below the noise-free ceiling (intervals): "
                f"{top_hi < ceiling['noise_free']}")  # fmt: skip
            for method in ("EK-FAC", "Gradient cosine"):
                say(f"{t} {m}: {method} above gradient dot by LDS (interval): "
                    f"{lds[method]['ci'][0] > lds['Gradient dot']['mean']}")  # fmt: skip
            ek = r["removal"].get("EK-FAC", {})
            for share, e in ek.items():
                say(f"{t} {m}: removing EK-FAC's top {share} beats random removal (interval of "
                    f"the excess above 0): {e['excess_ci'][0] > 0}")  # fmt: skip
            ratio = loo["mean_abs_actual"] / loo["seed_noise"]
            say(f"{t} {m}: leave-one-out changes within a factor 2 of seed-to-seed changes: "
                f"{0.5 < ratio < 2}")  # fmt: skip
            for metric in ("coverage", "auc"):
                say(f"{t} {m}: the class-label {metric} orders the methods as LDS does (rank "
                    f"correlation > 0.8): {r['verdict_agreement'][metric] > 0.8}")  # fmt: skip
            if "margin" in r:
                mg = r["margin"]
                best_m = _best(mg["lds"])
                names = sorted(lds)
                rho = stats.spearmanr([lds[k]["mean"] for k in names],
                                      [mg["lds"][k]["mean"] for k in names])[0]  # fmt: skip
                say(f"{t} {m}: class margin, best LDS above 0.05 (interval): "
                    f"{mg['lds'][best_m]['ci'][0] > 0.05}")  # fmt: skip
                say(f"{t} {m}: the class margin orders the methods as the loss does by LDS "
                    f"(rank correlation > 0.8): {rho > 0.8}")  # fmt: skip
                say(f"{t} {m}: retrained margin and loss move together over the subsets "
                    f"(mean Spearman > 0.5): {mg['agreement_with_loss']['mean'] > 0.5}")  # fmt: skip
    return out


def findings(results: dict, methods: Sequence[str]) -> str:
    """The Findings cell: every number printed from `results`."""
    lines = []
    for t in results:
        for m, r in results[t].items():
            lds, ceiling = r["lds"], r["noise_ceiling"]
            order = sorted(methods, key=lambda k: -lds[k]["mean"])
            top = ", ".join(f"{k} {lds[k]['mean']:.2f}" for k in order[:3])
            low = ", ".join(f"{k} {lds[k]['mean']:.2f}" for k in order[-3:])
            cov_best = max(methods, key=lambda k: r["labels"][k]["coverage"])
            auc_best = max(methods, key=lambda k: r["labels"][k]["auc"])
            lines += [
                f"- **{t}, {m}** (N = {r['n_train']}, {len(r['queries'])} queries, "
                f"{r['retrains_per_minute']:.1f} retrains per minute on one core).",
                f"  - Noise ceiling (a second seed predicting the first): "
                f"{ceiling['mean']:.2f} [{ceiling['ci'][0]:.2f}, {ceiling['ci'][1]:.2f}]; a "
                f"noise-free predictor could reach about {ceiling['noise_free']:.2f} against "
                f"one seed and {ceiling['noise_free_seed_mean']:.2f} against the seed mean.",
                f"  - Highest LDS: {top}; lowest: {low}. EK-FAC {lds['EK-FAC']['mean']:.2f}, "
                f"gradient dot {lds['Gradient dot']['mean']:.2f}, RepSim "
                f"{lds['RepSim']['mean']:.2f}.",
                f"  - The class-label proxy's best: {cov_best} by coverage, {auc_best} by AUC; "
                f"rank correlation of the methods' LDS with their coverage "
                f"{r['verdict_agreement']['coverage']:+.2f}, with their AUC "
                f"{r['verdict_agreement']['auc']:+.2f}.",
            ]
            if "margin" in r:
                mg = r["margin"]
                order_m = sorted(methods, key=lambda k: -mg["lds"][k]["mean"])
                c = mg["noise_ceiling"]
                lines.append(
                    f"  - Class margin (the zoo model's mean over the queries "
                    f"{mg['zoo_margin']:.2f} nats): retrained margin and loss agree over the "
                    f"subsets with mean Spearman {mg['agreement_with_loss']['mean']:.2f}; noise "
                    f"ceiling {c['mean']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}] (noise-free "
                    f"{c['noise_free']:.2f}); highest LDS "
                    + ", ".join(f"{k} {mg['lds'][k]['mean']:.2f}" for k in order_m[:3])
                    + f"; EK-FAC {mg['lds']['EK-FAC']['mean']:.2f}, gradient dot "
                    f"{mg['lds']['Gradient dot']['mean']:.2f}. The loss's scores predict the "
                    f"margin with EK-FAC {mg['lds_of_loss_scores']['EK-FAC']['mean']:.2f}, "
                    f"gradient cosine {mg['lds_of_loss_scores']['Gradient cosine']['mean']:.2f}."
                )
            for k, v in r["removal"].items():
                for e in v.values():
                    lines.append(
                        f"  - Removing {k}'s top {e['k']} proponents raises the query loss by "
                        f"{e['rise']:.3f} nats [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}] against "
                        f"{e['random_rise']:.3f} for {e['k']} random examples; it beats random "
                        f"for {100 * e['win_rate']:.0f}% of the queries."
                    )
            loo = r["loo"]
            lines.append(
                f"  - Leave-one-out: mean |change| {loo['mean_abs_actual']:.4f} nats against "
                f"{loo['seed_noise']:.4f} between two seeds; EK-FAC's predicted sign holds for "
                f"{100 * loo['agreement']['EK-FAC']['sign_agreement']:.0f}% of the pairs, its "
                f"scale (slope) is {loo['agreement']['EK-FAC']['slope']:.2g}."
            )
            p = r.get("pbrf")
            if p and p["converged"] == p["n"] and p["n"] > 2:
                lines.append(
                    f"  - PBRF ({p['n']} pairs): correlation with EK-FAC "
                    f"{p['table']['EK-FAC']['pearson_pbrf']:+.2f}, with gradient dot "
                    f"{p['table']['Gradient dot']['pearson_pbrf']:+.2f}; PBRF against "
                    f"leave-one-out {p['pbrf_vs_loo']:+.2f}."
                )
            elif p:
                first = p["pairs"][0]
                lines.append(
                    f"  - PBRF is out of reach here: {p['seconds_per_step']:.1f} s per L-BFGS "
                    f"iteration (a pass over the N training sequences), and after "
                    f"{first['steps']} iterations the objective's gradient is still "
                    f"{first['residual']:.2f} of its initial norm; its value there, "
                    f"{first['score']:.3g}, against EK-FAC's score {first['ekfac']:.3g}, is "
                    f"a truncated estimate, not a measurement."
                )
    return "\n".join(lines)


def pbrf_check(s: Setting, scores: dict, queries: list[dict], loo_result: dict, damping) -> dict:
    """PBRF scores (``influence.lab.pbrf``, removal: epsilon = -1/N, the shared damping) of the
    first ``pbrf_pairs`` leave-one-out pairs, at most ``pbrf_steps`` L-BFGS iterations each;
    per method, the Pearson correlation of its scores with PBRF's and with the actual
    leave-one-out changes over the same pairs, and PBRF's own with leave-one-out."""
    pairs = loo_result["pairs"][: s.pbrf_pairs]
    train = training_set(s)
    path = benchmark.model_path(s.task, s.mode, 0, s.profile)
    model, tok, layers = benchmark.load(path, s.mode)
    train_b = make_batches(tok, train, 32)
    solver = pbrf.PBRF(model, layers, train_b, damping)
    found, clock = [], time.perf_counter()
    for p in pairs:
        example = make_batches(tok, [train[p["example"]]], 1)[0]
        query = make_batches(tok, [queries[p["query"]]], 1)[0]
        res = solver.response(example, query, epsilon=-1 / len(train), steps=s.pbrf_steps,
                              tol=1e-6)  # fmt: skip
        found.append(dict(score=float(res["response"][0]) * len(train),
                          ekfac=float(scores["EK-FAC"][p["query"], p["example"]]),
                          residual=float(res["relative_grad_norm"]), steps=res["steps"]))  # fmt: skip
    per_step = (time.perf_counter() - clock) / max(1, sum(f["steps"] for f in found))
    value = np.array([f["score"] for f in found])
    actual = np.array([p["actual"] for p in pairs])

    def corr(a, b):
        return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 else float("nan")

    table = {}
    for method, sc in scores.items():
        pred = np.array([sc[p["query"], p["example"]] for p in pairs])
        table[method] = {"pearson_pbrf": corr(pred, value), "pearson_loo": corr(pred, actual)}
    return {
        "n": len(pairs),
        "pairs": [{**p, **f} for p, f in zip(pairs, found, strict=True)],
        "table": table,
        "pbrf_vs_loo": corr(value / len(train), actual),
        "max_residual": max(f["residual"] for f in found),
        "converged": sum(f["residual"] <= 1e-6 for f in found),
        "seconds_per_step": per_step,
    }

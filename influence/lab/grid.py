"""Notebooks 03-05 as one pipeline: the benchmark over tasks x fine-tuning modes x seeds.

:class:`Grid` runs ``benchmark.task_scores`` for every (task, mode, seed), sweeps the damping on
the first seed, and turns the runs into what the three notebooks show and save: the table of
the three metrics (accuracy, coverage, AUC) with two-level bootstrap intervals, chance levels
and coverage ceilings, each damped method at its best damping (tuned on the queries), the
winner per metric, the agreement of each method with the gradient dot product, gradient-norm
outliers, a figure of the three metrics, a figure of the sweep, and results.json's layout.
Each notebook keeps its task list, its extra sections and its discussion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from influence.damping import FACTOR
from influence.lab import attribution, benchmark
from influence.lab.notebook import figure, value_range

METRICS = ("accuracy", "coverage", "auc")
TIE = 0.05  # a winner by less than this (absolute, on the metric's mean) is a tie


@dataclass
class Grid:
    """The benchmark for ``tasks`` x ``modes`` x ``seeds`` (seed 0 = the zoo's model).

    query_classes: {task: classes of the scored queries, or None for every training class}.
    sizes: ``task_scores``'s curvature options (curv_examples, fit_examples, lissa_depth, ...).
    sweep: damping factors tried on the first seed (``tuned``); loss_on as in ``task_scores``.
    """

    tasks: Sequence[str]
    modes: Sequence[str]
    seeds: Sequence[int]
    profile: str
    query_classes: dict = field(default_factory=dict)
    n_query: int | None = None
    sizes: dict = field(default_factory=dict)
    sweep: Sequence[float] = ()
    loss_on: str = "response"
    runs: dict = field(default_factory=dict, repr=False)  # (task, mode) -> [TaskScores]

    def run(self) -> Grid:
        for task in self.tasks:
            for mode in self.modes:
                self.runs[task, mode] = [
                    benchmark.task_scores(
                        task,
                        mode,
                        s,
                        self.profile,
                        loss_on=self.loss_on,
                        n_query=self.n_query,
                        query_classes=self.query_classes.get(task),
                        sweep=self.sweep if k == 0 else (),
                        **self.sizes,
                    )  # fmt: skip
                    for k, s in enumerate(self.seeds)
                ]
        return self

    def classes(self, task: str):
        """The classes of ``task``'s scored queries (None: every training class)."""
        return self.query_classes.get(task)

    def describe(self) -> str:
        """One line per task: N, classes, queries scored, tracked parameters per mode."""
        lines = []
        for task in self.tasks:
            r = self.runs[task, self.modes[0]][0]
            keep = benchmark.query_mask(r, self.classes(task))
            params = ", ".join(
                f"{self.runs[task, m][0].info['params']:,} ({m})" for m in self.modes
            )
            lines.append(
                f"{task}: N = {len(r.train_labels)} training examples, "
                f"{len(set(r.train_labels))} classes, {keep.sum()} queries scored; "
                f"tracked P = {params}"
            )
        return "\n".join(lines)

    # ---- metrics ----------------------------------------------------------------------------

    def table(self) -> dict:
        """table[task][mode][method] = {metric: {mean, lo, hi}} at the fixed damping rule."""
        return {
            t: {m: benchmark.evaluate(self.runs[t, m], self.classes(t)) for m in self.modes}
            for t in self.tasks
        }

    def levels(self, task: str) -> dict[str, float]:
        """Chance and ceiling of the metrics for ``task``'s scored queries: a random ranking's
        expected accuracy and coverage (the share of training examples in the query's class),
        AUC 0.5, and the coverage ceiling min(n_class, k) / k (below 1 when the query's class
        has fewer than k = floor(N / classes) training examples)."""
        r = self.runs[task, self.modes[0]][0]
        q = r.query_labels[benchmark.query_mask(r, self.classes(task))]
        share = [np.mean(r.train_labels == c) for c in q]
        k = attribution.default_k(r.train_labels)
        ceiling = [min(int(np.sum(r.train_labels == c)), k) / k for c in q]
        return {
            "chance": float(np.mean(share)),
            "auc_chance": 0.5,
            "ceiling": float(np.mean(ceiling)),
        }

    def tuned(self) -> dict:
        """tuned[task][mode][method][metric] = {factor, value, fixed}: on the first seed, each
        damped method's best mean over the sweep's factors (tuned on these queries) beside its
        value at the fixed rule on the same seed."""
        out = {}
        for t in self.tasks:
            for m in self.modes:
                first = self.runs[t, m][:1]
                fixed = benchmark.evaluate(first, self.classes(t))
                at = {c: benchmark.evaluate(first, self.classes(t), factor=c) for c in self.sweep}
                for method in first[0].sweep:
                    for metric in METRICS:
                        best = max(self.sweep, key=lambda c: at[c][method][metric]["mean"])
                        out.setdefault(t, {}).setdefault(m, {}).setdefault(method, {})[metric] = {
                            "factor": best,
                            "value": at[best][method][metric]["mean"],
                            "fixed": fixed[method][metric]["mean"],
                        }
        return out

    def tuning_changes(self) -> pd.DataFrame:
        """Per (task, mode) and metric, on the first seed: the winner (``winner``) with every
        damped method at the fixed rule, and with each at its tuned damping."""
        tuned, rows = self.tuned(), []
        for t in self.tasks:
            for m in self.modes:
                first = benchmark.evaluate(self.runs[t, m][:1], self.classes(t))
                for metric in METRICS:
                    best = {
                        k: {metric: {"mean": v[metric]["value"]}} for k, v in tuned[t][m].items()
                    }
                    merged = {k: {metric: v[metric]} for k, v in first.items()} | best
                    rows.append(dict(task=t, mode=m, metric=metric, fixed=winner(first, metric),
                                     tuned=winner(merged, metric)))  # fmt: skip
        return pd.DataFrame(rows)

    def sweep_frame(self) -> pd.DataFrame:
        """Long table of the first seed's sweep: task, mode, method, factor, metric, value."""
        rows = []
        for (t, m), runs in self.runs.items():
            for c in self.sweep:
                for method, metrics in benchmark.evaluate(runs[:1], self.classes(t), c).items():
                    for metric in METRICS:
                        rows.append((t, m, method, c, metric, metrics[metric]["mean"]))
        return pd.DataFrame(rows, columns=["task", "mode", "method", "factor", "metric", "value"])

    def lissa(self) -> pd.DataFrame:
        """Per (task, mode), means over seeds: LiSSA's relative residual on its curvature set
        after its steps, 1 - its per-step contraction bound (lambda_min / scale), and the steps a
        1e-6 residual needs."""
        rows = []
        for (t, m), runs in self.runs.items():
            rows.append(dict(
                task=t, mode=m,
                residual=np.mean([r.info["lissa_residual"] for r in runs]),
                contraction=np.mean([1 - r.info["lissa_rate"] for r in runs]),
                steps_run=self.sizes.get("lissa_depth", 8),
                steps_to_1e6=float(np.median([r.info["lissa_steps_to_1e6"] for r in runs])),
            ))  # fmt: skip
        return pd.DataFrame(rows)

    def agreement(self, methods=("LiSSA as published", "LiSSA", "DataInf", "EK-FAC", "MC Fisher")):
        """Mean over queries and seeds of each method's Spearman correlation with the gradient
        dot product, and the median ratio of as-published LiSSA to the dot product."""
        rows = []
        for (t, m), runs in self.runs.items():
            row = dict(task=t, mode=m)
            for method in methods:
                rho = [attribution.row_spearman(r.scores[method], r.scores["Gradient dot"]).mean()
                       for r in runs]  # fmt: skip
                row[f"rho({method}, dot)"] = float(np.mean(rho))
            ratio = [np.median(r.scores["LiSSA as published"] / r.scores["Gradient dot"])
                     for r in runs]  # fmt: skip
            row["published / dot"] = float(np.mean(ratio))
            rows.append(row)
        return pd.DataFrame(rows)

    def outliers(self, methods=("RepSim", "Gradient cosine", "Gradient dot", "DataInf", "EK-FAC")):
        """``benchmark.norm_outliers`` per (task, mode, method), mean over seeds."""
        rows = []
        for (t, m), runs in self.runs.items():
            for method in methods:
                vals = [benchmark.norm_outliers(r, method, self.classes(t)) for r in runs]
                rows.append(dict(task=t, mode=m, method=method,
                                 **{k: float(np.mean([v[k] for v in vals])) for k in vals[0]}))  # fmt: skip
        return pd.DataFrame(rows)


# ---- verdicts, tables, results ------------------------------------------------------------


def winner(metrics: dict, metric: str, influence=benchmark.INFLUENCE, tie: float = TIE) -> str:
    """ "RepSim", "influence" (the best of ``influence``) or "tie" on ``metric``'s mean."""
    best = max(metrics[m][metric]["mean"] for m in influence)
    gap = metrics["RepSim"][metric]["mean"] - best
    return "RepSim" if gap > tie else "influence" if gap < -tie else "tie"


def winners(table: dict) -> pd.DataFrame:
    """Rows (task, mode), one column per metric: who wins by that metric."""
    rows = [
        dict(task=t, mode=m, **{metric: winner(table[t][m], metric) for metric in METRICS})
        for t in table
        for m in table[t]
    ]
    return pd.DataFrame(rows).set_index(["task", "mode"])


def print_table(table: dict, methods: Sequence[str] = benchmark.METHODS, title: str = "") -> None:
    """Paper B's table per task: methods x (mode, metric), mean [95% interval]."""
    with pd.option_context("display.width", 250, "display.max_colwidth", 30):
        for t, modes in table.items():
            print(f"=== {t}{title}")
            frame = attribution.paper_table(modes, metrics=METRICS, digits=2)
            print(frame.loc[list(methods)].to_string())
            print()


def entry(summary: dict) -> dict:
    """results.json's cell: {accuracy, coverage, auc, ci: {metric: [lo, hi]}}."""
    return {m: summary[m]["mean"] for m in METRICS} | {
        "ci": {m: [summary[m]["lo"], summary[m]["hi"]] for m in METRICS}
    }


def results(grid: Grid, table: dict, **extra) -> dict:
    """The layout 03-05 share; ``extra`` adds a notebook's own sections."""
    return {
        "layout": "table[task][mode][method] = {accuracy, coverage, auc, ci: {metric: [lo, hi]}} "
        "at the fixed damping rule (0.1 x each layer's mean true-Fisher eigenvalue, shared by "
        "every damped method); means over seeds x queries, 95% two-level bootstrap intervals. "
        "tuned[task][mode][method][metric] = {factor, value, fixed}: first seed, best factor of "
        "the sweep on these queries (tuned), and the fixed rule's value on the same seed",
        "damping_factor": FACTOR,
        "sweep": list(grid.sweep),
        "table": {
            t: {m: {k: entry(v) for k, v in table[t][m].items()} for m in table[t]} for t in table
        },  # fmt: skip
        "levels": {t: grid.levels(t) for t in grid.tasks},
        "tuned": grid.tuned(),
        "winners": {f"{t}/{m}": row for (t, m), row in winners(table).to_dict("index").items()},
        "lissa": grid.lissa().to_dict("records"),
        "agreement_with_gradient_dot": grid.agreement().to_dict("records"),
        "norm_outliers": grid.outliers().to_dict("records"),
        **extra,
    }


def print_tuning(grid: Grid) -> pd.DataFrame:
    """Print each damped method's best value over the sweep at its factor beside its value at
    the fixed rule (first seed, tuned on the scored queries), then the winner per (task, mode)
    and metric at the fixed rule and with every damped method tuned; returns
    ``grid.tuning_changes()``."""
    tuned = grid.tuned()
    rows = [dict(task=t, mode=m, method=k, metric=metric, **v)
            for t in tuned for m in tuned[t] for k in tuned[t][m]
            for metric, v in tuned[t][m][k].items()]  # fmt: skip
    frame = pd.DataFrame(rows).assign(
        cell=lambda d: [f"{r.value:.2f} at {r.factor:g} (fixed {r.fixed:.2f})" for r in d.itertuples()]
    )  # fmt: skip
    print(f"best value at factor (value at the fixed rule {FACTOR:g}), first seed, tuned on the queries:")  # fmt: skip
    print(frame.pivot(index=["task", "mode", "method"], columns="metric", values="cell")
          .loc[:, list(METRICS)].to_string())  # fmt: skip
    changes = grid.tuning_changes()
    print("\nwinner at the fixed rule -> with every damped method tuned (first seed):")
    print(changes.pivot_table(index=["task", "mode"], columns="metric", values=["fixed", "tuned"],
                              aggfunc="first", sort=False).to_string())  # fmt: skip
    return changes


def loss_on_all(grid: Grid, table: dict, task: str) -> dict:
    """Paper B's variant on ``task`` (LoRA): the same seeds and sizes with the loss over prompt
    and response. Prints both tables and the first seed's training-gradient norms (median,
    max / median); returns {"response": table, "all": table} for that column."""
    g_all = Grid([task], ["lora"], grid.seeds, grid.profile, grid.query_classes, grid.n_query,
                 grid.sizes, loss_on="all").run()  # fmt: skip
    both = {"response": table[task]["lora"], "all": g_all.table()[task]["lora"]}
    print_table({f"{task} LoRA": both}, title=": loss on the response vs on all tokens")
    for key, runs in (("response", grid.runs[task, "lora"]), ("all", g_all.runs[task, "lora"])):
        v = runs[0].train_grad_norms
        print(
            f"loss on {key}: training gradient norm median {np.median(v):.3g}, "
            f"max / median {v.max() / np.median(v):.1f}"
        )
    return both


def print_outliers(grid: Grid) -> None:
    """``Grid.outliers``' three measures, methods x (task, mode), means over seeds."""
    outliers = grid.outliers()
    for col in ["top1_share", "top1_norm_pct", "norm_corr"]:
        print(f"--- {col} (mean over seeds)")
        print(outliers.pivot_table(index="method", columns=["task", "mode"], values=col, sort=False)
              .round(2).to_string())  # fmt: skip


def findings(grid: Grid, table: dict, changes: pd.DataFrame, lissa: pd.DataFrame,
             agreement: pd.DataFrame, loss_all: dict, all_task: str) -> str:  # fmt: skip
    """The findings of 03-05 as Markdown bullets, every number from the results: winners per
    metric over the columns and where the metrics disagree, each column's coverage and AUC
    against chance, what tuning the damping changes (``changes``), LiSSA's residual
    (``lissa``), as-published LiSSA against the gradient dot product (``agreement``), and the
    loss-over-all-tokens variant (``loss_all`` from :func:`loss_on_all`)."""
    wins = winners(table)
    agree = wins[wins.nunique(axis=1) == 1]
    cols = [(t, m) for t in grid.tasks for m in grid.modes]
    lines = []
    for metric in METRICS:
        counts = wins[metric].value_counts()
        lines.append(f"- **By {metric.replace('auc', 'AUC')}**, over the {len(cols)} (task, mode) columns: RepSim wins "
                     f"{counts.get('RepSim', 0)}, influence wins {counts.get('influence', 0)}, "
                     f"tie {counts.get('tie', 0)}.")  # fmt: skip
    lines.append(f"- The three metrics name the same winner in {len(agree)} of {len(cols)} columns"
                 + ("." if len(agree) == len(cols) else ", not in: "
                    + ", ".join(f"{t} {m}" for t, m in wins.index.difference(agree.index)) + "."))  # fmt: skip
    methods = benchmark.METHODS
    for t, m in cols:
        cov = {k: table[t][m][k]["coverage"]["mean"] for k in methods}
        auc = {k: table[t][m][k]["auc"]["mean"] for k in methods}
        best = max(benchmark.INFLUENCE, key=cov.get)
        lines.append(f"- {t} {m}: coverage RepSim {cov['RepSim']:.2f}, best influence {best} "
                     f"{cov[best]:.2f}, gradient dot {cov['Gradient dot']:.2f}, MC Fisher "
                     f"{cov['MC Fisher']:.2f} (chance {grid.levels(t)['chance']:.2f}); AUC RepSim "
                     f"{auc['RepSim']:.2f}, {best} {auc[best]:.2f}.")  # fmt: skip
    moved = changes[changes.fixed != changes.tuned]
    lines.append(f"- Tuning every damped method's damping on the scored queries changes the winner in "
                 f"{len(moved)} of {len(changes)} (column, metric) cases"
                 + ("." if moved.empty else ": " + "; ".join(
                     f"{r.task} {r.mode} {r.metric} {r.fixed} -> {r.tuned}" for r in moved.itertuples()) + "."))  # fmt: skip
    lines.append(f"- Correct LiSSA after {grid.sizes['lissa_depth']} steps keeps a relative residual of "
                 f"{value_range(lissa.residual)} on its own curvature; a residual of 1e-6 would take "
                 f"{lissa.steps_to_1e6.min():.1e}-{lissa.steps_to_1e6.max():.1e} steps.")  # fmt: skip
    lines.append(f"- LiSSA as published / gradient dot: median ratio {value_range(agreement['published / dot'])}, "
                 f"Spearman with gradient dot {value_range(agreement['rho(LiSSA as published, dot)'])}.")  # fmt: skip
    drop = {k: loss_all["response"][k]["coverage"]["mean"] - loss_all["all"][k]["coverage"]["mean"]
            for k in methods}  # fmt: skip
    lines.append(f"- Loss over prompt and response ({all_task}, LoRA): coverage change "
                 + ", ".join(f"{k} {-drop[k]:+.2f}" for k in benchmark.INFLUENCE + ("RepSim",)) + ".")  # fmt: skip
    return "\n".join(lines)


# ---- figures ------------------------------------------------------------------------------


def plot_metrics(grid: Grid, table: dict, methods: Sequence[str] = benchmark.METHODS):
    """Bars with 95% intervals: rows = metrics, columns = modes; chance dotted, the coverage
    ceiling dashed where it is below 1."""
    df = pd.concat(
        [attribution.tidy({t: table[t][m] for t in grid.tasks}).assign(mode=m) for m in grid.modes]
    )
    fig, axes = figure(height=8.0, nrows=len(METRICS), ncols=len(grid.modes), sharey="row",
                       layout="constrained", squeeze=False)  # fmt: skip
    width = 0.8 / len(methods)
    for col, mode in enumerate(grid.modes):
        for row, metric in enumerate(METRICS):
            ax = axes[row, col]
            d = df[(df["mode"] == mode) & (df.metric == metric)]
            for j, method in enumerate(methods):
                r = d[d.method == method].set_index("task").loc[list(grid.tasks)]
                x = np.arange(len(grid.tasks)) + (j - (len(methods) - 1) / 2) * width
                err = [r["mean"] - r["lo"], r["hi"] - r["mean"]]
                ax.bar(x, r["mean"], width, yerr=err, capsize=1.2, label=method,
                       error_kw={"lw": 0.7})  # fmt: skip
            for i, task in enumerate(grid.tasks):
                lv = grid.levels(task)
                chance = lv["auc_chance"] if metric == "auc" else lv["chance"]
                ax.hlines(chance, i - 0.45, i + 0.45, colors="k", linestyles=":", lw=1,
                          label="chance")  # fmt: skip
                if metric == "coverage" and lv["ceiling"] < 1:
                    ax.hlines(lv["ceiling"], i - 0.45, i + 0.45, colors="k", linestyles="--",
                              lw=1, label="ceiling")  # the legend keeps one of each  # fmt: skip
            ax.set_ylim(0, 1.05)
            ax.set_xticks(range(len(grid.tasks)), [t.replace("_", " ") for t in grid.tasks],
                          fontsize=7, rotation=20, ha="right")  # fmt: skip
            if col == 0:
                ax.set_ylabel(metric)
            if row == 0:
                ax.set_title(f"{'LoRA' if mode == 'lora' else 'full'} fine-tuning", fontsize=10)
    unique = {}  # every panel's entries once: the ceiling is drawn in the coverage row only
    for ax in axes.flat:
        handles, labels = ax.get_legend_handles_labels()
        unique |= {k: h for k, h in zip(labels, handles, strict=True) if k not in unique}
    fig.legend(unique.values(), unique.keys(), loc="outside lower center", ncol=5, fontsize=7)
    return fig


def plot_sweep(grid: Grid, metric: str = "auc"):
    """The first seed's ``metric`` against the damping factor, one panel per (task, mode):
    the damped methods as lines, gradient dot and RepSim as horizontal references, the fixed
    rule as a vertical line."""
    frame = grid.sweep_frame()
    frame = frame[frame.metric == metric]
    fig, axes = figure(height=1.9 * len(grid.modes) + 0.8, nrows=len(grid.modes),
                       ncols=len(grid.tasks), sharex=True, sharey=True, layout="constrained",
                       squeeze=False)  # fmt: skip
    for row, mode in enumerate(grid.modes):
        for col, task in enumerate(grid.tasks):
            ax = axes[row, col]
            part = frame[(frame.task == task) & (frame["mode"] == mode)]
            for method, g in part.groupby("method", sort=False):
                ax.semilogx(g.factor, g.value, marker="o", ms=2.5, lw=1, label=method)
            undamped = benchmark.evaluate(grid.runs[task, mode][:1], grid.classes(task))
            for method, style in (("Gradient dot", ":"), ("RepSim", "--")):
                ax.axhline(undamped[method][metric]["mean"], color="k", ls=style, lw=0.8,
                           label=method)  # fmt: skip
            ax.axvline(FACTOR, color="gray", lw=0.6)
            ax.set_title(f"{task} · {mode}", fontsize=8)
            if col == 0:
                ax.set_ylabel(metric)
            if row == len(grid.modes) - 1:
                ax.set_xlabel("damping / mean eigenvalue", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=6, fontsize=7)
    return fig

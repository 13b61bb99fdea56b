"""Notebooks 03-05's pipeline (influence.lab.grid) on a smoke-size zoo."""

import dataclasses
import json

import numpy as np
import pytest

from influence.lab import benchmark, grid
from influence.lab.notebook import _jsonable

TASK = "mixeds"  # 40 training examples, 2 classes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    sizes = dict(curv_examples=4, fit_examples=8, lissa_depth=2,
                 cache=tmp_path_factory.mktemp("zoo"))  # fmt: skip
    g = grid.Grid([TASK], ["lora"], [0, 1], "smoke", {TASK: ["harmful"]}, n_query=6,
                  sizes=sizes, sweep=(1e-2, 0.1, 10.0)).run()  # fmt: skip
    return g, g.table()


def test_table_levels_and_tuned(run):
    g, table = run
    assert set(table[TASK]["lora"]) == set(benchmark.METHODS)
    first = g.runs[TASK, "lora"][0]
    keep = first.query_labels == "harmful"
    share = np.mean(first.train_labels == "harmful")
    levels = g.levels(TASK)
    assert levels["chance"] == pytest.approx(share)
    k = len(first.train_labels) // 2
    assert levels["ceiling"] == pytest.approx(min(np.sum(first.train_labels == "harmful"), k) / k)
    assert keep.any() and len(g.runs[TASK, "lora"]) == 2
    assert not g.runs[TASK, "lora"][1].sweep  # the sweep runs on the first seed only
    tuned = g.tuned()[TASK]["lora"]
    assert set(tuned) == set(benchmark.DAMPED)
    for method, metrics in tuned.items():
        for metric, t in metrics.items():
            assert t["factor"] in g.sweep
            assert t["value"] >= t["fixed"] - 1e-12, (method, metric)  # 0.1 is in the sweep
    frame = g.sweep_frame()
    assert len(frame) == len(g.sweep) * len(benchmark.DAMPED) * len(grid.METRICS)


def test_winner_reads_the_metric():
    m = {"RepSim": {"auc": {"mean": 0.9}, "coverage": {"mean": 0.3}},
         "EK-FAC": {"auc": {"mean": 0.7}, "coverage": {"mean": 0.6}},
         "Gradient dot": {"auc": {"mean": 0.88}, "coverage": {"mean": 0.32}}}  # fmt: skip
    assert grid.winner(m, "auc", ["EK-FAC"]) == "RepSim"
    assert grid.winner(m, "coverage", ["EK-FAC"]) == "influence"
    assert grid.winner(m, "auc", ["EK-FAC", "Gradient dot"]) == "tie"


def test_results_are_json_and_figures_draw(run):
    g, table = run
    out = grid.results(g, table)
    text = json.dumps(_jsonable(out))
    assert "tuned" in text and out["table"][TASK]["lora"]["EK-FAC"]["ci"]["auc"][0] <= 1
    assert out["lissa"][0]["residual"] > 0
    fig = grid.plot_metrics(g, table)
    assert len(fig.axes) == len(grid.METRICS)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    ceiling = ["ceiling"] if g.levels(TASK)["ceiling"] < 1 else []
    assert sorted(legend) == sorted([*benchmark.METHODS, "chance", *ceiling])  # each once
    # A coverage ceiling below 1 (drawn in the coverage row only, here for the second task
    # only) is in the legend too, once.
    planted = dataclasses.replace(g, tasks=["a", "b"])
    planted.levels = lambda task: {"chance": 0.2, "auc_chance": 0.5,
                                   "ceiling": 1.0 if task == "a" else 0.6}  # fmt: skip
    two = {"a": table[TASK], "b": table[TASK]}
    legend = [t.get_text() for t in grid.plot_metrics(planted, two).legends[0].get_texts()]
    assert sorted(legend) == sorted([*benchmark.METHODS, "chance", "ceiling"])
    fig = grid.plot_sweep(g)
    assert fig.axes[0].get_lines()


def test_findings_are_read_from_the_results(run, capsys):
    g, table = run
    changes = grid.print_tuning(g)
    assert "tuned on the queries" in capsys.readouterr().out
    both = grid.loss_on_all(g, table, TASK)
    assert set(both) == {"response", "all"} and both["response"] is table[TASK]["lora"]
    lissa, agreement = g.lissa(), g.agreement()
    text = grid.findings(g, table, changes, lissa, agreement, both, TASK)
    cov = table[TASK]["lora"]["RepSim"]["coverage"]["mean"]
    assert f"coverage RepSim {cov:.2f}" in text
    # A planted outcome: RepSim far ahead on coverage in the only column -> RepSim wins it.
    planted = json.loads(json.dumps(table))
    planted[TASK]["lora"]["RepSim"]["coverage"]["mean"] = 2.0
    text = grid.findings(g, planted, changes, lissa, agreement, both, TASK)
    assert "**By coverage**, over the 1 (task, mode) columns: RepSim wins 1" in text
    assert "coverage RepSim 2.00" in text


def test_value_range():
    from influence.lab.notebook import value_range

    assert value_range([0.123, 0.456]) == "0.12-0.46"
    assert value_range([0.1201, 0.1249]) == "0.12"  # both ends print alike
    assert value_range((3.0, 12.0), ".0f") == "3-12"

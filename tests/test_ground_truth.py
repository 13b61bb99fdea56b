"""Notebook 11's pipeline (influence.lab.ground_truth) end to end on the smoke profile's tiny
zoo: every method scored, every measurement present and well-formed, a rerun served from the
retraining cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence.lab import ground_truth as gt
from influence.lab import retrain, zoo

torch.set_num_threads(1)

SMOKE = gt.Setting(
    "emotion", "full", "smoke", n_query=4, m=6, ensemble_seeds=(0, 1), trak_dim=64,
    tracin_checkpoints=2, removal_queries=2, random_repeats=2, loo_queries=1, loo_per_side=1,
    pbrf_pairs=1, pbrf_steps=3, margin=True,
)  # fmt: skip


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "CACHE", tmp_path / "zoo")
    monkeypatch.setattr(retrain, "CACHE", tmp_path / "retrain")


def test_pipeline_on_the_smoke_zoo(caches, monkeypatch):
    measured, queries, info = gt.attribute(SMOKE)
    n = len(gt.training_set(SMOKE))
    assert set(measured) == {"loss", "margin"}
    for scores in measured.values():
        assert set(scores) == set(gt.METHODS)
        assert all(s.shape == (len(queries), n) and np.isfinite(s).all() for s in scores.values())
    # Another measurement, other query gradients: every gradient method's scores change, and
    # RepSim's (representations, no gradient) do not.
    for method in gt.METHODS:
        same = np.allclose(measured["loss"][method], measured["margin"][method])
        assert same == (method == "RepSim"), method
    scores = measured["loss"]
    out = gt.run(SMOKE, measured, queries)
    out["pbrf"] = gt.pbrf_check(SMOKE, scores, queries, out["loo"], info["damping"])
    out["labels"] = gt.label_metrics(SMOKE, scores, queries)
    out["verdict_agreement"] = gt.verdict_agreement(out["lds"], out["labels"])
    for method in gt.METHODS:
        for v in (out["lds"][method], out["margin"]["lds"][method]):
            assert -1 <= v["ci"][0] <= v["mean"] <= v["ci"][1] <= 1
    assert out["margin"]["lds"] != out["margin"]["lds_of_loss_scores"]
    c = out["noise_ceiling"]
    assert 0 <= c["noise_free"] <= c["noise_free_seed_mean"] <= 1  # averaging seeds helps
    share = f"{SMOKE.removal_k[0]:g}"
    assert {m: out["removal"][m][share]["k"] for m in SMOKE.removal_methods} == dict.fromkeys(
        SMOKE.removal_methods, round(SMOKE.removal_k[0] * n)
    )
    assert len(out["loo"]["pairs"]) == SMOKE.loo_queries * 2 * SMOKE.loo_per_side
    assert out["pbrf"]["n"] == 1 and out["pbrf"]["pairs"][0]["steps"] <= SMOKE.pbrf_steps
    results = {"emotion": {"full": out}}
    statements = gt.verdict(results)["statements"]
    assert statements and all(s.endswith(("True", "False")) for s in statements)
    assert "Noise ceiling" in gt.findings(results, gt.METHODS)

    # Every retrain is cached: a rerun trains nothing and measures the same losses.
    def fail(*args, **kwargs):
        raise AssertionError("a rerun must not retrain")

    monkeypatch.setattr(zoo, "_fit", fail)
    again = gt.run(SMOKE, measured, queries)
    assert again["lds"] == out["lds"]

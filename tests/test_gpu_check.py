"""benchmarks/gpu_check.py run on the CPU at ``--size small``: the JSON it writes, float64
factors from bfloat16 captures, and bfloat16 scores that rank the training set as float32's do.

The script is loaded from its path, as ``python benchmarks/gpu_check.py`` runs it (benchmarks/
is not an installed package)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(what main returns, what it wrote) for one CPU run at --size small."""
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    returned = gpu_check.main(["--device", "cpu", "--size", "small", "--out", str(out)])
    return returned, json.loads(out.read_text())


def test_json_has_machine_settings_timings_and_memory(run):
    returned, written = run
    assert written == json.loads(json.dumps(returned))
    assert set(written) == {
        "machine",
        "settings",
        "timing",
        "agreement",
        "accumulation_check",
        "wall_s",
    }
    assert written["machine"]["device"] == "cpu"
    assert written["machine"]["torch"] == torch.__version__
    model = written["settings"]["timing"]
    assert model["n_train"] == gpu_check.TINY.n_train
    assert 0 < model["tracked_params"] < model["params"]  # embeddings and head not tracked
    # No TF32 on the CPU: float32 is timed, and every precision is compared with it.
    assert set(written["timing"]) == {"float32", "bf16", "autocast"}
    assert set(written["agreement"]) == {"bf16", "autocast"}
    for record in written["timing"].values():
        assert record["fit_s"] > 0 and record["score_s"] > 0
        assert record["total_s"] == pytest.approx(record["fit_s"] + record["score_s"])
        assert record["peak_fit_mb"] > 0 and record["peak_score_mb"] > 0
        assert record["factor_dtypes"] == ["torch.float64"]
    weights = {name: r["weight_dtype"] for name, r in written["timing"].items()}
    assert weights == {
        "float32": "torch.float32",
        "bf16": "torch.bfloat16",
        "autocast": "torch.float32",
    }
    # The library's dtype rule: bfloat16 (a, g) are summed into float32 gradients and scores.
    for name in ("float32", "bf16"):
        assert written["timing"][name]["grad_dtype"] == "torch.float32", name
        assert written["timing"][name]["scores_dtype"] == "torch.float32", name


def test_factors_accumulate_in_float64_from_bf16_captures(run):
    # bfloat16 inputs are exact in float64; a float32 sum would be ~1e-7 off, a bfloat16 one ~1e-3.
    check = run[1]["accumulation_check"]
    assert check["capture_dtype"] == "torch.bfloat16"
    assert check["factor_dtypes"] == ["torch.float64"]
    assert check["kfac_rel_err"] < 1e-10
    assert check["ekfac_rel_err"] < 1e-10


def test_bf16_scores_rank_the_training_set_as_float32(run):
    for name, agree in run[1]["agreement"].items():
        assert agree["spearman_min"] > 0.9, (name, agree)
        assert agree["spearman_mean"] > 0.9, (name, agree)
        assert 0.9 < agree["ratio_median"] < 1.1, (name, agree)
        assert agree["ratio_median"] != 1.0, f"{name} gave float32's very scores: not run in bf16?"


def test_agreement_of_equal_reversed_and_tied_scores():
    scores = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    same = gpu_check.agreement(scores, scores)
    assert same["spearman_min"] == pytest.approx(1.0)
    assert same["ratio_median"] == pytest.approx(1.0)
    assert same["distinct_fraction"] == 1.0
    assert gpu_check.agreement(-scores, scores)["spearman_mean"] == pytest.approx(-1.0)
    tied = scores.repeat_interleave(2, dim=1)  # every value twice
    assert gpu_check.agreement(tied, tied)["distinct_fraction"] == 0.5


def test_default_size_is_100m_on_cuda_only():
    assert gpu_check.parse_args(["--device", "cpu"]).size == "small"
    assert gpu_check.parse_args(["--device", "cpu", "--size", "100m"]).size == "100m"


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cuda"])
    assert "pass --device cpu" in capsys.readouterr().err

"""The shared damping rule (influence.damping) against its definition."""

import pytest
import torch

from influence.damping import FACTOR, damping, mean_eigenvalues


def test_mean_eigenvalues_are_trace_over_size_of_the_layer_fisher():
    gen = torch.Generator().manual_seed(0)
    grads = {
        "a": torch.randn(5, 3, 4, generator=gen),
        "b": 10 * torch.randn(5, 2, 2, generator=gen),
    }
    ref = mean_eigenvalues(grads)
    for name, g in grads.items():
        flat = g.flatten(1).double()
        fisher = flat.T @ flat / len(flat)  # (P_l, P_l)
        assert ref[name] == pytest.approx(float(torch.linalg.eigvalsh(fisher).mean()), rel=1e-12)
    assert ref["b"] > 10 * ref["a"]  # per layer, not one value for all


def test_damping_rule_factor_and_absolute():
    ref = {"a": 2.0, "b": 0.5}
    assert damping(ref) == {"a": FACTOR * 2.0, "b": FACTOR * 0.5}
    assert damping(ref, 10.0) == {"a": 20.0, "b": 5.0}
    assert damping(ref, absolute=0.3) == {"a": 0.3, "b": 0.3}
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="factor must be finite"):
            damping(ref, bad)
    with pytest.raises(ValueError, match="absolute damping"):
        damping(ref, absolute=0.0)
    with pytest.raises(ValueError, match="no gradient reached"):
        damping({"a": 0.0})
    with pytest.raises(ValueError, match="expected"):
        mean_eigenvalues({"a": torch.zeros(0, 2, 2)})

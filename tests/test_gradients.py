"""Per-example gradients against an autograd loop over single unpadded sequences."""

import pytest
import torch
from conftest import make_batch, split_batch, unpad
from transformers.pytorch_utils import Conv1D

from influence.gradients import (
    capture,
    collect_grads,
    grads_from_pairs,
    iter_captures,
    per_example_grads,
    sample_labels,
)
from influence.lm import IGNORE, sequence_losses
from influence.modules import find_layers


def autograd_grads(model, layers, batch, labels=None):
    """Oracle: d L / d [W | b] of a one-sequence batch by plain autograd, canonical layout."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = sequence_losses(logits, batch["labels"] if labels is None else labels).sum()
    out = {}
    for name, m in layers.items():
        params = [m.weight] + ([m.bias] if m.bias is not None else [])
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        w = grads[0].T if isinstance(m, Conv1D) else grads[0]
        out[name] = torch.cat([w, grads[1][:, None]], dim=1) if m.bias is not None else w
    return out


def test_per_example_grads_match_autograd_loop(tiny_model, batch):
    # One padded batch gives each sequence the gradient it has alone, without padding.
    layers = find_layers(tiny_model)
    grads = per_example_grads(tiny_model, batch, layers=layers)
    for i in range(batch["input_ids"].shape[0]):
        expected = autograd_grads(tiny_model, layers, unpad(batch, i))
        for name in layers:
            assert grads[name][i].abs().sum() > 0
            torch.testing.assert_close(grads[name][i], expected[name], rtol=1e-10, atol=1e-12)


def test_padding_and_batch_composition_do_not_change_grads(tiny_model):
    # Extra right padding and other batch sizes give the same per-example gradients.
    layers = find_layers(tiny_model)
    tight = make_batch([7, 5, 3, 6, 4])
    padded = make_batch([7, 5, 3, 6, 4], pad_to=14)
    ref = per_example_grads(tiny_model, tight, layers=layers)
    for grads in (
        per_example_grads(tiny_model, padded, layers=layers),
        collect_grads(tiny_model, split_batch(padded, 2), layers=layers, progress=False),
    ):
        for name in layers:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-10, atol=1e-12)


def test_padding_positions_have_zero_output_grad(gpt2):
    cap = capture(gpt2, find_layers(gpt2), make_batch([5, 3], pad_to=8))
    for g in cap.g.values():
        assert torch.all(g[~cap.mask] == 0)
    assert cap.mask.sum() == 8


def test_grads_from_pairs_is_sum_of_outer_products():
    a, g = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    expected = sum(torch.outer(g[1, t], a[1, t]) for t in range(3))
    torch.testing.assert_close(grads_from_pairs(a, g)[1], expected)


def test_sampled_labels_only_at_counted_positions_and_seeded():
    labels = make_batch([6, 4])["labels"]
    logits = torch.randn(2, 6, 32, dtype=torch.float64)
    first = sample_labels(logits, labels, torch.Generator().manual_seed(3))
    again = sample_labels(logits, labels, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert torch.equal(first == IGNORE, labels == IGNORE)
    # A near-deterministic predictive distribution is sampled at its mode.
    peaked = torch.full((2, 6, 32), -1e4, dtype=torch.float64)
    peaked[..., 7] = 0
    sampled = sample_labels(peaked, labels, torch.Generator().manual_seed(0))
    assert torch.all(sampled[labels != IGNORE] == 7)


def test_true_fisher_grads_use_the_sampled_labels(llama, batch):
    # The true-Fisher capture is the gradient of the loss on labels drawn with the same seed.
    layers = find_layers(llama, include="mlp")
    (cap,) = iter_captures(llama, layers, [batch], fisher="true", seed=5, progress=False)
    logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = sample_labels(logits, batch["labels"], torch.Generator().manual_seed(5 * 1_000_003))
    assert not torch.equal(labels, batch["labels"])
    expected = autograd_grads(llama, layers, {**batch, "labels": labels})
    for name in layers:
        got = grads_from_pairs(cap.a[name], cap.g[name]).sum(0)
        torch.testing.assert_close(got, expected[name], rtol=1e-10, atol=1e-12)


def test_collect_grads_with_sampled_labels(llama, batch):
    # Per sequence, the gradient of the loss on the labels drawn with the seed of batch 0.
    layers = find_layers(llama, include="mlp")
    got = collect_grads(llama, [batch], layers=layers, progress=False, fisher="true", seed=5)
    logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = sample_labels(logits, batch["labels"], torch.Generator().manual_seed(5 * 1_000_003))
    for row in range(batch["input_ids"].shape[0]):
        one = {k: v[row : row + 1] for k, v in {**batch, "labels": labels}.items()}
        expected = autograd_grads(llama, layers, one)
        for name in layers:
            torch.testing.assert_close(got[name][row], expected[name], rtol=1e-10, atol=1e-12)


def test_unknown_fisher_is_an_error(gpt2, batch):
    with pytest.raises(ValueError, match="'exact'"):
        capture(gpt2, find_layers(gpt2), batch, fisher="exact")


def test_nan_weights_are_a_clear_error_not_silent_nan_factors(gpt2, batch):
    # A NaN anywhere upstream must stop the kernels with the layers named, before any fit.
    layers = find_layers(gpt2)
    with torch.no_grad():
        gpt2.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        per_example_grads(gpt2, batch, layers=layers)


def test_finite_check_catches_nan_and_inf_and_not_large_half_sums():
    from influence.gradients import _finite

    x = torch.randn(4, 8, 16)
    assert _finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 2, 3] = bad
        assert not _finite(y)
    both = x.clone()
    both[0, 0, 0], both[0, 0, 1] = float("inf"), float("-inf")  # sums to NaN: still caught
    assert not _finite(both)
    big = torch.full((64, 64, 64), 60000.0, dtype=torch.float16)  # finite; its fp16 sum is not
    assert _finite(big)

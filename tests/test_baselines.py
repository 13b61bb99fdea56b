"""RepSim and gradient cosine against hand-computed cosines on tiny float64 models; TRAK against
the dense empirical-Fisher influence, TracIn against a loop."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rel, make_batch, make_gpt2_lora, unpad
from transformers.pytorch_utils import Conv1D

from influence.baselines import (
    cosine_scores,
    gradient_cosine_from_grads,
    gradient_cosine_scores,
    hidden_states,
    last_token_index,
    repsim_scores,
    tracin_scores,
    trak_scores,
)
from influence.gradients import collect_grads
from influence.lm import sequence_losses
from influence.modules import find_layers, flatten


def autograd_flat_grad(model, layers, batch) -> torch.Tensor:
    """Oracle: the gradient of a one-sequence batch's loss, canonical layout, flattened."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = sequence_losses(logits, batch["labels"]).sum()
    parts = []
    for m in layers.values():
        params = [m.weight] + ([m.bias] if m.bias is not None else [])
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        w = grads[0].T if isinstance(m, Conv1D) else grads[0]
        parts.append(
            (torch.cat([w, grads[1][:, None]], dim=1) if m.bias is not None else w).flatten()
        )
    return torch.cat(parts)


def test_gradient_cosine_equals_cosine_of_autograd_gradients(tiny_model):
    layers = find_layers(tiny_model)
    queries, train = make_batch([7, 5], seed=2), make_batch([8, 4, 6], seed=1)
    scores = gradient_cosine_scores(tiny_model, train, queries, layers=layers)  # (2, 3)
    q = torch.stack([autograd_flat_grad(tiny_model, layers, unpad(queries, i)) for i in range(2)])
    t = torch.stack([autograd_flat_grad(tiny_model, layers, unpad(train, j)) for j in range(3)])
    expected = torch.nn.functional.cosine_similarity(q[:, None], t[None], dim=-1)
    assert scores.shape == (2, 3)
    assert torch.allclose(scores, expected, rtol=0, atol=1e-12)


def test_scores_are_cosines_and_one_on_identical_examples(tiny_model):
    batch = make_batch([8, 4, 6, 7], seed=1)
    for scores in (
        repsim_scores(tiny_model, batch, batch),
        gradient_cosine_scores(tiny_model, batch, batch, layers=find_layers(tiny_model)),
    ):
        assert scores.shape == (4, 4)
        assert (scores.abs() <= 1).all()
        assert torch.allclose(scores.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-12)
        assert (scores - torch.eye(4, dtype=torch.float64)).abs().max() > 1e-3  # not trivial


def test_repsim_reads_the_last_non_padding_token(gpt2):
    # Right padding must not move the representation: the padded batch's states equal those
    # of each sequence run alone, at its last position; hidden_states[-1] is after ln_f.
    batch = make_batch([8, 4, 6], seed=1)
    states = hidden_states(gpt2, batch)
    for i in range(3):
        alone = unpad(batch, i)
        with torch.no_grad():
            h = gpt2.transformer(alone["input_ids"]).last_hidden_state[0, -1]
        assert torch.allclose(states[i], h, rtol=0, atol=1e-12)
    expected = cosine_scores(states[:1], states)
    assert torch.equal(repsim_scores(gpt2, batch, {k: v[:1] for k, v in batch.items()}), expected)


def test_hidden_state_layer_and_mean_position(gpt2):
    batch = make_batch([8, 4], seed=1)
    embeddings = hidden_states(gpt2, batch, layer=0, position="mean")
    with torch.no_grad():
        h0 = gpt2(
            **{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True
        )
    h0 = h0.hidden_states[0]
    assert torch.allclose(embeddings[1], h0[1, :4].mean(0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        hidden_states(gpt2, batch, layer=10)
    with pytest.raises(ValueError, match="position"):
        hidden_states(gpt2, batch, position="first")


def test_last_token_index_with_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 0]
    with pytest.raises(ValueError, match="no non-padding token"):
        last_token_index(torch.tensor([[0, 0]]))


def test_cosine_of_a_zero_vector_is_zero_and_shapes_are_checked():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    assert cosine_scores(a, b).tolist() == [[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]]
    with pytest.raises(ValueError, match="features"):
        cosine_scores(a, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="differ"):
        gradient_cosine_from_grads({"x": torch.zeros(1, 2, 2)}, {"y": torch.zeros(1, 2, 2)})


# ---- TRAK and TracIn --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_grads():
    """Flat gradients of one LoRA adapter (P = 96) for N = 128 > P training sequences and 3
    queries, so that G^T G is invertible. (Not lora_A: its inputs, LayerNorm outputs with
    beta = 0, have zero mean, so its gradients span 30 of its 32 dimensions.)"""
    model = make_gpt2_lora()
    layers = find_layers(model, include=r"h\.0\..*lora_B")
    train = make_batch([4 + i % 5 for i in range(128)], seed=1)
    queries = make_batch([7, 5, 6], seed=2)
    grads = [
        flatten(collect_grads(model, b, layers=layers, progress=False)) for b in (train, queries)
    ]
    return grads[0], grads[1]  # (128, 96), (3, 96)


def test_trak_with_dim_p_and_no_damping_is_the_empirical_fisher_influence(lora_grads):
    # With R square and invertible the projection cancels: Q R (R^T G^T G R)^{-1} R^T G^T
    # = Q (G^T G)^{-1} G^T = Q G^+ (pinv: the rounding of cond(G) ~ 4e3, not of cond(G)^2).
    g, q = lora_grads
    expected = q @ torch.linalg.pinv(g)  # (3, 128)
    assert_rel(q @ torch.linalg.solve(g.T @ g, g.T), expected, 1e-9)  # the definition
    for seed in range(3):
        assert_rel(trak_scores([g], [q], dim=g.shape[1], damping=0.0, seed=seed), expected, 1e-11)
    # dim > P: K is singular without damping; as damping -> 0 the scores tend to the same
    # limit, at an error O(damping / sigma_min(G R)^2) (1.4e-5 here).
    lam = 1e-10 * float((g.T @ g).trace()) / (3 * g.shape[1])
    assert_rel(trak_scores([g], [q], dim=3 * g.shape[1], damping=lam), expected, 1e-4)
    with pytest.raises(ValueError, match="singular"):
        trak_scores([g], [q], dim=3 * g.shape[1], damping=0.0)


def test_trak_averages_models_projected_with_seed_plus_s(lora_grads):
    g, q = lora_grads
    pair = trak_scores([g, g], [q, q], dim=8, seed=3)
    single = [trak_scores([g], [q], dim=8, seed=s) for s in (3, 4)]
    assert_rel(pair, (single[0] + single[1]) / 2, 1e-13)
    # Where the projection cancels (dim = P, no damping) two identical models equal one.
    exact = trak_scores([g], [q], dim=g.shape[1], damping=0.0)
    assert_rel(trak_scores([g, g], [q, q], dim=g.shape[1], damping=0.0), exact, 1e-10)


def test_trak_is_reproducible_for_a_seed(lora_grads):
    g, q = lora_grads
    assert torch.equal(trak_scores([g], [q], dim=8), trak_scores([g], [q], dim=8))
    assert (trak_scores([g], [q], dim=8) - trak_scores([g], [q], dim=8, seed=1)).abs().max() > 1e-6


def test_trak_is_not_gradient_dot_when_the_fisher_is_anisotropic():
    # Planted: training gradients vary 100x more along e0 than along e1. The query (1, 1, 0..)
    # has the larger dot product with z0 = 10 e0, but the Fisher-weighted score prefers
    # z1 = 0.1 e1, whose direction the other examples rarely move.
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(40, 6, dtype=torch.float64, generator=gen)
    g[:, 0] *= 10.0
    g[:, 1] *= 0.1
    g[0], g[1] = 10.0 * torch.eye(6)[0], 0.1 * torch.eye(6)[1]
    q = torch.tensor([[1.0, 1.0, 0, 0, 0, 0]], dtype=torch.float64)
    dot = q @ g.T
    trak = trak_scores([g], [q], dim=64)
    assert dot[0, 0] > 50 * dot[0, 1]
    assert trak[0, 1] > 5 * trak[0, 0]


def test_trak_and_tracin_check_their_inputs(lora_grads):
    g, q = lora_grads
    with pytest.raises(ValueError, match="2 models"):
        trak_scores([g, g], [q])
    with pytest.raises(ValueError, match="same P"):
        trak_scores([g], [q[:, :5]])
    with pytest.raises(ValueError, match="same N, Q, P"):
        trak_scores([g, g[:10]], [q, q])
    with pytest.raises(ValueError, match="dim"):
        trak_scores([g], [q], dim=0)
    with pytest.raises(ValueError, match="lrs has 1 values for 2 checkpoints"):
        tracin_scores([g, g], [q, q], [0.1])


def test_tracin_is_the_lr_weighted_sum_of_gradient_dots(lora_grads):
    g, q = lora_grads
    gen = torch.Generator().manual_seed(0)
    checkpoints = [
        (g, q),
        (g * 0.5 + 0.01, q - 0.02),
        (torch.randn(g.shape, generator=gen).double(), q),
    ]
    lrs = [1e-3, 5e-4, 2e-4]
    expected = torch.zeros(3, 128, dtype=torch.float64)
    for lr, (gc, qc) in zip(lrs, checkpoints, strict=True):
        for i in range(3):
            for j in range(128):
                expected[i, j] += lr * torch.dot(qc[i], gc[j])
    scores = tracin_scores([c[0] for c in checkpoints], [c[1] for c in checkpoints], lrs)
    assert_rel(scores, expected, 1e-13)

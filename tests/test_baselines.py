"""RepSim and gradient cosine against hand-computed cosines on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, unpad
from transformers.pytorch_utils import Conv1D

from influence.baselines import (
    cosine_scores,
    gradient_cosine_from_grads,
    gradient_cosine_scores,
    hidden_states,
    last_token_index,
    repsim_scores,
)
from influence.lm import sequence_losses
from influence.modules import find_layers


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

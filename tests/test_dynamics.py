"""Parameter and behaviour change (influence.lab.dynamics) against exact float64 oracles."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_rel, make_batch, make_gpt2, make_gpt2_lora, split_batch

from influence.lab.dynamics import first_reach, response_kl, weight_deltas


def test_lora_delta_is_b_a_scaled_and_reproduces_the_adapted_model():
    model = make_gpt2_lora()
    deltas = weight_deltas(model)
    assert sorted(deltas) == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]
    base = make_gpt2()  # the same seed: the weights the adapters were added to
    batch = make_batch([9, 6, 4, 7])
    for i in range(2):
        layer = model.base_model.model.transformer.h[i].attn.c_attn
        a = layer.lora_A["default"].weight.detach()  # (r, in)
        b = layer.lora_B["default"].weight.detach()  # (out, r)
        # Conv1D stores W as (in, out): delta W = (B A)^T * alpha / r, alpha = 4, r = 2
        assert_rel(deltas[f"transformer.h.{i}.attn.c_attn.weight"], (b @ a).T * 2.0)
        with torch.no_grad():
            base.transformer.h[i].attn.c_attn.weight += deltas[
                f"transformer.h.{i}.attn.c_attn.weight"
            ]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        assert_rel(base(**inputs).logits, model(**inputs).logits)


def test_full_delta_is_the_difference_to_the_reference():
    model = make_gpt2()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight += 0.5
    deltas = weight_deltas(model, reference)
    assert set(deltas) == set(reference)
    for name, delta in deltas.items():
        expected = 0.5 if name == "transformer.h.0.mlp.c_fc.weight" else 0.0
        assert torch.equal(delta, torch.full_like(delta, expected))
    with pytest.raises(ValueError, match="unknown parameters"):
        weight_deltas(model, {"nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no LoRA layer"):
        weight_deltas(model)


def test_response_kl_matches_a_loop_over_counted_tokens():
    p, q = make_gpt2(0), make_gpt2(1)
    batch = make_batch([9, 6, 4, 7])
    got = response_kl(p, q, split_batch(batch, 3))  # two batches: order kept
    expected = []
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i : i + 1, :n]
        with torch.no_grad():
            lp, lq = p(input_ids=ids).logits[0], q(input_ids=ids).logits[0]  # unpadded
        terms = []
        for t in range(n - 1):
            if batch["labels"][i, t + 1] == -100:  # the next token is not counted
                continue
            pp, qq = torch.softmax(lp[t], -1), torch.softmax(lq[t], -1)
            terms.append(sum(pp[v] * torch.log(pp[v] / qq[v]) for v in range(len(pp))))
        expected.append(torch.stack(terms).mean())
    assert_rel(got, torch.stack(expected), tol=1e-9)
    assert (got > 0).all()
    assert torch.equal(response_kl(p, copy.deepcopy(p), [batch]), torch.zeros(4, dtype=got.dtype))


def test_first_reach_is_the_start_of_the_plateau():
    steps = [0, 10, 20, 40, 80]
    assert first_reach(steps, [0.0, 0.5, 0.96, 0.97, 1.0]) == 20
    assert first_reach(steps, [0.0, 0.97, 0.5, 0.96, 1.0]) == 40  # a dip moves it past the dip
    assert first_reach(steps, [0.0, 0.1, 0.2, 0.3, 1.0]) == 80
    assert first_reach(steps, [0.0, 0.5, 0.5, 0.5, 1.0], share=0.5) == 10
    with pytest.raises(ValueError):
        first_reach(steps, [1.0])

"""The class margin (influence.lab.behaviour) and its query gradient against float64 autograd, on
the smoke profile's emotion fine-tune (5 classes, multi-token responses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from influence.lab import behaviour, benchmark, zoo
from influence.lab.tokenizer import make_batches
from influence.lm import sequence_losses

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def emotion(tmp_path_factory):
    path = zoo.build("gpt2-emotion-full", "smoke", cache=tmp_path_factory.mktemp("zoo"))
    model, tok, layers = benchmark.load(path, "full", full_layers=r"attn\.c_(attn|proj)|mlp")
    train = zoo.task_examples("emotion", "train")
    queries = zoo.task_examples("emotion", "test")[:3]
    return model.double(), tok, layers, behaviour.class_responses(train), queries


def _log_prob(model, tok, prompt: str, response: str) -> torch.Tensor:
    """log p(response + eos | prompt) of one unpadded sequence, differentiable."""
    batch = make_batches(tok, [{"prompt": prompt, "response": response}], 1)[0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return -sequence_losses(logits, batch["labels"])[0]


def _oracle(model, tok, query, responses) -> torch.Tensor:
    """m_q by its definition, one sequence at a time: log p_y - log sum_{c != y} p_c."""
    logp = {label: _log_prob(model, tok, query["prompt"], r) for label, r in responses.items()}
    rest = torch.logsumexp(torch.stack([v for k, v in logp.items() if k != query["label"]]), 0)
    return logp[query["label"]] - rest


def test_class_responses_and_errors():
    train = zoo.task_examples("emotion", "train")
    responses = behaviour.class_responses(train)
    assert sorted(responses) == sorted({ex["label"] for ex in train})
    with pytest.raises(ValueError, match="one response per label"):
        behaviour.class_responses([*train, {**train[0], "response": " elation"}])
    with pytest.raises(ValueError, match="at least 2 labels"):
        behaviour.class_responses(train[:1])


def test_margins_match_their_definition(emotion):
    model, tok, _, responses, queries = emotion
    got = behaviour.margins(model, tok, queries, responses)
    with torch.no_grad():
        expected = np.array([_oracle(model, tok, q, responses).item() for q in queries])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="outside the classes"):
        behaviour.margins(model, tok, [{**queries[0], "label": "awe"}], responses)


def test_margin_grads_match_autograd(emotion):
    # The combination of the K candidates' loss gradients is the gradient of -m_q itself.
    model, tok, layers, responses, queries = emotion
    got = behaviour.margin_grads(model, tok, layers, queries, responses, batch_size=4)
    loss_g = benchmark.collect_grads(
        model, make_batches(tok, queries, 4), layers=layers, progress=False
    )
    for i, query in enumerate(queries):
        m = -_oracle(model, tok, query, responses)
        for name, module in layers.items():
            params = [module.weight] + ([module.bias] if module.bias is not None else [])
            grads = torch.autograd.grad(m, params, retain_graph=True)
            w = grads[0].T if isinstance(module, Conv1D) else grads[0]  # canonical (d_out, d_in)
            expected = torch.cat([w, grads[1][:, None]], dim=1) if len(grads) == 2 else w
            torch.testing.assert_close(got[name][i], expected, rtol=1e-8, atol=1e-10)
            assert not torch.allclose(got[name][i], loss_g[name][i])  # not the loss's gradient


def test_with_queries_rescores_only_what_reads_the_queries(emotion):
    model, tok, layers, responses, queries = emotion
    train = zoo.task_examples("emotion", "train")[:12]
    prep = benchmark.prepare(model.float(), tok, layers, train, queries, fit_examples=8,
                             curv_examples=4, lissa_depth=2)  # fmt: skip
    model.double()
    same = benchmark.with_queries(prep, prep.query_g)
    for method in benchmark.METHODS:
        np.testing.assert_array_equal(
            benchmark.method_scores(same, method), benchmark.method_scores(prep, method)
        )
    other = {n: g.flip(0) for n, g in prep.query_g.items()}  # the queries in reverse order
    flipped = benchmark.with_queries(prep, other)
    for method in benchmark.METHODS:
        expected = benchmark.method_scores(prep, method)
        expected = expected if method == "RepSim" else expected[::-1]
        np.testing.assert_allclose(benchmark.method_scores(flipped, method), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="query gradients of shapes"):
        benchmark.with_queries(prep, {n: g[..., :-1] for n, g in prep.query_g.items()})

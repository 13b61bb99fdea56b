"""Paper B's benchmark driver on a smoke-size zoo: scores against explicit gradient products."""

import numpy as np
import pytest
import torch

from influence.gradients import collect_grads
from influence.lab import benchmark, zoo
from influence.lab.tasks import load_task
from influence.lab.tokenizer import make_batch, make_batches
from influence.lm import sequence_losses
from influence.modules import find_layers, flatten

TASK = "mixeds"  # 40 training examples, 2 classes


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo")
    out = benchmark.task_scores(TASK, "lora", 0, "smoke", n_query=6, curv_examples=4,
                                fit_examples=8, lissa_depth=2, cache=cache)  # fmt: skip
    return out, cache


def explicit_grads(model, tok, examples) -> torch.Tensor:
    """(n, P) gradient of each example's summed response loss w.r.t. the LoRA weights, one
    autograd call per example (no hooks, no per-example tricks)."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    rows = []
    for ex in examples:
        batch = make_batch(tok, [ex])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        grads = torch.autograd.grad(sequence_losses(logits, batch["labels"]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def test_identity_scores_are_gradient_dot_products(result):
    out, cache = result
    path = benchmark.model_path(TASK, "lora", 0, "smoke", cache=cache)
    model, tok = zoo.load_model(path), zoo.load_tokenizer(path)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    train = load_task(TASK, "train")
    queries = [ex for ex in load_task(TASK, "test") if ex["id"] in out.info["queries"]]
    q, t = explicit_grads(model, tok, queries), explicit_grads(model, tok, train)
    dot = (q @ t.T).numpy()
    np.testing.assert_allclose(
        out.scores["Gradient dot"], dot, rtol=1e-4, atol=1e-6 * abs(dot).max()
    )
    np.testing.assert_allclose(out.train_grad_norms, t.norm(dim=1).numpy(), rtol=1e-4)
    cos = dot / np.outer(q.norm(dim=1).numpy(), t.norm(dim=1).numpy())
    np.testing.assert_allclose(out.scores["Gradient cosine"], cos, atol=1e-5)
    # Paper B's published LiSSA is the gradient dot product times (iterations + 1) = 4, up to
    # O(|G| / 1000) (large at the smoke model's random-init gradients, hence a few percent).
    gap = np.linalg.norm(out.scores["LiSSA as published"] - 4 * dot) / np.linalg.norm(4 * dot)
    assert gap < 0.05, gap


def test_exact_is_a_dense_solve_of_the_sampled_fisher(result):
    # Exact = g_q^T (F + lam I)^{-1} g_z with F = (1/N) sum_i s_i s_i^T over the sampled-label
    # gradients of all N training sequences, lam = 0.1 tr(F) / P: checked by a dense solve.
    out, cache = result
    path = benchmark.model_path(TASK, "lora", 0, "smoke", cache=cache)
    model, tok = zoo.load_model(path, trainable="lora_"), zoo.load_tokenizer(path)
    layers = find_layers(model, include="lora_")
    train = make_batches(tok, load_task(TASK, "train"), 32)
    queries = [ex for ex in load_task(TASK, "test") if ex["id"] in out.info["queries"]]
    s = flatten(
        collect_grads(model, train, layers=layers, progress=False, fisher="true", seed=0)
    ).double()
    t = flatten(collect_grads(model, train, layers=layers, progress=False)).double()
    q = flatten(
        collect_grads(model, make_batches(tok, queries, 32), layers=layers, progress=False)
    ).double()
    fisher = s.T @ s / len(s)
    lam = 0.1 * fisher.trace() / len(fisher)
    eye = torch.eye(len(fisher), dtype=torch.float64)
    expected = (torch.linalg.solve(fisher + lam * eye, q.T).T @ t.T).numpy()
    np.testing.assert_allclose(
        out.scores["Exact"], expected, rtol=1e-6, atol=1e-9 * abs(expected).max()
    )
    assert not np.allclose(out.scores["Exact"], out.scores["Gradient dot"] / lam.item(), rtol=0.1)


def test_shapes_labels_and_queries_line_up(result):
    out, _ = result
    train, test = load_task(TASK, "train"), load_task(TASK, "test")
    assert out.train_labels.tolist() == [ex["label"] for ex in train]
    by_id = {ex["id"]: ex["label"] for ex in test}
    assert out.query_labels.tolist() == [by_id[i] for i in out.info["queries"]]
    assert len(out.query_labels) == 6
    assert set(out.scores) == set(benchmark.METHODS)
    for name, s in out.scores.items():
        assert s.shape == (6, len(train)), name
        assert np.isfinite(s).all(), name
    assert np.abs(out.scores["RepSim"]).max() <= 1.0
    assert (out.train_lengths > 0).all()


def test_select_queries_balances_and_drops_unknown_classes():
    test = [{"label": c, "id": f"{c}{i}"} for c in "aabbbz" for i in range(2)]
    chosen = benchmark.select_queries(test, ["a", "b"], n_query=4)
    assert [ex["label"] for ex in chosen] == ["a", "b", "a", "b"]
    assert all(ex["label"] != "z" for ex in benchmark.select_queries(test, ["a", "b"], None))

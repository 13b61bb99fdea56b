"""Paper B's benchmark driver on a smoke-size zoo: scores against explicit gradient products."""

import numpy as np
import pytest
import torch

from influence import solvers
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
                                fit_examples=8, lissa_depth=2, cache=cache, sweep=(0.1, 10.0))  # fmt: skip
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


def test_mc_fisher_is_a_dense_solve_with_the_shared_damping(result):
    # MC Fisher = g_q^T (F + D)^{-1} g_z with F = (1/N) sum_i s_i s_i^T over the sampled-label
    # gradients of all N training sequences and D = 0.1 tr(F_l) / P_l on layer l (the rule every
    # damped method shares): checked by a dense solve.
    out, cache = result
    path = benchmark.model_path(TASK, "lora", 0, "smoke", cache=cache)
    model, tok = zoo.load_model(path, trainable="lora_"), zoo.load_tokenizer(path)
    layers = find_layers(model, include="lora_")
    train = make_batches(tok, load_task(TASK, "train"), 32)
    queries = [ex for ex in load_task(TASK, "test") if ex["id"] in out.info["queries"]]
    sampled = collect_grads(model, train, layers=layers, progress=False, fisher="true", seed=0)
    s = flatten(sampled).double()
    t = flatten(collect_grads(model, train, layers=layers, progress=False)).double()
    q = flatten(
        collect_grads(model, make_batches(tok, queries, 32), layers=layers, progress=False)
    ).double()
    fisher = s.T @ s / len(s)
    lam = torch.cat(
        [torch.full((g[0].numel(),), 0.1 * float(g.double().pow(2).sum()) / g.numel())
         for g in sampled.values()]
    ).double()  # fmt: skip
    assert lam.unique().numel() == len(sampled)  # one value per layer, not one for all
    assert np.allclose([out.info["damping"][n] for n in sampled], lam.unique_consecutive())
    expected = (torch.linalg.solve(fisher + torch.diag(lam), q.T).T @ t.T).numpy()
    # The solve is float64; the benchmark contracts its output with the float32 training
    # gradients in float32 (Prepared.score: half the memory), hence float32 round-off here.
    np.testing.assert_allclose(
        out.scores["MC Fisher"], expected, rtol=1e-4, atol=1e-6 * abs(expected).max()
    )
    # The sweep's factor 0.1 is the fixed rule; another factor gives other scores.
    np.testing.assert_allclose(out.sweep["MC Fisher"][0.1], out.scores["MC Fisher"], rtol=1e-5)
    assert not np.allclose(out.sweep["MC Fisher"][10.0], out.scores["MC Fisher"], rtol=0.1)


def test_every_damped_method_gets_the_same_damping(result, monkeypatch):
    # Record the damping each solver is built with at the fixed rule: one dict for all.
    out, cache = result
    seen = {}
    real = {"DataInf": solvers.DataInf, "LiSSA": solvers.LiSSA}

    def spy(name):
        def make(*args, damping, **kwargs):
            seen[name] = damping
            return real[name](*args, damping=damping, **kwargs)

        return make

    monkeypatch.setattr(solvers, "DataInf", spy("DataInf"))
    monkeypatch.setattr(solvers, "LiSSA", spy("LiSSA"))
    again = benchmark.task_scores(TASK, "lora", 0, "smoke", n_query=6, curv_examples=4,
                                  fit_examples=8, lissa_depth=2, cache=cache,
                                  methods=("DataInf", "LiSSA"))  # fmt: skip
    assert seen["DataInf"] == seen["LiSSA"] == out.info["damping"] == again.info["damping"]
    np.testing.assert_array_equal(again.scores["DataInf"], out.scores["DataInf"])
    assert out.info["lissa_residual"] > 0 and out.info["lissa_steps_to_1e6"] > 2


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


def test_absolute_damping_is_one_value_on_every_layer(result):
    # Notebook 06 sweeps one absolute damping x I for every method: the Monte-Carlo Fisher's
    # exact inverse at x I is the dense solve, and the rule's factor is then ignored.
    out, cache = result
    path = benchmark.model_path(TASK, "lora", 0, "smoke", cache=cache)
    model, tok, layers = benchmark.load(path, "lora")
    train = load_task(TASK, "train")
    queries = [ex for ex in load_task(TASK, "test") if ex["id"] in out.info["queries"]]
    prep = benchmark.prepare(model, tok, layers, train, queries, curv_examples=4, fit_examples=8,
                             lissa_depth=2, methods=("MC Fisher", "EK-FAC"))  # fmt: skip
    x = 0.37 * float(np.mean(list(prep.reference.values())))
    assert prep.damping(0.1, absolute=x) == dict.fromkeys(prep.reference, x)
    u, t = prep.fisher.u, prep.train_flat.double()  # sampled-label rows (n, P), training grads
    q = flatten(prep.query_g).double()
    fisher = u.T @ u / len(u)
    eye = torch.eye(len(fisher), dtype=torch.float64)
    expected = (torch.linalg.solve(fisher + x * eye, q.T).T @ t.T).numpy()
    got = benchmark.method_scores(prep, "MC Fisher", absolute=x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * abs(expected).max())
    rule = benchmark.method_scores(prep, "MC Fisher")  # the per-layer rule: other scores
    assert not np.allclose(rule, got, rtol=1e-2)
    ekfac = benchmark.method_scores(prep, "EK-FAC", absolute=x)
    np.testing.assert_array_equal(ekfac, benchmark.method_scores(prep, "EK-FAC", 5.0, absolute=x))
    damped = prep.ekfac.with_damping(dict.fromkeys(prep.reference, x))
    np.testing.assert_array_equal(ekfac, prep.score(damped.ihvp(prep.query_g)))

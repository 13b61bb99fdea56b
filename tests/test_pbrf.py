"""PBRF against the exact damped-GGN influence on a tiny float64 GPT-2 (its first-order term),
its objective's derivatives at theta_s, and the model left untouched."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_rel, make_batch, make_gpt2, make_gpt2_lora
from torch.nn.attention import SDPBackend, sdpa_kernel

from influence.ggn import GGN
from influence.gradients import per_example_grads
from influence.lab.pbrf import PBRF, lbfgs, pbrf_response, pbrf_scores
from influence.lm import sequence_losses
from influence.modules import find_layers, flatten
from influence.solvers import Exact, relative_damping

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def problem():
    """GPT-2, one tracked layer (P = 272, weight and bias), 6 training sequences, 3 queries,
    the first 2 training sequences as the examples; damping = 1 x the GGN's mean eigenvalue."""
    model = make_gpt2()
    layers = find_layers(model, include="h.0.attn.c_proj")
    train = make_batch([8, 5, 7, 4, 6, 8], seed=1)
    queries = make_batch([7, 6, 9], seed=2)
    examples = {k: v[:2] for k, v in train.items()}
    ggn = GGN(model, layers, train)
    lam = relative_damping(1.0, ggn, per_layer=False)
    pre = Exact.from_ggn(ggn, lam).ihvp(per_example_grads(model, examples, layers=layers))
    influence = flatten(per_example_grads(model, queries, layers=layers)) @ flatten(pre).T
    return model, layers, train, queries, examples, next(iter(lam.values())), influence


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_pbrf_scores_at_small_epsilon_are_the_damped_ggn_influence(problem):
    # score(eps) = s + c eps + O(eps^2), s = g_q^T (G + lam)^{-1} g_m: one-sided errors are
    # O(eps) (6.2e-5 at |eps| = 1e-6: the response is strongly nonlinear, ~60 |eps|), the
    # mean of +eps and -eps is O(eps^2) (7.7e-9, at the optimiser's tol = 1e-9).
    model, layers, train, queries, examples, lam, influence = problem
    plus, minus = (
        pbrf_scores(model, layers, train, examples, queries, damping=lam, epsilon=e, tol=1e-9)
        for e in (1e-6, -1e-6)
    )
    assert plus.shape == (3, 2)
    assert rel(minus, influence) < 2e-4
    assert rel(plus, influence) < 2e-4
    assert rel((plus + minus) / 2, influence) < 1e-7


def test_objective_is_zero_with_gradient_eps_grad_loss_at_theta_s(problem):
    # The divergence and the proximal term are 0 with zero gradient at theta_s, so the
    # gradient is eps grad L(z_m) (native layouts: Conv1D weight (d_in, d_out), then bias).
    model, layers, train, _, examples, lam, _ = problem
    pbrf, eps = PBRF(model, layers, train, lam), -0.3
    example = pbrf.batches({k: v[:1] for k, v in examples.items()})
    theta = pbrf.theta_s.clone().requires_grad_()
    assert float(pbrf.divergence(theta).detach()) == 0.0
    (grad,) = torch.autograd.grad(pbrf.objective(theta, example, eps), theta)
    params = [p for m in layers.values() for p in (m.weight, m.bias)]
    batch = example[0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.autograd.grad(sequence_losses(logits, batch["labels"]).sum(), params)
    assert_rel(grad, eps * torch.cat([g.flatten() for g in expected]), 1e-12)


def test_divergence_hessian_at_theta_s_is_the_ggn():
    # The Hessian of (1/N) sum_i D_i at theta_s is GGN.dense(): the same normalisation (per
    # sequence). LoRA adapters, passed as a parameter list: nn.Linear without bias, so the
    # native and canonical layouts agree.
    model = make_gpt2_lora()
    layers = find_layers(model)
    train = make_batch([8, 5, 7, 4, 6, 8], seed=1)
    pbrf = PBRF(model, [m.weight for m in layers.values()], train, damping=0.0)
    ggn = GGN(model, layers, train)
    v = torch.randn(ggn.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    theta = pbrf.theta_s.clone().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention has no second derivative
        (grad,) = torch.autograd.grad(pbrf.divergence(theta), theta, create_graph=True)
        (hv,) = torch.autograd.grad(grad @ v, theta)
    assert_rel(hv, flatten(ggn.matvec(ggn.unflatten(v[None])))[0], 1e-10)


def test_realistic_epsilon_converges_and_leaves_the_model_unchanged(problem):
    # eps = -1/N (removal) on this untrained model moves the tracked weights far from the
    # linear regime: N x response / influence ranges over -1.3 .. 5.4 for these six pairs, so
    # only convergence and finiteness are asserted. The model: values, grads, mode untouched.
    model, layers, train, queries, examples, lam, influence = problem
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = pbrf_response(
        model, layers, train, [{k: v[i : i + 1] for k, v in examples.items()} for i in range(2)],
        queries, epsilon=-1 / 6, damping=lam, tol=1e-7,
    )  # fmt: skip
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for r, column in zip(results, influence.T, strict=True):
        assert r["converged"] and r["relative_grad_norm"] <= 1e-7 and r["steps"] > 1
        assert r["response"].shape == (3,) and r["response"].isfinite().all()
        ratio = 6 * r["response"] / column  # N x response / influence
        assert ratio.isfinite().all()


def test_lbfgs_solves_a_quadratic_from_gradients_alone():
    # f(x) = 1/2 x^T A x - b^T x, condition number 1e3: x* = A^{-1} b (303 iterations).
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64, generator=gen))
    a = q @ torch.diag(torch.logspace(-3, 0, 50, dtype=torch.float64)) @ q.T
    b = torch.randn(50, dtype=torch.float64, generator=gen)
    x, info = lbfgs(lambda x: a @ x - b, torch.zeros(50, dtype=torch.float64), steps=500, tol=1e-10)
    assert info["converged"] and info["relative_grad_norm"] <= 1e-10 and info["steps"] < 500
    assert info["evaluations"] < 2 * info["steps"] + 2  # the unit step is nearly always taken
    assert_rel(x, torch.linalg.solve(a, b), 1e-8)  # measured 7e-11


def test_pbrf_checks_its_inputs(problem):
    model, layers, train, queries, examples, lam, _ = problem
    with pytest.raises(ValueError, match="not parameters of this model"):
        PBRF(model, [torch.nn.Parameter(torch.zeros(2))], train, lam)
    with pytest.raises(ValueError, match="damping"):
        PBRF(model, layers, train, -1.0)
    with pytest.raises(ValueError, match="nonzero"):
        pbrf_scores(model, layers, train, examples, queries, damping=lam, epsilon=0.0)
    with pytest.raises(ValueError, match="finite"):
        pbrf_response(model, layers, train, examples, queries, epsilon=math.nan, damping=lam)


def test_per_layer_damping_is_the_shared_rules_damping():
    # The shared damping rule gives each layer its own lambda_l: the PBRF's proximal term with
    # {layer: lambda_l} has first-order term g_q^T (G + diag(lambda_l))^{-1} g_m (Exact's).
    model = make_gpt2()
    layers = find_layers(model, include=r"h\.[01]\.attn\.c_proj")
    train = make_batch([8, 5, 7, 4, 6, 8], seed=1)
    queries = make_batch([7, 6, 9], seed=2)
    examples = {k: v[:2] for k, v in train.items()}
    ggn = GGN(model, layers, train)
    lam = relative_damping(1.0, ggn, per_layer=True)
    assert len(set(lam.values())) == 2  # two layers, two different dampings
    pre = Exact.from_ggn(ggn, lam).ihvp(per_example_grads(model, examples, layers=layers))
    influence = flatten(per_example_grads(model, queries, layers=layers)) @ flatten(pre).T
    plus, minus = (
        pbrf_scores(model, layers, train, examples, queries, damping=lam, epsilon=e, tol=1e-9)
        for e in (1e-6, -1e-6)
    )
    assert rel((plus + minus) / 2, influence) < 1e-6
    with pytest.raises(ValueError, match="no damping for layer"):
        PBRF(model, layers, train, {next(iter(lam)): 1.0})

"""Multi-stage influence against retraining (true Hessians) and against dense formulas."""

import copy

import pytest
import torch
from conftest import assert_rel, make_batch, make_gpt2, make_llama
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from influence.curvature import fit_ekfac
from influence.ggn import GGN
from influence.lm import sequence_losses
from influence.modules import canonical_weight, find_layers, flatten, layer_shape, to_native
from influence.modules import unflatten as unflatten_layers
from influence.multistage import (
    MultiStageConfig,
    multistage_scores,
    multistage_solvers,
    single_stage_scores,
)
from influence.solvers import Exact

NAMES = ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]  # 2 x 16 x 17 = 544


def pt_data():
    return make_batch([8, 5, 7, 4, 6, 8, 7, 6], seed=1)


def ft_data():
    return make_batch([7, 6, 8, 5, 6, 7], prompt_len=4, seed=3)


def query_data():
    return make_batch([8, 6], prompt_len=5, seed=4)


# ---- retraining oracle ------------------------------------------------------------------


class Problem:
    """Pre-training and proximal fine-tuning of NAMES' weights th (544 numbers), exactly.

    J_pt(th) = (1/N) sum_i w_i L(z_i; th) + (l/2) ||th||^2 with l = lam and w = 1 + N eps e_z
    (upweighting z by eps); J_ft(th) = (1/M) sum_j L(x_j; th) + (a/2) ||th - th_pt||^2.
    Minimised by L-BFGS, then Newton steps with the exact Hessian to a gradient norm of 1e-12.
    """

    def __init__(self, a: float, lam: float):
        self.a, self.lam = a, lam
        self.net = make_gpt2(0)
        self.net.set_attn_implementation("eager")  # sdpa on CPU has no double backward
        self.net.requires_grad_(False)
        modules = dict(self.net.named_modules())
        self.layers = {n: modules[n] for n in NAMES}
        self.shapes = {n: layer_shape(m) for n, m in self.layers.items()}
        self.pt, self.ft, self.q = pt_data(), ft_data(), query_data()

    def losses(self, th: torch.Tensor, batch) -> torch.Tensor:
        """(B,) summed sequence losses with the tracked weights set to th (P,)."""
        params = {
            f"{n}.{k}": v
            for n, mat in unflatten_layers(th, self.shapes).items()
            for k, v in to_native(self.layers[n], mat).items()
        }
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return sequence_losses(
            functional_call(self.net, params, (), inputs).logits, batch["labels"]
        )

    def pt_objective(self, weights: torch.Tensor):
        return lambda th: (self.losses(th, self.pt) * weights).mean() + self.lam / 2 * th @ th

    def ft_objective(self, th_pt: torch.Tensor):
        diff = lambda th: th - th_pt  # noqa: E731
        return lambda th: self.losses(th, self.ft).mean() + self.a / 2 * diff(th) @ diff(th)

    def hessian(self, f, th: torch.Tensor) -> torch.Tensor:
        return torch.autograd.functional.hessian(f, th, vectorize=True)

    def minimise(self, f, th: torch.Tensor, hess: torch.Tensor | None = None) -> torch.Tensor:
        """argmin f near th; hess: f's Hessian near the minimum (else L-BFGS first, then H)."""
        th = th.clone()
        if hess is None:
            th.requires_grad_(True)
            opt = torch.optim.LBFGS(
                [th], max_iter=1000, tolerance_grad=1e-9, tolerance_change=0,
                history_size=50, line_search_fn="strong_wolfe",
            )  # fmt: skip

            def closure():
                opt.zero_grad()
                value = f(th)
                value.backward()
                return value

            opt.step(closure)
            th = th.detach()
            hess = self.hessian(f, th)
        chol = torch.linalg.cholesky(hess)  # fails unless the minimum is strict
        for _ in range(50):
            th.requires_grad_(True)
            (grad,) = torch.autograd.grad(f(th), th)
            th = th.detach()
            if grad.norm() <= 1e-12:
                return th
            th = th - torch.cholesky_solve(grad[:, None], chol)[:, 0]
        raise AssertionError(f"not converged: gradient norm {float(grad.norm()):.3g}")

    def train(self, weights: torch.Tensor, start=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(th_pt, th_ft) for pre-training weights w; start: warm start and fixed Hessians."""
        if start is None:
            th0 = flatten({n: canonical_weight(m) for n, m in self.layers.items()})
            th_pt = self.minimise(self.pt_objective(weights), th0)
            return th_pt, self.minimise(self.ft_objective(th_pt), th_pt)
        (th_pt0, h_pt), (th_ft0, h_ft) = start
        th_pt = self.minimise(self.pt_objective(weights), th_pt0, h_pt)
        return th_pt, self.minimise(self.ft_objective(th_pt), th_ft0, h_ft)

    def model(self, th: torch.Tensor):
        """A copy of the GPT-2 with the tracked weights set to th, for the library."""
        model = copy.deepcopy(self.net).requires_grad_(True)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for n, mat in unflatten_layers(th, self.shapes).items():
                for k, v in to_native(modules[n], mat).items():
                    getattr(modules[n], k).copy_(v)
        return model


@pytest.fixture(scope="module")
def retrained():
    """Scores from the library with exact Hessians, and -d m(q) / d eps by retraining."""
    prob = Problem(a=0.5, lam=1.0)
    n = prob.pt["input_ids"].shape[0]
    ones = torch.ones(n, dtype=torch.float64)
    th_pt, th_ft = prob.train(ones)
    # Hessians of the averaged losses (the regularisers' a I, l I are the solvers' damping).
    h_pt = prob.hessian(lambda th: prob.losses(th, prob.pt).mean(), th_pt)
    h_ft = prob.hessian(lambda th: prob.losses(th, prob.ft).mean(), th_ft)
    eye = torch.eye(len(th_pt), dtype=torch.float64)
    start = ((th_pt, h_pt + prob.lam * eye), (th_ft, h_ft + prob.a * eye))

    eps = 1e-4
    change = torch.zeros(2, n, dtype=torch.float64)  # d m(q) / d eps, central difference
    for i in range(n):
        m = []
        for sign in (1, -1):
            weights = ones.clone()
            weights[i] += sign * eps * n  # (1/N) sum_i w_i L_i = mean + sign eps L_z
            _, th_ft_eps = prob.train(weights, start)
            m.append(prob.losses(th_ft_eps, prob.q).detach())
        change[:, i] = (m[0] - m[1]) / (2 * eps)

    pt_model, ft_model = prob.model(th_pt), prob.model(th_ft)
    ft_solver = Exact(h_ft, prob.shapes, damping=prob.a)
    pt_solver = Exact(h_pt, prob.shapes, damping=prob.lam)
    config = MultiStageConfig(proximity=prob.a, damping=prob.lam)
    args = (ft_model, pt_model, [prob.q], [prob.pt], ft_solver, pt_solver, config, NAMES)
    return {
        "change": change,
        "scores": multistage_scores(*args, progress=False),
        "models": (ft_model, pt_model),
        "solvers": (ft_solver, pt_solver),
        "prob": prob,
        "min_eigenvalues": [float(torch.linalg.eigvalsh(h).min()) for h in (h_pt, h_ft)],
    }


def test_multistage_score_is_minus_the_change_of_the_query_loss(retrained):
    # Upweighting pre-training sequence z by eps changes the fine-tuned query loss by -eps score.
    scores, change = retrained["scores"], retrained["change"]
    assert_rel(scores, -change, tol=1e-6)
    assert torch.equal(scores.argsort(dim=1), (-change).argsort(dim=1))
    # The Hessians are indefinite: the check is of the true-Hessian formula, not of a GGN.
    assert min(retrained["min_eigenvalues"]) < 0


def test_retraining_oracle_rejects_the_single_stage_shortcuts(retrained):
    # The same oracle tells the multi-stage score from the shortcuts it replaces.
    change = retrained["change"]
    ft_model, pt_model = retrained["models"]
    ft_solver, pt_solver = retrained["solvers"]
    prob = retrained["prob"]
    pt_only = single_stage_scores(
        pt_model, pt_model, [prob.q], [prob.pt], pt_solver, NAMES, progress=False
    )
    published = single_stage_scores(
        ft_model, pt_model, [prob.q], [prob.pt], ft_solver, NAMES, progress=False
    )
    for shortcut in (pt_only, prob.a * published):
        err = float((shortcut + change).norm() / change.norm())
        assert err > 0.1, err


def test_gauss_newton_in_place_of_the_hessian_is_only_approximate(retrained):
    # At these minima the Hessian is not the GGN: the exact formula needs the Hessian.
    ft_model, pt_model = retrained["models"]
    prob = retrained["prob"]
    config = MultiStageConfig(proximity=prob.a, damping=prob.lam)
    solvers = [
        Exact(GGN(model, find_layers(model, include=NAMES), [data]).dense(), prob.shapes, damping=d)
        for model, data, d in ((ft_model, prob.ft, prob.a), (pt_model, prob.pt, prob.lam))
    ]
    scores = multistage_scores(
        ft_model, pt_model, [prob.q], [prob.pt], *solvers, config, NAMES, progress=False
    )
    err = float((scores + retrained["change"]).norm() / retrained["change"].norm())
    assert err > 0.1, err


# ---- dense formulas ---------------------------------------------------------------------

A, L = 0.3, 0.05  # proximity a and pre-training damping l for the dense checks


def perturbed(model, scale=0.05, seed=5):
    """A copy of ``model`` with every weight moved: a stand-in fine-tuned model."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return out


def dense_parts(model, data, queries, candidates):
    """GGN (P, P) on ``data``; query gradients (Q, P) and candidate gradients (N, P) on model."""
    ggn = GGN(model, find_layers(model, include=NAMES), [data])
    return ggn.dense(), ggn.sequence_grads(queries), ggn.sequence_grads(candidates)


@pytest.fixture(scope="module")
def dense():
    pt_model = make_gpt2(0)
    ft_model = perturbed(pt_model)
    q, cand = query_data(), pt_data()
    g_ft, q_ft, z_ft = dense_parts(ft_model, ft_data(), q, cand)
    g_pt, q_pt, z_pt = dense_parts(pt_model, cand, q, cand)
    eye = torch.eye(len(g_ft), dtype=torch.float64)
    shapes = {n: layer_shape(m) for n, m in find_layers(pt_model, include=NAMES).items()}
    return {
        "models": (ft_model, pt_model),
        "ggn": (g_ft, g_pt),
        "queries": (q_ft, q_pt),  # grad m(q) at th_ft, at th_pt
        "candidates": (z_ft, z_pt),  # grad L(z) at th_ft, at th_pt
        "inverse": lambda mat, damping: torch.linalg.inv(mat + damping * eye),
        "shapes": shapes,
    }


def block_diagonal(curvature, names):
    return torch.block_diag(*[curvature.dense(n) for n in names])


@pytest.mark.parametrize("curvature", ["exact", "ekfac"])
def test_multistage_scores_equal_the_dense_formula(dense, curvature):
    # score = a grad m(q; th_ft)^T (H_ft + a I)^-1 (H_pt + l I)^-1 grad L(z; th_pt).
    ft_model, pt_model = dense["models"]
    config = MultiStageConfig(proximity=A, damping=L)
    if curvature == "exact":
        h_ft, h_pt = dense["ggn"]
        solvers = Exact(h_ft, dense["shapes"], damping=A), Exact(h_pt, dense["shapes"], damping=L)
    else:
        fit = {"progress": False, "seed": 0}
        ft_ekfac = fit_ekfac(
            ft_model, [ft_data()], layers=find_layers(ft_model, include=NAMES), **fit
        )
        pt_ekfac = fit_ekfac(
            pt_model, [pt_data()], layers=find_layers(pt_model, include=NAMES), **fit
        )
        solvers = multistage_solvers(ft_ekfac, pt_ekfac, config)
        h_ft, h_pt = block_diagonal(ft_ekfac, NAMES), block_diagonal(pt_ekfac, NAMES)
    inv = dense["inverse"]
    q_ft, z_pt = dense["queries"][0], dense["candidates"][1]
    expected = A * q_ft @ inv(h_ft, A) @ inv(h_pt, L) @ z_pt.T
    scores = multistage_scores(
        ft_model, pt_model, [query_data()], [pt_data()], *solvers, config, NAMES, progress=False
    )
    assert_rel(scores, expected)
    # The order of the two inverses matters: the check would catch a swap.
    swapped = A * q_ft @ inv(h_pt, L) @ inv(h_ft, A) @ z_pt.T
    assert float((swapped - expected).norm() / expected.norm()) > 1e-2


def test_single_stage_scores_equal_their_definitions(dense):
    ft_model, pt_model = dense["models"]
    (h_ft, h_pt), inv, shapes = dense["ggn"], dense["inverse"], dense["shapes"]
    (q_ft, q_pt), (z_ft, z_pt) = dense["queries"], dense["candidates"]
    ft_solver, pt_solver = Exact(h_ft, shapes, damping=A), Exact(h_pt, shapes, damping=L)
    cases = [
        # fine-tuning influence, candidates at th_ft
        (ft_model, ft_model, ft_solver, q_ft @ inv(h_ft, A) @ z_ft.T),
        # as published: the fine-tuning inverse, candidates at th_pt
        (ft_model, pt_model, ft_solver, q_ft @ inv(h_ft, A) @ z_pt.T),
        # pre-training influence on the pre-trained model
        (pt_model, pt_model, pt_solver, q_pt @ inv(h_pt, L) @ z_pt.T),
        # gradient dot products
        (ft_model, pt_model, None, q_ft @ z_pt.T),
    ]
    for query_model, candidate_model, solver, expected in cases:
        scores = single_stage_scores(
            query_model, candidate_model, [query_data()], [pt_data()], solver, NAMES,
            progress=False,
        )  # fmt: skip
        assert_rel(scores, expected)


def test_large_proximity_gives_pre_training_influence(dense):
    # a -> inf: fine-tuning cannot move (th_ft = th_pt) and a (H_ft + a I)^-1 = I - H_ft / a + ...,
    # so score -> grad m(q; th_pt)^T (H_pt + l I)^-1 grad L(z; th_pt), with a 1/a correction.
    _, pt_model = dense["models"]
    g_ft_at_pt = GGN(pt_model, find_layers(pt_model, include=NAMES), [ft_data()]).dense()
    (_, h_pt), inv, shapes = dense["ggn"], dense["inverse"], dense["shapes"]
    q_pt, z_pt = dense["queries"][1], dense["candidates"][1]
    pt_solver = Exact(h_pt, shapes, damping=L)
    limit = single_stage_scores(
        pt_model, pt_model, [query_data()], [pt_data()], pt_solver, NAMES, progress=False
    )
    correction = -q_pt @ g_ft_at_pt @ inv(h_pt, L) @ z_pt.T  # d score / d (1/a) at 1/a = 0
    norm = float(torch.linalg.matrix_norm(g_ft_at_pt, ord=2))
    for a in (1e3, 1e4):
        ft_solver = Exact(g_ft_at_pt, shapes, damping=a)
        scores = multistage_scores(
            pt_model, pt_model, [query_data()], [pt_data()], ft_solver, pt_solver,
            MultiStageConfig(proximity=a, damping=L), NAMES, progress=False,
        )  # fmt: skip
        assert_rel(scores, limit, tol=2 * float(correction.norm() / limit.norm()) / a)
        assert_rel(a * (scores - limit), correction, tol=2 * norm / a)


# ---- errors -----------------------------------------------------------------------------


def test_bad_configurations_are_clear_errors(dense):
    with pytest.raises(ValueError, match="proximity must be > 0"):
        MultiStageConfig(proximity=0.0, damping=L)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        MultiStageConfig(proximity=A, damping=-1.0)
    ft_model, pt_model = dense["models"]
    h_ft, h_pt = dense["ggn"]
    config = MultiStageConfig(proximity=A, damping=L)
    shapes = dense["shapes"]
    run = lambda ft, pt, solvers: multistage_scores(  # noqa: E731
        ft, pt, [query_data()], [pt_data()], *solvers, config, NAMES, progress=False
    )
    exact = Exact(h_ft, shapes, damping=A), Exact(h_pt, shapes, damping=L)
    # A fine-tuning solver damped by something other than a (here EK-FAC's relative default).
    ekfac = fit_ekfac(
        ft_model, [ft_data()], layers=find_layers(ft_model, include=NAMES), progress=False
    )
    with pytest.raises(ValueError, match="fine-tuning solver has damping 0.1 .relative=True"):
        run(ft_model, pt_model, (ekfac, exact[1]))
    with pytest.raises(ValueError, match="pre-training solver has damping 0.3"):
        run(ft_model, pt_model, (exact[0], Exact(h_pt, shapes, damping=A)))
    # Models whose tracked layers differ.
    smaller = copy.deepcopy(pt_model)
    smaller.transformer.h[1].attn.c_proj = Conv1D(8, 16).double()
    with pytest.raises(ValueError, match=r"shape \(16, 17\) in the query model and \(8, 17\)"):
        run(ft_model, smaller, exact)
    with pytest.raises(ValueError, match="not in the candidate model"):
        run(ft_model, make_llama(0), exact)

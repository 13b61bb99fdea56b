"""Counterfactual metrics on planted retraining results, and an exact convex oracle: influence
functions of L2-regularised multinomial logistic regression against real retraining."""

import numpy as np
import pytest
import torch
from conftest import assert_rel

from influence.lab.counterfactual import (
    bootstrap_ci,
    lds,
    loo_agreement,
    noise_ceiling,
    predicted_effects,
    removal_effect,
    seed_average_ceiling,
    subset_masks,
)


def test_subset_masks_sizes_and_seeds():
    masks = subset_masks(50, 40, 0.3, seed=0)
    assert masks.shape == (40, 50) and masks.dtype == bool
    np.testing.assert_array_equal(masks.sum(1), np.full(40, 15))
    assert len({row.tobytes() for row in masks}) == 40  # independent subsets, not one repeated
    np.testing.assert_array_equal(masks, subset_masks(50, 40, 0.3, seed=0))
    assert (masks != subset_masks(50, 40, 0.3, seed=1)).any()
    assert (subset_masks(7, 3, 0.5, seed=0).sum(1) == 4).all()  # round(3.5) = 4 (half to even)


@pytest.mark.parametrize(
    "args, match",
    [
        ((10, 5, 0.0), "alpha=0.0"),
        ((10, 5, 1.0), "alpha=1.0"),
        ((10, 0, 0.5), "m=0"),
        ((1, 5, 0.5), "n=1"),
        ((10, 5, 0.01), "round"),
    ],  # fmt: skip
)
def test_subset_masks_errors(args, match):
    with pytest.raises(ValueError, match=match):
        subset_masks(*args, seed=0)


@pytest.fixture
def planted():
    """(Q, N) = (20, 50) random scores, M = 200 subsets at alpha = 0.5, and the exact linear
    datamodel: the summed scores of each subset's examples, (M, Q)."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 50))
    masks = subset_masks(50, 200, 0.5, seed=0)
    return scores, masks, masks @ scores.T, rng


def test_lds_planted(planted):
    scores, masks, linear, rng = planted
    np.testing.assert_array_equal(predicted_effects(scores, masks), linear)
    # Losses that fall exactly as the summed scores rise: a perfect attribution.
    exact = lds(scores, masks, -linear)
    assert abs(exact["mean"] - 1) < 1e-12 and exact["n_nan"] == 0
    np.testing.assert_allclose(exact["ci"], [1, 1], atol=1e-12)
    assert len(exact["per_query"]) == 20
    assert abs(lds(scores, masks, linear)["mean"] + 1) < 1e-12  # the opposite sign
    # Spearman: any decreasing function of the linear datamodel is just as perfect.
    assert abs(lds(scores, masks, np.exp(-0.3 * linear))["mean"] - 1) < 1e-12
    noise = lds(scores, masks, rng.normal(size=linear.shape))
    assert abs(noise["mean"]) < 0.2 and noise["ci"][0] < 0 < noise["ci"][1]


def test_lds_constant_query_is_left_out(planted):
    scores, masks, linear, _ = planted
    losses = -linear.copy()
    losses[:, 3] = 1.0  # every subset model has the same loss on query 3
    out = lds(scores, masks, losses)
    assert out["n_nan"] == 1 and np.isnan(out["per_query"][3])
    assert abs(out["mean"] - 1) < 1e-12 and np.isfinite(out["ci"]).all()
    with pytest.raises(ValueError, match="expected \\(M, Q\\)"):
        lds(scores, masks, losses[:, :5])


def test_noise_ceilings(planted):
    _, _, linear, rng = planted
    losses = rng.normal(size=linear.shape)  # (M, Q) one seed's retrained losses
    assert abs(noise_ceiling(losses, losses)["mean"] - 1) < 1e-12
    other = losses + rng.normal(size=losses.shape)
    # With two seeds, the mean of "the other seeds" is the other seed.
    pair = seed_average_ceiling(np.stack([losses, other]))
    np.testing.assert_allclose(pair["per_query"], noise_ceiling(losses, other)["per_query"])
    copies = losses + 0.1 * rng.normal(size=(3, *losses.shape))  # (S, M, Q)
    assert seed_average_ceiling(copies)["mean"] > 0.9
    assert abs(seed_average_ceiling(rng.normal(size=(3, *losses.shape)))["mean"]) < 0.1
    with pytest.raises(ValueError, match="S=1"):
        seed_average_ceiling(losses[None])


def test_removal_effect_planted():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 3, size=30)  # (Q,)
    random = base + np.array([-2.0, -1, 0, 1, 2])[:, None]  # (R, Q) = (5, 30), mean = base
    out = removal_effect(base, base + 1, random)
    assert out["rise"] == pytest.approx(1) and out["random_rise"] == pytest.approx(0)
    assert out["excess"] == pytest.approx(1) and out["win_rate"] == 1
    np.testing.assert_allclose(out["ci"], [1, 1])
    np.testing.assert_allclose(out["excess_ci"], [1, 1])
    assert removal_effect(base, base - 1, random)["win_rate"] == 0
    assert removal_effect(base, base, random)["win_rate"] == 0  # a tie is no win

    def excess_width(q: int) -> float:
        base = rng.uniform(1, 3, size=q)
        random = base + rng.normal(size=(5, q))
        lo, hi = removal_effect(base, base + 1 + rng.normal(size=q), random)["excess_ci"]
        assert lo < 1 < hi
        return hi - lo

    assert excess_width(1000) < excess_width(10) / 3  # ~ 1 / sqrt(Q): 10x expected


def test_loo_agreement_planted():
    predicted = np.random.default_rng(0).normal(size=40)
    out = loo_agreement(predicted, 2 * predicted)
    assert out["slope"] == pytest.approx(2, rel=1e-12) and out["n"] == 40
    for key in ("pearson", "spearman", "sign_agreement"):
        assert out[key] == pytest.approx(1, rel=1e-12), key
    out = loo_agreement(predicted, -predicted)
    assert out["sign_agreement"] == 0 and out["slope"] == pytest.approx(-1, rel=1e-12)
    assert out["pearson"] == pytest.approx(-1, rel=1e-12)
    actual = predicted.copy()
    actual[:10] = 0.0  # exact zeros carry no sign; the 30 others agree
    assert loo_agreement(predicted, actual)["sign_agreement"] == 1


def test_bootstrap_ci_ignores_nan():
    values = np.random.default_rng(0).normal(size=50)
    with_nan = np.concatenate([values, [np.nan] * 5])
    assert bootstrap_ci(with_nan, 200, 1) == bootstrap_ci(values, 200, 1)
    assert np.isnan(bootstrap_ci([np.nan, np.nan])).all()
    lo, hi = bootstrap_ci(values, level=0.5)
    lo95, hi95 = bootstrap_ci(values, level=0.95)
    assert lo95 < lo < values.mean() < hi < hi95


# An exact convex oracle. Multinomial logistic regression without bias, W (C, d), float64:
#     J(W) = (1/n) sum_{j kept} CE(W x_j, y_j) + (lam/2) ||W||^2.
# Influence of removing example i from the full model (n = N): with W* the optimum, H the
# Hessian of J at W* and g_j = grad CE_j(W*), the objective without i (same 1/N, same lam) is
# J - CE_i / N, whose optimum W* + D solves grad J(W* + D) - grad CE_i(W* + D) / N = 0, i.e.
# H D = g_i / N to first order: D = H^-1 g_i / N. The query loss changes by
# g_q^T D = g_q^T H^-1 g_i / N = score / N, positive (a rise) for a proponent: the project's
# sign. The LOO models keep the 1/N of the full objective so that the removal is the only
# change (with 1/(N-1) every weight rises by N/(N-1): a shift shared by all i). The subset
# models of the LDS use 1/|S| (the mean loss over the kept examples, as retraining on a subset
# does); |S| is the same for every subset, so this only rescales lam, alike for all subsets.
C, D, N, N_QUERY, LAM = 3, 5, 100, 8, 1e-2
SCALES = np.array([10, 3, 1, 0.3, 0.1])  # anisotropic features: cond(H) ~ 2e3


def _probs(W, X):
    z = X @ W.T  # (n, C)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _ce(W, X, Y):
    """(n,) cross-entropy of each example."""
    return -np.log(_probs(W, X)[np.arange(len(Y)), Y])


def _grads(W, X, Y):
    """(n, C * d) gradient of each example's cross-entropy: (p - onehot(y)) x^T."""
    r = _probs(W, X)
    r[np.arange(len(Y)), Y] -= 1
    return (r[:, :, None] * X[:, None, :]).reshape(len(Y), -1)


def _objective(W, X, Y, keep, n):
    return _ce(W, X[keep], Y[keep]).sum() / n + LAM / 2 * (W**2).sum()


def _grad_hessian(W, X, Y, keep, n):
    """Gradient (C d,) and Hessian (C d, C d) of J: H = (1/n) sum (diag p - p p^T) kron x x^T
    + lam I."""
    X, Y = X[keep], Y[keep]
    p = _probs(W, X)  # (n, C)
    a = p[:, :, None] * np.eye(C) - p[:, :, None] * p[:, None, :]  # (n, C, C)
    h = np.einsum("nab,ni,nj->aibj", a, X, X).reshape(C * D, C * D)
    g = _grads(W, X, Y).sum(0) / n + LAM * W.ravel()
    return g, h / n + LAM * np.eye(C * D)


def _fit(X, Y, keep, n, W=None):
    """Newton's method with backtracking (Armijo) to ||grad J|| < 1e-13; returns W, ||grad||."""
    W = np.zeros((C, D)) if W is None else W.copy()
    for _ in range(50):
        g, h = _grad_hessian(W, X, Y, keep, n)
        if np.linalg.norm(g) < 1e-13:
            break
        step = np.linalg.solve(h, g).reshape(W.shape)
        decrement, t, f = g @ step.ravel(), 1.0, _objective(W, X, Y, keep, n)
        # Near the optimum the objective's rounding exceeds its decrease: take full steps.
        while decrement > 1e-12 and _objective(W - t * step, X, Y, keep, n) > f - t * decrement / 4:
            t /= 2
        W = W - t * step
    return W, np.linalg.norm(_grad_hessian(W, X, Y, keep, n)[0])


@pytest.fixture(scope="module")
def logreg():
    """N training examples and N_QUERY held-out queries from a softmax teacher (overlapping
    classes), the full model, every leave-one-out model and 100 subset models (alpha = 0.5)."""
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(C, D)) / SCALES
    X = rng.normal(size=(N + N_QUERY, D)) * SCALES
    Y = np.array([rng.choice(C, p=p) for p in _probs(teacher, X)])
    X, Y, Xq, Yq = X[:N], Y[:N], X[N:], Y[N:]
    full = np.ones(N, bool)
    W, grad_norm = _fit(X, Y, full, N)
    H = _grad_hessian(W, X, Y, full, N)[1]
    g_train, g_query = _grads(W, X, Y), _grads(W, Xq, Yq)  # (N, C d), (Q, C d)
    base = _ce(W, Xq, Yq)  # (Q,)
    loo = np.zeros((N_QUERY, N))  # actual change of each query's loss without example i
    for i in range(N):
        keep = full.copy()
        keep[i] = False
        Wi, g = _fit(X, Y, keep, N, W)
        grad_norm = max(grad_norm, g)
        loo[:, i] = _ce(Wi, Xq, Yq) - base
    masks = subset_masks(N, 100, 0.5, seed=0)
    losses = np.zeros((len(masks), N_QUERY))  # (M, Q)
    for m, keep in enumerate(masks):
        Wm, g = _fit(X, Y, keep, int(keep.sum()), W)
        grad_norm = max(grad_norm, g)
        losses[m] = _ce(Wm, Xq, Yq)
    return {
        "X": X, "Y": Y, "H": H, "loo": loo, "masks": masks, "losses": losses,
        "grad_norm": grad_norm,
        "exact": g_query @ np.linalg.solve(H, g_train.T),  # (Q, N) g_q^T H^-1 g_i
        "dot": g_query @ g_train.T,  # (Q, N) g_q^T g_i: H = I
    }  # fmt: skip


def test_logreg_derivatives_match_autograd(logreg):
    X, Y = logreg["X"], logreg["Y"]
    keep = np.arange(N) % 3 > 0
    W = np.random.default_rng(1).normal(size=(C, D))
    Xt, Yt = torch.from_numpy(X[keep]), torch.from_numpy(Y[keep])

    def objective(w):
        ce = torch.nn.functional.cross_entropy(Xt @ w.view(C, D).T, Yt, reduction="sum")
        return ce / 50 + LAM / 2 * (w**2).sum()

    w = torch.from_numpy(W.ravel())
    g, h = _grad_hessian(W, X, Y, keep, 50)
    assert_rel(torch.from_numpy(g), torch.func.grad(objective)(w))
    assert_rel(torch.from_numpy(h), torch.func.hessian(objective)(w))
    assert_rel(torch.tensor(_objective(W, X, Y, keep, 50)), objective(w))
    assert logreg["grad_norm"] < 1e-10  # every model trained to convergence
    assert np.linalg.cond(logreg["H"]) > 1e3  # the anisotropy that separates exact from dot


def test_influence_predicts_leave_one_out(logreg):
    # All N * Q pairs. Measured: pearson 0.9978, sign agreement 0.9988, slope 1.089 (the
    # actual change is ~9% larger: without i the curvature H - H_i / N is smaller than H).
    out = loo_agreement(logreg["exact"].ravel() / N, logreg["loo"].ravel())
    assert out["pearson"] > 0.99 and out["sign_agreement"] > 0.95
    assert 0.95 < out["slope"] < 1.2  # the score / N scale of a 1/N objective


def test_exact_influence_lds(logreg):
    # Measured: exact 0.967 [0.961, 0.973], gradient dot 0.594 [0.480, 0.716]. With isotropic
    # features (SCALES = 1, cond(H) 33) the two are close: 0.954 and 0.910.
    exact = lds(logreg["exact"], logreg["masks"], logreg["losses"])
    dot = lds(logreg["dot"], logreg["masks"], logreg["losses"])
    assert exact["mean"] > 0.93 and exact["ci"][0] > 0.9
    assert exact["mean"] > dot["mean"] + 0.2 and exact["ci"][0] > dot["ci"][1]

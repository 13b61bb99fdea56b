"""iHVP solvers against the exact damped GGN / Fisher of tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_gpt2_lora, split_batch

from influence.curvature import fit_ekfac
from influence.ggn import GGN, DenseGGN
from influence.gradients import per_example_grads
from influence.modules import find_layers, flatten, unflatten
from influence.solvers import (
    CG,
    DataInf,
    Exact,
    Identity,
    LiSSA,
    LiSSAAsPublished,
    LowRank,
    datainf_damping,
    largest_eigenvalue,
    lissa_depth,
    relative_damping,
)


@pytest.fixture(scope="module")
def problem():
    """GPT-2 + LoRA (256 parameters in 4 layers), 6 training sequences, 3 query vectors."""
    model = make_gpt2_lora()
    layers = find_layers(model)
    train = make_batch([8, 5, 7, 4, 6, 8], seed=1)
    ggn = GGN(model, layers, train)
    dense = ggn.dense()
    queries = per_example_grads(model, make_batch([7, 6, 9], seed=2), layers=layers)  # (3, ...)
    return model, layers, train, ggn, dense, queries


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)  # float64: lam * eye must not round lam


def rel_err(a: dict, b: dict) -> float:
    a, b = flatten(a), flatten({n: b[n] for n in a})
    return float((a - b).norm() / b.norm())


def solve(matrix: torch.Tensor, damping: torch.Tensor, v: dict, shapes) -> dict:
    """Oracle: torch.linalg.solve((G + diag(damping)), v) on flattened vectors."""
    x = torch.linalg.solve(matrix + torch.diag(damping), flatten(v).T).T
    return unflatten(x, shapes)


def damping_vector(damping: dict, shapes) -> torch.Tensor:
    return torch.cat(
        [torch.full((o * i,), damping[n], dtype=torch.float64) for n, (o, i) in shapes.items()]
    )


def test_identity_returns_v(problem):
    *_, queries = problem
    out = Identity().ihvp(queries)
    assert all(torch.equal(out[n], queries[n]) for n in queries)


def test_exact_equals_linear_solve(problem):
    _, _, _, ggn, dense, v = problem
    lam = relative_damping(0.1, ggn, per_layer=False)
    expected = solve(dense, damping_vector(lam, ggn.shapes), v, ggn.shapes)
    assert rel_err(Exact(dense, ggn.shapes, lam).ihvp(v), expected) < 1e-10
    # Per-layer damping, full matrix: (G + diag(lam_l)) x = v.
    lam_l = relative_damping(0.1, ggn, per_layer=True)
    expected = solve(dense, damping_vector(lam_l, ggn.shapes), v, ggn.shapes)
    assert rel_err(Exact(dense, ggn.shapes, lam_l).ihvp(v), expected) < 1e-10


def test_exact_block_diagonal_inverts_each_layer_alone(problem):
    _, _, _, ggn, dense, v = problem
    lam = relative_damping(0.1, ggn, per_layer=True)
    out, start = Exact(dense, ggn.shapes, lam, block_diagonal=True).ihvp(v), 0
    for name, (o, i) in ggn.shapes.items():
        block = dense[start : start + o * i, start : start + o * i] + lam[name] * eye(o * i)
        expected = torch.linalg.solve(block, v[name].flatten(1).T).T
        assert rel_err({name: out[name].flatten(1)}, {name: expected}) < 1e-10
        start += o * i


def test_relative_damping_is_factor_times_mean_eigenvalue(problem):
    _, _, _, ggn, dense, _ = problem
    overall = relative_damping(2.0, ggn, per_layer=False)
    mean_eig = float(torch.linalg.eigvalsh(dense).mean())
    assert all(d == pytest.approx(2.0 * mean_eig, rel=1e-10) for d in overall.values())
    per_layer, start = relative_damping(2.0, ggn, per_layer=True), 0
    for name, (o, i) in ggn.shapes.items():
        block = dense[start : start + o * i, start : start + o * i]
        assert per_layer[name] == pytest.approx(2.0 * float(block.trace()) / (o * i), rel=1e-10)
        start += o * i
    for bad in (0.0, -1.0, float("nan")):  # the shared rule's check, not a silent 0 damping
        for per in (True, False):
            with pytest.raises(ValueError, match="damping factor must be finite and > 0"):
                relative_damping(bad, ggn, per_layer=per)


def test_cg_converges_to_exact_within_p_iterations(problem):
    _, _, _, ggn, dense, v = problem
    lam = relative_damping(0.1, ggn, per_layer=False)
    exact = Exact(dense, ggn.shapes, lam).ihvp(v)
    cg = CG(ggn, lam, max_iters=ggn.num_params, tol=1e-10)
    out = cg.ihvp(v)
    assert rel_err(out, exact) < 1e-8
    assert cg.info.iterations <= ggn.num_params
    assert cg.info.residuals.shape == (cg.info.iterations + 1, 3)
    assert cg.info.residuals[-1].max() <= 1e-10 and cg.info.residuals[0].min() == 1.0
    assert cg.info.products == 3 * cg.info.iterations


def test_cg_with_the_exact_inverse_as_preconditioner_takes_one_step(problem):
    _, _, _, ggn, dense, v = problem
    lam = relative_damping(0.1, ggn, per_layer=False)
    exact = Exact(dense, ggn.shapes, lam)
    pcg = CG(ggn, lam, max_iters=10, tol=1e-10, preconditioner=exact)
    assert rel_err(pcg.ihvp(v), exact.ihvp(v)) < 1e-10
    assert pcg.info.iterations == 1


def test_preconditioned_cg_converges_to_exact(problem):
    # Any symmetric positive definite preconditioner leaves the answer unchanged.
    model, layers, train, ggn, dense, v = problem
    v = {n: x[:1] for n, x in v.items()}
    lam = relative_damping(0.1, ggn, per_layer=False)
    exact = Exact(dense, ggn.shapes, lam).ihvp(v)
    ekfac = fit_ekfac(
        model,
        [train] * 4,
        layers=layers,
        fisher="true",
        progress=False,
        damping=lam[next(iter(lam))],
        relative=False,
    )  # true Fisher, 4 label samples per sequence: an estimate of this GGN, per layer
    block = Exact(dense, ggn.shapes, lam, block_diagonal=True)
    iterations = {}
    for name, pre in {"plain": None, "ekfac": ekfac, "block": block}.items():
        cg = CG(ggn, lam, max_iters=ggn.num_params, tol=1e-10, preconditioner=pre)
        assert rel_err(cg.ihvp(v), exact) < 1e-8, name
        iterations[name] = cg.info.iterations
    # Not a theorem but a property of this problem, whose LoRA layers are weakly coupled:
    # the exact per-layer inverse saves CG steps.
    assert iterations["block"] < iterations["plain"]


def test_lissa_is_the_truncated_neumann_series(problem):
    # Deterministic (one batch): result = (1/s) sum_{k<=J} (I - A/s)^k v, which equals
    # A^{-1} v - (I - A/s)^{J+1} A^{-1} v.
    _, _, _, ggn, dense, v = problem
    lam, scale, depth = 1e-3, 0.2, 5
    step = eye(ggn.num_params) - (dense + lam * eye(ggn.num_params)) / scale
    expected = (
        sum(torch.linalg.matrix_power(step, k) for k in range(depth + 1)) @ flatten(v).T / scale
    )
    out = LiSSA(ggn, damping=lam, scale=scale, depth=depth).ihvp(v)
    assert rel_err(out, unflatten(expected.T, ggn.shapes)) < 1e-10


def test_lissa_converges_to_exact_at_the_predicted_rate(problem):
    # With s > lambda_max(A), the error is at most (1 - lambda_min(A)/s)^(J+1) |A^{-1} v|.
    _, _, _, ggn, dense, v = problem
    lam = relative_damping(2.0, ggn, per_layer=False)
    eig = torch.linalg.eigvalsh(dense) + next(iter(lam.values()))
    scale = 1.05 * float(eig.max())
    rate = 1 - float(eig.min()) / scale
    depth = lissa_depth(rate, 1e-3)
    exact = Exact(dense, ggn.shapes, lam).ihvp(v)
    out = LiSSA(ggn, damping=lam, scale=scale, depth=depth).ihvp(v)
    assert rel_err(out, exact) <= rate ** (depth + 1)
    assert rel_err(out, exact) > 0.2 * rate ** (depth + 1)  # the bound is nearly attained


def test_lissa_with_minibatches_is_unbiased(problem):
    # Each step samples a batch independent of h_j, so E[result] is the deterministic
    # recursion with the full GGN; projections of the mean of independent runs must lie
    # within 4.5 standard errors of it.
    model, layers, train, _, dense, v = problem
    ggn = GGN(model, layers, split_batch(train, 2))  # 3 batches of 2 sequences
    v = {n: x[:1] for n, x in v.items()}
    lam, scale, depth, runs = 1e-3, 0.2, 4, 40
    a = dense + lam * eye(ggn.num_params)
    step = eye(ggn.num_params) - a / scale
    h = flatten(v)[0]
    target = h.clone()
    for _ in range(depth):
        target = h + step @ target
    target = target / scale
    outs = torch.stack(
        [flatten(LiSSA(ggn, lam, scale, depth, seed=seed).ihvp(v))[0] for seed in range(runs)]
    )  # (runs, P)
    dirs = torch.randn(
        4, ggn.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    proj, exact = outs @ dirs.T, dirs @ target  # (runs, 4), (4,)
    stderr = proj.std(0) / runs**0.5
    assert (stderr > 0).all()  # the minibatches do differ
    assert ((proj.mean(0) - exact).abs() < 4.5 * stderr).all()
    # repeats=R averages R runs drawn from one seeded generator.
    avg = flatten(LiSSA(ggn, lam, scale, depth, repeats=3, seed=0).ihvp(v))[0]
    assert ((avg @ dirs.T - exact).abs() < 4.5 * proj.std(0) / 3**0.5).all()


def datainf_oracle(train_grads: dict, v: dict, lam: dict) -> dict:
    """(1/n) sum_i (g_i g_i^T + lam I)^{-1} v with explicit inverses, per layer."""
    out = {}
    for name, g in train_grads.items():
        g = g.flatten(1)  # (n, D)
        inv = torch.stack(
            [torch.linalg.inv(torch.outer(gi, gi) + lam[name] * eye(len(gi))) for gi in g]
        )
        out[name] = (v[name].flatten(1) @ inv.mean(0)).reshape(v[name].shape)  # inverses symmetric
    return out


def test_datainf_equals_its_closed_form(problem):
    model, layers, train, _, _, v = problem
    grads = per_example_grads(model, train, layers=layers)
    solver = DataInf(grads)
    assert rel_err(solver.ihvp(v), datainf_oracle(grads, v, solver.lam)) < 1e-10
    absolute = DataInf(grads, damping=0.05)
    lam = dict.fromkeys(grads, 0.05)
    assert rel_err(absolute.ihvp(v), datainf_oracle(grads, v, lam)) < 1e-10


def test_datainf_default_damping_is_the_reference_heuristic(problem):
    # ykwon0407/DataInf: lambda_l = mean_i mean(g_i ** 2) / lambda_const, lambda_const = 10.
    model, layers, train, *_ = problem
    grads = per_example_grads(model, train, layers=layers)
    lam = datainf_damping(grads)
    for name, g in grads.items():
        per_example = [float((gi**2).mean()) for gi in g]
        assert lam[name] == pytest.approx(sum(per_example) / len(per_example) / 10, rel=1e-12)
        assert lam[name] == pytest.approx(0.1 * float(g.pow(2).sum((1, 2)).mean()) / g[0].numel())


def test_lissa_as_published_is_four_times_the_gradient(problem):
    model, layers, train, _, _, v = problem
    grads = per_example_grads(model, train, layers=layers)
    solver = LiSSAAsPublished(grads)
    out = solver.ihvp(v)
    for name, g in grads.items():
        # Exactly sum_{k<=3} (I - (F - lam I)/1000)^k v with the empirical Fisher F.
        gf = g.flatten(1)
        d = gf.shape[1]
        step = eye(d) - (gf.T @ gf / gf.shape[0] - solver.lam[name] * eye(d)) / 1000
        terms = [torch.linalg.matrix_power(step, k) for k in range(4)]
        expected = v[name].flatten(1) @ sum(terms)
        assert rel_err({name: out[name].flatten(1)}, {name: expected}) < 1e-12
        # |h_3 - 4 v| <= sum_k ((1 + e)^k - 1) |v| with e = |I - step|: 6 e to first order.
        e = float(torch.linalg.matrix_norm(eye(d) - step, ord=2))
        bound = sum((1 + e) ** k - 1 for k in range(4))
        assert e < 1e-2  # small gradients: far from the regime where the recursion acts
        err = (out[name] - 4 * v[name]).flatten(1).norm(dim=1) / v[name].flatten(1).norm(dim=1)
        assert (err <= bound).all()


def test_largest_eigenvalue_by_power_iteration(problem):
    _, _, _, ggn, dense, _ = problem
    top = float(torch.linalg.eigvalsh(dense)[-1])
    estimate = largest_eigenvalue(ggn, iters=40)
    assert 0.999 * top < estimate <= top * (1 + 1e-12)  # a Rayleigh quotient: never above
    # The GGN of a minibatch (here the whole data as 2 of 3 batches: a different matrix).
    batches = split_batch(problem[2], 2)
    held = DenseGGN(GGN(problem[0], problem[1], batches))
    sub = float(torch.linalg.eigvalsh(held.sums[0] + held.sums[2])[-1]) / 4
    estimate = largest_eigenvalue(held, iters=60, batches=[batches[0], batches[2]])
    assert 0.999 * sub < estimate <= sub * (1 + 1e-12) and abs(sub - top) > 1e-3 * top


def test_bad_vectors_are_clear_errors(problem):
    _, _, _, ggn, dense, v = problem
    exact = Exact(dense, ggn.shapes, 1e-3)
    with pytest.raises(ValueError, match="leading query dimension"):
        exact.ihvp({n: x[0] for n, x in v.items()})
    with pytest.raises(ValueError, match="the solver expects"):
        CG(ggn, 1e-3).ihvp(dict(list(v.items())[:1]))


def test_bad_damping_is_a_clear_error(problem):
    _, _, _, ggn, dense, v = problem
    with pytest.raises(ValueError, match="damping must be >= 0"):
        CG(ggn, damping=-1.0)
    with pytest.raises(ValueError, match="no value for layers"):
        Exact(dense, ggn.shapes, damping={})
    with pytest.raises(ValueError, match="singular"):
        Exact(dense, ggn.shapes, damping=0.0)  # 6 sequences: G has a null space
    with pytest.raises(ValueError, match="divides by the damping"):
        DataInf(v, damping=0.0)


def test_exact_with_damping_equals_a_fresh_decomposition(problem):
    _, _, _, ggn, dense, v = problem
    per_layer = relative_damping(0.5, ggn, per_layer=True)
    for block_diagonal in (False, True):
        base = Exact(dense, ggn.shapes, 1e-3, block_diagonal=block_diagonal)
        for damping in (0.2, per_layer):  # shifted eigenvalues; per-layer: shifted per block
            fresh = Exact(dense, ggn.shapes, damping, block_diagonal=block_diagonal)
            assert rel_err(base.with_damping(damping).ihvp(v), fresh.ihvp(v)) < 1e-10
    assert base.damping == 1e-3  # the original is unchanged


def test_callbacks_see_every_iterate(problem):
    _, _, _, ggn, _, v = problem
    seen = {}
    cg = CG(ggn, 0.1, max_iters=4, tol=0.0, callback=lambda k, x: seen.update({k: x}))
    out = cg.ihvp(v)
    assert sorted(seen) == [1, 2, 3, 4] and rel_err(seen[4], out) < 1e-12
    two = CG(ggn, 0.1, max_iters=2, tol=0.0).ihvp(v)
    assert rel_err(seen[2], two) < 1e-12
    seen.clear()
    record = lambda j, x: seen.update({j: x})  # noqa: E731
    out = LiSSA(ggn, damping=1e-3, scale=0.2, depth=5, callback=record).ihvp(v)
    assert sorted(seen) == [1, 2, 3, 4, 5] and rel_err(seen[5], out) < 1e-12
    assert rel_err(seen[3], LiSSA(ggn, damping=1e-3, scale=0.2, depth=3).ihvp(v)) < 1e-12


def test_low_rank_is_the_exact_inverse_of_the_empirical_fisher(problem):
    model, layers, train, ggn, _, v = problem
    grads = per_example_grads(model, train, layers=layers)  # 6 rows, P = 256
    fisher = ggn.empirical_fisher_dense()
    p = fisher.shape[0]
    for lam in (1e-3, 0.1, 10.0):
        solver = LowRank(grads, lam)
        assert (
            rel_err(
                solver.ihvp(v),
                solve(fisher, torch.full((p,), lam, dtype=torch.float64), v, ggn.shapes),
            )
            < 1e-9
        )
    again = LowRank(grads, 1.0).with_damping(1e-2)
    assert rel_err(again.ihvp(v), LowRank(grads, 1e-2).ihvp(v)) < 1e-12
    top = torch.linalg.eigvalsh(fisher).flip(0)[: len(solver.eigenvalues)]
    assert torch.allclose(solver.eigenvalues, top, atol=1e-10 * top[0])
    # Per layer: the Woodbury form with D = diag(lam_l), and a multiple of D (a damping sweep)
    # that reuses the eigendecomposition of U D^-1 U^T.
    per_layer = {n: 10.0 ** -(k % 3) for k, n in enumerate(ggn.shapes)}
    solver = LowRank(grads, per_layer)
    for c in (1.0, 1e-2, 1e2):
        lam = {n: c * x for n, x in per_layer.items()}
        expected = solve(fisher, damping_vector(lam, ggn.shapes), v, ggn.shapes)
        assert rel_err(solver.with_damping(lam).ihvp(v), expected) < 1e-9
    assert len(solver._bases) == 1  # three multiples of one profile: one eigendecomposition
    # A uniform damping on the same matrix (a sweep in absolute terms): one more profile, shared
    # by every copy, and still the exact inverse.
    for c in (1e-3, 1.0):
        expected = solve(fisher, torch.full((p,), c, dtype=torch.float64), v, ggn.shapes)
        assert rel_err(solver.with_damping(c).ihvp(v), expected) < 1e-9
    assert len(solver._bases) == 2
    with pytest.raises(ValueError, match="finite damping > 0"):
        LowRank(grads, {n: 0.0 for n in grads})
    with pytest.raises(ValueError, match="no value for layers"):
        LowRank(grads, {next(iter(grads)): 0.1})
    with pytest.raises(ValueError, match="NaN"):
        LowRank({n: g * float("nan") for n, g in grads.items()}, 0.1)


def test_low_rank_on_ggn_jacobian_columns_inverts_the_ggn(problem):
    # G = (1/N) A A^T with A = GGN.jacobian (P, C): rows u = sqrt(C / N) A^T give (1/C) U^T U = G.
    _, _, train, ggn, dense, v = problem
    a = ggn.jacobian(train, "forward")  # (P, C)
    rows = ggn.unflatten((a.T * (a.shape[1] / ggn.num_sequences) ** 0.5).contiguous())
    p = dense.shape[0]
    solver = LowRank(rows, 0.05)
    assert (
        rel_err(
            solver.ihvp(v), solve(dense, torch.full((p,), 0.05, dtype=torch.float64), v, ggn.shapes)
        )
        < 1e-9
    )

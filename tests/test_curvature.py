"""K-FAC / EK-FAC against dense Fisher matrices, invariances, save/load and resume."""

import pytest
import torch
from conftest import assert_rel, make_batch, make_gpt2, make_llama, split_batch

from influence.curvature import EKFAC, KFAC, fit_ekfac, fit_from_captures, fit_kfac
from influence.gradients import Captured, capture, per_example_grads
from influence.io import load_tensors
from influence.modules import find_layers


def data():
    return make_batch([8, 5, 7, 4, 6, 8], seed=1)


def dense_fisher(grads):
    """(1/N) sum_n vec(G_n) vec(G_n)^T of one layer's (N, d_out, d_in') gradients."""
    flat = grads.flatten(start_dim=1)
    return flat.T @ flat / flat.shape[0]


def random_v(factors, q=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(q, *lam.shape, generator=g, dtype=torch.float64)
        for n, lam in factors.eigenvalues.items()
    }


def assert_same_factors(f1, f2):
    for name in f1.eigenvalues:
        assert_rel(f1.eigenvalues[name], f2.eigenvalues[name])
    v = random_v(f1)
    for name, x in f1.ihvp(v).items():
        assert_rel(x, f2.ihvp(v)[name])


def test_ekfac_and_kfac_equal_their_dense_formulas(tiny_model):
    # EK-FAC: Lambda = diag(Q^T F Q) with F the dense empirical Fisher; K-FAC: F ~ (M/N) S (x) A.
    layers = find_layers(tiny_model)
    batch = data()
    ekfac = fit_ekfac(
        tiny_model,
        split_batch(batch, 4),
        layers=layers,
        fisher="empirical",
        progress=False,
        damping=1e-3,
    )
    kfac = fit_kfac(
        tiny_model,
        [batch],
        layers=layers,
        fisher="empirical",
        progress=False,
        damping=1e-3,
        relative=False,
    )
    grads = per_example_grads(tiny_model, batch, layers=layers)
    cap = capture(tiny_model, layers, batch)
    mask = cap.mask
    n_tokens, n_seq = int(mask.sum()), mask.shape[0]
    v = random_v(ekfac)
    for name in layers:
        fisher = dense_fisher(grads[name])
        basis = torch.kron(ekfac.eigvecs_s[name], ekfac.eigvecs_a[name])
        in_basis = basis.T @ fisher @ basis
        assert_rel(ekfac.eigenvalues[name].reshape(-1), in_basis.diagonal())
        # Among diagonal matrices in this basis, EK-FAC's fits F best; K-FAC's does worse.
        err_ekfac = (in_basis - torch.diag(ekfac.eigenvalues[name].reshape(-1))).norm()
        err_kfac = (in_basis - torch.diag(kfac.eigenvalues[name].reshape(-1))).norm()
        assert err_ekfac < err_kfac
        # The damped inverse is the dense one.
        lam = 1e-3 * float(in_basis.diagonal().mean())
        expected = torch.linalg.solve(
            ekfac.dense(name) + lam * torch.eye(len(fisher), dtype=torch.float64),
            v[name].flatten(start_dim=1).T,
        ).T
        assert_rel(ekfac.ihvp(v)[name].flatten(start_dim=1), expected)
        # K-FAC's factors are the token averages A, S over non-padding tokens, scaled by M/N.
        a, g = cap.a[name][mask], cap.g[name][mask]
        a_cov, s_cov = a.T @ a / n_tokens, g.T @ g / n_tokens
        assert_rel(kfac.dense(name), n_tokens / n_seq * torch.kron(s_cov, a_cov))
        expected = torch.linalg.solve(
            kfac.dense(name) + 1e-3 * torch.eye(len(fisher), dtype=torch.float64),
            v[name].flatten(start_dim=1).T,
        ).T
        assert_rel(kfac.ihvp(v)[name].flatten(start_dim=1), expected)


def synthetic(tokens_per_example, pairs):
    """A capture source of examples given as lists of (a, g) token pairs, one batch."""
    a = torch.stack([torch.stack([p[0] for p in ex]) for ex in pairs])  # (N, T, d_in)
    g = torch.stack([torch.stack([p[1] for p in ex]) for ex in pairs])  # (N, T, d_out)
    mask = torch.ones(a.shape[:2], dtype=torch.bool)
    cap = Captured({"w": a}, {"w": g}, mask)
    dense = dense_fisher(torch.einsum("nto,nti->noi", g, a))
    return (lambda start, desc: [cap][start:]), {"w": (g.shape[-1], a.shape[-1])}, dense


def rotation(d, seed):
    return torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed)).double()
    )[0]


def test_ekfac_exact_when_fisher_is_diagonal_in_the_kronecker_basis():
    # One token per example, a = u R e_i and g = v P e_j with non-product weights u_ij v_ij:
    # F is diagonal in the basis P (x) R but not a Kronecker product, so EK-FAC is exact and
    # K-FAC is not.
    d_in, d_out = 3, 4
    R, P = rotation(d_in, 0), rotation(d_out, 1)
    w = torch.rand(d_in, d_out, generator=torch.Generator().manual_seed(2)).double() + 0.5
    pairs = [
        [(w[i, j] * R[:, i], (1 + i + j**2) * P[:, j])] for i in range(d_in) for j in range(d_out)
    ]
    source, shapes, fisher = synthetic(1, pairs)
    ekfac = fit_from_captures(source, shapes, "ekfac", damping=0.0, relative=False)
    kfac = fit_from_captures(source, shapes, "kfac", damping=0.0, relative=False)
    assert_rel(ekfac.dense("w"), fisher)
    assert (kfac.dense("w") - fisher).norm() > 0.05 * fisher.norm()
    # Undamped, the iHVP is the exact inverse: F (F^-1 v) = v.
    v = {"w": torch.randn(2, d_out, d_in, dtype=torch.float64)}
    back = (fisher @ ekfac.ihvp(v)["w"].reshape(2, -1).T).T.reshape(2, d_out, d_in)
    assert_rel(back, v["w"])


def test_kfac_exact_under_token_independence():
    # Two tokens per example; each grid token (a_i, g_j) appears twice, the second time with
    # the sign of g flipped in the partner token, so cross-token terms cancel exactly and
    # F = (1/N) sum_tokens (a a^T) (x) (g g^T) = (M/N) A (x) S with product weights.
    d_in, d_out = 3, 2
    R, P = rotation(d_in, 3), rotation(d_out, 4)
    grid = [((1 + i) * R[:, i], (2 + j) * P[:, j]) for i in range(d_in) for j in range(d_out)]
    pairs = []
    for k in range(0, len(grid), 2):
        (a1, g1), (a2, g2) = grid[k], grid[k + 1]
        pairs += [[(a1, g1), (a2, g2)], [(a1, g1), (a2, -g2)]]
    source, shapes, fisher = synthetic(2, pairs)
    kfac = fit_from_captures(source, shapes, "kfac", damping=0.0, relative=False)
    ekfac = fit_from_captures(source, shapes, "ekfac", damping=0.0, relative=False)
    assert_rel(kfac.dense("w"), fisher)
    assert_rel(ekfac.dense("w"), fisher)


@pytest.mark.parametrize("maker", [make_gpt2, make_llama])
def test_factors_invariant_to_batch_size_and_padding(maker):
    # Covariances and corrected eigenvalues do not depend on how the data is batched or padded.
    model = maker()
    batch = data()
    padded = make_batch([8, 5, 7, 4, 6, 8], seed=1, pad_to=12)
    ref = fit_ekfac(model, [batch], fisher="empirical", progress=False)
    for batches in (split_batch(batch, 1), split_batch(padded, 4)):
        assert_same_factors(fit_ekfac(model, batches, fisher="empirical", progress=False), ref)


def test_damping_absolute_and_relative(gpt2):
    ekfac = fit_ekfac(
        gpt2, [data()], fisher="empirical", progress=False, damping=0.1, relative=True
    )
    name = next(iter(ekfac.eigenvalues))
    assert ekfac.damping_of(name) == pytest.approx(0.1 * float(ekfac.eigenvalues[name].mean()))
    assert ekfac.with_damping(0.5, relative=False).damping_of(name) == 0.5
    with pytest.raises(ValueError, match="damped eigenvalue"):
        ekfac.with_damping(-1e6, relative=False).ihvp(random_v(ekfac))
    # A dict is absolute per layer: each layer is solved with its own value, as if alone.
    per_layer = {n: 0.01 * (k + 1) for k, n in enumerate(ekfac.eigenvalues)}
    v = random_v(ekfac)
    out = ekfac.with_damping(per_layer).ihvp(v)
    for n, lam in per_layer.items():
        alone = ekfac.with_damping(lam, relative=False).ihvp({n: v[n]})[n]
        assert torch.equal(out[n], alone)
    with pytest.raises(KeyError, match="no value for layer"):
        ekfac.with_damping({name: 0.1}).ihvp(v)


def test_true_fisher_is_seeded(gpt2):
    batches = split_batch(data(), 3)
    first = fit_ekfac(gpt2, batches, fisher="true", seed=1, progress=False)
    assert_same_factors(first, fit_ekfac(gpt2, batches, fisher="true", seed=1, progress=False))
    other = fit_ekfac(gpt2, batches, fisher="true", seed=2, progress=False)
    name = next(iter(first.eigenvalues))
    assert not torch.allclose(first.eigenvalues[name], other.eigenvalues[name])
    assert first.meta["fisher"] == "true"


def test_save_load_round_trip(gpt2, tmp_path):
    batches = split_batch(data(), 2)
    ekfac = fit_ekfac(gpt2, batches, path=tmp_path, fisher="empirical", progress=False)
    assert_same_factors(EKFAC.load(tmp_path, model=gpt2), ekfac)
    assert_same_factors(
        KFAC.load(tmp_path), fit_kfac(gpt2, batches, fisher="empirical", progress=False)
    )
    assert EKFAC.load(tmp_path).meta["examples"] == 6
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_mismatches_are_clear_errors(gpt2, tmp_path):
    batches = split_batch(data(), 2)
    fit_ekfac(gpt2, batches, path=tmp_path, fisher="empirical", progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        EKFAC.load(tmp_path, model=make_gpt2(seed=1))
    with pytest.raises(ValueError, match="fisher: saved 'empirical', expected 'true'"):
        fit_ekfac(gpt2, batches, path=tmp_path, fisher="true", progress=False)
    with pytest.raises(ValueError, match="data"):
        fit_ekfac(gpt2, batches[:2], path=tmp_path, fisher="empirical", progress=False)
    with pytest.raises(FileNotFoundError, match="no eigens.safetensors"):
        EKFAC.load(tmp_path / "elsewhere")
    (tmp_path / "correction.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(ValueError, match="corrupted"):
        EKFAC.load(tmp_path)


def test_interrupted_fit_resumes(llama, tmp_path):
    # A fit killed part-way reruns only the batches not yet saved and gives the same factors.
    batches = split_batch(data(), 1)  # 6 batches, 2 passes (covariance, correction)
    ref = fit_ekfac(llama, batches, fisher="empirical", progress=False)
    forwards, stop = [], []

    def count(module, args, kwargs):
        if stop and len(forwards) == stop[0]:
            raise KeyboardInterrupt("simulated interruption")
        forwards.append(1)

    handle = llama.register_forward_pre_hook(count, with_kwargs=True)
    try:
        # Run 1 dies after 3 covariance batches; run 2 does the other 3 and 2 correction
        # batches, then dies; run 3 only does the 4 correction batches left.
        for stop_after, done in [(3, 3), (5, 5), (None, 4)]:
            forwards.clear()
            stop[:] = [stop_after] if stop_after else []
            if stop_after:
                with pytest.raises(KeyboardInterrupt):
                    fit_ekfac(
                        llama,
                        batches,
                        path=tmp_path,
                        save_every=1,
                        fisher="empirical",
                        progress=False,
                    )
            else:
                resumed = fit_ekfac(
                    llama, batches, path=tmp_path, save_every=1, fisher="empirical", progress=False
                )
            assert len(forwards) == done
    finally:
        handle.remove()
    assert_same_factors(resumed, ref)
    _, meta = load_tensors(tmp_path / "correction.safetensors")
    assert meta["stage"] == "correction" and meta["fisher"] == "empirical"
    assert not list(tmp_path.glob("*.partial.*"))


def test_true_fisher_ekfac_matches_exact_expectation():
    # With labels sampled from the model, EK-FAC's corrected eigenvalues estimate
    # diag(Q^T G Q) per layer, G the exact GGN (= the expected true Fisher per sequence), in
    # the fitted basis Q = Q_S (x) Q_A. Their error is label-sampling noise: ~ 1/sqrt(draws).
    from influence.ggn import GGN

    model = make_gpt2()
    layers = find_layers(model, include=r"attn\.c_proj")
    batch = data()
    exact = GGN(model, layers, [batch]).dense()

    def error(draws):
        fit = fit_ekfac(model, [batch] * draws, layers=layers, progress=False)
        num = den = 0.0
        start = 0
        for name, lam in fit.eigenvalues.items():
            size = lam.numel()
            block = exact[start : start + size, start : start + size]
            basis = torch.kron(fit.eigvecs_s[name], fit.eigvecs_a[name])
            expected = torch.einsum("pi,pq,qi->i", basis, block, basis)
            num += float((lam.reshape(-1) - expected).square().sum())
            den += float(expected.square().sum())
            start += size
        return (num / den) ** 0.5

    few, many = error(4), error(256)
    assert many < 0.1, many
    # 64x the draws: the noise should shrink ~8x; allow for the randomness of the estimate.
    assert many < few / 3, (few, many)


def test_float32_products(llama, tmp_path):
    # product_dtype=float32 runs each batch's products in float32 and sums them in float64.
    # On a float32 model it agrees with the float64 products at float32 round-off; a float64
    # model keeps float64 products (at least the model's dtype): the same factors bit for bit.
    batches = split_batch(data(), 2)
    exact = fit_ekfac(llama, batches, fisher="empirical", progress=False)
    same = fit_ekfac(llama, batches, fisher="empirical", product_dtype=torch.float32,
                     progress=False)  # fmt: skip
    for name in exact.eigenvalues:
        assert torch.equal(same.eigenvalues[name], exact.eigenvalues[name])
    model32 = make_llama().float()
    f64 = fit_ekfac(model32, batches, fisher="empirical", progress=False)
    f32 = fit_ekfac(model32, batches, fisher="empirical", product_dtype=torch.float32,
                    path=tmp_path, progress=False)  # fmt: skip
    assert f32.meta["product_dtype"] == "float32" and f64.meta["product_dtype"] is None
    v = random_v(f64)
    for name, x in f32.ihvp(v).items():
        assert f32.eigenvalues[name].dtype == torch.float64
        assert_rel(x, f64.ihvp(v)[name], tol=1e-4)
        assert not torch.equal(f32.eigenvalues[name], f64.eigenvalues[name])  # float32 ran
    with pytest.raises(ValueError, match="product_dtype: saved 'float32', expected None"):
        fit_ekfac(model32, batches, fisher="empirical", path=tmp_path, progress=False)
    with pytest.raises(ValueError, match="product_dtype must be"):
        fit_ekfac(model32, batches, product_dtype=torch.bfloat16, progress=False)

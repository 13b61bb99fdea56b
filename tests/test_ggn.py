"""The exact GGN against independent oracles on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from conftest import MAKERS, make_batch, split_batch, unpad
from transformers.pytorch_utils import Conv1D

from influence.ggn import GGN, DenseGGN, ggn_vector_product
from influence.gradients import per_example_grads
from influence.lm import loss_mask
from influence.modules import find_layers, flatten

# A few hundred parameters per model, with and without bias, Conv1D and nn.Linear.
LAYERS = {
    "gpt2": ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"],
    "llama": ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"],
    "gpt2_lora": None,  # every LoRA adapter
}
# Llama's RMSNorm computes in float32 whatever the model's dtype, so derivatives through it
# agree to ~1e-7 only; the GPT-2 models are float64 end to end.
RTOL = {"gpt2": 1e-10, "llama": 1e-6, "gpt2_lora": 1e-10}


def setup(name: str, batch=None):
    model = MAKERS[name]()
    layers = find_layers(model, include=LAYERS[name])
    batch = make_batch([9, 6, 4, 7]) if batch is None else batch
    return model, layers, batch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def native_grad_to_canonical(module: torch.nn.Module, gw: torch.Tensor, gb) -> torch.Tensor:
    """A weight/bias gradient in the canonical (d_out, d_in') layout, written out by hand."""
    w = gw.T if isinstance(module, Conv1D) else gw
    return w if gb is None else torch.cat([w, gb[:, None]], dim=1)


def autograd_ggn(model, layers, batch) -> torch.Tensor:
    """Oracle: sum over counted positions of J^T (diag p - p p^T) J / N, where each row of J
    (one logit) comes from its own torch.autograd.grad on the model's real parameters."""
    params = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = loss_mask(batch["labels"])
    g = torch.zeros(
        sum(p.numel() for p in params), sum(p.numel() for p in params), dtype=torch.float64
    )
    for b, t in mask.nonzero().tolist():
        rows = []
        for k in range(logits.shape[-1]):
            grads = iter(torch.autograd.grad(logits[b, t, k], params, retain_graph=True))
            row = []
            for m in layers.values():
                gw, gb = next(grads), next(grads) if m.bias is not None else None
                row.append(native_grad_to_canonical(m, gw, gb).flatten())
            rows.append(torch.cat(row))
        jac = torch.stack(rows)  # (V, P)
        p = torch.softmax(logits[b, t].detach(), dim=-1)
        g += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return g / batch["input_ids"].shape[0]


@pytest.mark.parametrize("name", list(MAKERS))
def test_dense_equals_matvecs_on_unit_vectors(name):
    # Column i of the dense GGN is G e_i from the matrix-free product.
    model, layers, batch = setup(name)
    ggn = GGN(model, layers, batch)
    dense = ggn.dense()
    eye = torch.eye(ggn.num_params, dtype=torch.float64)
    columns = flatten(ggn.matvec(ggn.unflatten(eye)))
    assert rel_err(columns, dense) < RTOL[name]
    assert torch.allclose(dense, dense.T, rtol=0, atol=1e-12 * dense.abs().max())
    assert torch.linalg.eigvalsh(dense).min() > -1e-10 * dense.abs().max()  # PSD


@pytest.mark.parametrize("name", list(MAKERS))
def test_dense_matches_autograd_oracle(name):
    model, layers, batch = setup(name, make_batch([6, 4, 5], seed=3))
    dense = GGN(model, layers, batch).dense()
    assert rel_err(dense, autograd_ggn(model, layers, batch)) < RTOL[name]


def test_matvec_on_random_vectors_and_functional_form():
    model, layers, batch = setup("gpt2")
    ggn = GGN(model, layers, batch)
    v = torch.randn(
        5, ggn.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    expected = v @ ggn.dense()
    chunked = GGN(model, layers, batch, chunk=2)  # chunks smaller than Q, in 3 passes
    assert rel_err(flatten(chunked.matvec(ggn.unflatten(v))), expected) < 1e-10
    direct = flatten(ggn_vector_product(model, layers, [batch], ggn.unflatten(v)))
    assert rel_err(direct, expected) < 1e-10


def test_products_on_one_batch_reuse_its_forward_pass(monkeypatch):
    """A power iteration's products on one minibatch build its linear maps once, and give
    bit for bit what a GGN that rebuilds them at every product gives."""
    model, layers, batch = setup("gpt2_lora")
    other = make_batch([5, 8])
    cached, fresh = GGN(model, layers, [batch, other]), GGN(model, layers, [batch, other])
    built = []
    build = GGN._linear_maps

    def counting(self, b):
        built.append(self is cached)
        return build(self, b)

    monkeypatch.setattr(GGN, "_linear_maps", counting)
    fresh._maps = fresh._linear_maps  # no reuse
    gen = torch.Generator().manual_seed(0)
    v = cached.unflatten(torch.randn(3, cached.num_params, dtype=torch.float64, generator=gen))
    for batches in ([batch], [batch], [batch], [other], [batch], None):
        a, b = cached.matvec(v, batches=batches), fresh.matvec(v, batches=batches)
        assert all(torch.equal(a[n], b[n]) for n in a)
    # built for: batch (then reused twice), other, batch, other (the full GGN reuses batch)
    assert built.count(True) == 4 and built.count(False) == 7


def test_ggn_equals_hessian_when_logits_are_linear_in_the_weights():
    # logits = W h with h independent of the LM head W: the Hessian has no residual term.
    model = MAKERS["llama"]()
    layers = {"lm_head": model.lm_head}
    batch = make_batch([7, 5, 6], seed=2)
    ggn = GGN(model, layers, batch)
    assert rel_err(ggn.dense(), mean_loss_hessian(ggn, batch)) < 1e-10


def test_ggn_differs_from_hessian_inside_the_network():
    # Control for the test above: with a non-linear path the residual term is not small.
    model, layers, batch = setup("gpt2", make_batch([7, 5, 6], seed=2))
    ggn = GGN(model, layers, batch)
    assert rel_err(ggn.dense(), mean_loss_hessian(ggn, batch)) > 1e-3


def mean_loss_hessian(ggn: GGN, batch) -> torch.Tensor:
    from influence.lm import sequence_losses

    f = ggn.logits_fn(batch)

    def loss(flat):
        return sequence_losses(f(ggn.unflatten(flat)), batch["labels"]).mean()

    theta = flatten(ggn.params)
    return torch.autograd.functional.hessian(loss, theta, vectorize=True)


def test_sampled_fisher_converges_to_ggn():
    # u^T F_s w for label samples s is an unbiased estimate of u^T G w; each projection must
    # lie within 4.5 standard errors (from the sample spread) of the exact value.
    model, layers, batch = setup("gpt2_lora")
    ggn = GGN(model, layers, batch)
    dense = ggn.dense()
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(3, ggn.num_params, dtype=torch.float64, generator=gen)
    pairs = [(0, 0), (0, 1), (1, 2), (2, 2)]
    samples = 200
    values = torch.zeros(samples, len(pairs), dtype=torch.float64)
    for s in range(samples):
        g = ggn.sequence_grads(batch, ggn.sample_labels(batch, gen))  # (N, P)
        proj = g @ dirs.T  # (N, 3)
        values[s] = torch.stack([(proj[:, i] * proj[:, j]).mean() for i, j in pairs])
    exact = torch.stack([dirs[i] @ dense @ dirs[j] for i, j in pairs])
    stderr = values.std(0) / samples**0.5
    assert ((values.mean(0) - exact).abs() < 4.5 * stderr).all()
    # The dense Monte-Carlo estimator gets closer with more samples (error ~ 1/sqrt(S)).
    few = rel_err(ggn.sampled_fisher_dense(4, torch.Generator().manual_seed(1)), dense)
    many = rel_err(ggn.sampled_fisher_dense(64, torch.Generator().manual_seed(1)), dense)
    assert many < few / 2


def test_empirical_fisher_matches_per_example_grads():
    model, layers, batch = setup("gpt2")
    ggn = GGN(model, layers, batch)
    g = flatten(per_example_grads(model, batch, layers=layers))  # (N, P), from the hooks
    expected = g.T @ g / g.shape[0]
    assert rel_err(ggn.empirical_fisher_dense(), expected) < 1e-10
    # It is not the GGN: the data's labels are not the model's samples.
    assert rel_err(ggn.empirical_fisher_dense(), ggn.dense()) > 1e-2


def test_ggn_is_invariant_to_batching_and_padding():
    # The average over sequences must not depend on how they are batched or padded.
    model, _, batch = setup("gpt2")
    layers = find_layers(model, include="transformer.h.1.attn.c_proj")
    whole = GGN(model, layers, batch).dense()
    split = GGN(model, layers, split_batch(batch, 3)).dense()
    unpadded = GGN(model, layers, [unpad(batch, i) for i in range(4)]).dense()
    assert rel_err(split, whole) < 1e-12
    assert rel_err(unpadded, whole) < 1e-10


def test_trace_matches_dense_blocks():
    model, _, batch = setup("llama")
    layers = find_layers(
        model, include=["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    )
    ggn = GGN(model, layers, batch)
    dense, traces, start = ggn.dense(), ggn.trace(), 0
    for name, (o, i) in ggn.shapes.items():
        block = dense[start : start + o * i, start : start + o * i]
        assert traces[name] == pytest.approx(float(block.trace()), rel=1e-12)
        start += o * i


def test_bad_vector_shapes_are_clear_errors():
    model, layers, batch = setup("gpt2")
    ggn = GGN(model, layers, batch)
    v = {n: torch.zeros(2, o, i, dtype=torch.float64) for n, (o, i) in ggn.shapes.items()}
    with pytest.raises(ValueError, match="leading query dimension"):
        ggn.matvec({n: x[0] for n, x in v.items()})
    with pytest.raises(ValueError, match="tracks"):
        ggn.matvec(dict(list(v.items())[:1]))


@pytest.mark.parametrize("name", list(MAKERS))
def test_reverse_mode_equals_forward_mode(name):
    # Two independent routes to the same matrix: P Jacobian-vector products through the logits
    # against K*d backward passes through the last hidden state; chunks smaller than a round.
    model, layers, batch = setup(name)
    ggn = GGN(model, layers, [batch, make_batch([5, 8], seed=3)], chunk=5)
    forward = ggn.dense()
    assert rel_err(ggn.dense(mode="reverse"), forward) < RTOL[name]
    traces = ggn.trace(mode="reverse")
    assert sum(traces.values()) == pytest.approx(float(forward.trace()), rel=1e-10)


def test_reverse_mode_needs_an_untracked_linear_head():
    model = MAKERS["llama"]()
    ggn = GGN(model, {"lm_head": model.lm_head}, make_batch([5, 4]))
    with pytest.raises(ValueError, match="untracked LM head"):
        ggn.dense(mode="reverse")
    with pytest.raises(ValueError, match="mode must be"):
        ggn.dense(mode="sideways")


def test_dense_ggn_products_equal_matvec():
    # Whole data and one batch of it (LiSSA's stochastic products), from cached matrices.
    model, layers, batch = setup("gpt2_lora")
    batches = split_batch(batch, 2)
    ggn = GGN(model, layers, batches)
    held = DenseGGN(ggn, mode="reverse")
    v = ggn.unflatten(torch.randn(3, ggn.num_params, dtype=torch.float64))
    assert rel_err(flatten(held.matvec(v)), flatten(ggn.matvec(v))) < 1e-10
    one = [batches[1]]
    assert rel_err(flatten(held.matvec(v, one)), flatten(ggn.matvec(v, one))) < 1e-10
    assert rel_err(held.dense(), ggn.dense()) < 1e-10
    with pytest.raises(ValueError, match="not among"):
        held.matvec(v, [make_batch([4, 4])])

"""Influence scores against explicit gradient dot products, and their invariances."""

import pytest
import torch
from conftest import assert_rel, make_batch, split_batch, unpad

from influence.curvature import fit_ekfac
from influence.gradients import collect_grads
from influence.lm import sequence_losses
from influence.modules import canonical_weight, find_layers, to_native
from influence.scores import compress, pairwise_scores, self_influence, token_scores


def train():
    return make_batch([8, 5, 7, 4, 6, 8], seed=1)


def queries():
    return make_batch([6, 9], seed=2)


def flat_autograd_grad(model, layers, single):
    """Oracle: the tracked parameters' gradient of one unpadded sequence's loss, flattened."""
    logits = model(input_ids=single["input_ids"]).logits
    loss = sequence_losses(logits, single["labels"]).sum()
    params = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_identity_scores_are_gradient_dot_products(tiny_model):
    layers = find_layers(tiny_model)
    q_batch, t_batch = queries(), train()
    q = collect_grads(tiny_model, [q_batch], layers=layers, progress=False)
    scores = pairwise_scores(tiny_model, split_batch(t_batch, 4), q, progress=False)
    q_flat = torch.stack(
        [flat_autograd_grad(tiny_model, layers, unpad(q_batch, i)) for i in range(2)]
    )
    t_flat = torch.stack(
        [flat_autograd_grad(tiny_model, layers, unpad(t_batch, i)) for i in range(6)]
    )
    assert scores.shape == (2, 6)
    assert_rel(scores, q_flat @ t_flat.T)


def test_ekfac_scores_match_dense_solve(gpt2):
    # score = sum_l q_l^T (F_l + lambda_l I)^-1 g_l with the dense EK-FAC blocks.
    layers = find_layers(gpt2)
    ekfac = fit_ekfac(gpt2, [train()], layers=layers, fisher="empirical", progress=False)
    q = collect_grads(gpt2, [queries()], layers=layers, progress=False)
    g = collect_grads(gpt2, [train()], layers=layers, progress=False)
    expected = 0
    for name in layers:
        block = ekfac.dense(name)
        damped = block + ekfac.damping_of(name) * torch.eye(len(block), dtype=torch.float64)
        expected = expected + q[name].flatten(1) @ torch.linalg.solve(damped, g[name].flatten(1).T)
    assert_rel(pairwise_scores(gpt2, [train()], q, solver=ekfac, progress=False), expected)


def test_positive_score_means_loss_decreases(gpt2):
    # Sign convention: stepping th <- th - eps H^-1 grad L(z) (here H = I) changes the query's
    # loss by -eps * score(z, q) to first order.
    layers = find_layers(gpt2)
    q_batch, z = unpad(queries(), 0), unpad(train(), 2)
    q = collect_grads(gpt2, [q_batch], layers=layers, progress=False)
    score = pairwise_scores(gpt2, [z], q, progress=False)[0, 0]
    step = collect_grads(gpt2, [z], layers=layers, progress=False)

    def query_loss():
        with torch.no_grad():
            return sequence_losses(gpt2(input_ids=q_batch["input_ids"]).logits, q_batch["labels"])

    before, eps = query_loss(), 1e-6
    with torch.no_grad():
        for name, module in layers.items():
            native = to_native(module, canonical_weight(module) - eps * step[name][0])
            module.weight.copy_(native["weight"])
            module.bias.copy_(native["bias"])
    change = query_loss() - before
    assert score.abs() > 1e-3
    assert change.item() == pytest.approx(-eps * score.item(), rel=1e-4)


def test_per_layer_and_per_token_scores_sum_to_total(tiny_model):
    layers = find_layers(tiny_model)
    ekfac = fit_ekfac(tiny_model, [train()], layers=layers, fisher="empirical", progress=False)
    q = collect_grads(tiny_model, [queries()], layers=layers, progress=False)
    batches = split_batch(train(), 4)  # batches of lengths 8 and 8: T is padded the same
    total = pairwise_scores(tiny_model, batches, q, solver=ekfac, progress=False)
    per_layer = pairwise_scores(
        tiny_model, batches, q, solver=ekfac, per_layer=True, progress=False
    )
    assert per_layer.shape == (len(layers), 2, 6)
    assert_rel(per_layer.sum(0), total)
    per_token = token_scores(tiny_model, batches, q, solver=ekfac, progress=False)
    assert per_token.shape == (2, 6, 8)
    assert_rel(per_token.sum(-1), total)
    padding = train()["attention_mask"] == 0
    assert torch.all(per_token[:, padding] == 0)


def test_self_influence_is_pairwise_diagonal(tiny_model):
    layers = find_layers(tiny_model)
    ekfac = fit_ekfac(tiny_model, [train()], layers=layers, fisher="empirical", progress=False)
    batches = split_batch(train(), 4)
    as_queries = collect_grads(tiny_model, batches, layers=layers, progress=False)
    pairwise = pairwise_scores(tiny_model, batches, as_queries, solver=ekfac, progress=False)
    selfs = self_influence(
        tiny_model, split_batch(train(), 2), solver=ekfac, layers=layers, progress=False
    )
    assert_rel(selfs, pairwise.diagonal())
    assert torch.all(selfs > 0)


def test_scores_invariant_to_batch_size_and_padding(llama):
    layers = find_layers(llama)
    ekfac = fit_ekfac(llama, [train()], layers=layers, fisher="empirical", progress=False)
    q = collect_grads(llama, [queries()], layers=layers, progress=False)
    ref = pairwise_scores(llama, [train()], q, solver=ekfac, progress=False)
    padded = make_batch([8, 5, 7, 4, 6, 8], seed=1, pad_to=13)
    for batches in (split_batch(train(), 1), split_batch(padded, 4)):
        assert_rel(pairwise_scores(llama, batches, q, solver=ekfac, progress=False), ref)


def test_low_rank_queries(gpt2_lora):
    layers = find_layers(gpt2_lora)
    ekfac = fit_ekfac(gpt2_lora, [train()], layers=layers, fisher="empirical", progress=False)
    q = collect_grads(gpt2_lora, [queries()], layers=layers, progress=False)
    dense = pairwise_scores(gpt2_lora, [train()], q, solver=ekfac, progress=False)
    # Full rank (LoRA matrices have rank <= 2) is exact; rank 1 is an approximation.
    assert_rel(
        pairwise_scores(gpt2_lora, [train()], q, solver=ekfac, rank=2, progress=False), dense
    )
    approx = pairwise_scores(gpt2_lora, [train()], q, solver=ekfac, rank=1, progress=False)
    assert (approx - dense).norm() > 1e-6 * dense.norm()
    # compress() is a truncated SVD: rank r keeps the r largest singular values.
    pre = ekfac.ihvp(q)
    left, right = compress(pre, 1)[next(iter(pre))]
    mat = pre[next(iter(pre))]
    sv = torch.linalg.svdvals(mat)
    residual = mat - left @ right.mT
    assert_rel(torch.linalg.matrix_norm(residual), sv[:, 1:].norm(dim=-1))


def test_errors(gpt2, llama):
    q = collect_grads(llama, [queries()], layers=find_layers(llama), progress=False)
    with pytest.raises(ValueError, match="does not have"):
        pairwise_scores(gpt2, [train()], q, progress=False)
    with pytest.raises(ValueError, match="rank"):
        compress(q, 0)


class CountingBatches(list):
    """A list of batches that counts the passes over it."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def test_several_query_sets_in_one_pass_equal_separate_calls(gpt2):
    # The same queries preconditioned two ways, and a third set of other size: one call with
    # the sets gives each set's own scores exactly, from a single pass over the training data.
    layers = find_layers(gpt2)
    ekfac = fit_ekfac(gpt2, [train()], layers=layers, fisher="empirical", progress=False)
    q = collect_grads(gpt2, [queries()], layers=layers, progress=False)
    sets = {"ekfac": ekfac.ihvp(q), "dot": dict(q), "first": {n: x[:1] for n, x in q.items()}}
    batches = CountingBatches(split_batch(train(), 2))
    got, norms = pairwise_scores(gpt2, batches, sets, norms=True, progress=False)
    assert batches.passes == 1
    for name, pre in sets.items():
        alone = pairwise_scores(gpt2, split_batch(train(), 2), pre, progress=False)
        assert got[name].shape == alone.shape
        assert torch.equal(got[name], alone)
    # norms: |grad L(z)| of each training sequence over the tracked layers (autograd oracle)
    t = train()
    oracle = torch.stack([flat_autograd_grad(gpt2, layers, unpad(t, i)).norm() for i in range(6)])
    assert_rel(norms, oracle)
    # query batches: one pass per batch of each set, the same scores
    batches = CountingBatches(split_batch(train(), 2))
    batched = pairwise_scores(gpt2, batches, sets, query_batch_size=1, progress=False)
    assert batches.passes == 2 + 2 + 1
    for name in sets:
        assert_rel(batched[name], got[name])


def test_query_set_errors(gpt2):
    layers = find_layers(gpt2)
    q = collect_grads(gpt2, [queries()], layers=layers, progress=False)
    first = next(iter(q))
    with pytest.raises(ValueError, match="layers"):  # sets over different layers
        pairwise_scores(gpt2, [train()], {"a": dict(q), "b": {first: q[first]}}, progress=False)
    with pytest.raises(ValueError, match="mix layers and query sets"):
        pairwise_scores(gpt2, [train()], {first: q[first], "b": dict(q)}, progress=False)
    with pytest.raises(ValueError, match=r"\['none'\] hold no query"):
        pairwise_scores(gpt2, [train()], {"a": dict(q), "none": {n: x[:0] for n, x in q.items()}},
                        progress=False)  # fmt: skip


def test_queries_preconditioned_batch_by_batch(gpt2, llama):
    # collect_grads(precondition=) is the solver's ihvp of the gradients, computed batch by
    # batch (three query batches here: the chunks are joined); scoring them with solver=None
    # gives the scores of the plain gradients with the solver, and scoring them with a solver
    # again (preconditioning twice) is refused.
    layers = find_layers(gpt2)
    ekfac = fit_ekfac(gpt2, [train()], layers=layers, fisher="empirical", progress=False)
    query_batches = split_batch(make_batch([6, 9, 4, 7, 5], seed=2), 2)
    plain = collect_grads(gpt2, query_batches, layers=layers, progress=False)
    pre = collect_grads(gpt2, query_batches, layers=layers, precondition=ekfac, progress=False)
    assert plain.preconditioned is None and pre.preconditioned == "EKFAC"
    assert pre.fingerprint == plain.fingerprint
    expected = ekfac.ihvp(plain)
    assert list(pre) == list(expected)
    for name in layers:
        assert pre[name].shape == (5, *plain.shapes[name])
        assert_rel(pre[name], expected[name])
    scores = pairwise_scores(gpt2, [train()], pre, progress=False)
    assert_rel(scores, pairwise_scores(gpt2, [train()], plain, solver=ekfac, progress=False))
    with pytest.raises(ValueError, match=r"already preconditioned \(by EKFAC"):
        pairwise_scores(gpt2, [train()], pre, solver=ekfac, progress=False)
    with pytest.raises(ValueError, match="fitted on"):  # a solver of another model
        collect_grads(llama, [queries()], precondition=ekfac, progress=False)

"""The scoring API: query batches, provenance checks, checksums, saved scores, top-k, query
measurements and the dtype rule."""

import pytest
import torch
from conftest import assert_rel, make_batch, make_gpt2, make_llama, split_batch, unpad
from safetensors.torch import save_file
from scipy.stats import spearmanr
from transformers.pytorch_utils import Conv1D

from influence.curvature import EKFAC, fit_ekfac
from influence.gradients import Gradients, collect_grads
from influence.io import load_scores, load_tensors, save_scores, save_tensors, weights_fingerprint
from influence.lm import IGNORE, sequence_losses
from influence.modules import canonical_weight, find_layers, to_native
from influence.scores import pairwise_scores, token_scores, top_k


def train():
    return make_batch([8, 5, 7, 4, 6, 8], seed=1)


def queries():
    return make_batch([6, 9, 7, 5, 8], seed=2)


def fitted(model):
    layers = find_layers(model)
    ekfac = fit_ekfac(model, [train()], layers=layers, fisher="empirical", progress=False)
    return ekfac, collect_grads(model, [queries()], layers=layers, progress=False)


# ---- query batches --------------------------------------------------------------------------


def test_query_batches_give_the_unbatched_scores(tiny_model):
    # Scoring the queries b at a time changes what is held in memory, not the scores: they agree
    # to the last bits (the shapes of the matrix products, hence their rounding, change with b).
    ekfac, q = fitted(tiny_model)
    batches = split_batch(train(), 4)
    for kwargs in ({}, {"per_layer": True}, {"rank": 1}):
        ref = pairwise_scores(tiny_model, batches, q, solver=ekfac, progress=False, **kwargs)
        for size in (1, 2, 5, 7):
            got = pairwise_scores(
                tiny_model, batches, q, solver=ekfac, query_batch_size=size, progress=False,
                **kwargs,
            )  # fmt: skip
            assert_rel(got, ref, tol=1e-14)
    ref = token_scores(tiny_model, batches, q, solver=ekfac, progress=False)
    # full rank (64 >= min(d_out, d_in') of every layer): the factored contraction is exact
    full = token_scores(
        tiny_model, batches, q, solver=ekfac, rank=64, query_batch_size=2, progress=False
    )
    assert_rel(full, ref, tol=1e-12)
    for size in (2, 5):
        got = token_scores(
            tiny_model, batches, q, solver=ekfac, query_batch_size=size, progress=False
        )
        assert_rel(got, ref, tol=1e-14)


class Spy:
    """A solver that records how many queries each ihvp call receives."""

    def __init__(self, solver):
        self.solver, self.sizes = solver, []

    def ihvp(self, v):
        self.sizes.append(next(iter(v.values())).shape[0])
        return self.solver.ihvp(v)


class CountingBatches:
    """A re-iterable list of batches that counts the passes over it."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_query_batches_bound_the_solver_and_set_the_passes(gpt2):
    # Dense: each batch of b queries is preconditioned, then scored in its own pass over the
    # data. Low rank: every batch is compressed first, then one pass scores them all.
    ekfac, q = fitted(gpt2)
    for rank, passes in ((None, 3), (2, 1)):
        spy, data = Spy(ekfac), CountingBatches(split_batch(train(), 3))
        pairwise_scores(gpt2, data, q, solver=spy, rank=rank, query_batch_size=2, progress=False)
        assert spy.sizes == [2, 2, 1]
        assert data.passes == passes
    with pytest.raises(ValueError, match="query_batch_size"):
        pairwise_scores(gpt2, [train()], q, query_batch_size=0, progress=False)


# ---- provenance -----------------------------------------------------------------------------


def test_gradients_carry_the_weights_fingerprint(gpt2):
    q = collect_grads(gpt2, [queries()], progress=False)
    assert isinstance(q, Gradients)
    assert q.fingerprint == weights_fingerprint(gpt2)
    assert q.shapes == {name: tuple(x.shape[1:]) for name, x in q.items()}
    other = make_gpt2(seed=1)
    assert weights_fingerprint(other) != q.fingerprint
    for score in (pairwise_scores, token_scores):
        with pytest.raises(ValueError, match="another model"):
            score(other, [train()], q, progress=False)
    # dict() drops the fingerprint: scoring on another model on purpose (as multi-stage does)
    assert pairwise_scores(other, [train()], dict(q), progress=False).shape == (5, 6)
    # a change of the weights in place is another model too
    with torch.no_grad():
        next(gpt2.parameters())[0, 0] += 1e-3
    with pytest.raises(ValueError, match="recompute them with this model"):
        pairwise_scores(gpt2, [train()], q, progress=False)


def test_solver_fitted_on_another_model_is_refused(llama, tmp_path):
    # Llama's layer order (q, k, v, o) is not the sorted order of the saved metadata: the check
    # must not depend on it.
    layers = find_layers(llama)
    ekfac = fit_ekfac(llama, [train()], layers=layers, fisher="empirical", path=tmp_path)
    q = collect_grads(llama, [queries()], layers=layers, progress=False)
    ref = pairwise_scores(llama, [train()], q, solver=ekfac, progress=False)
    loaded = EKFAC.load(tmp_path)
    assert list(loaded.meta["layers"]) != list(layers)
    # the same factors (stored row-major: BLAS rounds differently)
    assert_rel(pairwise_scores(llama, [train()], q, solver=loaded, progress=False), ref, tol=1e-13)
    with torch.no_grad():
        layers["model.layers.1.mlp.down_proj"].weight[0, 0] += 1e-3
    for solver in (ekfac, loaded, ekfac.with_damping(1.0)):
        with pytest.raises(ValueError, match="fitted on another model"):
            pairwise_scores(llama, [train()], dict(q), solver=solver, progress=False)


def test_non_finite_queries_name_the_layer(gpt2):
    ekfac, q = fitted(gpt2)
    name = list(q)[1]
    bad = dict(q)
    bad[name] = bad[name].clone()
    bad[name][3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"query gradients of layer '{name}'.*queries \[3\]"):
        pairwise_scores(gpt2, [train()], bad, solver=ekfac, query_batch_size=2, progress=False)

    class Diverged:
        def ihvp(self, v):
            out = {n: x.clone() for n, x in v.items()}
            out[name][0] = float("inf")
            return out

    with pytest.raises(ValueError, match=rf"preconditioned queries of layer '{name}'"):
        token_scores(gpt2, [train()], dict(q), solver=Diverged(), progress=False)


# ---- files ----------------------------------------------------------------------------------


def flip_bit(path, offset_in_data: int) -> None:
    """Flip one bit of the tensor bytes of a safetensors file (after its JSON header)."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + offset_in_data] ^= 0x10
    path.write_bytes(bytes(raw))


def test_files_carry_a_checksum(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.randn(64, dtype=torch.float64), "b": torch.arange(10)}
    save_tensors(path, tensors, {"x": 1})
    loaded, meta = load_tensors(path)
    assert meta == {"x": 1} and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    flip_bit(path, 100)
    with pytest.raises(ValueError, match=rf"{path}.*damaged"):
        load_tensors(path)
    # a safetensors file not written by save_tensors has no checksum: refused
    save_file(tensors, tmp_path / "plain.safetensors", metadata={"influence": "{}"})
    with pytest.raises(ValueError, match="no checksum"):
        load_tensors(tmp_path / "plain.safetensors")


def test_a_bit_flip_in_a_factor_file_names_the_file(gpt2, tmp_path):
    fit_ekfac(gpt2, [train()], fisher="empirical", path=tmp_path, progress=False)
    flip_bit(tmp_path / "correction.safetensors", 40)
    with pytest.raises(ValueError, match=r"correction\.safetensors is damaged"):
        EKFAC.load(tmp_path, model=gpt2)


def test_scores_save_and_load(gpt2, tmp_path):
    ekfac, q = fitted(gpt2)
    scores = pairwise_scores(gpt2, [train()], q, solver=ekfac, progress=False)
    meta = {"model": "tiny-gpt2", "queries": ["a", "b"], "damping": 0.1}
    path = tmp_path / "scores" / "pairwise.safetensors"
    save_scores(path, scores, meta=meta)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    loaded, loaded_meta = load_scores(path)
    assert torch.equal(loaded, scores) and loaded.dtype == scores.dtype
    assert loaded_meta == meta
    save_scores(path, scores[:1])
    assert load_scores(path)[1] == {}
    save_tensors(tmp_path / "other.safetensors", {"scores": scores}, {})
    with pytest.raises(ValueError, match="not scores"):
        load_scores(tmp_path / "other.safetensors")


def test_top_k():
    scores = torch.tensor([[3.0, -1.0, 2.0, 2.0, -5.0], [0.0, 1.0, -2.0, 4.0, 4.0]])
    texts = ["a", "b", "c", "d", "e"]
    out = top_k(scores, k=2, texts=texts)
    assert out[0] == {
        "query": 0,
        "proponents": [{"index": 0, "score": 3.0, "text": "a"}, {"index": 2, "score": 2.0, "text": "c"}],
        "opponents": [{"index": 4, "score": -5.0, "text": "e"}, {"index": 1, "score": -1.0, "text": "b"}],
    }  # fmt: skip
    # ties go to the lower index
    assert [e["index"] for e in out[1]["proponents"]] == [3, 4]
    assert [e["index"] for e in out[1]["opponents"]] == [2, 0]
    full = top_k(scores, k=10)
    assert [len(r["proponents"]) for r in full] == [5, 5] and "text" not in full[0]["opponents"][0]
    assert [e["index"] for e in full[0]["proponents"]] == [0, 2, 3, 1, 4]
    with pytest.raises(ValueError, match="texts"):
        top_k(scores, texts=texts[:4])
    with pytest.raises(ValueError, match=r"\(Q, N\)"):
        top_k(scores[0])
    with pytest.raises(ValueError, match=r"queries \[1\]"):
        top_k(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))


# ---- measurements ---------------------------------------------------------------------------


def last_token_odds(logits, batch):
    """m = -log(p / (1 - p)) of each sequence's last counted label: lowering m raises its odds
    (a measurement is a quantity to lower; a behaviour to raise enters with a minus sign)."""
    labels = batch["labels"]
    counted = labels[:, 1:] != IGNORE  # (B, T-1): position t predicts labels[:, t + 1]
    t = counted.shape[1] - 1 - counted.flip(1).int().argmax(1)  # last counted position
    rows = torch.arange(len(t), device=logits.device)
    logp = torch.log_softmax(logits[rows, t], dim=-1)[rows, labels[rows, t + 1]]  # (B,)
    return -(logp - torch.log(-torch.expm1(logp)))


def autograd_measurement_grads(model, layers, single, measurement):
    """Oracle: d m / d [W | b] of one unpadded sequence by plain autograd, canonical layout."""
    m = measurement(model(input_ids=single["input_ids"]).logits, single).sum()
    out = {}
    for name, mod in layers.items():
        params = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
        grads = torch.autograd.grad(m, params, retain_graph=True)
        w = grads[0].T if isinstance(mod, Conv1D) else grads[0]
        out[name] = torch.cat([w, grads[1][:, None]], dim=1) if mod.bias is not None else w
    return out


def test_measurement_gradients_match_autograd(tiny_model):
    # The per-example gradient of a custom measurement in a padded batch is the gradient of
    # the measurement of that sequence alone.
    layers = find_layers(tiny_model)
    batch = queries()
    grads = collect_grads(
        tiny_model, split_batch(batch, 3), layers=layers, measurement=last_token_odds,
        progress=False,
    )  # fmt: skip
    default = collect_grads(tiny_model, [batch], layers=layers, progress=False)
    for i in range(batch["input_ids"].shape[0]):
        expected = autograd_measurement_grads(tiny_model, layers, unpad(batch, i), last_token_odds)
        for name in layers:
            assert grads[name][i].abs().sum() > 0
            torch.testing.assert_close(grads[name][i], expected[name], rtol=1e-10, atol=1e-12)
            assert not torch.allclose(grads[name][i], default[name][i])


def test_measurement_sign(gpt2):
    # score(z, q) > 0: the step th <- th - eps grad L(z) (H = I) lowers m(q) by eps * score.
    layers = find_layers(gpt2)
    q_batch, z = unpad(queries(), 1), unpad(train(), 0)
    q = collect_grads(gpt2, [q_batch], layers=layers, measurement=last_token_odds, progress=False)
    score = pairwise_scores(gpt2, [z], q, progress=False)[0, 0]
    step = collect_grads(gpt2, [z], layers=layers, progress=False)

    def measured():
        with torch.no_grad():
            return last_token_odds(gpt2(input_ids=q_batch["input_ids"]).logits, q_batch)

    before, eps = measured(), 1e-8  # the second-order term is ~1e-5 of the first
    with torch.no_grad():
        for name, module in layers.items():
            native = to_native(module, canonical_weight(module) - eps * step[name][0])
            module.weight.copy_(native["weight"])
            module.bias.copy_(native["bias"])
    assert score.abs() > 1e-3
    assert (measured() - before).item() == pytest.approx(-eps * score.item(), rel=1e-4)


def test_measurement_errors(gpt2):
    explicit = collect_grads(
        gpt2, [queries()], measurement=lambda logits, b: sequence_losses(logits, b["labels"]),
        progress=False,
    )  # fmt: skip
    default = collect_grads(gpt2, [queries()], progress=False)
    assert all(torch.equal(explicit[n], default[n]) for n in default)
    with pytest.raises(ValueError, match="one scalar per sequence"):
        collect_grads(gpt2, [queries()], measurement=lambda logits, b: logits.sum(), progress=False)
    with pytest.raises(ValueError, match="fisher"):
        collect_grads(gpt2, [queries()], measurement=last_token_odds, fisher="true", progress=False)


# ---- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_gpt2, make_llama])
def test_bf16_scores_follow_float32(make):
    # bf16 weights and activations, float32 contractions, float64 curvature: the ranking of a
    # float32 run survives.
    train_batches = split_batch(make_batch([12, 9, 14, 10, 16, 11, 13, 8] * 3, seed=3), 8)
    query_batch = make_batch([10, 14, 9, 12], seed=4)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make().to(dtype)
        ekfac = fit_ekfac(model, train_batches, fisher="empirical", progress=False)
        q = collect_grads(model, [query_batch], progress=False)
        assert all(x.dtype == torch.float32 for x in q.values())
        runs[dtype] = pairwise_scores(model, train_batches, q, solver=ekfac, progress=False)
    low, ref = runs[torch.bfloat16], runs[torch.float32]
    assert low.dtype == torch.float32 and bool(low.isfinite().all())
    assert spearmanr(low.flatten(), ref.flatten()).statistic > 0.99


def test_autocast_does_not_lower_the_contractions(gpt2):
    # Under a caller's torch.autocast(bfloat16) the forward runs in bf16, but the per-example
    # gradients and the score contractions stay float32 (they would come back bf16 otherwise).
    train_batches = split_batch(make_batch([12, 9, 14, 10, 16, 11], seed=3), 3)
    query_batch = make_batch([10, 14, 9], seed=4)
    model = gpt2.float()
    ref = pairwise_scores(
        model, train_batches, collect_grads(model, [query_batch], progress=False), progress=False
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = collect_grads(model, [query_batch], progress=False)
        low = pairwise_scores(model, train_batches, q, progress=False)
    assert all(x.dtype == torch.float32 for x in q.values()) and low.dtype == torch.float32
    assert spearmanr(low.flatten(), ref.flatten()).statistic > 0.99

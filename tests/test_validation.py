"""The batch contract and the numerical guards: one clear message per bad input.

Each test feeds one kind of bad input (or a kind of data that must work) through a public entry
point and checks that the message names the problem; the tiny float64 models of conftest.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import VOCAB, make_batch, make_gpt2, split_batch
from transformers import GPT2Config, GPT2LMHeadModel

from influence.baselines import hidden_states
from influence.curvature import KFAC, fit_ekfac
from influence.data import (
    Batches,
    DataWarning,
    as_batches,
    batches_from_texts,
    check_batch,
    pad_rows,
)
from influence.gradients import collect_grads, iter_captures, per_example_grads
from influence.lm import IGNORE
from influence.models import eval_mode, load_model
from influence.modules import find_layers
from influence.scores import pairwise_scores, self_influence


@pytest.fixture
def batch():
    return make_batch([6, 5, 4], seed=3)


def no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# ---- the batch contract --------------------------------------------------------------------


def test_a_well_formed_batch_passes_as_int64_tensors(batch):
    narrow = {
        "input_ids": batch["input_ids"].int(),
        "attention_mask": batch["attention_mask"].bool(),
        "labels": batch["labels"].tolist(),  # lists are made tensors
    }
    clean = no_warnings(check_batch, narrow, vocab_size=VOCAB)
    for key in batch:
        assert clean[key].dtype == torch.long
        assert torch.equal(clean[key], batch[key])


def test_missing_labels(gpt2, batch):
    del batch["labels"]
    with pytest.raises(ValueError, match="batch 0 has no 'labels'.*masked_fill"):
        collect_grads(gpt2, [batch], progress=False)


def test_tuple_batch(gpt2, batch):
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(batch["input_ids"], batch["labels"]), batch_size=2
    )
    with pytest.raises(TypeError, match="batch 0 is a list: batches must be dicts.*tuples"):
        collect_grads(gpt2, loader, progress=False)
    with pytest.raises(TypeError, match="batch 0 is a tuple"):
        collect_grads(gpt2, [tuple(batch.values())], progress=False)


def test_extra_text_column(gpt2, batch):
    batch["text"] = ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"keys \['text'\] besides .* silently ignored"):
        collect_grads(gpt2, [batch], progress=False)


def test_one_dimensional_batch(gpt2, batch):
    row = {k: v[0] for k, v in batch.items()}  # (T,)
    with pytest.raises(ValueError, match=r"input_ids has shape \(6,\), batches are 2-D"):
        collect_grads(gpt2, [row], progress=False)


def test_float_ids(gpt2, batch):
    batch["input_ids"] = batch["input_ids"].float()
    with pytest.raises(TypeError, match="input_ids has dtype torch.float32; token ids are"):
        collect_grads(gpt2, [batch], progress=False)


def test_out_of_vocabulary_ids(gpt2, batch):
    batch["input_ids"][1, 2] = VOCAB + 5
    with pytest.raises(ValueError, match=rf"outside \[0, {VOCAB}\) \(e.g. {VOCAB + 5} at row 1"):
        collect_grads(gpt2, [batch], progress=False)
    batch["input_ids"][1, 2] = 3
    batch["labels"][0, 4] = -1  # a negative label other than -100
    with pytest.raises(ValueError, match="labels has 1 values outside .* only -100"):
        collect_grads(gpt2, [batch], progress=False)


def test_empty_batch(gpt2, batch):
    empty = {k: v[:0] for k, v in batch.items()}  # B = 0
    with pytest.raises(ValueError, match=r"batch 1 is empty: \(B, T\) = \(0, 6\)"):
        collect_grads(gpt2, [batch, empty], progress=False)
    with pytest.raises(ValueError, match="the data has no batches"):
        collect_grads(gpt2, [], progress=False)


def test_attention_mask_other_than_zero_one(gpt2, batch):
    batch["attention_mask"][0, 0] = 2
    with pytest.raises(ValueError, match=r"attention_mask has values \[0, 1, 2\]"):
        collect_grads(gpt2, [batch], progress=False)


def test_labels_on_padding_warn_with_the_count(gpt2, batch):
    batch["labels"] = batch["input_ids"].clone()  # padding (rows 1 and 2: 1 + 2 positions)
    with pytest.warns(DataWarning, match="3 padding positions .*masked_fill"):
        grads = collect_grads(gpt2, [batch], progress=False)
    assert all(g.isfinite().all() for g in grads.values())


def test_pre_shifted_labels_warn(gpt2, batch):
    shifted = batch["labels"].clone()
    shifted[:, :-1] = batch["input_ids"][:, 1:]
    shifted[batch["attention_mask"] == 0] = IGNORE
    shifted[:, -1] = IGNORE
    batch["labels"] = shifted
    with pytest.warns(DataWarning, match="pre-shifted labels"):
        collect_grads(gpt2, [batch], progress=False)


def test_query_with_no_counted_label(gpt2, batch):
    layers = find_layers(gpt2)
    batch["labels"][1] = IGNORE  # row 1: nothing counted
    with pytest.raises(ValueError, match=r"query batch 0, rows \[1\]: no counted label"):
        list(iter_captures(gpt2, layers, [batch], progress=False, queries=True))
    # as training data, a warning: the sequence's gradient is exactly 0
    with pytest.warns(DataWarning, match=r"batch 0, rows \[1\]: no counted label"):
        grads = collect_grads(gpt2, [batch], layers=layers, progress=False)
    assert all(float(g[1].abs().max()) == 0 and float(g[0].abs().max()) > 0 for g in grads.values())
    # scored as queries, the zero row is an error, not a row of zero scores
    with pytest.raises(ValueError, match=r"queries \[1\] have a zero gradient"):
        pairwise_scores(gpt2, [batch], grads, progress=False)


# ---- data containers ---------------------------------------------------------------------


def test_dataset_passed_directly_equals_padded_batches(gpt2):
    from datasets import Dataset

    batch = make_batch([6, 5, 4, 7, 4], seed=4)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(5):
        n = int(batch["attention_mask"][i].sum())
        for key in rows:
            rows[key].append(batch[key][i, :n].tolist())
    dataset = Dataset.from_dict(rows)
    layers = find_layers(gpt2)
    expected = collect_grads(gpt2, split_batch(batch, 2), layers=layers, progress=False)
    got = collect_grads(gpt2, as_batches(dataset, batch_size=2), layers=layers, progress=False)
    direct = collect_grads(gpt2, dataset, layers=layers, progress=False)  # default batch size
    for name in layers:
        assert torch.allclose(got[name], expected[name], rtol=0, atol=1e-12)
        assert torch.allclose(direct[name], expected[name], rtol=0, atol=1e-12)
    assert len(as_batches(dataset, batch_size=2)) == 3
    with pytest.raises(ValueError, match=r"columns \['text'\] .*remove_columns"):
        collect_grads(gpt2, dataset.add_column("text", list("abcde")), progress=False)


def test_pad_rows_right_pads():
    out = pad_rows(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    with pytest.raises(ValueError, match=r"row 0 has shapes .*\(1, 3\).* without batch_size"):
        list(as_batches([{"input_ids": [[5, 6, 7]], "labels": [[5, 6, 7]]}], batch_size=2))


def test_generator_and_dataset_iter_are_refused(gpt2, batch):
    from datasets import Dataset

    with pytest.raises(TypeError, match="one-shot iterator .* pass a list or a DataLoader"):
        collect_grads(gpt2, (b for b in [batch]), progress=False)
    rows = Dataset.from_dict({"input_ids": [[3, 4, 5]], "labels": [[3, 4, 5]]})
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit_ekfac(gpt2, rows.iter(batch_size=32), progress=False)


def test_shuffled_dataloader_is_refused(gpt2):
    data = [{k: v[0] for k, v in make_batch([5], seed=s).items()} for s in range(4)]
    with pytest.raises(ValueError, match="RandomSampler.*shuffle=False"):
        fit_ekfac(gpt2, torch.utils.data.DataLoader(data, batch_size=2, shuffle=True))
    in_order = torch.utils.data.DataLoader(data, batch_size=2)  # default collate: dicts
    layers = find_layers(gpt2)
    got = collect_grads(gpt2, in_order, layers=layers, progress=False)
    listed = collect_grads(gpt2, list(in_order), layers=layers, progress=False)
    assert all(torch.equal(got[n], listed[n]) for n in layers)


class Reshuffled:
    """Re-iterable data that gives its batches in another order from the third pass on."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes < 3 else self.batches[::-1])


def test_order_changed_between_passes(gpt2):
    batches = split_batch(make_batch([6, 5, 4, 7], seed=5), 2)
    # EK-FAC reads the data three times: the data fingerprint, the covariance, the correction
    with pytest.raises(ValueError, match="batch 0 differs from batch 0 of the first pass"):
        fit_ekfac(gpt2, Reshuffled(batches), fisher="empirical", progress=False)
    fit_ekfac(gpt2, Reshuffled(batches[:1]), fisher="empirical", progress=False)  # same order
    # rows swapped within a batch, and a batch left out, are caught too
    data = Batches(batches)
    list(data)
    data.source = [{k: v.flip(0) for k, v in batches[0].items()}, batches[1]]
    with pytest.raises(ValueError, match="batch 0 differs"):
        list(data)
    data.source = batches[:1]
    with pytest.raises(ValueError, match="gave 1 batches in this pass and 2 in the first"):
        list(data)


def test_other_kinds_of_data_are_named(gpt2, batch):
    with pytest.raises(TypeError, match="data is a Tensor"):
        collect_grads(gpt2, batch["input_ids"], progress=False)
    with pytest.raises(TypeError, match="pick one, e.g. data\\['train'\\]"):
        from datasets import Dataset, DatasetDict

        rows = Dataset.from_dict({"input_ids": [[3]], "labels": [[3]]})
        as_batches(DatasetDict(train=rows))
    one = collect_grads(gpt2, batch, progress=False)  # one batch dict is one batch
    assert next(iter(one.values())).shape[0] == 3


# ---- layers ------------------------------------------------------------------------------


def test_empty_and_listed_layers(gpt2, batch):
    with pytest.raises(ValueError, match="layers is empty"):
        self_influence(gpt2, [batch], layers={}, progress=False)
    names = list(find_layers(gpt2))
    with pytest.raises(TypeError, match="layers is a list .* pass a dict"):
        fit_ekfac(gpt2, [batch], layers=names, progress=False)
    with pytest.raises(TypeError, match="layers is a list"):
        per_example_grads(gpt2, batch, layers=names)
    other = find_layers(make_gpt2(seed=1))
    with pytest.raises(ValueError, match="not modules of this model"):
        self_influence(gpt2, [batch], layers=other, progress=False)


# ---- numerical guards --------------------------------------------------------------------


def test_nan_weights_with_true_fisher(gpt2, batch):
    with torch.no_grad():
        gpt2.transformer.h[0].attn.c_attn.weight[0, 0] = float("nan")
    message = r"batch 0: .* NaN/inf .* parameters \['transformer.h.0.attn.c_attn.weight'\]"
    with pytest.raises(ValueError, match=message):
        fit_ekfac(gpt2, [batch], fisher="true", progress=False)
    with pytest.raises(ValueError, match=message):
        collect_grads(gpt2, [batch], fisher="empirical", progress=False)


def tiny_kfac(eigenvalues: torch.Tensor, **kwargs) -> KFAC:
    d_out, d_in = eigenvalues.shape
    return KFAC(
        {"w": torch.eye(d_in, dtype=torch.float64)},
        {"w": torch.eye(d_out, dtype=torch.float64)},
        {"w": eigenvalues.double()},
        **kwargs,
    )


def test_nan_eigenvalue_names_the_layer(tmp_path):
    values = torch.tensor([[1.0, 2.0], [float("nan"), 4.0]])
    v = {"w": torch.ones(1, 2, 2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"layers \[\"'w' \(eigenvalues: 1 of 4 entries\)\"\]"):
        tiny_kfac(values).ihvp(v)
    eigens = {
        "QA/w": torch.eye(2, dtype=torch.float64),
        "QS/w": torch.eye(2, dtype=torch.float64),
        "eA/w": torch.tensor([1.0, float("inf")], dtype=torch.float64),
        "eS/w": torch.tensor([1.0, 2.0], dtype=torch.float64),
        "tokens": torch.tensor(4),
        "examples": torch.tensor(2),
    }
    with pytest.raises(ValueError, match="KFAC factors of layers .*'w' .*contain NaN/inf"):
        KFAC.from_stages(eigens, None)
    from influence.io import save_tensors

    save_tensors(tmp_path / "eigens.safetensors", eigens, {"stage": "eigens"})
    with pytest.raises(ValueError, match=f"{tmp_path}: the KFAC factors of layers .*'w'"):
        KFAC.load(tmp_path)


def test_damping_guards():
    values = torch.tensor([[1e-30, 1.0], [2.0, 4.0]])  # near-singular: smallest ~ 0
    v = {"w": torch.ones(1, 2, 2, dtype=torch.float64)}
    fitted = tiny_kfac(values, damping=0.1, relative=True)
    no_warnings(fitted.ihvp, v)
    with pytest.raises(ValueError, match="damping 1e-300 .absolute. is 2.5e-301 of the layer's"):
        fitted.with_damping(1e-300, relative=False).ihvp(v)
    with pytest.raises(ValueError, match=r"damping 0.0 \(absolute\) is 0.0e\+00 .* >= 4e-10"):
        fitted.with_damping(0.0, relative=False).ihvp(v)
    with pytest.raises(ValueError, match="damping inf .* is not finite"):
        fitted.with_damping(float("inf"), relative=False).ihvp(v)
    with pytest.raises(ValueError, match="damped eigenvalue is <= 0"):
        fitted.with_damping(-1.0, relative=False).ihvp(v)
    with pytest.warns(UserWarning, match="gradient dot products / damping"):
        out = fitted.with_damping(1e7, relative=True).ihvp(v)
    assert torch.allclose(out["w"] * 1e7 * float(values.mean()), v["w"], rtol=1e-5)
    # undamped but well conditioned: the exact inverse, no complaint
    well = tiny_kfac(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), damping=0.0, relative=False)
    assert torch.allclose(
        no_warnings(well.ihvp, v)["w"], 1 / torch.tensor([[1.0, 2.0], [3.0, 4.0]]).double()
    )


# ---- eval mode ---------------------------------------------------------------------------


def dropout_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5,
    )  # fmt: skip
    return GPT2LMHeadModel(config).double()


def test_passes_run_in_eval_mode_and_restore_the_mode(batch):
    model = dropout_gpt2().train()
    model.transformer.h[1].eval()  # a mixed state, restored as it was
    modes = {name: m.training for name, m in model.named_modules()}
    layers = find_layers(model)
    first = self_influence(model, [batch], layers=layers, progress=False)
    second = self_influence(model, [batch], layers=layers, progress=False)
    states = hidden_states(model, batch)
    assert {name: m.training for name, m in model.named_modules()} == modes
    with eval_mode(model):
        expected = self_influence(model, [batch], layers=layers, progress=False)
        expected_states = hidden_states(model, batch)
    assert torch.equal(first, second) and torch.equal(first, expected)
    assert torch.equal(states, expected_states)
    queries = collect_grads(model, [batch], layers=layers, progress=False)
    scores = [pairwise_scores(model, [batch], queries, progress=False) for _ in range(2)]
    assert torch.equal(scores[0], scores[1])
    assert model.training


# ---- loading -----------------------------------------------------------------------------


def test_load_model_clear_errors_and_round_trip(tmp_path, gpt2):
    with pytest.raises(FileNotFoundError, match="no model folder at .*nope"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        load_model(str(tmp_path / "nope"))  # a path, not a Hub id
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path / "empty")
    gpt2.save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base")
    assert not model.training
    sd, loaded = gpt2.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], loaded[k].to(sd[k].dtype)) for k in sd)


def test_load_model_peft_adapter_next_to_its_base(tmp_path, gpt2):
    from peft import LoraConfig, get_peft_model

    gpt2.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = get_peft_model(make_gpt2(), config)
        lora.save_pretrained(tmp_path / "adapter")
    adapter = tmp_path / "adapter" / "adapter_config.json"
    meta = json.loads(adapter.read_text())
    adapter.write_text(json.dumps({**meta, "base_model_name_or_path": "base"}))  # as the zoo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(tmp_path / "adapter")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all("lora_" in n for n in find_layers(model))


# ---- texts -------------------------------------------------------------------------------


TEXTS = [f"The {a} sat on the {b} at {i}." for i, (a, b) in enumerate([("cat", "mat"), ("dog", "rug")] * 10)]  # fmt: skip
RECORDS = [{"id": f"r{i}", "prompt": f"Q{i}: where?\nA:", "response": [" mat", " rug"][i % 2]} for i in range(7)]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    from influence.lab.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS + [r["prompt"] + r["response"] for r in RECORDS], vocab_size=300, cache=None)  # fmt: skip


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_batches_from_texts_equal_make_batches(tok, loss_on):
    from influence.lab.tokenizer import make_batches

    got = batches_from_texts(tok, RECORDS, batch_size=3, loss_on=loss_on)
    expected = make_batches(tok, RECORDS, 3, loss_on=loss_on)
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys() and all(torch.equal(g[k], e[k]) for k in e)
    texts = batches_from_texts(tok, [{"text": t} for t in TEXTS[:2]], batch_size=2)
    assert torch.equal(texts[0]["labels"], make_batches(tok, TEXTS[:2], 2)[0]["labels"])
    assert (texts[0]["labels"] != IGNORE).sum() == texts[0]["attention_mask"].sum()


def test_batches_from_texts_bad_records(tok):
    with pytest.raises(ValueError, match="record 1 .id 'x'. has neither 'text' nor 'prompt'"):
        batches_from_texts(tok, [{"text": "a"}, {"id": "x", "body": "b"}])
    with pytest.raises(ValueError, match="record 0 has no 'response'"):
        batches_from_texts(tok, [{"prompt": "a"}])
    with pytest.raises(ValueError, match="tokens > max_length=2"):
        batches_from_texts(tok, [{"text": "a long sentence"}], max_length=2)

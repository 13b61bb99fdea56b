"""Tracked-layer selection, canonical layouts and the capture hooks."""

import pytest
import torch
from conftest import make_batch, make_gpt2, make_gpt2_lora, make_llama
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from influence.modules import (
    Capture,
    canonical_weight,
    find_layers,
    flatten,
    layer_shape,
    to_native,
    unflatten,
)


def test_default_layers_skip_embeddings_and_head():
    gpt2 = find_layers(make_gpt2())
    assert len(gpt2) == 8 and all(isinstance(m, Conv1D) for m in gpt2.values())
    llama = find_layers(make_llama())
    assert len(llama) == 14 and "lm_head" not in llama
    lora = find_layers(make_gpt2_lora())
    # Only the adapters: the frozen Conv1D base layers and the tied head are not tracked.
    assert len(lora) == 4 and all(".lora_A." in n or ".lora_B." in n for n in lora)


def test_include_exclude_by_regex_and_name():
    model = make_llama()
    assert list(find_layers(model, include=r"layers\.1\.mlp\.down_proj$")) == [
        "model.layers.1.mlp.down_proj"
    ]
    mlp = find_layers(model, include=["mlp"], exclude="gate_proj")
    assert len(mlp) == 4 and not any("gate" in n for n in mlp)
    # The untied LM head is tracked when named explicitly.
    assert list(find_layers(model, include="lm_head")) == ["lm_head"]


@pytest.mark.parametrize(
    ("maker", "name", "message"),
    [
        (make_llama, "model.embed_tokens", "Embedding"),
        (make_llama, "model.layers.0.input_layernorm", "LlamaRMSNorm"),
        (make_gpt2, "transformer.h.0.ln_1", "LayerNorm"),
        (make_gpt2, "lm_head", "tied"),
        (make_gpt2_lora, "base_model.model.transformer.h.0.attn.c_attn.base_layer", "frozen"),
        (make_llama, "no_such_layer", "no trainable"),
    ],
)
def test_unsupported_layer_named_is_an_error(maker, name, message):
    with pytest.raises(ValueError, match=message):
        find_layers(maker(), include=name)


@pytest.mark.parametrize("maker", [make_gpt2, make_llama])
def test_canonical_weight_round_trip_through_functional_call(maker):
    # Replacing each layer's parameters by to_native(canonical_weight) leaves the logits unchanged.
    model = maker()
    layers = find_layers(model)
    params = {}
    for name, module in layers.items():
        mat = canonical_weight(module)
        assert tuple(mat.shape) == layer_shape(module)
        for key, value in to_native(module, mat.detach() * 2).items():
            params[f"{name}.{key}"] = value
    batch = make_batch([5, 7])
    doubled = functional_call(model, params, (batch["input_ids"],)).logits
    with torch.no_grad():
        for module in layers.values():
            module.weight.mul_(2)
            if module.bias is not None:
                module.bias.mul_(2)
        expected = model(batch["input_ids"]).logits
    torch.testing.assert_close(doubled, expected, rtol=0, atol=1e-12)


def test_conv1d_layout_is_transposed():
    module = make_gpt2().transformer.h[0].mlp.c_fc  # Conv1D, weight stored (16, 64)
    mat = canonical_weight(module)
    assert tuple(mat.shape) == (64, 17)
    torch.testing.assert_close(mat[:, :16], module.weight.T)
    torch.testing.assert_close(mat[:, 16], module.bias)
    with pytest.raises(ValueError, match=r"\(64, 17\)"):
        to_native(module, mat.T)


def test_flatten_unflatten_round_trip():
    grads = {"x": torch.randn(3, 2, 5), "y": torch.randn(3, 4, 1)}
    vec = flatten(grads)
    assert tuple(vec.shape) == (3, 14)
    torch.testing.assert_close(vec[:, :10], grads["x"].reshape(3, 10))
    back = unflatten(vec, {"x": (2, 5), "y": (4, 1)})
    assert all(torch.equal(back[k], grads[k]) for k in grads)
    with pytest.raises(ValueError, match="13"):
        unflatten(vec[:, :13], {"x": (2, 5), "y": (4, 1)})


def test_capture_records_inputs_and_output_grads_and_cleans_up():
    model = make_llama()
    layers = find_layers(model, include=["q_proj", "down_proj"])
    batch = make_batch([6, 4])
    with Capture(model, layers) as cap:
        logits = model(batch["input_ids"]).logits
        cap.backward(logits.square().sum())
    q = "model.layers.0.self_attn.q_proj"  # with bias: a has a trailing column of ones
    assert tuple(cap.a[q].shape) == (2, 6, 17) and torch.all(cap.a[q][..., -1] == 1)
    down = "model.layers.1.mlp.down_proj"  # no bias
    assert tuple(cap.a[down].shape) == (2, 6, 24) and tuple(cap.g[down].shape) == (2, 6, 16)
    assert all(cap.g[n].abs().sum() > 0 for n in layers)
    assert all(p.grad is None for p in model.parameters())  # backward() leaves .grad alone
    assert not any(m._forward_hooks for m in model.modules())


def test_capture_rejects_a_layer_called_twice():
    layer = torch.nn.Linear(3, 3).double()
    model = torch.nn.Sequential(layer, torch.nn.Tanh(), layer)
    with pytest.raises(RuntimeError, match="twice"), Capture(model, {"0": layer}):
        model(torch.randn(2, 3, dtype=torch.float64))
    assert not layer._forward_hooks

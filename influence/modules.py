"""Tracked layers, their canonical weight layout, and the hooks that capture (a, g).

Every tracked layer is a linear map y = W a with W of canonical shape (d_out, d_in'),
where d_in' = d_in + 1 when the layer has a bias (the bias is W's last column and a gets a
trailing 1). nn.Linear stores W as (d_out, d_in) already; transformers' Conv1D (GPT-2)
stores it as (d_in, d_out), so it is transposed. peft LoRA is covered because its adapters
lora_A and lora_B are nn.Linear submodules (the frozen base layer is skipped).

Fused projections (GPT-2's c_attn, GPT-NeoX's query_key_value, Phi-3's qkv_proj and
gate_up_proj) are one tracked layer: W's rows are all the parts' outputs in the model's order
(q, k, v; GPT-NeoX interleaves them per head), and EK-FAC / K-FAC treat it as one block, with
one output factor over all parts (their correlations kept), not one block per part.

For a sequence with layer inputs a_t and output gradients g_t = dL/dy_t, the gradient of the
layer's weight is G = sum_t g_t a_t^T, shape (d_out, d_in'). ``LayerGrads`` maps a layer name
to such matrices, batched: (B, d_out, d_in').
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LayerGrads = dict[str, torch.Tensor]
SUPPORTED = (nn.Linear, Conv1D)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or re.search(pattern, name) is not None


def _patterns(spec: str | Iterable[str] | None) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _output_embedding_weights(model: nn.Module) -> set[int]:
    """ids of the weights of the embeddings and of the LM head (tied or not)."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        ids.add(id(head.weight))
    return ids


def find_layers(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """The layers whose weights influence functions track, by module name.

    Default: every nn.Linear / Conv1D whose weight requires grad, except the embeddings and
    the LM head. ``include`` / ``exclude``: a module name or regular expression (matched with
    re.search), or a list of them. A module named exactly in ``include`` is tracked even if it
    is the (untied) LM head; naming an unsupported module (Embedding, LayerNorm, a frozen or
    tied layer) is a ValueError, and so is a selection that matches nothing.
    """
    modules = dict(model.named_modules())
    skip = _output_embedding_weights(model)
    inc, exc = _patterns(include), _patterns(exclude)
    for name in inc:
        if name not in modules:
            continue  # a regex, checked below by matching
        module = modules[name]
        if not isinstance(module, SUPPORTED):
            raise ValueError(
                f"layer {name!r} is a {type(module).__name__}; only nn.Linear, Conv1D and "
                "peft LoRA adapters (lora_A / lora_B) are supported"
            )
        if not module.weight.requires_grad:
            raise ValueError(f"layer {name!r} is frozen (weight.requires_grad is False)")
        if isinstance(module, nn.Linear) and any(
            isinstance(m, nn.Embedding) and m.weight is module.weight for m in modules.values()
        ):
            raise ValueError(f"layer {name!r} shares its weight with an embedding (tied)")

    layers = {}
    for name, module in modules.items():
        if not isinstance(module, SUPPORTED) or not module.weight.requires_grad:
            continue
        explicit = name in inc
        if inc and not any(_matches(name, p) for p in inc):
            continue
        if not explicit and id(module.weight) in skip:
            continue
        if any(_matches(name, p) for p in exc):
            continue
        layers[name] = module
    if not layers:
        raise ValueError(
            f"no trainable nn.Linear / Conv1D layer matches include={include!r}, "
            f"exclude={exclude!r}; check the names in model.named_modules()"
        )
    return layers


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in') of the canonical weight; d_in' counts the bias column."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
    elif isinstance(module, nn.Linear):
        d_out, d_in = module.weight.shape
    else:
        raise ValueError(f"unsupported layer type {type(module).__name__}")
    return d_out, d_in + (module.bias is not None)


def canonical_weight(module: nn.Module) -> torch.Tensor:
    """The layer's parameters as one (d_out, d_in') matrix [W | b]."""
    weight = module.weight.T if isinstance(module, Conv1D) else module.weight  # (d_out, d_in)
    if module.bias is None:
        return weight
    return torch.cat([weight, module.bias[:, None]], dim=1)


def to_native(module: nn.Module, mat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of ``canonical_weight``: a (d_out, d_in') matrix as {"weight", "bias"}.

    The tensors have the module's own layouts, ready for torch.func.functional_call.
    """
    d_out, d_in = layer_shape(module)
    if tuple(mat.shape) != (d_out, d_in):
        raise ValueError(f"expected a ({d_out}, {d_in}) matrix, got {tuple(mat.shape)}")
    has_bias = module.bias is not None
    weight = mat[:, : d_in - 1] if has_bias else mat
    out = {"weight": weight.T if isinstance(module, Conv1D) else weight}
    if has_bias:
        out["bias"] = mat[:, -1]
    return out


def pair_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(Q, N) inner products <x_q, y_n> of (Q, d_out, d_in') and (N, d_out, d_in') matrices.

    One matrix multiply of the flattened matrices: ``torch.einsum("qoi,noi->qn")`` takes a
    path 6-17x slower on CPU (torch 2.13, one thread: 106 vs 18 ms for 240 x 32 matrices of
    128 x 512; 986 vs 58 ms for 24 x 750)."""
    return x.flatten(1) @ y.flatten(1).T


def flatten(grads: LayerGrads) -> torch.Tensor:
    """Concatenate the layers' (..., d_out, d_in') matrices into (..., P), in dict order."""
    return torch.cat([g.flatten(start_dim=-2) for g in grads.values()], dim=-1)


def unflatten(vec: torch.Tensor, shapes: dict[str, tuple[int, int]]) -> LayerGrads:
    """Inverse of ``flatten``: (..., P) -> {name: (..., d_out, d_in')}."""
    sizes = [d_out * d_in for d_out, d_in in shapes.values()]
    if vec.shape[-1] != sum(sizes):
        raise ValueError(f"vector has {vec.shape[-1]} entries, the layers have {sum(sizes)}")
    parts = torch.split(vec, sizes, dim=-1)
    return {
        name: p.reshape(*vec.shape[:-1], *shape)
        for (name, shape), p in zip(shapes.items(), parts, strict=True)
    }


class Capture:
    """Records each tracked layer's input a and output gradient g during one forward/backward.

    a: (B, T, d_in') with a trailing column of ones when the layer has a bias (detached);
    g: (B, T, d_out), the gradient of the backpropagated scalar w.r.t. the layer's output.
    g is filled by any backward pass through the outputs (``loss.backward()``,
    ``torch.autograd.grad``); ``backward(loss)`` runs one without touching ``.grad``.
    Hooks are removed on exit, so nothing stays on the modules. A layer that runs on the
    batch's tokens flattened to (B*T, d) (OPT's MLP) is reshaped to (B, T, d), with (B, T)
    read from the model's input_ids (or inputs_embeds); any other layout is an error.

        with Capture(model, layers) as cap:
            loss = sequence_losses(model(**inputs).logits, labels).sum()
            cap.backward(loss)
        cap.a[name], cap.g[name]
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.model, self.layers = model, layers
        self.a: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._tokens: tuple[int, int] | None = None  # (B, T) of the current forward pass

    def __enter__(self) -> Capture:
        self._handles.append(
            self.model.register_forward_pre_hook(self._record_tokens, with_kwargs=True)
        )
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _record_tokens(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            self._tokens = tuple(ids.shape)
        elif isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
            self._tokens = tuple(embeds.shape[:2])
        else:
            self._tokens = None  # not a (B, T) token model: inputs are kept as they come

    def _per_token(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x as (B, T, d): a layer's (B, T, d) as is, a flattened (B*T, d) reshaped."""
        if x.dim() == 3 or self._tokens is None:
            return x
        if x.dim() == 2 and x.shape[0] == math.prod(self._tokens):
            return x.reshape(*self._tokens, x.shape[-1])
        raise RuntimeError(
            f"layer {name!r} ran on a tensor of shape {tuple(x.shape)}, neither (B, T, d) nor "
            f"(B*T, d) with (B, T) = {self._tokens}; a layer that sees only some tokens (a "
            "mixture-of-experts expert) is not supported: exclude it"
        )

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if name in self.a:
                raise RuntimeError(
                    f"layer {name!r} ran twice in one forward pass; a layer reused within a "
                    "forward (weight sharing) is not supported: exclude it"
                )
            a = self._per_token(name, inputs[0].detach())
            if module.bias is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            self.a[name] = a  # (B, T, d_in')
            if output.requires_grad:
                self._outputs[name] = output
                output.register_hook(
                    lambda grad: self.g.__setitem__(name, self._per_token(name, grad.detach()))
                )

        return hook

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` to the tracked layers' outputs only (no parameter .grad)."""
        missing = [n for n in self.layers if n not in self._outputs]
        if missing:
            raise RuntimeError(
                f"layers {missing} produced no differentiable output in the forward pass; "
                "were they called, and does the model require grad up to them?"
            )
        names = list(self._outputs)
        grads = torch.autograd.grad(loss, [self._outputs[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            # A layer the loss does not depend on (e.g. after the last counted token) gets 0.
            grad = torch.zeros_like(self._outputs[name]) if grad is None else grad.detach()
            self.g[name] = self._per_token(name, grad)

"""Eight transformers architectures, full and LoRA, against oracles independent of the library.

Tiny random configs (hidden 16, 2 layers, vocab 50) of GPT-2, GPT-NeoX, Llama, Qwen2, Mistral,
Gemma-2, Phi-3 and OPT, in float64, dropout 0, eval mode; each tracked in full (every layer
``find_layers`` picks) and with peft LoRA (r=2) on its attention projections. Oracles: plain
autograd on each sequence run alone and unpadded, and a dense GGN from torch.func.jacrev of
the logits, both turned into the canonical (d_out, d_in') layout by hand.
"""

from __future__ import annotations

import copy
import functools
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel, make_batch, split_batch, unpad
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.pytorch_utils import Conv1D

from influence.curvature import fit_ekfac
from influence.ggn import GGN
from influence.gradients import per_example_grads
from influence.lm import IGNORE
from influence.modules import find_layers, layer_shape
from influence.scores import pairwise_scores
from influence.solvers import Exact

VOCAB = 50
# initializer_range 0.2 (not 0.02): logits with std ~0.8, far from uniform, so that the
# softmax Hessian and Gemma-2's logit softcapping are not in their near-linear regime.
COMMON = dict(
    vocab_size=VOCAB,
    max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,
)
# Llama-like decoders: grouped-query attention (2 query heads, 1 key/value head).
DECODER = dict(
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    attention_dropout=0.0,
)
CONFIGS = {
    "gpt2": lambda: GPT2Config(
        n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **COMMON
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **COMMON,
    ),
    "llama": lambda: LlamaConfig(**DECODER, **COMMON),
    "qwen2": lambda: Qwen2Config(**DECODER, **COMMON),  # q/k/v with bias, o_proj without
    "mistral": lambda: MistralConfig(**DECODER, **COMMON),
    # Gemma-2 (transformers 5 has Gemma and Gemma-2; Gemma-2 adds logit softcapping to
    # Gemma's sqrt(hidden) embedding scale, (1 + w) RMSNorm and tied head). Softcaps of 1 and
    # 2 make the tanh clearly non-linear at these logit scales.
    "gemma2": lambda: Gemma2Config(
        **DECODER, head_dim=8, final_logit_softcapping=1.0, attn_logit_softcapping=2.0, **COMMON
    ),
    "phi3": lambda: Phi3Config(**DECODER, resid_pdrop=0.0, embd_pdrop=0.0, **COMMON),
    # word_embed_proj_dim < hidden adds OPT's project_in / project_out layers (no bias).
    "opt": lambda: OPTConfig(
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=12,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        **COMMON,
    ),
}
# LoRA targets: the attention projections by each architecture's own module names (fused
# q/k/v where the model fuses them; Phi-3's fused gate/up projection as well).
LORA_TARGETS = {
    "gpt2": ["c_attn"],  # Conv1D
    "gpt_neox": ["query_key_value"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj", "gate_up_proj"],
    "opt": ["q_proj", "v_proj"],
}
# The dense-GGN check of the full variant: 1-2 small layers (P <= 900), the fused one where
# there is one, with and without bias.
GGN_LAYERS = {
    "gpt2": ["transformer.h.0.attn.c_attn"],
    "gpt_neox": ["gpt_neox.layers.0.attention.query_key_value"],
    "llama": ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"],
    "qwen2": ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj"],
    "mistral": ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.o_proj"],
    "gemma2": ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"],
    "phi3": ["model.layers.0.self_attn.qkv_proj"],
    "opt": ["model.decoder.layers.1.fc2", "model.decoder.project_out"],  # fc2: on (B*T, d)
}
CASES = [(arch, variant) for arch in CONFIGS for variant in ("full", "lora")]
CASE_IDS = [f"{arch}-{variant}" for arch, variant in CASES]


# ---- float64-exact models ----------------------------------------------------------------


def _eager_attention_in_input_dtype(
    module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs
):
    """transformers' eager attention (with Gemma-2's softcap), its softmax in the input's dtype.

    query (B, H, T, d), key and value (B, H_kv, T, d); returns (B, T, H, d) and the weights.
    transformers takes the softmax in float32, which rounds float64 models to ~1e-7.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(2, 3) * scaling  # (B, H, T, T)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


# Gemma-2 has no sdpa path (sdpa has no softcap): it runs this eager attention instead.
AttentionInterface.register("eager_input_dtype", _eager_attention_in_input_dtype)
AttentionMaskInterface.register("eager_input_dtype", eager_mask)


def _rms_norm_in_input_dtype(module, x, eps, offset):
    # transformers' RMSNorms compute in float32 whatever the input's dtype; Gemma's scales
    # by (1 + w), the others by w.
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (offset + module.weight) * x


def make_model(arch: str, variant: str = "full", dtype=torch.float64, exact: bool = True):
    """The tiny ``arch`` (seeded), LoRA-wrapped when ``variant == "lora"``, in eval mode.

    exact: float64-faithful RMSNorm and attention (see above); False keeps transformers' own
    modules, as a user's low-precision model runs them.
    """
    torch.manual_seed(0)
    attention = "sdpa"
    if arch == "gemma2":  # no sdpa path: sdpa has no softcap
        attention = "eager_input_dtype" if exact else "eager"
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=attention)
    if exact:
        for module in model.modules():
            kind = type(module).__name__
            if kind.endswith("RMSNorm"):
                eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
                offset = 1.0 if kind.startswith("Gemma") else 0.0
                module.forward = functools.partial(
                    _rms_norm_in_input_dtype, module, eps=eps, offset=offset
                )
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        config = LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=LORA_TARGETS[arch],
            lora_dropout=0.0,
            init_lora_weights=False,  # random A and B: LoRA gradients are not trivially 0
            fan_in_fan_out=arch == "gpt2",  # Conv1D stores its weight as (d_in, d_out)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, config)
    return model.to(dtype).eval()


# ---- oracles, independent of influence/ -------------------------------------------------


def to_canonical(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
    """Derivatives w.r.t. a layer's native weight / bias, (..., *weight.shape) / (..., d_out),
    as one (..., d_out, d_in') array: Conv1D's (d_in, d_out) transposed, the bias last."""
    weight = weight.mT if isinstance(module, Conv1D) else weight
    return weight if bias is None else torch.cat([weight, bias[..., None]], dim=-1)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one sequence: logits (T, V), labels (T,)."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")


def oracle_grads(model, layers, batch) -> dict[str, torch.Tensor]:
    """{name: (N, d_out, d_in')}: each sequence's loss gradient, the sequence run alone."""
    out = {name: [] for name in layers}
    for i in range(batch["input_ids"].shape[0]):
        seq = unpad(batch, i)
        logits = model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"]).logits
        params = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None]
        grads = iter(torch.autograd.grad(summed_loss(logits[0], seq["labels"][0]), params))
        for name, m in layers.items():
            weight, bias = next(grads), next(grads) if m.bias is not None else None
            out[name].append(to_canonical(m, weight, bias))
    return {name: torch.stack(g) for name, g in out.items()}


def oracle_ggn(model, layers, batch) -> torch.Tensor:
    """(1/N) sum_n sum_{counted t} J_t^T (diag p_t - p_t p_t^T) J_t, (P, P), each sequence
    alone; J_t (V, P) = d logits_t / d theta from torch.func.jacrev of the native weights."""
    native = {
        f"{name}.{key}": p.detach()
        for name, m in layers.items()
        for key, p in (("weight", m.weight), ("bias", m.bias))
        if p is not None
    }
    total = 0
    for i in range(batch["input_ids"].shape[0]):
        seq = unpad(batch, i)
        inputs = {"input_ids": seq["input_ids"], "attention_mask": seq["attention_mask"]}

        def logits_of(params, inputs=inputs):
            return functional_call(model, params, (), inputs).logits[0]  # (T, V)

        # The fused sdpa kernels have no batching rule for jacrev's vmap; the math one has.
        # no_grad: no graph through the other (trainable) weights; jacrev differentiates anyway.
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            jac = jacrev(logits_of)(native)  # {key: (T, V, *param shape)}
            logits = logits_of(native).detach()
        jac = torch.cat(
            [
                to_canonical(m, jac[f"{n}.weight"], jac.get(f"{n}.bias")).flatten(2)
                for n, m in layers.items()
            ],
            dim=-1,
        )  # (T, V, P)
        counted = seq["labels"][0, 1:] != IGNORE  # position t predicts label t + 1
        j, p = jac[:-1][counted], torch.softmax(logits[:-1][counted], dim=-1)  # (K, V, P), (K, V)
        hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (K, V, V)
        total = total + torch.einsum("kvp,kvw,kwq->pq", j, hessian, j)
    return total / batch["input_ids"].shape[0]


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)  # (N, P)


def every_linear_layer(model: nn.Module) -> set[str]:
    """Names of every trainable nn.Linear / Conv1D but the LM head, found by hand."""
    head = model.get_output_embeddings()
    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and m.weight.requires_grad and m is not head
    }


# ---- 1. per-example gradients ------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant"), CASES, ids=CASE_IDS)
def test_per_example_grads_match_each_sequence_alone(arch, variant):
    # One right-padded batch (padded past its longest sequence too) gives every tracked layer
    # the gradient each sequence's summed loss has when it runs alone, unpadded.
    model = make_model(arch, variant)
    layers = find_layers(model)
    assert set(layers) == every_linear_layer(model)
    if variant == "lora":
        assert all(".lora_A." in n or ".lora_B." in n for n in layers)
    batch = make_batch([9, 6, 4, 7], pad_to=11)
    grads = per_example_grads(model, batch, layers=layers)
    expected = oracle_grads(model, layers, batch)
    for name, module in layers.items():
        assert grads[name].shape == (4, *layer_shape(module))
        assert (grads[name].flatten(1).norm(dim=1) > 0).all(), name
        assert_rel(grads[name], expected[name], 1e-10)


# ---- 2. exact scores against the dense GGN ------------------------------------------------


@functools.cache
def ggn_case(arch: str, variant: str):
    """Model, layers, batches and the oracle GGN of one case, computed once per module."""
    model = make_model(arch, variant)
    layers = find_layers(model, include=GGN_LAYERS[arch] if variant == "full" else None)
    train = split_batch(make_batch([7, 5, 6, 4], seed=1), 2)  # two batches, averaged
    ggn = GGN(model, layers, train)
    whole = {k: torch.cat([b[k] for b in train]) for k in train[0]}
    return model, layers, train, ggn, oracle_ggn(model, layers, whole)


@pytest.mark.parametrize(("arch", "variant"), CASES, ids=CASE_IDS)
def test_exact_scores_match_dense_ggn_oracle(arch, variant):
    # score(z, q) = grad m(q)^T (G + lam I)^-1 grad L(z), every piece from the oracles.
    model, layers, train, ggn, expected_ggn = ggn_case(arch, variant)
    dense = ggn.dense()
    assert dense.shape[0] <= 900  # small enough for an exact eigendecomposition here
    assert_rel(dense, expected_ggn, 1e-10)
    lam = 0.1 * float(expected_ggn.trace()) / expected_ggn.shape[0]  # 0.1 x mean eigenvalue
    queries = make_batch([6, 5, 8], seed=2)
    got = pairwise_scores(
        model,
        train,
        per_example_grads(model, queries, layers=layers),
        solver=Exact(dense, ggn.shapes, damping=lam),
        progress=False,
    )
    q = flat(oracle_grads(model, layers, queries))  # (Q, P)
    g = torch.cat([flat(oracle_grads(model, layers, b)) for b in train])  # (N, P)
    eye = torch.eye(len(expected_ggn), dtype=torch.float64)
    expected = q @ torch.linalg.solve(expected_ggn + lam * eye, g.T)  # (Q, N)
    assert got.shape == (3, 4)
    assert_rel(got, expected, 1e-10)  # G + lam I has condition number < 1e4 here


@pytest.mark.parametrize(("arch", "variant"), CASES, ids=CASE_IDS)
def test_reverse_mode_ggn_matches_oracle_or_names_the_softcap(arch, variant):
    # Reverse mode assumes logits = W h; Gemma-2's final tanh softcap breaks that: clear error.
    _, _, _, ggn, expected_ggn = ggn_case(arch, variant)
    if arch == "gemma2":
        with pytest.raises(ValueError, match="softcapping"):
            ggn.dense(mode="reverse")
    else:
        assert_rel(ggn.dense(mode="reverse"), expected_ggn, 1e-10)


# ---- 3. fused layers --------------------------------------------------------------------

# (arch, layer, number of fused parts, rows of the first part): q/k/v or gate/up.
FUSED = [
    ("gpt2", "transformer.h.0.attn.c_attn", 3 * 16, 16),
    ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value", 3 * 16, 8),  # per head q|k|v
    ("phi3", "model.layers.0.self_attn.qkv_proj", 16 + 8 + 8, 16),
    ("phi3", "model.layers.0.mlp.gate_up_proj", 2 * 24, 24),
]


@pytest.mark.parametrize(
    ("arch", "name", "d_out", "first"), FUSED, ids=[f"{a}-{n.split('.')[-1]}" for a, n, *_ in FUSED]
)
def test_fused_layer_is_one_tracked_block(arch, name, d_out, first):
    # A fused projection is one tracked layer whose rows are all its parts; EK-FAC fits one
    # output factor S over all of them, so correlations between the parts are kept.
    model = make_model(arch)
    module = dict(model.named_modules())[name]
    assert name in find_layers(model)
    assert list(find_layers(model, include=name)) == [name]
    d_in = 16 + (module.bias is not None)
    assert layer_shape(module) == (d_out, d_in)
    ekfac = fit_ekfac(model, [make_batch([9, 6, 4, 7])], layers={name: module}, progress=False)
    qs = ekfac.eigvecs_s[name]
    assert qs.shape == (d_out, d_out) and ekfac.eigvecs_a[name].shape == (d_in, d_in)
    assert ekfac.eigenvalues[name].shape == (d_out, d_in)
    # Eigenvectors of S that mix the first part with the rest: none if S were block-diagonal.
    share = qs[:first].pow(2).sum(0)  # (d_out,) mass of each eigenvector on the first part
    assert int(((share > 0.05) & (share < 0.95)).sum()) > 0


# ---- 4. low precision -------------------------------------------------------------------

# Bound on the relative error of a low-precision gradient: 8 eps = 16 unit roundoffs u (bf16:
# u = 2^-8, bound 0.0625; fp16: u = 2^-11, bound 0.0078). Weights, activations and output
# gradients are each rounded (error u), then pass through ~2 x 2 layers of matmuls, norms and
# the softmax, forward and back, so a few u are expected: measured 4-7 u (Llama bf16 0.026,
# GPT-2 bf16 0.015; fp16 0.0031 and 0.0014). A wrong layout or scale is off by O(1).
LOW_PRECISION = {dtype: 8 * torch.finfo(dtype).eps for dtype in (torch.bfloat16, torch.float16)}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_low_precision_grads_and_ekfac(arch, dtype):
    # A low-precision copy of a float32 model: finite gradients within the bound of the
    # float32 ones, and EK-FAC factors in float64 whatever the model's dtype.
    ref_model = make_model(arch, dtype=torch.float32, exact=False)
    low_model = copy.deepcopy(ref_model).to(dtype)
    batch = make_batch([9, 6, 4, 7])
    ref = per_example_grads(ref_model, batch, layers=find_layers(ref_model))
    low = per_example_grads(low_model, batch, layers=find_layers(low_model))
    for name in ref:
        assert low[name].isfinite().all()
        assert_rel(low[name].float(), ref[name], LOW_PRECISION[dtype])
    ekfacs = [
        fit_ekfac(m, [batch], layers=find_layers(m), fisher="empirical", progress=False)
        for m in (ref_model, low_model)
    ]
    for name in ref:
        for factors in ("eigvecs_a", "eigvecs_s", "eigenvalues"):
            tensor = getattr(ekfacs[1], factors)[name]
            assert tensor.dtype == torch.float64 and tensor.isfinite().all(), (name, factors)
        # Empirical EK-FAC eigenvalues sum to (1/N) sum_n |G_n|^2 (any orthogonal basis),
        # quadratic in the gradients: within twice their bound of float32's.
        total = [float(e.eigenvalues[name].sum()) for e in ekfacs]
        assert total[1] == pytest.approx(total[0], rel=2 * LOW_PRECISION[dtype])


def test_a_layer_on_some_tokens_is_a_clear_error():
    # A mixture-of-experts expert runs on a subset of the flattened (B*T, d) tokens: its
    # inputs cannot be laid out per sequence, so capturing it must fail with its name.
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.expert = nn.Embedding(VOCAB, 4), nn.Linear(4, 4)
            self.head = nn.Linear(4, VOCAB, bias=False)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids).reshape(-1, 4)  # (B*T, 4)
            routed = torch.arange(0, len(h), 2)  # every other token goes to the expert
            h = h.index_add(0, routed, self.expert(h[routed]))
            return SimpleNamespace(logits=self.head(h).reshape(*input_ids.shape, VOCAB))

    model = Routed().double()
    with pytest.raises(RuntimeError, match="'expert'.*mixture-of-experts"):
        per_example_grads(model, make_batch([5, 4]), layers={"expert": model.expert})

"""Tiny float64 causal LMs and a padded batch, shared by the kernel tests.

Every model is built from a fixed seed, in float64 with all dropouts at 0, so that oracles
(autograd loops, dense Fisher/GGN matrices) can be compared at tight tolerances.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from influence.lm import IGNORE

VOCAB = 32
MAX_LEN = 16

# The models are tiny: one thread is fastest, and the test machine's cores are shared.
torch.set_num_threads(1)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-10) -> None:
    """||actual - expected|| <= tol ||expected|| (Frobenius): float64 agreement relative to the
    tensor's scale, which elementwise tolerances misjudge for entries near 0."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = float((actual - expected).norm() / expected.norm())
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 (Conv1D layers with bias, tied LM head): 2 layers, width 16, 2 heads."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=MAX_LEN,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).double().eval()


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    """Llama (nn.Linear layers; attention projections with bias so both cases are covered)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_LEN,
        attention_bias=True,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",  # eager attention takes its softmax in float32
    )
    model = LlamaForCausalLM(config).double().eval()
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    return model


def _rms_norm_in_input_dtype(self, x: torch.Tensor) -> torch.Tensor:
    # transformers' LlamaRMSNorm computes in float32 even for float64 inputs; its rounding
    # then depends on the batch shape (~1e-8), which would hide float64-exact comparisons.
    variance = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


def make_gpt2_lora(seed: int = 0):
    """The tiny GPT-2 with peft LoRA (r=2) on c_attn; B is random so LoRA gradients are not 0."""
    from peft import LoraConfig, get_peft_model

    model = make_gpt2(seed)
    torch.manual_seed(seed + 1)
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["c_attn"],
        lora_dropout=0.0,
        init_lora_weights=False,  # random A and B: the LoRA gradients are not trivially 0
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight as (d_in, d_out)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config).double().eval()


def make_batch(
    lengths: list[int], prompt_len: int = 3, seed: int = 0, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch with response-only labels (-100 on the prompt and on padding).

    Sequence i has ``lengths[i]`` real tokens, the first ``prompt_len`` being the prompt.
    Padding uses token 0 and attention_mask 0.
    """
    g = torch.Generator().manual_seed(seed)
    T = pad_to or max(lengths)
    input_ids = torch.zeros(len(lengths), T, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        attention_mask[i, :n] = 1
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE
    labels[:, :prompt_len] = IGNORE
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_batch(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """The batch cut into consecutive batches of ``size`` sequences (same padding)."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def unpad(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sequence i alone, without its padding: a (1, length_i) batch."""
    n = int(batch["attention_mask"][i].sum())
    return {k: v[i : i + 1, :n] for k, v in batch.items()}


MAKERS = {"gpt2": make_gpt2, "llama": make_llama, "gpt2_lora": make_gpt2_lora}


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def gpt2_lora():
    return make_gpt2_lora()


@pytest.fixture(params=list(MAKERS))
def tiny_model(request):
    """Each tiny model in turn: GPT-2 (Conv1D), Llama (nn.Linear), GPT-2 + LoRA."""
    return MAKERS[request.param]()


@pytest.fixture
def batch():
    """4 right-padded sequences of lengths 9, 6, 4, 7 (prompt of 3 tokens, labels -100)."""
    return make_batch([9, 6, 4, 7])


@pytest.fixture
def train_batch():
    """6 right-padded sequences for scoring and curvature tests (a second seed)."""
    return make_batch([8, 5, 7, 4, 6, 8], seed=1)

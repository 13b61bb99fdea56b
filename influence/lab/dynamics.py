"""Training dynamics: how far the weights moved, and how far the behaviour moved.

- :func:`weight_deltas`: the parameter change of a fine-tune, per weight. For a peft LoRA model,
  each adapted layer's effective change ``delta W = B A * alpha / r`` (peft's
  ``get_delta_weight``, in the base weight's layout); for any model, ``theta - theta_ref`` of the
  parameters named in a reference state dict (full fine-tuning: the weights before training).
  Both use the base model's parameter names (``transformer.h.0.attn.c_attn.weight``), so LoRA
  and full fine-tuning compare weight by weight.
- :func:`response_kl`: the behaviour change, KL(p || q) between two models' next-token
  distributions, teacher-forced on the same sequences and averaged over each sequence's counted
  (response) tokens.
- :func:`first_reach`: the first checkpoint at which a curve reaches a share of its final value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from influence.lm import loss_mask

PEFT_PREFIX = "base_model.model."


def weight_deltas(
    model, reference: dict[str, torch.Tensor] | None = None, adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """{parameter name: change} of `model`, detached.

    reference None: `model` must hold peft LoRA layers; each layer's ``get_delta_weight(adapter)``
    (= B A * scaling, transposed for GPT-2's Conv1D like the base weight) under the name of the
    base weight it adds to. Otherwise: ``theta - reference[name]`` for every parameter of
    `model` named in `reference` (a name missing from `model` is an error).
    """
    if reference is not None:
        params = dict(model.named_parameters())
        missing = sorted(set(reference) - set(params))
        if missing:
            raise ValueError(f"reference names {len(missing)} unknown parameters: {missing[:3]}")
        return {n: (params[n] - ref).detach() for n, ref in reference.items()}
    from peft.tuners.lora import LoraLayer

    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                out[f"{name.removeprefix(PEFT_PREFIX)}.weight"] = module.get_delta_weight(adapter)
    if not out:
        raise ValueError("model has no LoRA layer; pass the reference weights for a full fine-tune")
    return out


@torch.no_grad()
def response_kl(p_model, q_model, batches: Sequence[dict]) -> torch.Tensor:
    """(N,) KL(p || q) per counted token of each sequence, in nats.

    At every input position whose next token is counted by the loss (``lm.loss_mask``: the
    response and its eos with response-only labels), KL(p || q) = sum_v p(v) (log p(v) - log q(v))
    of the two models' next-token distributions given the same prefix (teacher forcing), then
    the mean over the sequence's counted positions. A sequence with none counted gets 0.
    """
    out = []
    for batch in batches:
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        log_p = F.log_softmax(p_model(**inputs).logits.double(), dim=-1)  # (B, T, V)
        log_q = F.log_softmax(q_model(**inputs).logits.double(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
        mask = loss_mask(batch["labels"])  # (B, T)
        out.append((kl * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out)


def first_reach(steps: Sequence[int], values: Sequence[float], share: float = 0.95) -> int:
    """The first of `steps` from which `values` stay at or above `share` x the last value
    (the start of the plateau; a later dip below it moves the answer past the dip)."""
    if len(steps) != len(values) or not steps:
        raise ValueError(f"{len(steps)} steps for {len(values)} values")
    level = share * values[-1]
    at = len(values) - 1
    while at > 0 and values[at - 1] >= level:
        at -= 1
    return steps[at]

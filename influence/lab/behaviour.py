"""A behaviour beside the loss: the class margin of a classification task (notebook 11).

The loss that attribution scores by default is L_q = -log p(y_q + eos | prompt_q). What a reader
of a classifier cares about is its decision: does the model prefer the correct class to the
others? The class margin

    m_q = log p(y_q | x_q) - log sum_{c != y_q} p(c | x_q),

with p(c | x) = p(response_c + eos | prompt) over the task's class responses (whole, often
multi-token, sequences), is the log-odds of the correct class against the rest. It falls when
probability moves from the correct class to another one, but not when every class loses
probability to text outside the classes, which raises the loss.

Attributing it: a library measurement (``collect_grads(measurement=)``) is a function of one
sequence's logits, and m_q reads K sequences. Its gradient combines theirs,

    grad m_q = grad log p_y - sum_{c != y} w_c grad log p_c,   w_c = p_c / sum_{c' != y} p_c',

so the query gradient of -m_q (a measurement is a quantity to lower; a behaviour to raise
enters with a minus sign) is g_y - sum_{c != y} w_c g_c, with g_c = grad L_c the loss gradients
of the K candidate sequences, computed by ``collect_grads`` in one pass over Q x K sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from influence.gradients import collect_grads
from influence.lab.metrics import response_losses
from influence.lab.tokenizer import make_batches
from influence.modules import LayerGrads


def class_responses(train: Sequence[dict]) -> dict[str, str]:
    """{label: response} of a classification task's training set; an error when a label has
    several responses (the margin needs one candidate sequence per class)."""
    out: dict[str, set[str]] = {}
    for ex in train:
        out.setdefault(ex["label"], set()).add(ex["response"])
    several = {label: sorted(r)[:3] for label, r in out.items() if len(r) > 1}
    if several:
        raise ValueError(
            f"the class margin needs one response per label; labels with several: {several}"
        )
    if len(out) < 2:
        raise ValueError(f"the class margin needs at least 2 labels, got {sorted(out)}")
    return {label: next(iter(r)) for label, r in sorted(out.items())}


def _candidates(queries: Sequence[dict], responses: dict[str, str]) -> list[dict]:
    """Each query's prompt with every class response, query-major: (Q x K) examples."""
    unknown = sorted({q["label"] for q in queries} - set(responses))
    if unknown:
        raise ValueError(f"queries with labels {unknown} outside the classes {sorted(responses)}")
    return [{"prompt": q["prompt"], "response": r} for q in queries for r in responses.values()]


def _correct(queries: Sequence[dict], responses: dict[str, str]) -> torch.Tensor:
    labels = list(responses)
    return torch.tensor([labels.index(q["label"]) for q in queries])


def class_log_probs(model, tok, queries: Sequence[dict], responses: dict[str, str]) -> torch.Tensor:
    """(Q, K) log p(response_k + eos | prompt_q), classes in the order of `responses`."""
    with torch.no_grad():
        losses = response_losses(model, tok, _candidates(queries, responses))
    return -losses.double().view(len(queries), len(responses))


def _split(logp: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_y, log sum_{c != y} p_c) per query, from (Q, K) log-probabilities."""
    rows = torch.arange(len(correct))
    others = logp.clone()
    others[rows, correct] = -torch.inf
    return logp[rows, correct], torch.logsumexp(others, dim=1)


def margins(model, tok, queries: Sequence[dict], responses: dict[str, str]) -> np.ndarray:
    """(Q,) class margin m_q (module docstring), in nats: > 0 when the correct class is more
    probable than all the others together."""
    right, rest = _split(
        class_log_probs(model, tok, queries, responses), _correct(queries, responses)
    )
    return (right - rest).numpy()


def margin_grads(
    model, tok, layers, queries: Sequence[dict], responses: dict[str, str], batch_size: int = 32
) -> LayerGrads:
    """{layer: (Q, d_out, d_in')}: the gradient of -m_q, the query gradient that attributes the
    class margin (a measurement to lower, as the loss is)."""
    q, k = len(queries), len(responses)
    batches = make_batches(tok, _candidates(queries, responses), batch_size)
    g = collect_grads(model, batches, layers=layers, progress=False)  # grad L_c, (Q K, o, i)
    correct = _correct(queries, responses)
    logp = class_log_probs(model, tok, queries, responses)
    _, rest = _split(logp, correct)
    coef = -torch.exp(logp - rest[:, None])  # -w_c
    coef[torch.arange(q), correct] = 1.0
    return {
        name: torch.einsum("qk,qkoi->qoi", coef.to(x.dtype), x.view(q, k, *x.shape[1:]))
        for name, x in g.items()
    }

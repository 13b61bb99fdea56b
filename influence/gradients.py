"""Per-example layer gradients from one forward/backward pass per batch.

The loss of sequence n is L_n = sum of next-token cross-entropies over its counted tokens
(``influence.lm.sequence_losses``; response-only through labels = -100). Sequences in a batch
do not interact, so backpropagating sum_n L_n once gives each layer's output gradients
g_{n,t} = dL_n/dy_{n,t}, and the per-example gradient of a tracked layer is the contraction

    G_n = sum_t g_{n,t} a_{n,t}^T        (d_out, d_in'),

an einsum over tokens; the model-wide per-example gradient is never materialised. Padding
positions have g = 0 (nothing counted depends on them), so padding does not change G_n.

Labels for curvature estimates: ``fisher="empirical"`` uses the data's labels (empirical
Fisher); ``fisher="true"`` draws each counted label from the model's own predictive
distribution (true Fisher, a Monte-Carlo sample), from a generator seeded by (seed, batch
index) so that reruns and resumed fits draw the same labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm  # tqdm.auto warns in notebooks without ipywidgets

from influence.lm import IGNORE, sequence_losses
from influence.modules import Capture, LayerGrads, find_layers

FISHERS = ("empirical", "true")


class Captured(NamedTuple):
    """One batch's layer inputs and output gradients.

    a: {name: (B, T, d_in')}, g: {name: (B, T, d_out)}, mask: (B, T) bool, True at the
    non-padding positions (the batch's attention_mask).
    """

    a: dict[str, torch.Tensor]
    g: dict[str, torch.Tensor]
    mask: torch.Tensor


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def sample_labels(
    logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Labels drawn from the model at the counted positions (IGNORE elsewhere).

    logits: (B, T, V); labels: (B, T). The label at t is drawn from softmax(logits[:, t-1]).
    """
    counted = labels[:, 1:] != IGNORE  # (B, T-1)
    probs = torch.softmax(logits[:, :-1][counted].detach().double(), dim=-1)  # (K, V)
    sampled = torch.full_like(labels, IGNORE)
    draws = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (K,)
    sampled[:, 1:][counted] = draws.to(labels.dtype)
    return sampled


def _generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def capture(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batch: dict[str, torch.Tensor],
    fisher: str = "empirical",
    generator: torch.Generator | None = None,
) -> Captured:
    """Forward + backward of sum_n L_n on one batch; the tracked layers' (a, g) and the mask."""
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if fisher == "true" and generator is None:
        raise ValueError("fisher='true' samples labels: pass a seeded torch.Generator")
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    with torch.enable_grad(), Capture(model, layers) as cap:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        if fisher == "true":
            labels = sample_labels(logits, labels, generator)
        losses = sequence_losses(logits, labels)
        cap.backward(losses.sum())
    bad = [n for n in layers if not (cap.a[n].isfinite().all() and cap.g[n].isfinite().all())]
    if bad:
        raise ValueError(
            f"non-finite activations or gradients in layers {bad} (sequence losses "
            f"{losses.detach().tolist()}): check the model's weights and the batch's labels"
        )
    return Captured(cap.a, cap.g, batch["attention_mask"].bool())


def grads_from_pairs(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G_n = sum_t g_{n,t} a_{n,t}^T: (B, T, d_in'), (B, T, d_out) -> (B, d_out, d_in')."""
    return torch.einsum("bto,bti->boi", g, a)


def per_example_grads(
    model: nn.Module, batch: dict[str, torch.Tensor], *, layers: dict[str, nn.Module] | None = None
) -> LayerGrads:
    """Gradient of each sequence's loss L_n w.r.t. each tracked layer: {name: (B, d_out, d_in')}.

    layers: default ``find_layers(model)``."""
    layers = layers if layers is not None else find_layers(model)
    cap = capture(model, layers, batch)
    return {name: grads_from_pairs(cap.a[name], cap.g[name]) for name in layers}


def _progress(batches: Iterable, progress: bool, desc: str) -> Iterable:
    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=desc, disable=not progress, leave=False)


def iter_captures(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    fisher: str = "empirical",
    seed: int = 0,
    progress: bool = True,
    desc: str = "gradients",
    start: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[Captured | None]:
    """``capture`` on each batch in turn, with a tqdm bar (``progress=False`` hides it).

    ``start`` skips the first batches (used when resuming); the true-Fisher generator of batch
    i is seeded with (seed, i) whatever ``start`` is. ``shard=(r, K)``: process r of K captures
    the batches i with i % K == r and yields None for the others, so that every process walks
    through the same batches in step.
    """
    device = next(model.parameters()).device
    rank, world = shard
    for i, batch in enumerate(_progress(batches, progress, desc)):
        if i < start:
            continue
        if i % world != rank:
            yield None
            continue
        gen = _generator(seed, i, device) if fisher == "true" else None
        yield capture(model, layers, batch, fisher=fisher, generator=gen)


def collect_grads(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    layers: dict[str, nn.Module] | None = None,
    fisher: str = "empirical",
    seed: int = 0,
    progress: bool = True,
) -> LayerGrads:
    """Per-example gradients of every sequence in ``batches``, concatenated: (N, d_out, d_in').

    layers: default ``find_layers(model)``.

    ``fisher="true"``: with the counted labels drawn from the model (seeded as
    ``iter_captures``), the gradients whose outer products average to the true Fisher.
    """
    layers = layers if layers is not None else find_layers(model)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    captures = iter_captures(model, layers, batches, fisher, seed, progress, "per-example grads")
    for cap in captures:
        for name in layers:
            chunks[name].append(grads_from_pairs(cap.a[name], cap.g[name]))
    return {name: torch.cat(parts) for name, parts in chunks.items()}

"""Influence scores: pairwise, per layer, per token, self-influence.

Convention. For a query q and a training sequence z,

    score(z, q) = grad m(q)^T H^-1 grad L(z),

with m(q) the query's summed loss, L(z) the training sequence's summed loss and H^-1 given by
a solver's ``ihvp`` (EK-FAC, K-FAC, CG, ...; ``solver=None`` is the identity, i.e. gradient
dot products). Positive = proponent: upweighting z lowers the query's loss to first order
(the parameters move by -eps H^-1 grad L(z), so m(q) changes by -eps score). Scores are not
multiplied by the number of training examples N.

Cost. The few query gradients are preconditioned once, P_l = ihvp(grad m(q))_l (d_out, d_in'),
then each training batch is captured once and contracted with them:
score = sum_l <P_l, G_l(z)> with G_l(z) = sum_t g_t a_t^T. With a rank-r compression
P_l ~ U V^T the contraction uses (a, g) directly, sum_t (g_t^T U)(V^T a_t), and never forms
G_l(z). Per-token scores g_t^T P_l a_t split each sequence's score over the positions t
of its layer inputs (the token's activations, through which all later losses flow); they sum
to the sequence's score.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from influence.gradients import grads_from_pairs, iter_captures
from influence.modules import LayerGrads, find_layers


class Solver(Protocol):
    def ihvp(self, v: LayerGrads) -> LayerGrads: ...


Batches = Iterable[dict[str, torch.Tensor]]


def _layers(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"the query gradients have layers {missing} that the model does not have")
    return {n: modules[n] for n in names}


def precondition(queries: LayerGrads, solver: Solver | None = None) -> LayerGrads:
    """ihvp of the query gradients {name: (Q, d_out, d_in')}; identity when solver is None."""
    return dict(queries) if solver is None else solver.ihvp(queries)


def compress(pre: LayerGrads, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rank-r truncated SVD of each (Q, d_out, d_in') matrix: {name: (U S, V)}, P ~ (U S) V^T.

    U S: (Q, d_out, r), V: (Q, d_in', r); exact when r >= min(d_out, d_in').
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    out = {}
    for name, mat in pre.items():
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(rank, s.shape[-1])
        out[name] = (u[..., :r] * s[..., None, :r], vh[..., :r, :].mT)
    return out


def pairwise_scores(
    model: nn.Module,
    train_batches: Batches,
    queries: LayerGrads,
    *,
    solver: Solver | None = None,
    rank: int | None = None,
    per_layer: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """Scores of every (query, training sequence) pair: (Q, N).

    queries: query gradients {name: (Q, d_out, d_in')} (e.g. ``collect_grads``); their layers
    are the ones scored. rank: compress the preconditioned queries to rank r per layer first.
    per_layer: return (L, Q, N), layers in the order of ``queries``, summing to the total.
    """
    layers = _layers(model, queries)
    pre = precondition(queries, solver)
    low = compress(pre, rank) if rank is not None else None
    chunks = []
    for cap in iter_captures(model, layers, train_batches, progress=progress, desc="scores"):
        per = []
        for name in layers:
            a, g = cap.a[name], cap.g[name]  # (B, T, d_in'), (B, T, d_out)
            if low is None:
                per.append(torch.einsum("qoi,boi->qb", pre[name], grads_from_pairs(a, g)))
            else:
                left, right = low[name]  # (Q, d_out, r), (Q, d_in', r)
                gu = torch.einsum("bto,qor->qbtr", g, left)
                av = torch.einsum("bti,qir->qbtr", a, right)
                per.append((gu * av).sum(dim=(2, 3)))
        chunks.append(torch.stack(per).cpu())  # (L, Q, B)
    scores = torch.cat(chunks, dim=-1)
    return scores if per_layer else scores.sum(0)


def token_scores(
    model: nn.Module,
    train_batches: Batches,
    queries: LayerGrads,
    *,
    solver: Solver | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Per-token scores (Q, N, T): sum over layers of g_t^T P_l a_t at input position t.

    T is the longest batch's length; positions past a sequence's end (and padding) score 0.
    Summing over T gives ``pairwise_scores``.
    """
    layers = _layers(model, queries)
    pre = precondition(queries, solver)
    chunks = []
    for cap in iter_captures(model, layers, train_batches, progress=progress, desc="token scores"):
        per_token = sum(
            torch.einsum("bto,qoi,bti->qbt", cap.g[name], pre[name], cap.a[name]) for name in layers
        )
        chunks.append(per_token.cpu())  # (Q, B, T_batch)
    width = max(c.shape[-1] for c in chunks)
    return torch.cat([nn.functional.pad(c, (0, width - c.shape[-1])) for c in chunks], dim=1)


def self_influence(
    model: nn.Module,
    batches: Batches,
    *,
    solver: Solver | None = None,
    layers: dict[str, nn.Module] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """grad L(z)^T H^-1 grad L(z) of every sequence: (N,). layers: default ``find_layers``."""
    layers = layers if layers is not None else find_layers(model)
    chunks = []
    for cap in iter_captures(model, layers, batches, progress=progress, desc="self-influence"):
        grads = {n: grads_from_pairs(cap.a[n], cap.g[n]) for n in layers}  # (B, d_out, d_in')
        pre = precondition(grads, solver)
        chunks.append(sum((pre[n] * grads[n]).sum(dim=(1, 2)) for n in layers).cpu())
    return torch.cat(chunks)

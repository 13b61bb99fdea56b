"""Similarity baselines that need no Hessian: representation similarity, gradient cosine, BM25.

RepSim and gradient cosine return a (Q, N) score matrix, queries by training examples, larger =
more similar, in [-1, 1] (a zero vector has cosine 0 with everything).

- RepSim (paper B): cos(h_q, h_z) of one layer's hidden state at one position, by default
  the last layer (``hidden_states[-1]``, after the final norm in GPT-2 and Llama) at each
  sequence's last non-padding token. Paper B feeds the prompt only (without the response);
  which tokens to feed is the caller's choice of batch.
- Gradient cosine: cos(g_q, g_z) of the flattened per-example gradients of the tracked
  layers (``influence.gradients.per_example_grads``), i.e. normalised gradient dot products.
- BM25 (paper A's lexical baseline): ``bm25_scores`` on texts, (Q, N), unbounded.

Two gradient baselines over several models (an ensemble or a run's checkpoints), (Q, N),
unbounded, larger = more helpful (the influence sign convention): ``trak_scores`` (TRAK,
randomly projected gradients with an empirical-Fisher kernel) and ``tracin_scores`` (TracInCP).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
from rank_bm25 import BM25Okapi
from torch import nn

from influence.data import Batch, as_batches
from influence.gradients import collect_grads, to_device
from influence.models import eval_mode, vocab_size
from influence.modules import LayerGrads, find_layers, flatten
from influence.scores import pairwise_scores
from influence.solvers import _check_nonsingular


def cosine_scores(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """(Q, D), (N, D) -> (Q, N) cosine similarities, computed in float64."""
    if queries.shape[-1] != train.shape[-1]:
        raise ValueError(
            f"queries have {queries.shape[-1]} features, training examples {train.shape[-1]}"
        )
    tiny = torch.finfo(torch.float64).tiny
    q = queries.double()
    q = q / q.norm(dim=1, keepdim=True).clamp_min(tiny)
    out = torch.empty(q.shape[0], train.shape[0], dtype=torch.float64, device=q.device)
    for start in range(0, train.shape[0], 256):  # float64 copies of 256 rows, not of all N
        t = train[start : start + 256].double()
        out[:, start : start + 256] = q @ (t / t.norm(dim=1, keepdim=True).clamp_min(tiny)).T
    return out.clamp(-1.0, 1.0)  # rounding may leave |cos| a hair above 1


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's last non-padding token (right or left padding)."""
    if (attention_mask.sum(1) == 0).any():
        raise ValueError("a sequence has no non-padding token (attention_mask row of zeros)")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(1)  # last index where mask is 1


@torch.no_grad()
def hidden_states(
    model: nn.Module,
    batches: Batch | Iterable[Batch],
    layer: int = -1,
    position: str = "last",
) -> torch.Tensor:
    """Hidden state of ``layer`` (an index into ``hidden_states``: 0 = embeddings, -1 = last
    layer) for every sequence: (N, d_model). ``position``: "last" (the last non-padding
    token) or "mean" (the mean over non-padding tokens).

    batches: one batch dict or anything ``influence.data.as_batches`` accepts, checked against
    the batch contract without labels (input_ids and attention_mask are what is fed); the
    model runs in eval mode, its modes restored after."""
    if position not in ("last", "mean"):
        raise ValueError(f"position must be 'last' or 'mean', got {position!r}")
    device = next(model.parameters()).device
    out = []
    # labels are not needed (nor checked): only input_ids and attention_mask are fed
    checked = as_batches(batches).checked(vocab_size=vocab_size(model), labels=False)
    with eval_mode(model):
        for batch in checked:
            batch = to_device(batch, device)
            mask = batch["attention_mask"]
            states = model(
                input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True
            ).hidden_states
            if not -len(states) <= layer < len(states):
                raise ValueError(f"layer {layer} out of range: the model has {len(states)} states")
            h = states[layer]  # (B, T, d)
            if position == "last":
                out.append(h[torch.arange(h.shape[0], device=device), last_token_index(mask)])
            else:
                w = mask[..., None].to(h)
                out.append((h * w).sum(1) / w.sum(1))
    return torch.cat(out)


def repsim_scores(
    model: nn.Module,
    train_batches: Batch | Iterable[Batch],
    query_batches: Batch | Iterable[Batch],
    *,
    layer: int = -1,
    position: str = "last",
) -> torch.Tensor:
    """RepSim: (Q, N) cosine similarities of the hidden states (see ``hidden_states``)."""
    queries = hidden_states(model, query_batches, layer, position)
    train = hidden_states(model, train_batches, layer, position)
    return cosine_scores(queries, train)


def gradient_cosine_from_grads(query_grads: LayerGrads, train_grads: LayerGrads) -> torch.Tensor:
    """(Q, N) cosine of flattened per-example gradients {layer: (Q or N, d_out, d_in')}."""
    if set(query_grads) != set(train_grads):
        raise ValueError(
            f"query layers {sorted(query_grads)} differ from training layers {sorted(train_grads)}"
        )
    names = list(train_grads)
    return cosine_scores(
        flatten({n: query_grads[n] for n in names}), flatten({n: train_grads[n] for n in names})
    )


def gradient_cosine_scores(
    model: nn.Module,
    train_batches: Batch | Iterable[Batch],
    query_batches: Batch | Iterable[Batch],
    *,
    layers: dict[str, nn.Module] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Gradient cosine: (Q, N) float64 cosines of the tracked layers' per-example gradients.

    The training gradients are streamed (``pairwise_scores`` with ``norms=True``: dot products
    and norms from one pass), so memory holds the queries' gradients, not the N training ones.
    layers: default ``find_layers(model)``."""

    def listed(batches):
        return [batches] if isinstance(batches, dict) else batches

    layers = layers if layers is not None else find_layers(model)
    queries = collect_grads(model, listed(query_batches), layers=layers, progress=progress)
    dots, norms = pairwise_scores(
        model, listed(train_batches), queries, norms=True, progress=progress
    )
    return cosines_from_dots(dots, queries, norms)


def cosines_from_dots(dots: torch.Tensor, queries: LayerGrads, norms: torch.Tensor) -> torch.Tensor:
    """(Q, N) float64 cosines from the dot products ``dots`` of the query gradients
    ``queries`` ({layer: (Q, d_out, d_in')}) with N training gradients of norms ``norms``
    (both from ``pairwise_scores(..., norms=True)``). The query norms are summed layer by layer
    in float64, without a float64 copy of the queries; a zero vector has cosine 0."""
    tiny = torch.finfo(torch.float64).tiny
    squares = sum(
        torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float64) ** 2
        for g in queries.values()
    )
    cos = dots.double() / squares.sqrt().clamp_min(tiny)[:, None]
    return (cos / norms.double().clamp_min(tiny)[None]).clamp(-1.0, 1.0)  # rounding: |cos| > 1


# ---- BM25 (paper A's lexical baseline) --------------------------------------------------


def words(text: str) -> list[str]:
    """Word-level tokens for BM25: lowercase, split on everything that is not a letter or digit."""
    return re.findall(r"[^\W_]+", text.lower())


def bm25_scores(
    queries: list[str], documents: list[str], k1: float = 1.5, b: float = 0.75
) -> torch.Tensor:
    """BM25 (Okapi, ``rank_bm25``) score of every document for every query: (Q, N) float64.

    Tokens from ``words``; idf and document lengths from ``documents`` (rank_bm25 floors a
    negative idf, a word in more than half the documents, at 0.25 x the mean idf; a word in
    exactly half of them has idf 0 and counts for nothing). Larger = more relevant. A corpus
    without a single word scores 0 everywhere.
    """
    if isinstance(queries, str) or isinstance(documents, str):
        raise ValueError("queries and documents must be lists of strings, not one string")
    if not documents:
        raise ValueError("documents is empty: BM25 needs at least one document to rank")
    corpus = [words(d) for d in documents]
    if not any(corpus):
        return torch.zeros(len(queries), len(documents), dtype=torch.float64)
    index = BM25Okapi(corpus, k1=k1, b=b)
    rows = [torch.from_numpy(index.get_scores(words(q))) for q in queries]
    return torch.stack(rows) if rows else torch.zeros(0, len(documents), dtype=torch.float64)


# ---- TRAK and TracIn: gradient baselines over several models ----------------------------

_PROJECTION_ROWS = 1024  # rows of R drawn at a time (at least dim): the (rows, dim) chunk


def _check_models(
    train_grads: Sequence[torch.Tensor], query_grads: Sequence[torch.Tensor], what: str
) -> None:
    """One (N, P) and one (Q, P) matrix per model, with N, Q and P equal across models."""
    if len(train_grads) != len(query_grads):
        raise ValueError(
            f"train_grads holds {len(train_grads)} models, query_grads {len(query_grads)}: "
            f"pass one (N, P) and one (Q, P) matrix per {what}"
        )
    if not train_grads:
        raise ValueError(f"no {what}: pass at least one (N, P) and one (Q, P) matrix")
    first = (tuple(train_grads[0].shape), tuple(query_grads[0].shape))
    for s, (g, q) in enumerate(zip(train_grads, query_grads, strict=True)):
        if g.dim() != 2 or q.dim() != 2 or g.shape[1] != q.shape[1]:
            raise ValueError(
                f"{what} {s}: train grads {tuple(g.shape)} and query grads {tuple(q.shape)} "
                "must be (N, P) and (Q, P) with the same P (flatten(collect_grads(...)))"
            )
        if (tuple(g.shape), tuple(q.shape)) != first:
            raise ValueError(
                f"{what} {s} has train grads {tuple(g.shape)} and query grads {tuple(q.shape)}, "
                f"{what} 0 has {first[0]} and {first[1]}: every {what} needs the same N, Q, P"
            )


def _project(grads: Sequence[torch.Tensor], dim: int, seed: int) -> list[torch.Tensor]:
    """x R for each x (n, P) in ``grads``: (n, dim) float64, with R (P, dim) Gaussian / sqrt(dim).

    R is drawn on the CPU from a generator seeded by ``seed`` (the same on every device), in
    chunks of rows, in float32, and each chunk multiplies in float64: no (P, dim) temporary.
    """
    p = grads[0].shape[1]
    device = grads[0].device
    gen = torch.Generator().manual_seed(seed)
    out = [torch.zeros(x.shape[0], dim, dtype=torch.float64, device=device) for x in grads]
    rows = max(dim, _PROJECTION_ROWS)
    for start in range(0, p, rows):
        r = torch.randn(min(rows, p - start), dim, generator=gen) / math.sqrt(dim)
        r = r.to(device, torch.float64)
        for x, phi in zip(grads, out, strict=True):
            phi += x[:, start : start + rows].double() @ r
    return out


def trak_scores(
    train_grads: Sequence[torch.Tensor],
    query_grads: Sequence[torch.Tensor],
    *,
    dim: int = 512,
    damping: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """TRAK (Park et al. 2023): (Q, N) float64, larger = more helpful.

    ``train_grads[s]`` (N, P) and ``query_grads[s]`` (Q, P): the flat per-example gradients
    (``flatten(collect_grads(...))``) of model s of an ensemble (fine-tuned with other seeds,
    or checkpoints). For each model, with R_s (P, dim) Gaussian / sqrt(dim) from a generator
    seeded by ``seed + s``, features Phi = G R_s (N, dim) and Phi_q = Q R_s (Q, dim):

        K_s = Phi^T Phi + damping I,    scores_s = Phi_q K_s^{-1} Phi^T,

    and TRAK is the mean of scores_s over the models (TRAK's ensembling). Differences from the
    paper: the output function is the loss (the gradients are those of the summed token
    losses, not of a margin), and there is no (1 - p) reweighting. Phi^T Phi is the projected
    empirical Fisher summed (not averaged) over the N examples, so with dim >= P and damping
    -> 0 a model's scores are Q (G^T G)^{-1} G^T = (1/N) Q F^{-1} G^T: 1/N x the influence
    scores with the empirical Fisher F = G^T G / N. Computed from the thin SVD of Phi (rounding
    of cond(Phi), not cond(K)). ``damping=None``: 1e-3 x tr(Phi^T Phi) / dim for each model
    (1e-3 x K's mean eigenvalue); a float is absolute (>= 0; 0 needs Phi of rank dim, N >= dim).
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if damping is not None and not damping >= 0:
        raise ValueError(f"damping must be >= 0 or None (the relative default), got {damping}")
    _check_models(train_grads, query_grads, "model")
    total = 0.0
    for s, (g, q) in enumerate(zip(train_grads, query_grads, strict=True)):
        phi, phi_q = _project([g, q], dim, seed + s)  # (N, dim), (Q, dim)
        # Phi = U S V^T (thin SVD, k = min(N, dim)): K^{-1} Phi^T = V diag(S / (S^2 + lam)) U^T,
        # with the rounding error of cond(Phi), not of cond(K) = cond(Phi)^2.
        u, sv, vh = torch.linalg.svd(phi, full_matrices=False)  # (N, k), (k,), (k, dim)
        lam = 1e-3 * float(sv.pow(2).sum()) / dim if damping is None else float(damping)
        unseen = sv.new_zeros(dim - len(sv))  # K's eigenvalues are S^2 + lam and lam (dim - k)
        _check_nonsingular(torch.cat([sv.pow(2), unseen]).sort().values + lam)
        total = total + ((phi_q @ vh.T) * (sv / (sv.pow(2) + lam))) @ u.T
    return total / len(train_grads)


def tracin_scores(
    train_grads: Sequence[torch.Tensor],
    query_grads: Sequence[torch.Tensor],
    lrs: Sequence[float],
) -> torch.Tensor:
    """TracInCP (Pruthi et al. 2020): sum_c lr_c Q_c G_c^T, (Q, N) float64, larger = more helpful.

    ``train_grads[c]`` (N, P) and ``query_grads[c]`` (Q, P): flat per-example gradients at
    checkpoint c; ``lrs[c]``: the learning rate in effect around checkpoint c.
    """
    if len(lrs) != len(train_grads):
        raise ValueError(f"lrs has {len(lrs)} values for {len(train_grads)} checkpoints")
    _check_models(train_grads, query_grads, "checkpoint")
    g0, q0 = train_grads[0], query_grads[0]
    out = torch.zeros(q0.shape[0], g0.shape[0], dtype=torch.float64, device=g0.device)
    for lr, g, q in zip(lrs, train_grads, query_grads, strict=True):
        q = q.double()
        for start in range(0, g.shape[0], 256):  # float64 copies of 256 rows, not of all N
            out[:, start : start + 256] += float(lr) * (q @ g[start : start + 256].double().T)
    return out

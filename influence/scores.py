"""Influence scores: pairwise, per layer, per token, self-influence; the top-k of a score matrix.

Convention. For a query q and a training sequence z,

    score(z, q) = grad m(q)^T H^-1 grad L(z),

with m(q) the query's measurement (default its summed loss; ``collect_grads(measurement=)``),
L(z) the training sequence's summed loss and H^-1 given by a solver's ``ihvp`` (EK-FAC, K-FAC,
CG, ...; ``solver=None`` is the identity, i.e. gradient dot products). Positive = proponent:
upweighting z lowers m(q) to first order (the parameters move by -eps H^-1 grad L(z), so m(q)
changes by -eps score). Scores are not multiplied by the number of training examples N.

Cost. The query gradients are preconditioned, P_l = ihvp(grad m(q))_l (d_out, d_in'), then
each training batch is captured once and contracted with them: score = sum_l <P_l, G_l(z)>
with G_l(z) = sum_t g_t a_t^T. With a rank-r compression P_l ~ U V^T the contraction uses
(a, g) directly, sum_t (g_t^T U)(V^T a_t), and never forms G_l(z). Per-token scores
g_t^T P_l a_t split each sequence's score over the positions t of its layer inputs (the
token's activations, through which all later losses flow); they sum to the sequence's score.
Several query sets ({set: {layer: (Q_s, d_out, d_in')}}, e.g. the same queries preconditioned
by two solvers) share one pass: each training batch is captured once and its per-example
gradients G_l(z) formed once for every set, without concatenating the sets.

Memory. ``query_batch_size=b`` scores the Q queries b at a time, so that what scoring holds
besides the queries themselves and the result is set by b and the training batch, not by Q:
- dense (``rank=None``): precondition b queries, stream the training data, then the next b:
  the training data is read ceil(Q / b) times.
- ``rank=r``: precondition b queries and compress them at once, keep the rank-r factors of all
  Q queries (Q r (d_out + d_in') numbers per layer instead of Q d_out d_in'), then one pass
  over the training data contracting b queries at a time.
``query_batch_size=None`` preconditions all Q at once and reads the data once: the fastest,
holding Q P more numbers (P = tracked parameters) plus the solver's temporaries for all Q.
The trade-off is time (ceil(Q / b) gradient passes) against memory (Q P): b is for when Q P
does not fit (1,024 queries of a model with 100 M tracked parameters: 400 GB in float32).
``benchmarks/memory_scaling.py`` (GPT-2, width 64, 2 blocks, P = 99 k, EK-FAC, 32 training
sequences of 32 tokens in batches of 16, float32, one thread) measured the growth of the peak
resident memory during the call: 1,024 queries 21.4 MB, 16 queries 20.9 MB (+2 %; +2 to +5 %
over four runs) at b = 16, in 16 and 0.2 CPU s; 1,024 queries in one batch 716 MB
(the preconditioned queries, 400 MB, and the EK-FAC solve's float64 temporaries) in 9 CPU s;
rank 4 at b = 16, 49 MB (of which the factors of 1,024 queries, 34 MB) in 18 CPU s.
When only the scores are wanted, ``collect_grads(..., precondition=solver)`` preconditions the
queries batch by batch as it collects them (never holding all plain and preconditioned
gradients at once); score those with ``solver=None``.
``per_layer=True`` returns (L, Q, N); otherwise the layers are summed batch by batch.

Dtypes, the one rule. Per-example layer inputs and output gradients (a, g) are captured in the
model's dtype. Every contraction and accumulation - the per-example gradient sum_t g_t a_t^T,
the preconditioned-query contraction, the sums over layers and tokens - runs in at least
float32 (bf16 / fp16 are upcast; float64 models stay float64). Curvature statistics are
accumulated in float64, and eigendecompositions and the reciprocals of eigenvalues are float64
(``influence.curvature``, ``influence.solvers``).

Safety. Gradients from ``collect_grads`` carry the fingerprint of the weights they were
computed at: scoring them on another model is a ValueError (``dict(queries)`` drops it, to do
so on purpose, as ``influence.multistage`` does). A solver with fit metadata (K-FAC, EK-FAC:
``meta["fingerprint"]`` and ``meta["layers"]``) must have been fitted on the scoring model.
NaN / inf in the query gradients or in the preconditioned queries is a ValueError naming the
layer and the queries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from influence.data import Batch, as_batches
from influence.gradients import Gradients, grads_from_pairs, iter_captures
from influence.io import model_fingerprint, weights_fingerprint
from influence.modules import LayerGrads, find_layers, layer_shape, pair_dots
from influence.solvers import Solver

Batches = Iterable[Batch]
# one layer's prepared query block: P (q, d_out, d_in'), or its rank-r factors (U S, V)
Block = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
# contract(a (B, T, d_in'), g (B, T, d_out), block) -> (q, B) or (q, B, T) scores of one layer
Contract = Callable[[torch.Tensor, torch.Tensor, Block], torch.Tensor]


def _layers(model: nn.Module, queries: LayerGrads) -> dict[str, nn.Module]:
    """The model's modules named by ``queries``, checked against the queries' shapes."""
    modules = dict(model.named_modules())
    missing = [n for n in queries if n not in modules]
    if missing:
        raise ValueError(f"the query gradients have layers {missing} that the model does not have")
    if not queries:
        raise ValueError("the query gradients hold no layer")
    counts = {n: q.shape[0] for n, q in queries.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"the layers hold different numbers of queries: {counts}")
    for name, q in queries.items():
        shape = layer_shape(modules[name])
        if q.dim() != 3 or tuple(q.shape[1:]) != shape:
            raise ValueError(
                f"query gradients of layer {name!r} have shape {tuple(q.shape)}, the model's "
                f"layer needs (Q, {shape[0]}, {shape[1]})"
            )
    return {n: modules[n] for n in queries}


def check_solver(model: nn.Module, solver: Solver | None) -> None:
    """A solver with fit metadata (``meta`` with "fingerprint" and "layers", as K-FAC and
    EK-FAC have) must have been fitted on ``model``: ValueError otherwise."""
    meta = getattr(solver, "meta", None)
    if not isinstance(meta, dict) or "fingerprint" not in meta or "layers" not in meta:
        return
    modules = dict(model.named_modules())
    missing = [n for n in meta["layers"] if n not in modules]
    if missing:
        raise ValueError(
            f"the solver was fitted on layers {missing} that the model does not have: fit it "
            "on this model"
        )
    ours = model_fingerprint(model, {n: modules[n] for n in meta["layers"]})
    if ours != meta["fingerprint"]:
        raise ValueError(
            f"the solver's curvature was fitted on another model (fingerprint "
            f"{meta['fingerprint']} vs {ours}): fit it on this model"
        )


def _check_provenance(model: nn.Module, queries: LayerGrads, solver: Solver | None) -> None:
    fingerprint = getattr(queries, "fingerprint", None)
    if fingerprint is not None:
        ours = weights_fingerprint(model)
        if fingerprint != ours:
            raise ValueError(
                f"query gradients were computed on another model (fingerprint {fingerprint} "
                f"vs {ours}); recompute them with this model (or pass dict(queries) to score "
                "them against this model on purpose)"
            )
    check_solver(model, solver)
    done = getattr(queries, "preconditioned", None)
    if done is not None and solver is not None:
        raise ValueError(
            f"the query gradients are already preconditioned (by {done}, through "
            "collect_grads(precondition=)): score them with solver=None, or collect plain "
            "gradients to precondition them here"
        )
    if isinstance(queries, Gradients):  # from collect_grads: a zero row counted no token
        zero = torch.stack([q.flatten(1).abs().amax(1) == 0 for q in queries.values()]).all(0)
        if bool(zero.any()):
            rows = zero.nonzero().flatten().tolist()
            raise ValueError(
                f"queries {rows[:10]} have a zero gradient: none of their tokens is counted "
                "(labels all -100 after position 0), so every score would be 0; set the "
                "labels of the tokens the query measures"
            )


def _check_finite(tensors: LayerGrads, what: str, rows: slice, hint: str) -> None:
    for name, x in tensors.items():
        bad = ~torch.isfinite(x).flatten(1).all(dim=1)  # (q,)
        if bool(bad.any()):
            which = (bad.nonzero().flatten() + rows.start).tolist()
            raise ValueError(
                f"{what} of layer {name!r} hold NaN or inf (queries {which[:10]}): {hint}"
            )


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
        # contiguous copies: views would keep the full SVD factors alive
        out[name] = (u[..., :r] * s[..., None, :r], vh[..., :r, :].mT.contiguous())
    return out


def _prepare(queries, rows, solver, rank, device, dtype) -> dict[str, Block]:
    """Queries ``rows`` preconditioned (and compressed), checked, on ``device`` in ``dtype``."""
    block = {name: q[rows] for name, q in queries.items()}  # views, not copies
    _check_finite(block, "query gradients", rows, "check the query batches and measurement")
    pre = precondition(block, solver)
    _check_finite(pre, "preconditioned queries", rows, "check the solver and its damping")
    pre = {name: x.to(device=device, dtype=dtype) for name, x in pre.items()}
    return pre if rank is None else compress(pre, rank)


def _token_low(a: torch.Tensor, g: torch.Tensor, p: tuple) -> torch.Tensor:
    left, right = p  # (q, d_out, r), (q, d_in', r)
    gu = torch.einsum("bto,qor->qbtr", g, left)
    av = torch.einsum("bti,qir->qbtr", a, right)
    return (gu * av).sum(dim=3)  # (q, B, T)


def _pair_low(a: torch.Tensor, g: torch.Tensor, p: tuple) -> torch.Tensor:
    return _token_low(a, g, p).sum(dim=2)


def _token_dense(a: torch.Tensor, g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    gp = torch.einsum("bto,qoi->qbti", g, p)  # (q, B, T, d_in'): bounded by the query batch
    return torch.einsum("qbti,bti->qbt", gp, a)


def _join(chunks: list[torch.Tensor], tokens: bool) -> torch.Tensor:
    """One pass's per-batch chunks as one block: columns of training sequences concatenated."""
    if not tokens:
        return torch.cat(chunks, dim=-1)
    width = max(c.shape[-1] for c in chunks)  # positions: the longest batch's length
    return torch.cat([nn.functional.pad(c, (0, width - c.shape[-1])) for c in chunks], dim=-2)


def _query_sets(queries) -> tuple[dict, bool]:
    """{set name: LayerGrads} and whether ``queries`` held several sets ({name: LayerGrads})
    rather than one LayerGrads ({layer: tensor})."""
    values = list(queries.values())
    if values and all(isinstance(v, Mapping) for v in values):
        return dict(queries), True
    if any(isinstance(v, Mapping) for v in values):
        raise ValueError(
            "queries mix layers and query sets: give {layer: (Q, d_out, d_in')} or "
            "{set name: {layer: (Q, d_out, d_in')}}"
        )
    return {None: queries}, False


def _scores(
    model: nn.Module,
    train_batches: Batches,
    queries,
    solver: Solver | None,
    rank: int | None,
    query_batch_size: int | None,
    per_layer: bool,
    tokens: bool,
    progress: bool,
    norms: bool = False,
):
    """The engine of ``pairwise_scores`` and ``token_scores`` (see the module docstring)."""
    sets, several = _query_sets(queries)
    layers = None
    for key, q in sets.items():
        found = _layers(model, q)
        if layers is not None and list(found) != list(layers):
            raise ValueError(
                f"query set {key!r} has layers {list(found)}, the first set {list(layers)}: "
                "every set is contracted in one pass over the same layers"
            )
        layers = found
        _check_provenance(model, q, solver)
    # one Batches for every pass: it checks that each pass reads the same batches
    train_batches = as_batches(train_batches)
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if query_batch_size is not None and (
        not isinstance(query_batch_size, int) or query_batch_size < 1
    ):
        raise ValueError(f"query_batch_size must be an int >= 1 or None, got {query_batch_size!r}")
    param = next(model.parameters())
    dtype = torch.promote_types(param.dtype, torch.float32)
    counts = {key: next(iter(q.values())).shape[0] for key, q in sets.items()}
    empty = [key for key, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"query sets {empty} hold no query" if several else "no query to score")
    units = [  # (set, rows): the blocks of queries preconditioned together
        (key, slice(i, min(i + (query_batch_size or n), n)))
        for key, n in counts.items()
        for i in range(0, n, query_batch_size or n)
    ]
    # dense: every set in one pass, or one pass per query batch; low rank: all compressed, one pass
    groups = [units] if rank is not None or query_batch_size is None else [[u] for u in units]
    # Dense pairwise scores contract each set with one per-example gradient per layer
    # (``pair_dots``); per-token and low-rank scores contract the pairs (a, g) directly.
    dense_pairs = rank is None and not tokens
    contract: Contract = (_token_dense if rank is None else _token_low) if tokens else _pair_low
    query_dim = 1 if per_layer else 0
    out: dict = {}
    norm_chunks: list[torch.Tensor] = []
    for k, group in enumerate(groups):
        blocks = [
            _prepare(sets[key], rows, solver, rank, param.device, dtype) for key, rows in group
        ]
        desc = "token scores" if tokens else "scores"
        desc += f" {k + 1}/{len(groups)}" if len(groups) > 1 else ""
        chunks: list[list[torch.Tensor]] = [[] for _ in blocks]
        for cap in iter_captures(model, layers, train_batches, progress=progress, desc=desc):
            per: list[list[torch.Tensor]] = [[] for _ in blocks]
            total: list = [None] * len(blocks)
            square = None
            for name in layers:
                a, g = cap.a[name].to(dtype), cap.g[name].to(dtype)  # (B, T, d_in'), (B, T, d_out)
                with torch.autocast(a.device.type, enabled=False):  # the dtype rule, always
                    grads = grads_from_pairs(a, g) if dense_pairs or (norms and k == 0) else None
                    for j, block in enumerate(blocks):
                        if dense_pairs:  # (q, B)
                            x = pair_dots(block[name], grads)
                        else:  # (q, B[, T])
                            x = contract(a, g, block[name])
                        if per_layer:
                            per[j].append(x)
                        else:
                            total[j] = x if total[j] is None else total[j].add_(x)
                    if grads is not None and norms and k == 0:
                        layer_sq = grads.pow(2).sum(dim=(1, 2))
                        square = layer_sq if square is None else square.add_(layer_sq)
            for j in range(len(blocks)):
                chunks[j].append((torch.stack(per[j]) if per_layer else total[j]).cpu())
            if square is not None:
                norm_chunks.append(square.sqrt().cpu())
            del cap, grads, a, g  # not alive while the next batch is captured
        for (key, rows), parts in zip(group, chunks, strict=True):
            block = _join(parts, tokens)
            if rows.start == 0 and rows.stop == counts[key]:  # the whole set: no copy
                out[key] = block
                continue
            if key not in out:  # filled in place: no second copy of the result
                shape = list(block.shape)
                shape[query_dim] = counts[key]
                out[key] = block.new_zeros(shape)
            out[key].narrow(query_dim, rows.start, rows.stop - rows.start).copy_(block)
    result = out if several else out[None]
    return (result, torch.cat(norm_chunks)) if norms else result


def pairwise_scores(
    model: nn.Module,
    train_batches: Batches,
    queries: LayerGrads | Mapping[str, LayerGrads],
    *,
    solver: Solver | None = None,
    rank: int | None = None,
    per_layer: bool = False,
    query_batch_size: int | None = None,
    norms: bool = False,
    progress: bool = True,
):
    """Scores of every (query, training sequence) pair: (Q, N), float32 or float64.

    queries: query gradients {name: (Q, d_out, d_in')} (e.g. ``collect_grads``); their layers
    are the ones scored. Or several query sets {set: {name: (Q_s, d_out, d_in')}} with the same
    layers (e.g. the same queries preconditioned by different solvers): they are contracted in
    one pass over the training data, each per-example gradient formed once for all of them,
    and the result is {set: (Q_s, N)}.
    rank: compress the preconditioned queries to rank r per layer.
    per_layer: return (L, Q, N), layers in the order of ``queries``, summing to the total.
    query_batch_size: score the queries this many at a time (bounded memory; see the module
    docstring); None: all at once. With it (and no rank), ``train_batches`` must give the same
    batches at every pass (a list, an unshuffled DataLoader).
    norms: also return the (N,) norms |grad L(z)| of the training sequences' gradients over the
    scored layers, from the same pass: ``(scores, norms)`` (gradient cosines without a second
    pass).
    """
    return _scores(
        model, train_batches, queries, solver, rank, query_batch_size, per_layer, False, progress,
        norms,
    )  # fmt: skip


def token_scores(
    model: nn.Module,
    train_batches: Batches,
    queries: LayerGrads,
    *,
    solver: Solver | None = None,
    rank: int | None = None,
    query_batch_size: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Per-token scores (Q, N, T): sum over layers of g_t^T P_l a_t at input position t.

    T is the longest batch's length; positions past a sequence's end (and padding) score 0.
    Summing over T gives ``pairwise_scores``. rank, query_batch_size: as in ``pairwise_scores``.
    """
    return _scores(
        model, train_batches, queries, solver, rank, query_batch_size, False, True, progress
    )


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
    check_solver(model, solver)
    chunks = []
    for cap in iter_captures(model, layers, batches, progress=progress, desc="self-influence"):
        grads = {n: grads_from_pairs(cap.a[n], cap.g[n]) for n in layers}  # (B, d_out, d_in')
        del cap  # not alive while the next batch is captured
        pre = precondition(grads, solver)
        chunks.append(sum((pre[n] * grads[n]).sum(dim=(1, 2)) for n in layers).cpu())
        del grads, pre
    return torch.cat(chunks)


def top_k(scores: torch.Tensor, k: int = 10, *, texts: Sequence[str] | None = None) -> list[dict]:
    """The k strongest proponents and opponents of each query in a (Q, N) score matrix.

    Returns one dict per query i: {"query": i, "proponents": [...], "opponents": [...]}, each
    entry {"index": j, "score": float, "text": texts[j]} ("text" only with ``texts``, the N
    training texts). Proponents: the k highest scores, highest first; opponents: the k lowest,
    lowest first; ties go to the lower index. k is capped at N. Signs are not filtered: if
    fewer than k scores are positive, the last proponents are not positive.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (Q, N), got shape {tuple(scores.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    n = scores.shape[1]
    if texts is not None and len(texts) != n:
        raise ValueError(f"{len(texts)} texts for {n} training sequences (scores' columns)")
    bad = (~torch.isfinite(scores)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"scores of queries {bad[:10]} hold NaN or inf")
    k = min(k, n)

    def entries(row: torch.Tensor, descending: bool) -> list[dict]:
        order = torch.sort(row, descending=descending, stable=True).indices[:k].tolist()
        out = [{"index": j, "score": float(row[j])} for j in order]
        if texts is not None:
            for entry in out:
                entry["text"] = texts[entry["index"]]
        return out

    result = []
    for i, row in enumerate(scores.detach().cpu()):  # one row at a time: memory O(N)
        result.append(
            {"query": i, "proponents": entries(row, True), "opponents": entries(row, False)}
        )
    return result

"""Fitting and scoring spread over several processes with torch.distributed (torchrun).

Sharding rule. With K processes, process r takes the batches i with i % K == r, i being the
batch's position in ``batches`` (the same sequence on every process); K need not divide the
number of batches. The true-Fisher labels of batch i are drawn from the generator seeded with
(seed, i), as in one process, so a sharded fit draws the same labels.

Fitting. Each process sums the covariance terms of its batches; the sums are all-reduced
(SUM) after the pass, before the division by the token count and the eigendecompositions.
Each eigendecomposition is computed by one process (largest matrices first, each to the
process with the least work so far) and broadcast, so every process ends with all factors.
The eigenvalue-correction pass is summed and all-reduced the same way. The results equal the
single-process ones up to float64 round-off (sums in another order). With ``path``, only rank
0 writes files; every process reads them to resume, so ``path`` must be a folder every process
sees (a shared file system across nodes). Checkpoints (``save_every``) are collective.

Scoring. Each process scores its batches; the (..., N_r) columns are all-gathered and put back
in the global order, so every process returns the same (Q, N) matrix.

Collectives use the default process group: gloo for CPU tensors, nccl for GPU tensors (then
each process puts the model on its own GPU). Without an initialised process group every
function here is its single-process counterpart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from influence import curvature, scores
from influence.data import Batch
from influence.modules import LayerGrads

Batches = Sequence[Batch]


def rank_and_world() -> tuple[int, int]:
    """(rank, number of processes) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    # nccl only takes CUDA tensors (on the process's current GPU); gloo is used with CPU ones.
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(state: dict[str, torch.Tensor]) -> None:
    """Sum every tensor of ``state`` over the processes, in place (same keys on every process)."""
    for key in sorted(state):
        buf = state[key].to(_comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not state[key]:
            state[key].copy_(buf)


def _broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    buf = t.to(_comm_device()).contiguous()
    dist.broadcast(buf, src=src)
    return buf.to(t.device)


def _eigh(mats: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """eigh of every symmetric (d, d) matrix: each computed by one process, then broadcast.

    Owners: the largest matrices first, each to the process with the least work (sum of d^3)
    so far; the rule depends on the shapes only, so every process draws the same owners.
    """
    rank, world = rank_and_world()
    work, owner = [0] * world, {}
    for key in sorted(mats, key=lambda k: -mats[k].shape[0]):  # stable: same order everywhere
        owner[key] = min(range(world), key=work.__getitem__)
        work[owner[key]] += mats[key].shape[0] ** 3
    # All own eigendecompositions first, then the broadcasts: computed in parallel, not in turn.
    mine = {key: torch.linalg.eigh(mats[key]) for key in mats if owner[key] == rank}
    out = {}
    for key, mat in mats.items():
        evals, evecs = (
            mine[key] if key in mine else (mat.new_empty(len(mat)), torch.empty_like(mat))
        )
        out[key] = (_broadcast(evals, owner[key]), _broadcast(evecs, owner[key]))
    return out


def _fit(
    kind: str,
    model: nn.Module,
    batches: Batches,
    *,
    layers: dict[str, nn.Module] | None = None,
    fisher: str = "true",
    seed: int = 0,
    path: str | Path | None = None,
    save_every: int | None = None,
    progress: bool = True,
    damping: float = 0.1,
    relative: bool = True,
    product_dtype: torch.dtype = torch.float64,
):
    rank, world = rank_and_world()
    parallel = curvature.ALONE
    if world > 1:
        parallel = curvature.Parallel(reduce=_all_reduce, eigh=_eigh, write=rank == 0)
        if path is not None:
            dist.barrier()  # files written by rank 0 before this call are complete everywhere
    # curvature._fit writes the same metadata as one process: the files of sharded and
    # single-process fits are interchangeable (either one resumes the other).
    fit = curvature._fit(
        kind,
        model,
        batches,
        layers=layers,
        fisher=fisher,
        seed=seed,
        path=path,
        save_every=save_every,
        progress=progress and rank == 0,
        damping=damping,
        relative=relative,
        product_dtype=product_dtype,
        shard=(rank, world),
        parallel=parallel,
    )
    if path is not None and world > 1:
        dist.barrier()  # rank 0's files are written when the fit returns on any process
    return fit


def fit_ekfac(model: nn.Module, batches: Batches, **options) -> curvature.EKFAC:
    """``influence.fit_ekfac`` (the same keyword options) with the batches shared by the
    processes; every process returns the same factors. ``batches``: the same sequence on every
    process."""
    return _fit("ekfac", model, batches, **options)


def fit_kfac(model: nn.Module, batches: Batches, **options) -> curvature.KFAC:
    """``influence.fit_kfac`` with the batches shared by the processes (see ``fit_ekfac``)."""
    return _fit("kfac", model, batches, **options)


def _gather_columns(score: Callable[[list], torch.Tensor], batches: Iterable) -> torch.Tensor:
    """score(this process's batches) -> (..., N_r) columns; all of them, in batch order: (..., N)."""
    rank, world = rank_and_world()
    sizes, mine = [], []
    for i, batch in enumerate(batches):
        sizes.append(len(batch["input_ids"]))
        if i % world == rank:
            mine.append(batch)
    if len(sizes) < world:
        raise ValueError(
            f"{len(sizes)} batches for {world} processes: each process needs at least one "
            "batch; use smaller batches or fewer processes"
        )
    local = score(mine)  # (..., N_r), on the CPU
    if world == 1:
        return local
    # all_gather takes equal shapes: pad every process's columns to the widest.
    width = max(sum(sizes[r::world]) for r in range(world))
    buf = nn.functional.pad(local, (0, width - local.shape[-1])).to(_comm_device())
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    columns = {}  # global batch index -> its (..., B_i) columns
    for r, part in enumerate(parts):
        offset = 0
        for i in range(r, len(sizes), world):
            columns[i] = part[..., offset : offset + sizes[i]]
            offset += sizes[i]
    return torch.cat([columns[i] for i in range(len(sizes))], dim=-1).cpu()


def pairwise_scores(
    model: nn.Module,
    train_batches: Batches,
    queries: LayerGrads,
    *,
    solver: scores.Solver | None = None,
    rank: int | None = None,
    per_layer: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """``influence.pairwise_scores`` with the training batches shared by the processes: the
    same (Q, N) ((L, Q, N) with ``per_layer``) matrix on every process."""
    if scores._query_sets(queries)[1]:
        raise ValueError(
            "distributed.pairwise_scores takes one query set {layer: (Q, d_out, d_in')}; "
            "call it once per set"
        )
    show = progress and rank_and_world()[0] == 0

    def score(mine: list) -> torch.Tensor:
        return scores.pairwise_scores(
            model, mine, queries, solver=solver, rank=rank, per_layer=per_layer, progress=show
        )

    return _gather_columns(score, train_batches)


def self_influence(
    model: nn.Module,
    batches: Batches,
    *,
    solver: scores.Solver | None = None,
    layers: dict[str, nn.Module] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``influence.self_influence`` with the batches shared by the processes: (N,) everywhere."""
    show = progress and rank_and_world()[0] == 0

    def score(mine: list) -> torch.Tensor:
        return scores.self_influence(model, mine, solver=solver, layers=layers, progress=show)

    return _gather_columns(score, batches)

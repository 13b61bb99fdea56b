"""Fits and scores shared by 2 gloo processes (torchrun) equal the single-process ones.

The ``runs`` fixture launches this file as a script under ``python -m torch.distributed.run``;
each process saves what it computed, and the tests compare that with one process here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import assert_rel, make_batch, make_gpt2

from influence import curvature, distributed
from influence.curvature import EKFAC, fit_ekfac, fit_kfac
from influence.gradients import collect_grads
from influence.io import load_tensors
from influence.scores import pairwise_scores, self_influence

WORLD = 2
SIZES = [3, 2, 3, 1, 2]  # 5 batches of uneven sizes: process 0 takes 3 of them, process 1 two


def train_batches() -> list[dict[str, torch.Tensor]]:
    batch = make_batch([9, 6, 4, 7, 8, 5, 7, 4, 6, 8, 9], seed=1)
    ends = torch.tensor(SIZES).cumsum(0).tolist()
    return [
        {k: v[end - size : end] for k, v in batch.items()}
        for size, end in zip(SIZES, ends, strict=True)
    ]


def query_grads(model):
    return collect_grads(model, [make_batch([8, 6, 7], seed=2)], progress=False)


class Killed(Exception):
    pass


class Interrupted(list):
    """The batches, but the second walk through them dies at batch ``at`` (the first walk is
    the data fingerprint, the second the covariance pass): a run killed part-way."""

    def __init__(self, batches, at: int):
        super().__init__(batches)
        self.at, self.walks = at, 0

    def __iter__(self):
        self.walks += 1
        for i, batch in enumerate(super().__iter__()):
            if self.walks == 2 and i == self.at:
                raise Killed(f"simulated interruption at batch {i}")
            yield batch


def worker(out: Path) -> None:
    """One process of the torchrun job: fit, score, and fit again after an interruption."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, batches = make_gpt2(), train_batches()
    queries = query_grads(model)
    ekfac = distributed.fit_ekfac(model, batches, progress=False)  # true Fisher: sampled labels
    kfac = distributed.fit_kfac(model, batches, fisher="empirical", progress=False)
    results = {
        "world": dist.get_world_size(),
        "ekfac": ekfac,
        "kfac": kfac,
        "scores": distributed.pairwise_scores(
            model, batches, queries, solver=ekfac, progress=False
        ),
        "per_layer": distributed.pairwise_scores(
            model, batches, queries, solver=kfac, per_layer=True, progress=False
        ),
        "self": distributed.self_influence(model, batches, solver=ekfac, progress=False),
    }

    # Record every file this process writes, and every forward pass.
    writes, forwards = [], []
    save = curvature.save_tensors
    curvature.save_tensors = lambda path, *args: (writes.append(Path(path).name), save(path, *args))
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    path = out / "factors"
    try:  # dies fetching batch 3, after the checkpoint of batches 0-1 (save_every=2)
        distributed.fit_ekfac(
            model, Interrupted(batches, at=3), path=path, save_every=2, progress=False
        )
        raise AssertionError("the interrupted fit did not stop")
    except Killed:
        pass
    dist.barrier()  # rank 0 has written its checkpoint
    results["checkpoint"] = load_tensors(path / "covariance.partial.safetensors")[1]
    forwards.clear()
    results["resumed"] = distributed.fit_ekfac(
        model, batches, path=path, save_every=2, progress=False
    )
    results["forwards"], results["writes"] = len(forwards), writes
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], Path]:
    """Each process's results, from one 2-process torchrun job (about 15 s on 2 cores)."""
    out = tmp_path_factory.mktemp("distributed")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # a free port
    command += [f"--nproc_per_node={WORLD}", __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in 180 s; its stderr:\n{err.stderr}")
    if done.returncode != 0:
        pytest.fail(
            f"torchrun exited with {done.returncode}; {' '.join(command)}\n"
            f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"
        )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


@pytest.fixture(scope="module")
def ref() -> dict:
    """The same computations in this one process."""
    model, batches = make_gpt2(), train_batches()
    queries = query_grads(model)
    ekfac = fit_ekfac(model, batches, progress=False)
    kfac = fit_kfac(model, batches, fisher="empirical", progress=False)
    return {
        "model": model,
        "ekfac": ekfac,
        "kfac": kfac,
        "scores": pairwise_scores(model, batches, queries, solver=ekfac, progress=False),
        "per_layer": pairwise_scores(
            model, batches, queries, solver=kfac, per_layer=True, progress=False
        ),
        "self": self_influence(model, batches, solver=ekfac, progress=False),
    }


def fisher_product(fit, v: dict) -> dict:
    """F v with F's dense block (Q_A (x) Q_S) diag(Lambda) (Q_A (x) Q_S)^T, not materialised."""
    out = {}
    for name, mat in v.items():
        qa, qs = fit.eigvecs_a[name], fit.eigvecs_s[name]
        out[name] = qs @ (fit.eigenvalues[name] * (qs.T @ mat @ qa)) @ qa.T
    return out


def assert_same_factors(fit, ref) -> None:
    # Eigenvectors are defined up to sign (and rotation in degenerate eigenspaces): compare
    # what they build, the dense block times v and the damped inverse times v, for random v.
    g = torch.Generator().manual_seed(0)
    v = {
        n: torch.randn(3, *lam.shape, generator=g, dtype=torch.float64)
        for n, lam in ref.eigenvalues.items()
    }
    products, ref_products = fisher_product(fit, v), fisher_product(ref, v)
    inverses, ref_inverses = fit.ihvp(v), ref.ihvp(v)
    for name in ref.eigenvalues:
        assert_rel(fit.eigenvalues[name], ref.eigenvalues[name])
        assert_rel(products[name], ref_products[name])
        assert_rel(inverses[name], ref_inverses[name])
    assert fit.meta == ref.meta


def test_sharded_factors_equal_single_process(runs, ref):
    # Uneven shards (5 batches on 2 processes) and sampled labels: every process ends with the
    # single-process factors, so the labels were drawn by global batch index.
    results, _ = runs
    for result in results:
        assert result["world"] == WORLD
        assert_same_factors(result["ekfac"], ref["ekfac"])
        assert_same_factors(result["kfac"], ref["kfac"])


def test_sharded_scores_equal_single_process(runs, ref):
    # Score columns are gathered back in the global order of the training sequences.
    results, _ = runs
    assert ref["scores"].shape == (3, sum(SIZES))
    for result in results:
        for key in ("scores", "per_layer", "self"):
            assert_rel(result[key], ref[key])


def test_interrupted_sharded_fit_resumes_and_only_rank_0_writes(runs, ref):
    results, out = runs
    for rank, result in enumerate(results):
        # The killed run's checkpoint sums batches 0-1 of both processes.
        assert result["checkpoint"]["batches_done"] == 2
        # The rerun skips them: covariance batches 2, 4 | 3, correction 0, 2, 4 | 1, 3.
        assert result["forwards"] == [5, 3][rank]
        assert_same_factors(result["resumed"], ref["ekfac"])
        stages = {"covariance", "covariance.partial", "eigens", "correction", "correction.partial"}
        written = {f"{stage}.safetensors" for stage in stages} if rank == 0 else set()
        assert set(result["writes"]) == written
    # The files are those of a single-process fit: it loads them (and would resume from them).
    assert_same_factors(EKFAC.load(out / "factors", model=ref["model"]), ref["ekfac"])
    assert not list((out / "factors").glob("*.partial.*"))


def test_without_a_process_group_is_single_process(ref):
    model, batches = ref["model"], train_batches()
    ekfac = distributed.fit_ekfac(model, batches, progress=False)
    for name in ekfac.eigenvalues:
        assert torch.equal(ekfac.eigenvalues[name], ref["ekfac"].eigenvalues[name])
    queries = query_grads(model)
    scores = distributed.pairwise_scores(model, batches, queries, solver=ekfac, progress=False)
    assert torch.equal(scores, ref["scores"])
    with pytest.raises(ValueError, match="one query set"):  # sets: only the one-process API
        distributed.pairwise_scores(model, batches, {"a": dict(queries)}, progress=False)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

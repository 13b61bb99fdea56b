"""Peak memory of ``pairwise_scores`` against the number of queries Q, at fixed batch sizes.

Claim (``influence.scores``, "Memory"): with ``query_batch_size=b`` what scoring holds besides
the query gradients (the caller's) and the (Q, N) result is set by b and the training batch,
not by Q. Measured: the growth of the peak resident memory during the call,

    overhead = VmHWM after the call - VmRSS before it,

with the peak reset just before the call (``/proc/self/clear_refs``) and freed heap returned
to the system first (``malloc_trim``), in a fresh subprocess per setting so that nothing of
one run is reused by the next. Target: overhead(Q = 1,024) within 10 % of overhead(Q = 16) at
the same batch sizes. Also measured: the same 1,024 queries in one batch (``b = None``), and
with ``rank=``, to state the time/memory trade-off.

Setting: a GPT-2 from ``GPT2Config`` (seed 0, float32, width 64, 2 blocks, vocabulary 512;
its 8 Conv1D layers, 99k parameters, tracked), EK-FAC of the empirical Fisher on the 32
training sequences of 32 tokens (batches of 16), queries drawn at random with the gradients'
shapes (their values do not change the memory), one torch thread. Linux only.

Run: ``python -m benchmarks.memory_scaling`` (about 2 minutes of CPU time; exit status 1 if the
target is missed).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

N_TRAIN, TRAIN_BATCH, LENGTH = 32, 16, 32
# (Q, query_batch_size, rank) per child; the first two are the claim
SETTINGS = [(16, 16, None), (1024, 16, None), (1024, None, None), (1024, 16, 4), (16, 16, 4)]


def _status(key: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(n_queries: int, query_batch_size: int | None, rank: int | None) -> dict:
    """Build the model, data, EK-FAC and queries, then score once: overhead and time."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from influence import find_layers, fit_ekfac, pairwise_scores
    from influence.modules import layer_shape

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=512, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 512, (N_TRAIN, LENGTH))
    batches = [
        {"input_ids": ids[i : i + TRAIN_BATCH], "attention_mask": torch.ones_like(ids[i : i + TRAIN_BATCH]),
         "labels": ids[i : i + TRAIN_BATCH]}
        for i in range(0, N_TRAIN, TRAIN_BATCH)
    ]  # fmt: skip
    layers = find_layers(model)
    ekfac = fit_ekfac(model, batches, layers=layers, fisher="empirical", progress=False)
    queries = {n: torch.randn(n_queries, *layer_shape(m)) for n, m in layers.items()}
    pairwise_scores(model, batches[:1], {n: q[:1] for n, q in queries.items()},
                    solver=ekfac, progress=False)  # fmt: skip  # lazy initialisation, untimed

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status("VmRSS")
    start = time.process_time()  # CPU time: the machine may be shared
    scores = pairwise_scores(
        model, batches, queries, solver=ekfac, rank=rank,
        query_batch_size=query_batch_size, progress=False,
    )  # fmt: skip
    seconds = time.process_time() - start
    peak = _status("VmHWM")
    assert scores.shape == (n_queries, N_TRAIN) and bool(scores.isfinite().all())
    return {
        "queries": n_queries,
        "query_batch_size": query_batch_size,
        "rank": rank,
        "params": sum(q.shape[1] * q.shape[2] for q in queries.values()),
        "rss_before_mb": before / 2**20,
        "peak_mb": peak / 2**20,
        "overhead_mb": (peak - before) / 2**20,
        "cpu_seconds": seconds,
    }


# glibc's default mmap threshold grows with the largest block freed, after which freed
# tensors stay in the heap and fragment it: the peak then drifts with the number of
# allocations, not with what is alive. A fixed threshold returns every tensor over 128 kB to
# the system when it is freed, so that the peak measures live memory.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run(n_queries: int, query_batch_size: int | None, rank: int | None) -> dict:
    """``measure`` in a fresh interpreter."""
    args = [str(n_queries), str(query_batch_size), str(rank)]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_scaling", "--child", *args],
        capture_output=True, text=True, check=True, env={**os.environ, **MALLOC},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="only the two runs of the claim")
    args = parser.parse_args()
    if args.child:

        def parse(x):
            return None if x == "None" else int(x)

        print(json.dumps(measure(*(parse(x) for x in args.child))))
        return
    results = [run(*setting) for setting in SETTINGS[: 2 if args.quick else None]]
    print(f"{'Q':>5} {'b':>5} {'rank':>5} {'before MB':>10} {'peak MB':>8} {'overhead MB':>12} "
          f"{'CPU s':>6}")  # fmt: skip
    for r in results:
        print(f"{r['queries']:>5} {r['query_batch_size']!s:>5} {r['rank']!s:>5} "
              f"{r['rss_before_mb']:>10.1f} {r['peak_mb']:>8.1f} {r['overhead_mb']:>12.1f} "
              f"{r['cpu_seconds']:>6.2f}")  # fmt: skip
    small, large = results[0]["overhead_mb"], results[1]["overhead_mb"]
    growth = large / small - 1
    print(f"P = {results[0]['params']}; overhead of 1,024 queries vs 16 at b = 16: "
          f"{growth:+.1%} (target within 10 %)")  # fmt: skip
    sys.exit(0 if abs(growth) <= 0.10 else 1)


if __name__ == "__main__":
    main()

"""What a computation costs, time and memory: helpers for 02 (scalability), 06, 09 and benchmarks/
(not kernels; ``benchmark`` is paper B's method comparison, a different thing).

- ``stopwatch()``: wall time of a block (``time.perf_counter``).
- ``interleaved_medians(fns, repeats)``: run several callables in turn, ``repeats`` rounds, and
  return each one's median seconds; interleaving exposes every method to the same load.
- ``power_law(x, y)``: the exponent k and constant c of y ~ c x^k (least squares in log-log).
- ``isolated(name, **kwargs)``: run a function of this module in a fresh Python process and
  return its JSON result, so that its peak memory is its own (no heap left by earlier work).
- ``ekfac_fit_cost(...)``: build a GPT-2 of a given width (fixed seed, untrained), fit EK-FAC
  on fixed batches, and report the fitting time and the peak extra resident memory.
- ``scale_cost(...)``: the scale ladder: a random-init GPT-2 of a given width and depth on
  random token sequences; EK-FAC fit and pairwise-scoring time and peak memory.

Memory is the resident set size (RSS) of the process, read from ``/proc/self/status``: the
peak (VmHWM) is reset just before fitting through ``/proc/self/clear_refs`` (Linux >= 4.0),
so peak - RSS before = the extra memory that fitting touched (activations, gradients,
factors, allocator overhead). Where the reset is unavailable the peak is ``getrusage``'s
``ru_maxrss``, a high-water mark since the process started (an upper bound).
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


class Stopwatch:
    """Holds the elapsed seconds of a ``with stopwatch() as t:`` block in ``t.seconds``."""

    seconds: float = float("nan")


@contextlib.contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    watch = Stopwatch()
    start = time.perf_counter()
    try:
        yield watch
    finally:
        watch.seconds = time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of each callable over ``repeats`` rounds (a, b, a, b, ...)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not fns:
        raise ValueError("fns is empty: pass {name: callable}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with stopwatch() as t:
                fn()
            times[name].append(t.seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def power_law(x, y) -> tuple[float, float]:
    """(k, c) of the least-squares fit log y = k log x + log c, i.e. y ~ c x^k."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two 1-d arrays of equal length >= 2, got {x.shape} and {y.shape}")
    if not ((x > 0).all() and (y > 0).all()):
        raise ValueError(f"a power law needs positive values; got x={x.tolist()}, y={y.tolist()}")
    k, log_c = np.polyfit(np.log(x), np.log(y), 1)
    return float(k), float(np.exp(log_c))


# ---- memory -----------------------------------------------------------------------------


def _status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` entry in MiB (VmRSS, VmHWM), None off Linux."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024  # the file gives kB
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident memory of this process, MiB."""
    value = _status_mb("VmRSS")
    return value if value is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (since start or since ``reset_peak_rss``), MiB."""
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def reset_peak_rss() -> bool:
    """Reset the peak (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


# ---- EK-FAC fitting cost ----------------------------------------------------------------


def ekfac_fit_cost(
    width: int,
    n_layer: int = 2,
    n_examples: int = 32,
    batch_size: int = 8,
    repeats: int = 2,
    task: str = "emotion",
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Fit EK-FAC (true Fisher, every Conv1D of the blocks) on a fresh GPT-2 of ``width``.

    The model has ``n_layer`` blocks, 4 heads, d_ff = 4 width, a fixed random init (training
    does not change the cost); the data are the first ``n_examples`` of ``task``'s training
    split. The first fit measures memory (peak RSS - RSS before, MiB) and warms up; the next
    ``repeats`` fits are timed. Returns {params (tracked), model_params, fit_seconds (median),
    peak_mb, peak_reset (whether the peak could be reset; else an upper bound)}.
    """
    import gc

    import torch

    from influence.curvature import fit_ekfac
    from influence.lab.config import seed_everything
    from influence.lab.tasks import load_task
    from influence.lab.tokenizer import make_batches, project_tokenizer
    from influence.lab.zoo import ModelConfig
    from influence.modules import find_layers, layer_shape

    if threads is not None:
        torch.set_num_threads(threads)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    tok = project_tokenizer()
    batches = make_batches(tok, load_task(task, "train")[:n_examples], batch_size)
    seed_everything(seed)
    model = ModelConfig("gpt2", n_layer, width, n_head=4, d_ff=4 * width, max_len=160).build(tok)
    model.eval()
    layers = find_layers(model)
    params = sum(o * i for o, i in (layer_shape(m) for m in layers.values()))

    def fit():
        return fit_ekfac(model, batches, layers=layers, seed=seed, progress=False)

    gc.collect()
    before = rss_mb()
    reset = reset_peak_rss()
    factors = fit()
    peak = peak_rss_mb() - before
    del factors
    seconds = []
    for _ in range(repeats):
        with stopwatch() as t:
            fit()
        seconds.append(t.seconds)
    return {
        "params": params,
        "model_params": sum(p.numel() for p in model.parameters()),
        "fit_seconds": statistics.median(seconds),
        "peak_mb": peak,
        "peak_reset": reset,
    }


def scale_cost(
    width: int,
    n_layer: int,
    n_examples: int,
    seq_len: int,
    n_query: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
) -> dict:
    """EK-FAC fit and pairwise-scoring cost of a random-init GPT-2 on random token sequences.

    The model has ``n_layer`` blocks of ``width``, 4 heads, d_ff = 4 width, a fixed random init
    from its config (no training: the cost does not depend on the weights), and every block
    layer tracked (P = 12 width^2 n_layer + biases). The data are ``n_examples`` training and
    ``n_query`` query sequences of ``seq_len`` uniform random tokens, loss on every token (the
    cost does not depend on which tokens). One fit (``fit_ekfac``, true Fisher) and one
    ``pairwise_scores`` with that EK-FAC (query gradients included), each timed once and
    measured from a reset peak. Memory: peak RSS - RSS before on the CPU (MiB); on a GPU,
    ``torch.cuda.max_memory_allocated`` - allocated before.

    Returns {params (tracked), model_params, n_examples, seq_len, fit_seconds, fit_peak_mb,
    score_seconds, score_peak_mb, peak_rss_mb (the process's peak, MiB), peak_reset}.
    """
    import gc

    import torch

    from influence.curvature import fit_ekfac
    from influence.gradients import collect_grads
    from influence.lab.config import seed_everything
    from influence.lab.tokenizer import project_tokenizer
    from influence.lab.zoo import ModelConfig
    from influence.modules import find_layers, layer_shape
    from influence.scores import pairwise_scores

    if threads is not None:
        torch.set_num_threads(threads)
    tok = project_tokenizer()
    seed_everything(seed)
    model = ModelConfig("gpt2", n_layer, width, n_head=4, d_ff=4 * width, max_len=seq_len)
    model = model.build(tok).to(device).eval()
    layers = find_layers(model)
    params = sum(o * i for o, i in (layer_shape(m) for m in layers.values()))
    gen = torch.Generator().manual_seed(seed)

    def batches(n: int) -> list[dict]:
        ids = torch.randint(len(tok), (n, seq_len), generator=gen)  # (n, T)
        return [
            {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
            for x in ids.split(batch_size)
        ]

    train, queries = batches(n_examples), batches(n_query)
    cuda = device.startswith("cuda")
    resets = []  # whether each CPU peak could be reset (else an upper bound)

    def measured(fn):  # (result, seconds, peak extra MiB)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = rss_mb()
            resets.append(reset_peak_rss())
        with stopwatch() as t:
            out = fn()
            if cuda:
                torch.cuda.synchronize()
        if cuda:
            return out, t.seconds, (torch.cuda.max_memory_allocated() - before) / 2**20
        return out, t.seconds, peak_rss_mb() - before

    ekfac, fit_seconds, fit_peak = measured(
        lambda: fit_ekfac(model, train, layers=layers, seed=seed, progress=False)
    )

    def score():
        q = collect_grads(model, queries, layers=layers, progress=False)  # (Q, d_out, d_in')
        return pairwise_scores(model, train, q, solver=ekfac, progress=False)  # (Q, N)

    _, score_seconds, score_peak = measured(score)
    return {
        "params": params,
        "model_params": sum(p.numel() for p in model.parameters()),
        "n_examples": n_examples,
        "seq_len": seq_len,
        "fit_seconds": fit_seconds,
        "fit_peak_mb": fit_peak,
        "score_seconds": score_seconds,
        "score_peak_mb": score_peak,
        "peak_rss_mb": peak_rss_mb(),
        "peak_reset": all(resets),
    }


ISOLATED = {"ekfac_fit_cost": ekfac_fit_cost, "scale_cost": scale_cost}


def isolated(name: str, **kwargs) -> dict:
    """``ISOLATED[name](**kwargs)`` run in a fresh ``python -m influence.lab.perf`` process.

    Arguments and result travel as JSON; the child's stderr is shown if it fails.
    """
    if name not in ISOLATED:
        raise ValueError(f"no isolated function {name!r}; known: {sorted(ISOLATED)}")
    cmd = [sys.executable, "-m", "influence.lab.perf", name, json.dumps(kwargs)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name}({kwargs}) failed in its subprocess:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    name, kwargs = (argv if argv is not None else sys.argv[1:])[:2]
    if name not in ISOLATED:
        raise SystemExit(f"no isolated function {name!r}; known: {sorted(ISOLATED)}")
    print(json.dumps(ISOLATED[name](**json.loads(kwargs))))


if __name__ == "__main__":
    main()

"""GPU check: EK-FAC fitting and scoring on a device, in float32 and in bfloat16.

Run: ``python benchmarks/gpu_check.py [--device cuda] [--size 100m|small] [--out FILE.json]``.

Setting. A Llama-style causal LM from ``LlamaConfig`` (random init from a fixed seed, made on
the CPU so that the weights do not depend on the device; untied LM head; dropout 0) and
sequences of uniform random tokens (no padding, every next token counted), all moved to the
device. Its 7 x n_layer ``nn.Linear`` layers are tracked (not the embeddings, not the head).
For each precision: ``fit_ekfac`` (true Fisher, damping 0.1 x the layer's mean eigenvalue) on
N training sequences, then the query gradients (``collect_grads``) and ``pairwise_scores`` of Q
queries against the N sequences. Timings are wall seconds with ``torch.cuda.synchronize``
before and after each timed block on CUDA, after one untimed warm-up (kernels, cuBLAS and
cuSOLVER handles). Memory is ``torch.cuda.max_memory_allocated`` on CUDA (weights included),
the process's peak resident memory on the CPU, both reset before each stage.

Precisions (the weights' dtype, autocast, TF32):

- ``float32``: float32, TF32 off. The reference.
- ``tf32`` (CUDA only): float32 with ``torch.backends.cuda.matmul.allow_tf32 = True``.
- ``bf16``: the weights cast to bfloat16, so activations a and gradients g are bfloat16.
- ``autocast``: float32 weights under ``torch.autocast(bfloat16)`` around fitting and scoring
  (a and g then mix float32, e.g. after RMSNorm, and bfloat16, the outputs of matmuls).

Where lower precision is safe. TF32 (10 mantissa bits in the matmul inputs) and bfloat16 (8)
round the forward and backward passes that capture (a, g), and TF32 the float32 contractions
after them (per-example gradients G_n = sum_t g_t a_t^T, scores <P, G_n>): a relative error of
~1e-3 per product, below the Monte-Carlo noise of a true-Fisher fit; the agreement rows
measure what it does to the scores' ranks. Everything the inverse depends on stays float64:
the library casts a and g to float64 before summing A = sum a a^T and S = sum g g^T
(``curvature._covariance_update``) and the corrected eigenvalues (``_correction_update``);
eigh, the damped reciprocals 1 / (Lambda + lambda) and ihvp's rotations are float64, which
TF32 (float32 matmuls only) and autocast (it casts no float64 tensor) leave alone.
``accumulation_check`` tests that claim on the device with TF32 on. ``grad_dtype`` and
``scores_dtype`` record the dtypes the library returned: under autocast its float32
contractions are themselves recast to bfloat16.

Agreement: per-query Spearman correlation of each precision's (Q, N) scores with float32's,
on a smaller model (~10M parameters for ``--size 100m``; the tiny model for ``--size small``),
and the least-squares ratio of the raw scores (1 when the scales agree).

Cost of ``--size 100m`` on one H200 (estimated, not measured: no GPU was lent when this was
written). 134M parameters (85M tracked), N = 512 sequences of T = 512 tokens (262k tokens),
Q = 32, batches of 16. Per precision: three passes over the data (covariance, correction,
scores), each a forward + backward of ~4 x 110M x 262k = 1.2e14 flop (~1-3 s in TF32/bf16),
plus float64 factor sums of ~1.2e14 flop (covariance) and ~0.6e14 (correction), ~3 s at the
H200's ~67 Tflop/s float64 peak; 168 float64 eigendecompositions 768 or 2048 wide (~5-10 s);
a few hashes of the 0.5 GB of weights on the CPU (~0.5 s each); the preconditioning of the 32
queries (Q x P = 2.7e9 numbers, ~11 GB in float32, + float64 rotations, ~1 s). So ~15-30 s
of fit and ~3-6 s of scores per precision, three precisions plus the 10M agreement model
(four precisions, seconds each): ~1.5-2.5 minutes in all, under 3.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers

from influence import collect_grads, find_layers, fit_ekfac, pairwise_scores
from influence.curvature import fit_from_captures
from influence.gradients import Captured, to_device
from influence.io import model_fingerprint
from influence.lab.attribution import row_spearman
from influence.lab.perf import Stopwatch, peak_rss_mb, reset_peak_rss
from influence.modules import layer_shape

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"


@dataclasses.dataclass(frozen=True)
class Setting:
    """A seeded Llama-style LM and its random token data."""

    vocab: int
    hidden: int
    intermediate: int
    n_layer: int
    n_head: int
    seq_len: int  # T
    n_train: int  # N
    n_query: int  # Q
    batch_size: int
    seed: int = 0


TINY = Setting(
    vocab=128, hidden=32, intermediate=64, n_layer=2, n_head=4,
    seq_len=16, n_train=64, n_query=8, batch_size=16,
)  # fmt: skip
# 17M parameters, 10.6M of them tracked: the agreement model of --size 100m.
M10 = Setting(
    vocab=8000, hidden=384, intermediate=1024, n_layer=6, n_head=6,
    seq_len=256, n_train=256, n_query=16, batch_size=16,
)  # fmt: skip
# 134M parameters (85M tracked, 49M in the embeddings and the untied head).
M100 = Setting(
    vocab=32000, hidden=768, intermediate=2048, n_layer=12, n_head=12,
    seq_len=512, n_train=512, n_query=32, batch_size=16,
)  # fmt: skip
SIZES = {"100m": (M100, M10), "small": (TINY, TINY)}  # size: (timing model, agreement model)


@dataclasses.dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # of the weights
    autocast: bool = False  # torch.autocast(bfloat16) around fitting and scoring
    tf32: bool = False  # torch.backends.cuda.matmul.allow_tf32 (no effect off CUDA)


PRECISIONS = {
    "float32": Precision(torch.float32),
    "tf32": Precision(torch.float32, tf32=True),
    "bf16": Precision(torch.bfloat16, tf32=True),
    "autocast": Precision(torch.float32, autocast=True, tf32=True),
}


# ---- model, data, device ----------------------------------------------------------------


def build_model(setting: Setting) -> transformers.LlamaForCausalLM:
    """The seeded float32 model on the CPU (eval mode, dropout 0)."""
    torch.manual_seed(setting.seed)
    config = transformers.LlamaConfig(
        vocab_size=setting.vocab,
        hidden_size=setting.hidden,
        intermediate_size=setting.intermediate,
        num_hidden_layers=setting.n_layer,
        num_attention_heads=setting.n_head,
        num_key_value_heads=setting.n_head,
        max_position_embeddings=setting.seq_len,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


def make_batches(setting: Setting, n: int, offset: int) -> list[dict[str, torch.Tensor]]:
    """n sequences of ``seq_len`` random tokens in batches of ``batch_size``; ``offset``
    separates the training and query streams of one seed."""
    gen = torch.Generator().manual_seed(setting.seed * 1_000 + offset)
    ids = torch.randint(0, setting.vocab, (n, setting.seq_len), generator=gen)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    size = setting.batch_size
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device) -> Iterator[Stopwatch]:
    """Wall seconds of the block, after the device has finished its queued work."""
    watch = Stopwatch()
    _sync(device)
    start = time.perf_counter()
    try:
        yield watch
    finally:
        _sync(device)
        watch.seconds = time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak``, MiB: device allocations on CUDA, process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


@contextlib.contextmanager
def precision_mode(precision: Precision, device: torch.device) -> Iterator[None]:
    """TF32 and autocast as ``precision`` says, restored on exit."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision.tf32
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision.autocast
        else contextlib.nullcontext()
    )
    try:
        with autocast:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


# ---- measurements -----------------------------------------------------------------------


def run_precision(
    master: torch.nn.Module, setting: Setting, precision: Precision, device: torch.device
) -> tuple[dict, torch.Tensor]:
    """Fit and score with one precision: (record of timings, memory and dtypes, (Q, N) scores)."""
    model = copy.deepcopy(master).to(device=device, dtype=precision.dtype)
    layers = find_layers(model)
    train = [to_device(b, device) for b in make_batches(setting, setting.n_train, offset=0)]
    queries = [to_device(b, device) for b in make_batches(setting, setting.n_query, offset=1)]
    with precision_mode(precision, device):
        # Warm-up, untimed: kernels, label sampling, cuBLAS and cuSOLVER handles.
        collect_grads(model, queries[:1], layers=layers, fisher="true", progress=False)
        torch.linalg.eigh(torch.eye(2, dtype=torch.float64, device=device))
        reset_peak(device)
        with timed(device) as fit:
            ekfac = fit_ekfac(
                model, train, layers=layers, fisher="true", seed=setting.seed, progress=False
            )
        fit_peak = peak_mb(device)
        reset_peak(device)
        with timed(device) as score:
            query_grads = collect_grads(model, queries, layers=layers, progress=False)
            scores = pairwise_scores(model, train, query_grads, solver=ekfac, progress=False)
        score_peak = peak_mb(device)
    # The library fingerprints the weights on the CPU when it fits (the factors' metadata) and
    # when it scores (the queries' and the solver's): one such hash, timed apart.
    with timed(device) as weights_hash:
        model_fingerprint(model, layers)
    factors = [*ekfac.eigvecs_a.values(), *ekfac.eigvecs_s.values(), *ekfac.eigenvalues.values()]
    tokens = setting.n_train * setting.seq_len
    record = {
        "fit_s": fit.seconds,
        "score_s": score.seconds,
        "total_s": fit.seconds + score.seconds,
        "weights_hash_s": weights_hash.seconds,  # one hash; fit_s and score_s hold a few
        "fit_tokens_per_s": 2 * tokens / fit.seconds,  # two passes over the data
        "peak_fit_mb": fit_peak,
        "peak_score_mb": score_peak,
        "weight_dtype": str(precision.dtype),
        "factor_dtypes": sorted({str(t.dtype) for t in factors}),
        "grad_dtype": str(next(iter(query_grads.values())).dtype),  # the query gradients
        "scores_dtype": str(scores.dtype),
    }
    return record, scores


def run_all(setting: Setting, names: list[str], device: torch.device) -> tuple[dict, dict]:
    """The setting's description (fields, parameter counts) and {precision name: (record,
    scores)}, the precisions in turn on one seeded model."""
    master = build_model(setting)
    tracked = sum(o * i for o, i in (layer_shape(m) for m in find_layers(master).values()))
    described = {
        **dataclasses.asdict(setting),
        "params": sum(p.numel() for p in master.parameters()),
        "tracked_params": tracked,
    }
    out = {}
    for name in names:
        out[name] = run_precision(master, setting, PRECISIONS[name], device)
        if device.type == "cuda":  # the next precision's peak must not count this one's cache
            gc.collect()
            torch.cuda.empty_cache()
    return described, out


def agreement(scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Per-query agreement of two (Q, N) score matrices.

    spearman_*: rank correlation of each query's N scores (average ranks for ties);
    ratio_median: median over queries of the least-squares slope <s, r> / <r, r>;
    distinct_fraction: mean share of distinct values among a query's N scores (ties from a
    low-precision output dtype show here).
    """
    s, r = scores.double().cpu(), reference.double().cpu()
    rho = row_spearman(s, r)
    ratio = (s * r).sum(1) / (r * r).sum(1)
    distinct = [len(torch.unique(row)) / len(row) for row in s]
    return {
        "spearman_mean": float(rho.mean()),
        "spearman_min": float(rho.min()),
        "ratio_median": float(ratio.median()),
        "distinct_fraction": sum(distinct) / len(distinct),
    }


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.cpu() - expected).norm() / expected.norm())


def accumulation_check(device: torch.device, seed: int = 0) -> dict:
    """Fit K-FAC and EK-FAC from bfloat16 captures and compare with float64 oracles.

    bfloat16 values are exact in float64, so a fit that casts a and g to float64 before
    summing matches the oracle to float64 round-off (~1e-16); summing in float32 would be
    ~1e-7 off, in bfloat16 ~1e-3. Oracles, with M tokens over N sequences:
    K-FAC eigenvalues (M/N) eig(S) eig(A)^T with A = a^T a / M, S = g^T g / M;
    EK-FAC eigenvalues (1/N) sum_n (Q_S^T G_n Q_A)^2 in the fitted basis, G_n in float64.
    Runs with TF32 on: it must not reach the float64 products.
    """
    gen = torch.Generator().manual_seed(seed)
    n, t, d_in, d_out = 8, 64, 48, 32
    a = torch.randn(n, t, d_in, generator=gen).bfloat16()
    g = torch.randn(n, t, d_out, generator=gen).bfloat16()
    mask = torch.ones(n, t, dtype=torch.bool, device=device)
    cap = Captured({"w": a.to(device)}, {"w": g.to(device)}, mask)
    shapes = {"w": (d_out, d_in)}

    def captures(start: int, desc: str) -> list[Captured]:
        return [cap][start:]

    with precision_mode(PRECISIONS["tf32"], device):
        kfac = fit_from_captures(captures, shapes, kind="kfac", device=device)
        ekfac = fit_from_captures(captures, shapes, kind="ekfac", device=device)
    a64, g64 = a.double().flatten(0, 1), g.double().flatten(0, 1)  # (M, d_in), (M, d_out)
    m = a64.shape[0]
    eig_a, eig_s = (torch.linalg.eigvalsh(x.T @ x / m) for x in (a64, g64))
    qa, qs = ekfac.eigvecs_a["w"].cpu(), ekfac.eigvecs_s["w"].cpu()
    grads = torch.einsum("bto,bti->boi", g.double(), a.double())  # (N, d_out, d_in)
    factors = [*ekfac.eigvecs_a.values(), *ekfac.eigvecs_s.values(), *ekfac.eigenvalues.values()]
    return {
        "capture_dtype": str(a.dtype),
        "factor_dtypes": sorted({str(x.dtype) for x in factors}),
        "kfac_rel_err": _relative_error(kfac.eigenvalues["w"], m / n * torch.outer(eig_s, eig_a)),
        "ekfac_rel_err": _relative_error(
            ekfac.eigenvalues["w"], (qs.T @ grads @ qa).square().mean(0)
        ),
    }


# ---- report ------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def machine(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def table(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    t, a = s["timing"], s["agreement"]
    memory = "max_memory_allocated" if m["gpu"] else "peak RSS"
    lines = [
        f"gpu_check --size {s['size']} on {m['gpu'] or m['cpu']} ({m['device']}), torch {m['torch']}",
        f"timing: {t['params'] / 1e6:.1f}M params ({t['tracked_params'] / 1e6:.1f}M tracked), "
        f"N={t['n_train']} x T={t['seq_len']}, Q={t['n_query']}, batch {t['batch_size']}",
        f"{'precision':<10} {'fit s':>8} {'score s':>8} {'hash s':>7} "
        f"{'fit MiB':>9} {'score MiB':>9}  ({memory})",
    ]
    for name, r in result["timing"].items():
        lines.append(
            f"{name:<10} {r['fit_s']:8.2f} {r['score_s']:8.2f} {r['weights_hash_s']:7.2f} "
            f"{r['peak_fit_mb']:9.0f} {r['peak_score_mb']:9.0f}"
        )
    lines.append(
        f"agreement with float32: {a['params'] / 1e6:.1f}M params, N={a['n_train']}, "
        f"Q={a['n_query']}"
    )
    lines.append(f"{'precision':<10} {'Spearman mean':>14} {'min':>7} {'ratio':>7} {'distinct':>9}")
    for name, r in result["agreement"].items():
        lines.append(
            f"{name:<10} {r['spearman_mean']:14.4f} {r['spearman_min']:7.4f} "
            f"{r['ratio_median']:7.4f} {r['distinct_fraction']:9.3f}"
        )
    c = result["accumulation_check"]
    lines.append(
        f"float64 factors from {c['capture_dtype']} captures: K-FAC rel err {c['kfac_rel_err']:.1e}, "
        f"EK-FAC {c['ekfac_rel_err']:.1e}; total {result['wall_s']:.0f} s"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"default: {default}")
    parser.add_argument(
        "--size", choices=sorted(SIZES), help="default: 100m on CUDA, small elsewhere"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON written")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; "
            "run on a GPU machine with a CUDA build of torch, or pass --device cpu"
        )
    if args.size is None:  # 100m on a CPU takes hours: only when asked for
        args.size = "100m" if args.device.type == "cuda" else "small"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    start = time.perf_counter()
    cuda = device.type == "cuda"
    timing_setting, agreement_setting = SIZES[args.size]
    compared = ["float32", *(["tf32"] if cuda else []), "bf16", "autocast"]
    timed_names = ["tf32" if cuda else "float32", "bf16", "autocast"]

    check = accumulation_check(device)
    # The small agreement model first: a failure shows in seconds, not after the big model.
    agree_described, agree_runs = run_all(agreement_setting, compared, device)
    if timing_setting == agreement_setting:
        time_described, time_runs = agree_described, agree_runs
    else:
        time_described, time_runs = run_all(timing_setting, timed_names, device)
    reference = agree_runs["float32"][1]
    result = {
        "machine": machine(device),
        "settings": {
            "size": args.size,
            "timing": time_described,
            "agreement": agree_described,
            "precisions": {
                name: {**dataclasses.asdict(p), "dtype": str(p.dtype)}
                for name, p in PRECISIONS.items()
                if name in compared
            },
            "fisher": "true",
            "damping": "0.1 x mean eigenvalue per layer",
        },
        "timing": {name: time_runs[name][0] for name in timed_names},
        "agreement": {name: agreement(agree_runs[name][1], reference) for name in compared[1:]},
        "accumulation_check": check,
        "wall_s": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

"""`make bench`: this project's EK-FAC against kronfluence's, on the same model, data and settings.

Setting: a Llama-style causal LM from ``LlamaConfig`` with a fixed seed (random init, 615k
parameters; its 28 ``nn.Linear`` layers are tracked, the embeddings and the LM head are not),
512 training sequences and 16 queries of 32 random tokens, batches of 32, EK-FAC of the true
Fisher, damping 0.1 x the layer's mean eigenvalue, one torch thread for both libraries.

Ours: ``fit_ekfac(model, batches, layers=layers, fisher="true")``, the query gradients
preconditioned batch by batch (``collect_grads(..., precondition=ekfac)``), then
``pairwise_scores(model, train_batches, preconditioned)``.
kronfluence: ``Analyzer.fit_all_factors`` (strategy "ekfac") then
``Analyzer.compute_pairwise_scores`` (it writes its factors and scores to a temporary folder,
as it always does; it too keeps only the preconditioned query gradients).

Matching. Both libraries compute, per query q and training sequence z,

    score(z, q) = grad m(q)^T (F + lambda I)^-1 grad L(z),
    F ~ (Q_A (x) Q_S) diag(Lambda) (Q_A (x) Q_S)^T per layer,

and the pieces agree once the kronfluence Task is written as below:

- L(z), m(q) are one sequence's summed next-token loss. kronfluence differentiates what its
  Task returns for a whole batch; ``causal_lm_loss`` returns the batch's *sum*, so its
  per-sample gradients are our G_n = sum_t g_t a_t^T (a mean would divide them by B, Lambda
  by B^2, and the scores by B^2 outside the damping's reach).
- Q_A, Q_S are the eigenvectors of the activation and output-gradient covariances. Both
  libraries divide the covariances by the token count (ours accumulates in float64,
  kronfluence in float32); EK-FAC keeps only the eigenvectors, so this normalisation cannot
  change the scores. (It would for K-FAC: kronfluence's K-FAC eigenvalues are eig_S eig_A per
  token, ours (M/N) eig_S eig_A per sequence.)
- Lambda = (1/N) sum_n (Q_S^T G_n Q_A)^2 in both (kronfluence divides its summed Lambda by the
  number of examples it processed).
- True Fisher: kronfluence calls ``compute_train_loss(sample=True)`` in its covariance and
  Lambda passes; the Task draws batch i's labels with the generator our library seeds for
  batch i (``label_generator``), so both fit the same Monte-Carlo sample of the Fisher.
- lambda = 0.1 mean(Lambda) per layer: ours ``damping=0.1, relative=True``; kronfluence
  ``damping_factor=None``, which ``Ekfac.prepare`` (kronfluence/factor/config.py) replaces by
  HEURISTIC_DAMPING_SCALE (= 0.1) x torch.mean(lambda_matrix) of each module.
- Neither multiplies the scores by N; both use + = the query's loss goes down.

So the raw scores should agree up to float32 rounding: Spearman ~1 per query and a raw ratio
~1, where the ratio is the least-squares slope of our scores on kronfluence's, per query.

Protocol: one run, interleaved (ours, ours_f32, kronfluence, ours, ...), each in a fresh
subprocess so that its peak resident memory (VmHWM) is its own. A child builds the model and the
data, runs one untimed forward/backward (lazy initialisation), then times fitting and scoring in
wall and CPU seconds (on one thread CPU time is what the work costs, even while other processes
share the machine). Our child then, after reading its peak, also times ``collect_grads`` over
the training data (the bare per-example gradient pass, to compare ``pairwise_scores`` with) and
one bare forward/backward pass (three of them, covariances + correction + scores, are a floor
under any EK-FAC fit + scores). When a target is missed, one more child profiles our
fit + scores with cProfile.

Run: ``make bench`` (installs kronfluence) or ``python -m benchmarks.kronfluence_bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from influence.gradients import sample_labels
from influence.lab.perf import peak_rss_mb, reset_peak_rss, rss_mb
from influence.lm import sequence_losses

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kronfluence.json"
# ours_f32: ours with float32 batch products (fit_ekfac(product_dtype=torch.float32)), the
# precision of kronfluence's defaults; "ours" is the library's default (float64 products).
METHODS = ("ours", "ours_f32", "kronfluence")
OURS = ("ours", "ours_f32")
# The targets of the issue: (quantity, bound on ours / reference).
TARGETS = {
    "total_ratio": 0.5,  # fit + scores <= 0.5 x kronfluence's wall time
    "peak_rss_ratio": 1.0,  # peak memory <= kronfluence's
    "pairwise_over_bare": 1.5,  # pairwise scoring <= 1.5 x the bare per-example gradient pass
}
# The targets on wall time are also judged in CPU time (each child computes on one thread).
CPU_TWIN = {"total_ratio": "total_cpu_ratio", "pairwise_over_bare": "pairwise_over_bare_cpu"}
HEURISTIC_DAMPING = 0.1  # kronfluence's HEURISTIC_DAMPING_SCALE, our default relative damping


@dataclasses.dataclass(frozen=True)
class Setting:
    """The benchmark's model, data and run parameters."""

    seed: int = 0
    vocab: int = 512
    hidden: int = 96
    intermediate: int = 320
    n_layer: int = 4  # x 7 projections = 28 tracked nn.Linear layers
    n_head: int = 4
    n_train: int = 512
    n_query: int = 16
    seq_len: int = 32
    batch_size: int = 32
    threads: int = 1  # both libraries on one thread: a fair comparison on a shared 2-core machine
    repeats: int = 3


# ---- model, data and the loss both libraries differentiate --------------------------------


def build_model(setting: Setting, dtype: torch.dtype = torch.float32):
    """The seeded, randomly initialised Llama-style LM (eval mode, dropout 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(setting.seed)
    config = LlamaConfig(
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
    return LlamaForCausalLM(config).to(dtype).eval()


def make_sequences(setting: Setting, n: int, offset: int) -> dict[str, torch.Tensor]:
    """n sequences of ``seq_len`` uniform random tokens (no padding, every next token counted).

    ``offset`` separates the training and query streams of the same seed.
    """
    gen = torch.Generator().manual_seed(setting.seed * 1_000 + offset)
    ids = torch.randint(0, setting.vocab, (n, setting.seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def split(sequences: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive batches of ``size`` sequences, in order (as kronfluence's sequential loader)."""
    n = sequences["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in sequences.items()} for i in range(0, n, size)]


def label_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator ``influence.gradients.iter_captures`` seeds for batch ``index`` with
    ``fisher="true"``, so that kronfluence's sampled labels are the very draws we use."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def batch_key(batch: dict[str, torch.Tensor]) -> bytes:
    """A batch's identity (its token ids), to find its index in the training data."""
    return batch["input_ids"].cpu().numpy().tobytes()


def causal_lm_loss(
    model, batch: dict[str, torch.Tensor], sample: bool = False, generator=None
) -> torch.Tensor:
    """sum_n L_n over the batch (scalar): each sequence's summed next-token loss, summed.

    With ``sample`` the counted labels are drawn from the model (``generator`` required), as
    our true-Fisher fit draws them. The batch sum makes every per-sample gradient d L_n / d W.
    """
    if sample and generator is None:
        raise ValueError("sample=True draws labels: pass a seeded torch.Generator")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = sample_labels(logits, batch["labels"], generator) if sample else batch["labels"]
    return sequence_losses(logits, labels).sum()


def kronfluence_damping(lambda_sum: torch.Tensor, examples: int) -> float:
    """kronfluence's damping_factor=None for one module: 0.1 x mean of Lambda = sum / examples."""
    return HEURISTIC_DAMPING * float((lambda_sum.double() / examples).mean())


def kronfluence_task(layer_names: list[str], batch_index: dict[bytes, int], seed: int):
    """A kronfluence Task computing ``causal_lm_loss`` on the given layers (imports kronfluence)."""
    from kronfluence.task import Task

    class CausalLMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            generator = None
            if sample:
                key = batch_key(batch)
                if key not in batch_index:
                    raise KeyError(
                        "kronfluence passed a batch that is not one of the training batches: "
                        "keep its sequential loader and per_device_batch_size = the setting's"
                    )
                generator = label_generator(seed, batch_index[key])
            return causal_lm_loss(model, batch, sample=sample, generator=generator)

        def compute_measurement(self, batch, model):
            return causal_lm_loss(model, batch)

        def get_influence_tracked_modules(self):
            return list(layer_names)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return CausalLMTask()


class Sequences(torch.utils.data.Dataset):
    """Rows of a dict of tensors, for kronfluence's DataLoader (its default collate stacks them)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


# ---- agreement and summary (pure) -----------------------------------------------------------


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """How two (Q, N) score matrices agree, per query.

    spearman_*: rank correlation of each query's N scores (invariant to any positive scale);
    ratio_*: least-squares slope of ours on theirs, <o, t> / <t, t> (1 when equal);
    max_relative_difference: max over queries of |o - t| / |t| (Euclidean norms).
    """
    from scipy.stats import spearmanr

    if ours.shape != theirs.shape or ours.dim() != 2:
        raise ValueError(
            f"need two (Q, N) score matrices of one shape, got {tuple(ours.shape)} and "
            f"{tuple(theirs.shape)}"
        )
    o, t = ours.double(), theirs.double()
    rho = [float(spearmanr(a.numpy(), b.numpy()).statistic) for a, b in zip(o, t, strict=True)]
    slope = ((o * t).sum(1) / (t * t).sum(1)).tolist()
    diff = ((o - t).norm(dim=1) / t.norm(dim=1)).tolist()
    return {
        "spearman_mean": statistics.fmean(rho),
        "spearman_min": min(rho),
        "ratio_median": statistics.median(slope),
        "ratio_min": min(slope),
        "ratio_max": max(slope),
        "max_relative_difference": max(diff),
    }


# Timed quantities of every child record: wall and CPU seconds of each stage, memory in MiB.
TIMES = ("fit", "score", "total")
MEMORY = ("peak_rss_mb", "extra_peak_mb")
# Our child also times the scoring pass alone, the bare per-example gradient pass, and one
# forward/backward pass over the training data that keeps only the layers' (a, g).
OURS_ONLY = ("pairwise", "bare_grads", "capture_pass")
# EK-FAC scores read the training data three times (covariances, eigenvalue correction,
# scores): three capture passes are the least our fit + scores can cost.
PASSES = 3


def _keys(stages) -> list[str]:
    return [f"{stage}_{kind}" for stage in stages for kind in ("s", "cpu_s")]


def summarise(runs: list[dict]) -> dict:
    """Medians per method over the repeats, ratios ours / kronfluence, and the targets.

    runs: the children's records ({"method", "fit_s", "fit_cpu_s", ..., "total_cpu_s",
    "peak_rss_mb", "extra_peak_mb"}, and for ours "pairwise_s", "bare_grads_s" and their
    "_cpu_s"). A ratio is named after its quantity: "total_s" -> "total_ratio",
    "total_cpu_s" -> "total_cpu_ratio", "peak_rss_mb" -> "peak_rss_ratio"; those of ours_f32
    (optional) carry the prefix "f32_". The targets judge the default ("ours").
    """
    keys = _keys(TIMES) + list(MEMORY)
    med = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            if method == "ours_f32":  # optional
                continue
            raise ValueError(f"no run of {method!r} among the records: run both methods")
        wanted = keys + (_keys(OURS_ONLY) if method in OURS else [])
        med[method] = {k: statistics.median(r[k] for r in mine) for k in wanted}
    ratios = {}
    for method, prefix in (("ours", ""), ("ours_f32", "f32_")):
        if method in med:
            for k in keys:
                name = prefix + k.removesuffix("_s").removesuffix("_mb") + "_ratio"
                ratios[name] = med[method][k] / med["kronfluence"][k]
    ours = med["ours"]
    ratios["pairwise_over_bare"] = ours["pairwise_s"] / ours["bare_grads_s"]
    ratios["pairwise_over_bare_cpu"] = ours["pairwise_cpu_s"] / ours["bare_grads_cpu_s"]
    theirs = med["kronfluence"]
    ratios["pass_floor_ratio"] = PASSES * ours["capture_pass_s"] / theirs["total_s"]
    ratios["pass_floor_cpu_ratio"] = PASSES * ours["capture_pass_cpu_s"] / theirs["total_cpu_s"]
    targets = {}
    for name, bound in TARGETS.items():
        targets[name] = {"bound": bound, "value": ratios[name], "met": ratios[name] <= bound}
        if name in CPU_TWIN:  # the same ratio in CPU seconds, robust to a busy machine
            cpu = ratios[CPU_TWIN[name]]
            targets[name].update({"cpu_value": cpu, "met_cpu": cpu <= bound})
    return {"medians": med, "ratios": ratios, "targets": targets}


def markdown_table(result: dict) -> str:
    """The README table: medians (wall, and CPU in parentheses), ratios ours / kronfluence,
    the targets' verdicts, and the agreement of the two libraries' scores."""
    med, ratios, targets = result["medians"], result["ratios"], result["targets"]
    ours, theirs = med["ours"], med["kronfluence"]

    def verdict(name: str) -> str:
        t = targets[name]
        text = f"<= {t['bound']:g}: {'met' if t['met'] else 'missed'}"
        if "met_cpu" in t:
            text += f" ({'met' if t['met_cpu'] else 'missed'} in CPU time)"
        return text

    def times(m: dict, stage: str) -> str:
        return f"{m[f'{stage}_s']:.2f} ({m[f'{stage}_cpu_s']:.2f})"

    lines = [
        "| wall s (CPU s), MB | ours | kronfluence | ours / kronfluence | target |",
        "|---|---|---|---|---|",
    ]
    for stage, label in (("fit", "fit"), ("score", "scores"), ("total", "fit + scores")):
        target = verdict("total_ratio") if stage == "total" else ""
        lines.append(
            f"| {label} | {times(ours, stage)} | {times(theirs, stage)} | "
            f"{ratios[f'{stage}_ratio']:.2f} ({ratios[f'{stage}_cpu_ratio']:.2f}) | {target} |"
        )
    lines.append(
        f"| peak RSS (MB) | {ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} | "
        f"{ratios['peak_rss_ratio']:.2f} | {verdict('peak_rss_ratio')} |"
    )
    lines.append(
        f"| extra peak over set-up (MB) | {ours['extra_peak_mb']:.0f} | "
        f"{theirs['extra_peak_mb']:.0f} | {ratios['extra_peak_ratio']:.2f} | |"
    )
    if "ours_f32" in med:
        f32 = med["ours_f32"]
        lines.append(
            f"| ours with float32 products: fit / fit + scores | {times(f32, 'fit')} / "
            f"{times(f32, 'total')} | {times(theirs, 'fit')} / {times(theirs, 'total')} | "
            f"{ratios['f32_fit_ratio']:.2f} / {ratios['f32_total_ratio']:.2f} "
            f"({ratios['f32_fit_cpu_ratio']:.2f} / {ratios['f32_total_cpu_ratio']:.2f}) | |"
        )
        lines.append(
            f"| ours with float32 products: peak RSS (MB) | {f32['peak_rss_mb']:.0f} | "
            f"{theirs['peak_rss_mb']:.0f} | {ratios['f32_peak_rss_ratio']:.2f} | |"
        )
    lines.append(
        f"| ours: pairwise scores / bare per-example gradient pass | {times(ours, 'pairwise')} / "
        f"{times(ours, 'bare_grads')} | | {ratios['pairwise_over_bare']:.2f} "
        f"({ratios['pairwise_over_bare_cpu']:.2f}) | {verdict('pairwise_over_bare')} |"
    )
    lines.append(
        f"| ours: {PASSES} bare forward/backward passes (a floor) | "
        f"{PASSES * ours['capture_pass_s']:.2f} ({PASSES * ours['capture_pass_cpu_s']:.2f}) | "
        f"{times(theirs, 'total')} | {ratios['pass_floor_ratio']:.2f} "
        f"({ratios['pass_floor_cpu_ratio']:.2f}) | |"
    )
    if "agreement" in result:
        agree = result["agreement"]
        lines.append(
            f"| Spearman per query, mean (min) | | | {agree['spearman_mean']:.4f} "
            f"({agree['spearman_min']:.4f}) | |"
        )
        lines.append(
            f"| raw score ratio, median [min, max] | | | {agree['ratio_median']:.4f} "
            f"[{agree['ratio_min']:.4f}, {agree['ratio_max']:.4f}] | |"
        )
    if "f32_vs_float64" in result:
        vs = result["f32_vs_float64"]
        lines.append(
            f"| ours, float32 vs float64 products: Spearman min; max relative difference | | | "
            f"{vs['spearman_min']:.4f}; {vs['max_relative_difference']:.1e} | |"
        )
    return "\n".join(lines)


def machine() -> dict:
    """nproc, CPU model, library versions."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "transformers", "kronfluence"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        **versions,
    }


RATIO_EXPLANATION = (
    "Both score grad m(q)^T (F + 0.1 mean(Lambda) I)^-1 grad L(z) with EK-FAC: the Task sums the "
    "batch loss, so kronfluence's per-sample gradients are our per-sequence gradients; only the "
    "covariances' eigenvectors enter EK-FAC, so their normalisation (both divide by tokens) "
    "cannot matter; Lambda is the per-sequence average in both; the sampled labels are the same "
    "draws (our seeds per batch); neither multiplies by N. The ratio is 1 up to float32 "
    "rounding (kronfluence accumulates in float32, we in float64)."
)


# ---- children: one method, one fresh process ------------------------------------------------


@dataclasses.dataclass
class Clock:
    """Wall and CPU seconds of a ``with clock() as c:`` block. On one thread CPU ~ wall when
    the machine is idle; CPU time also holds while other processes share the cores."""

    wall: float = float("nan")
    cpu: float = float("nan")


@contextlib.contextmanager
def clock() -> Iterator[Clock]:
    c = Clock()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield c
    finally:
        c.wall, c.cpu = time.perf_counter() - wall, time.process_time() - cpu


def _prepare(setting: Setting):
    """Model, layers and batches; one untimed forward/backward so lazy set-up is not timed."""
    from influence.modules import find_layers

    torch.set_num_threads(setting.threads)
    model = build_model(setting)
    layers = find_layers(model)
    train = make_sequences(setting, setting.n_train, offset=0)
    queries = make_sequences(setting, setting.n_query, offset=1)
    train_batches = split(train, setting.batch_size)
    query_batches = split(queries, setting.n_query)
    causal_lm_loss(model, train_batches[0]).backward()
    model.zero_grad(set_to_none=True)
    return model, layers, train, queries, train_batches, query_batches


def _timed(**clocks: Clock) -> dict[str, float]:
    """{stage_s: wall, stage_cpu_s: cpu} of each named clock."""
    out = {}
    for stage, c in clocks.items():
        out[f"{stage}_s"], out[f"{stage}_cpu_s"] = c.wall, c.cpu
    return out


def _ours(
    setting: Setting, scores_path: str | None, product_dtype: torch.dtype = torch.float64
) -> dict:
    import gc

    from influence import collect_grads, fit_ekfac, pairwise_scores
    from influence.gradients import iter_captures

    model, layers, _, _, train_batches, query_batches = _prepare(setting)
    gc.collect()
    before, reset = rss_mb(), reset_peak_rss()
    with clock() as total:
        with clock() as fit:
            ekfac = fit_ekfac(
                model,
                train_batches,
                layers=layers,
                fisher="true",
                seed=setting.seed,
                damping=HEURISTIC_DAMPING,
                relative=True,
                product_dtype=product_dtype,
                progress=False,
            )
        with clock() as score:
            pre = collect_grads(
                model, batches=query_batches, layers=layers, precondition=ekfac, progress=False
            )
            with clock() as pairwise:
                scores = pairwise_scores(model, train_batches, pre, progress=False)
    peak = peak_rss_mb()
    del pre
    gc.collect()
    with clock() as bare:
        collect_grads(model, batches=train_batches, layers=layers, progress=False)
    with clock() as capture_pass:
        captures = iter_captures(
            model, layers=layers, batches=train_batches, fisher="true", progress=False
        )
        for _ in captures:
            pass
    if scores_path:
        torch.save(scores, scores_path)
    return {
        **_timed(fit=fit, score=score, total=total, pairwise=pairwise, bare_grads=bare),
        **_timed(capture_pass=capture_pass),
        "peak_rss_mb": peak,
        "extra_peak_mb": peak - before,
        "peak_reset": reset,
        "damping": {name: ekfac.damping_of(name) for name in layers},
        "parameters": sum(p.numel() for p in model.parameters()),
        "tracked_parameters": sum(m.weight.numel() for m in layers.values()),
        "tracked_layers": len(layers),
    }


def _kronfluence(setting: Setting, scores_path: str | None) -> dict:
    import gc
    import logging
    import shutil

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    model, layers, train, queries, train_batches, _ = _prepare(setting)
    index = {batch_key(b): i for i, b in enumerate(train_batches)}
    task = kronfluence_task(list(layers), index, setting.seed)
    model = prepare_model(model, task)
    out = tempfile.mkdtemp(prefix="kronfluence-bench-")
    analyzer = Analyzer(
        analysis_name="bench",
        model=model,
        task=task,
        cpu=True,
        log_level=logging.WARNING,
        disable_tqdm=True,
        output_dir=out,
    )
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=False)
    score_args = ScoreArguments(damping_factor=None)  # 0.1 x mean eigenvalue per module
    train_set, query_set = Sequences(train), Sequences(queries)
    gc.collect()
    before, reset = rss_mb(), reset_peak_rss()
    with clock() as total:
        with clock() as fit:
            analyzer.fit_all_factors(
                factors_name="ekfac",
                dataset=train_set,
                per_device_batch_size=setting.batch_size,
                factor_args=factor_args,
                overwrite_output_dir=True,
            )
        with clock() as score:
            analyzer.compute_pairwise_scores(
                scores_name="pairwise",
                factors_name="ekfac",
                query_dataset=query_set,
                train_dataset=train_set,
                per_device_query_batch_size=setting.n_query,
                per_device_train_batch_size=setting.batch_size,
                score_args=score_args,
                overwrite_output_dir=True,
            )
    peak = peak_rss_mb()
    scores = analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"]
    lambdas = analyzer.load_lambda_matrices(factors_name="ekfac")
    damping = {
        name: kronfluence_damping(
            lambdas["lambda_matrix"][name], int(lambdas["num_lambda_processed"][name])
        )
        for name in layers
    }
    if scores_path:
        torch.save(scores.clone(), scores_path)
    shutil.rmtree(out, ignore_errors=True)
    return {
        **_timed(fit=fit, score=score, total=total),
        "peak_rss_mb": peak,
        "extra_peak_mb": peak - before,
        "peak_reset": reset,
        "damping": damping,
    }


# Functions that only drive others (their cumulative time is everything below them).
DRIVERS = {
    "fit_and_score",
    "fit_ekfac",
    "_fit",
    "fit_from_captures",
    "_stage",
    "covariance_then_eigh",
    "iter_captures",
    "collect_grads",
    "pairwise_scores",
    "_scores",
}


def _profile(setting: Setting, top: int = 5) -> dict:
    """cProfile (CPU-time clock, so other processes on the machine do not count) of our
    fit + scores, shares of the profiled CPU time:

    own_time: the top entries by own time; a torch built-in (einsum, backward) lists, as
    "callers", the first functions outside torch on its call path (climbing torch's wrappers)
    with their cumulative time through that wrapper, which also counts the wrapper's own work
    (e.g. nn.Module call machinery and hooks), so it can exceed the built-in's own time.
    library: the library's functions (in ``influence``, drivers left out) by cumulative time.
    """
    import cProfile
    import pstats

    from influence import collect_grads, fit_ekfac, pairwise_scores

    model, layers, _, _, train_batches, query_batches = _prepare(setting)

    def fit_and_score():
        ekfac = fit_ekfac(
            model, train_batches, layers=layers, fisher="true", seed=setting.seed, progress=False
        )
        pre = collect_grads(
            model, batches=query_batches, layers=layers, precondition=ekfac, progress=False
        )
        pairwise_scores(model, train_batches, pre, progress=False)

    profiler = cProfile.Profile(timer=time.process_time)
    profiler.runcall(fit_and_score)
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    table = stats.stats  # {(file, line, name): (calls, primitive, own, cumulative, callers)}

    def name(key) -> str:
        file, line, func = key
        return f"{Path(file).parent.name}/{Path(file).name}:{line}({func})" if line else func

    def entry(key, seconds) -> dict:
        return {"function": name(key), "cpu_s": seconds, "share": seconds / total}

    def in_torch(key) -> bool:
        return not key[1] or f"{os.sep}torch{os.sep}" in key[0]

    def callers_outside_torch(key) -> list[dict]:
        # climb torch's wrappers (einsum -> torch.functional.einsum -> caller) to our callers
        for _ in range(5):
            callers = table[key][4]
            if not callers or not all(in_torch(k) for k in callers):
                break
            key = max(callers, key=lambda k: callers[k][3])
        by_caller = sorted(table[key][4].items(), key=lambda kv: -kv[1][3])[:3]
        return [entry(k, v[3]) for k, v in by_caller]

    own = []
    for key, (_, _, own_s, _, _) in sorted(table.items(), key=lambda kv: -kv[1][2])[:top]:
        item = entry(key, own_s)
        if in_torch(key):  # a torch built-in: which of our functions spend that time
            item["callers"] = callers_outside_torch(key)
        own.append(item)
    library = [
        kv
        for kv in table.items()
        if f"{os.sep}influence{os.sep}" in kv[0][0] and kv[0][2] not in DRIVERS
    ]
    by_cumulative = sorted(library, key=lambda kv: -kv[1][3])[:top]
    return {
        "cpu_s": total,
        "own_time": own,
        "library": [entry(k, v[3]) for k, v in by_cumulative],
    }


CHILDREN = {
    "ours": _ours,
    "ours_f32": functools.partial(_ours, product_dtype=torch.float32),
    "kronfluence": _kronfluence,
}


def run_child(method: str, setting: Setting, scores_path: str | None = None) -> dict:
    """One method (or "profile") in a fresh ``python -m benchmarks.kronfluence_bench`` process."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.kronfluence_bench",
            "--child",
            method,
            "--setting",
            json.dumps(dataclasses.asdict(setting)),
            "--result",
            str(result),
        ]
        if scores_path:
            cmd += ["--scores", scores_path]
        threads = str(setting.threads)  # OpenMP/MKL pools too, not only torch's intra-op one
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the {method} child failed:\n{done.stderr[-4000:]}")
        return {"method": method, **json.loads(result.read_text())}


def run(setting: Setting, out: Path | None = RESULTS) -> dict:
    """Interleaved repeats, agreement of the first repeat's scores, a profile if a target is
    missed; writes the JSON to ``out`` and returns it."""
    try:
        import kronfluence  # noqa: F401
    except ImportError as err:
        raise SystemExit(
            "kronfluence is not installed: `make bench` installs it (pip install --no-deps "
            "kronfluence einconv, plus accelerate, einops, opt_einsum)"
        ) from err
    load_before = os.getloadavg()
    runs, scores = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(setting.repeats):
            for method in METHODS:
                path = str(Path(tmp) / f"{method}.pt") if repeat == 0 else None
                record = run_child(method, setting, path)
                print(
                    f"repeat {repeat + 1}/{setting.repeats} {method:>11}: fit {record['fit_s']:.2f}"
                    f" s, scores {record['score_s']:.2f} s, peak {record['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                )
                runs.append(record)
                if path:
                    scores[method] = torch.load(path)
    result = summarise(runs)
    result["agreement"] = {
        **agreement(scores["ours"], scores["kronfluence"]),
        "why_ratio_is_1": RATIO_EXPLANATION,
    }
    # what float32 products cost in precision: against kronfluence and against our float64
    result["agreement_f32"] = agreement(scores["ours_f32"], scores["kronfluence"])
    result["f32_vs_float64"] = agreement(scores["ours_f32"], scores["ours"])
    first = {method: next(r for r in runs if r["method"] == method) for method in METHODS}
    damping = {
        n: first["ours"]["damping"][n] / first["kronfluence"]["damping"][n]
        for n in first["ours"]["damping"]
    }
    result["damping_ratio"] = {"min": min(damping.values()), "max": max(damping.values())}
    if not all(t["met"] for t in result["targets"].values()):
        print("a target is missed: profiling our fit + scores", file=sys.stderr)
        result["profile"] = {
            k: v for k, v in run_child("profile", setting).items() if k != "method"
        }
    result.update(
        {
            "setting": dataclasses.asdict(setting),
            "model": {
                k: first["ours"][k] for k in ("parameters", "tracked_parameters", "tracked_layers")
            },
            "threads": (
                f"torch.set_num_threads({setting.threads}) and OMP/MKL_NUM_THREADS="
                f"{setting.threads} in every child, for both libraries"
            ),
            "dtypes": "model float32; ours computes and accumulates covariances and Lambda in "
            "float64 (ours_f32: each batch's products in float32, summed in float64), "
            "kronfluence (its defaults) in float32; both eigendecompose in float64",
            "machine": {**machine(), "load_average_1min": [load_before[0], os.getloadavg()[0]]},
            "runs": [{k: v for k, v in r.items() if k != "damping"} for r in runs],
        }
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=Setting.repeats)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=[*CHILDREN, "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        setting = Setting(**json.loads(args.setting))
        if args.child == "profile":
            record = _profile(setting)
        else:
            record = CHILDREN[args.child](setting, args.scores)
        args.result.write_text(json.dumps(record))
        return
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    result = run(Setting(repeats=args.repeats), args.out)
    print(markdown_table(result))


if __name__ == "__main__":
    main()

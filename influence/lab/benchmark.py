"""Paper B's attribution benchmark (arXiv 2409.19998): every method's score matrix for one model.

:func:`task_scores` fine-tunes (or loads from the zoo cache) the model of a task, fine-tuning
mode and seed, collects the per-example gradients of the training set and of the queries once,
and returns each method's (Q, N) score matrix, higher = more helpful (the project's sign:
positive = proponent), plus the labels the metrics of :mod:`influence.lab.attribution` need.

Methods (names are the keys of ``TaskScores.scores``):

- ``RepSim``: cosine of the last layer's hidden state at the prompt's last token (prompts only,
  as paper B) - ``baselines.repsim_scores``.
- ``Gradient cosine``: ``baselines.gradient_cosine_from_grads``.
- ``Gradient dot``: Hessian-free, ``solvers.Identity``.
- ``DataInf``: ``solvers.DataInf`` with its own damping heuristic ``datainf_damping``.
- ``LiSSA``: ``solvers.LiSSA`` on the damped GGN of ``curv_examples`` training sequences, scale
  1.1 x lambda_max(G) + lambda, ``lissa_depth`` minibatch steps of ``lissa_batch`` sequences.
- ``EK-FAC``: ``curvature.fit_ekfac`` on the training set (true Fisher), damping 0.1 x the mean
  eigenvalue per layer.
- ``Exact``: the exact inverse of the true Fisher of the whole training set, estimated with
  one label draw per sequence from the model (``collect_grads(fisher="true")``): the matrix
  EK-FAC approximates, without its Kronecker factors, its eigenvalue fit or its blocks, inverted
  by ``solvers.LowRank`` (Woodbury: rank <= N, exact for any number of parameters). Damping
  0.1 x its mean eigenvalue tr(F) / P, one value for all layers.
- ``LiSSA as published``: ``solvers.LiSSAAsPublished`` (paper B's code: ~4 x gradient dot).

Damping. DataInf and LiSSA share DataInf's per-layer damping lambda_l = 0.1 x
mean_i |g_i|^2 / D_l (0.1 x the mean eigenvalue of the layer's empirical Fisher); EK-FAC uses
0.1 x the mean of its own eigenvalues, the same rule on its Fisher estimate.

Tracked layers. LoRA: every adapter (lora_A and lora_B of c_attn, c_proj, c_fc, mlp.c_proj of
every block). Full fine-tuning: ``full_layers`` (default: the attention input projections
``c_attn`` of every block), because the per-example gradients of all block weights would not
fit in memory for 1,200 training sequences.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from influence import baselines, solvers
from influence.curvature import fit_ekfac
from influence.ggn import GGN
from influence.gradients import collect_grads
from influence.lab import attribution, zoo
from influence.lab.tasks import load_task
from influence.lab.tokenizer import make_batches
from influence.lm import IGNORE
from influence.modules import LayerGrads, find_layers, flatten

FULL_LAYERS = r"attn\.c_attn"  # tracked block layers under full fine-tuning
METHODS = (
    "RepSim", "Gradient cosine", "Gradient dot", "DataInf", "LiSSA", "EK-FAC", "Exact",
    "LiSSA as published",
)  # fmt: skip


@dataclass
class TaskScores:
    """One model's benchmark inputs: ``scores[method]`` (Q, N) float64, higher = more helpful."""

    task: str
    mode: str
    seed: int
    loss_on: str
    scores: dict[str, np.ndarray]
    train_labels: np.ndarray  # (N,)
    query_labels: np.ndarray  # (Q,)
    train_grad_norms: np.ndarray  # (N,) norms of the tracked layers' training gradients
    train_lengths: np.ndarray  # (N,) counted (loss) tokens of each training sequence
    info: dict = field(default_factory=dict)


def select_queries(test: Sequence[dict], classes: Sequence, n_query: int | None) -> list[dict]:
    """Test examples whose class is in `classes` (e.g. the training labels), classes interleaved
    round-robin (so any prefix is balanced), cut to `n_query` (None: all)."""
    classes = set(classes)
    groups: dict = {}
    for ex in test:
        if ex["label"] in classes:
            groups.setdefault(ex["label"], []).append(ex)
    order = [
        g[i] for i in range(max(map(len, groups.values()))) for g in groups.values() if i < len(g)
    ]
    return order[:n_query]


def model_path(
    task: str,
    mode: str,
    seed: int,
    profile: str,
    loss_on: str = "response",
    cache=None,
    checkpoints: Sequence[int] = (),
) -> Path:
    """The zoo's ``gpt2-<task>-<mode>`` trained with another seed / loss (seed 0 = the zoo's
    cached model), saving the weights after each step of `checkpoints`; `cache`: the zoo
    folder (default ``zoo.CACHE``)."""
    spec = zoo.specs(profile)[f"gpt2-{task}-{mode}"]
    cfg = dataclasses.replace(
        spec.train, seed=seed, loss_on=loss_on, checkpoints=tuple(checkpoints)
    )
    name = spec.name if loss_on == "response" else f"{spec.name}-all"
    base = zoo.build(spec.base, profile, cache=Path(cache or zoo.CACHE))
    return zoo.finetune(base, task, cfg, name=name)


def _scores(pre: LayerGrads, train_flat: torch.Tensor) -> np.ndarray:
    """(Q, N) = flatten(preconditioned queries) @ flatten(train grads)^T, float64."""
    return (flatten(pre).double() @ train_flat.T).numpy()


def _prompt_batches(tok, examples, batch_size) -> list[dict]:
    """Batches of the prompts alone, the appended eos masked out: the last non-padding token is
    the prompt's last token (RepSim's position; causal attention, so masking it changes
    nothing before it)."""
    batches = make_batches(tok, [ex["prompt"] for ex in examples], batch_size)
    for b in batches:
        last = b["attention_mask"].sum(1) - 1  # (B,) position of the eos
        b["attention_mask"][torch.arange(len(last)), last] = 0
    return batches


def spread(examples: Sequence[dict], n: int) -> list[dict]:
    """`n` examples evenly spread over the list (every class when the list is grouped)."""
    return list(examples[:: max(1, len(examples) // n)][:n])


def task_scores(
    task: str,
    mode: str = "lora",
    seed: int = 0,
    profile: str = "default",
    *,
    loss_on: str = "response",
    n_query: int | None = None,
    query_classes: Sequence | None = None,
    curv_examples: int = 16,
    fit_examples: int = 128,
    lissa_depth: int = 8,
    lissa_batch: int = 2,
    full_layers: str = FULL_LAYERS,
    batch_size: int = 32,
    cache: Path | None = None,
    checkpoints: Sequence[int] = (),
    step: int | None = None,
) -> TaskScores:
    """Every method's (Q, N) scores for the fine-tune of `task` (see the module docstring).

    loss_on: the loss of training *and* of the gradients ("response" or paper B's "all").
    n_query: queries (test examples whose class is in training, or in `query_classes` when
    given; classes interleaved).
    curv_examples: training sequences of the GGN (LiSSA); fit_examples: of EK-FAC's fit;
    both spread evenly over the training set.
    checkpoints, step: train the model saving these steps' weights and score the checkpoint
    after `step` steps (None: the trained model).
    """
    start = time.perf_counter()
    path = model_path(task, mode, seed, profile, loss_on, cache, checkpoints)
    include = r"lora_[AB]" if mode == "lora" else full_layers
    if step is None:
        model = zoo.load_model(path, trainable=include)
    else:
        model = zoo.load_checkpoint(path, step, trainable=include)
    tok = zoo.load_tokenizer(path)
    layers = find_layers(model, include=include)

    train_seconds, clock = time.perf_counter() - start, time.perf_counter()
    train = load_task(task, "train")
    classes = [ex["label"] for ex in train] if query_classes is None else query_classes
    tests = select_queries(load_task(task, "test"), classes, n_query)
    train_b = make_batches(tok, train, batch_size, loss_on=loss_on)
    query_b = make_batches(tok, tests, batch_size, loss_on=loss_on)
    curv_b = make_batches(tok, spread(train, curv_examples), lissa_batch, loss_on=loss_on)
    fit_b = make_batches(tok, spread(train, fit_examples), batch_size, loss_on=loss_on)
    train_g = collect_grads(model, train_b, layers=layers, progress=False)  # {l: (N, o, i)}
    query_g = collect_grads(model, query_b, layers=layers, progress=False)  # {l: (Q, o, i)}
    train_flat = flatten(train_g).double()  # (N, P)
    lam = solvers.datainf_damping(train_g)

    scores, seconds = {}, {}

    def lap(name):  # wall time since the previous lap, charged to `name`
        nonlocal clock
        seconds[name], clock = time.perf_counter() - clock, time.perf_counter()

    lap("gradients")
    rep = baselines.repsim_scores(
        model, _prompt_batches(tok, train, batch_size), _prompt_batches(tok, tests, batch_size)
    )
    scores["RepSim"] = rep.numpy()
    lap("RepSim")
    scores["Gradient cosine"] = baselines.gradient_cosine_from_grads(query_g, train_g).numpy()
    scores["Gradient dot"] = _scores(solvers.Identity().ihvp(query_g), train_flat)
    scores["DataInf"] = _scores(solvers.DataInf(train_g).ihvp(query_g), train_flat)
    lap("DataInf")
    published = solvers.LiSSAAsPublished(train_g)
    scores["LiSSA as published"] = _scores(published.ihvp(query_g), train_flat)
    lap("LiSSA as published")
    # The last use of the float32 (N, d_out, d_in') gradients: train_flat holds the same numbers
    # in float64, and Exact's (N, P) matrices below need the room (full fine-tuning: 357 MB).
    del train_g, published
    ggn = GGN(model, layers, curv_b)
    scale = 1.1 * solvers.largest_eigenvalue(ggn, iters=8, seed=seed) + max(lam.values())
    lissa = solvers.LiSSA(ggn, damping=lam, scale=scale, depth=lissa_depth, seed=seed)
    scores["LiSSA"] = _scores(lissa.ihvp(query_g), train_flat)
    lap("LiSSA")
    ekfac = fit_ekfac(model, fit_b, layers=layers, seed=seed, progress=False)
    scores["EK-FAC"] = _scores(ekfac.ihvp(query_g), train_flat)
    lap("EK-FAC")
    sampled = collect_grads(model, train_b, layers=layers, progress=False, fisher="true", seed=seed)
    fisher = solvers.LowRank(sampled, 1.0)
    del sampled
    exact = fisher.with_damping(0.1 * float(fisher.eigenvalues.sum()) / train_flat.shape[1])
    # float64 queries: the solve's output is not rounded back to float32 (an "exact" row).
    scores["Exact"] = _scores(exact.ihvp({n: g.double() for n, g in query_g.items()}), train_flat)
    del fisher, exact
    lap("Exact")
    scores = {m: scores[m] for m in METHODS}  # the module's order, whatever the order of work

    lengths = torch.cat([(b["labels"][:, 1:] != IGNORE).sum(1) for b in train_b]).numpy()
    info = dict(path=path.name, step=step, params=train_flat.shape[1], layers=len(layers),
                mean_grad_norm=float(train_flat.mean(0).norm()),  # |grad of the mean loss|
                lissa_scale=scale, lissa_rate=1 - min(lam.values()) / scale,
                queries=[ex["id"] for ex in tests], seconds={"model": train_seconds, **seconds})  # fmt: skip
    return TaskScores(
        task, mode, seed, loss_on, scores,
        np.array([ex["label"] for ex in train]), np.array([ex["label"] for ex in tests]),
        train_flat.norm(dim=1).numpy(), lengths, info,
    )  # fmt: skip


def _kept(run: TaskScores, labels: Sequence | None) -> np.ndarray:
    """(Q,) mask of the queries whose class is in `labels` (None: all)."""
    if labels is None:
        return np.ones(len(run.query_labels), bool)
    return np.isin(run.query_labels, labels)


def evaluate(runs: Sequence[TaskScores], labels: Sequence | None = None, **kwargs) -> dict:
    """{method: {metric: {"mean", "lo", "hi"}}} over the seeds in `runs` (one task, one mode):
    ``attribution.rank_metrics`` per seed, then ``attribution.summarize``. `labels`: keep only
    the queries of these classes (k stays floor(N / n_classes), as paper B)."""
    per_method: dict[str, list] = {}
    for run in runs:
        keep = _kept(run, labels)
        for method, s in run.scores.items():
            m = attribution.rank_metrics(
                s[keep], run.train_labels, run.query_labels[keep], **kwargs
            )
            per_method.setdefault(method, []).append(m)
    return {method: attribution.summarize(per_seed) for method, per_seed in per_method.items()}


def norm_outliers(run: TaskScores, method: str, labels: Sequence | None = None) -> dict:
    """Gradient-norm dominance of one score matrix (queries of `labels` only, None: all):
    ``top1_share``, the share of queries whose top-1 training example is the most frequent
    top-1; ``norm_corr``, the Spearman correlation of the training gradient norms with the mean
    score over queries; ``top1_norm_pct``, the mean percentile (0-100) of the top-1 examples'
    gradient norms (50 = no preference for large gradients)."""
    scores = run.scores[method][_kept(run, labels)]
    top1 = scores.argmax(1)  # (Q,)
    pct = 100 * stats.rankdata(run.train_grad_norms)[top1] / len(run.train_grad_norms)
    return dict(
        top1_share=float(np.bincount(top1).max() / len(top1)),
        norm_corr=float(stats.spearmanr(run.train_grad_norms, scores.mean(0))[0]),
        top1_norm_pct=float(pct.mean()),
    )

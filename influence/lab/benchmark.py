"""Paper B's attribution benchmark (arXiv 2409.19998): every method's score matrix for one model.

:func:`prepare` fine-tunes (or loads from the zoo cache) the model of a task, fine-tuning mode
and seed, and computes once what the methods need, all **undamped**: the per-example gradients
of the training set and of the queries, the Monte-Carlo true Fisher of the training set, an
EK-FAC fit, LiSSA's minibatch GGN and its safe scale, RepSim. :func:`method_scores` then gives
one method's (Q, N) score matrix at a damping factor, higher = more helpful (the project's
sign: positive = proponent). :func:`task_scores` runs every method at the fixed rule and, if
asked, a damping sweep, and returns the labels the metrics of :mod:`influence.lab.attribution`
need.

Damping (``influence.damping``): one rule for every method, applied at solve time. Each layer
l gets lambda_l = factor x tr(F_l) / P_l, the mean eigenvalue of layer l's block of the true
Fisher of all N training sequences (labels drawn from the model, one draw per sequence), so
every method inverts its own curvature plus *the same* damping. Fixed rule: factor 0.1.

Methods (names are the keys of ``TaskScores.scores``):

- ``RepSim``: cosine of the last layer's hidden state at the prompt's last token (prompts only,
  as paper B) - ``baselines.repsim_scores``. No curvature, no damping.
- ``Gradient cosine``: ``baselines.gradient_cosine_from_grads``. No damping.
- ``Gradient dot``: Hessian-free, ``solvers.Identity``. No damping.
- ``DataInf``: ``solvers.DataInf`` (its closed-form per-layer inverse of the empirical Fisher).
- ``LiSSA``: ``solvers.LiSSA`` on the GGN of ``curv_examples`` training sequences,
  ``lissa_depth`` minibatch steps of ``lissa_batch`` sequences, scale 1.1 x the largest
  eigenvalue over the minibatch GGNs + the largest damping (safe for every step). Truncated: its
  relative residual on the curvature set and the steps a 1e-6 residual would need are in
  ``info``.
- ``EK-FAC``: ``curvature.fit_ekfac`` on ``fit_examples`` training sequences (true Fisher).
- ``MC Fisher``: the Monte-Carlo true Fisher of all N training sequences (the reference
  curvature of the damping rule), inverted exactly by ``solvers.LowRank`` (Woodbury, any P):
  the matrix EK-FAC approximates without its Kronecker factors, eigenvalue fit or blocks. Its
  rank is at most N, so it is *not* the GGN (whose exact inverse costs ~1.5 gradient passes
  of the training set per query and CG step: out of reach on a CPU for P = 33k-99k).
- ``LiSSA as published``: ``solvers.LiSSAAsPublished`` (paper B's code, with its own damping
  heuristic, reproduced as published: ~4 x gradient dot).

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
from influence.curvature import EKFAC, fit_ekfac
from influence.damping import FACTOR, mean_eigenvalues
from influence.damping import damping as rule
from influence.ggn import GGN
from influence.gradients import collect_grads
from influence.lab import attribution, zoo
from influence.lab.tasks import load_task
from influence.lab.tokenizer import make_batches
from influence.lm import IGNORE
from influence.modules import LayerGrads, find_layers, flatten, layer_shape, unflatten

FULL_LAYERS = r"attn\.c_attn"  # tracked block layers under full fine-tuning
METHODS = (
    "RepSim", "Gradient cosine", "Gradient dot", "DataInf", "LiSSA", "EK-FAC", "MC Fisher",
    "LiSSA as published",
)  # fmt: skip
DAMPED = ("DataInf", "LiSSA", "EK-FAC", "MC Fisher")  # the methods the damping rule applies to
INFLUENCE = ("Gradient dot", "DataInf", "LiSSA", "EK-FAC", "MC Fisher")  # Hessian-based or -free


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
    sweep: dict[str, dict[float, np.ndarray]] = field(default_factory=dict)  # method -> factor


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


def load(path: Path, mode: str, step: int | None = None, full_layers: str = FULL_LAYERS):
    """(model, tokenizer, tracked layers) of the fine-tune at `path` (after `step` training
    steps when given): LoRA tracks every adapter, full fine-tuning the `full_layers`."""
    include = r"lora_[AB]" if mode == "lora" else full_layers
    if step is None:
        model = zoo.load_model(path, trainable=include)
    else:
        model = zoo.load_checkpoint(path, step, trainable=include)
    return model, zoo.load_tokenizer(path), find_layers(model, include=include)


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


@dataclass
class Prepared:
    """What every method needs for one model, computed once and undamped (:func:`prepare`)."""

    train_flat: torch.Tensor  # (N, P) float32 training gradients
    train_g: LayerGrads  # {layer: (N, d_out, d_in')} float32 views of train_flat
    query_g: LayerGrads  # {layer: (Q, d_out, d_in')} float32
    reference: dict[str, float]  # mean eigenvalue of each layer's true-Fisher block
    fisher: solvers.LowRank | None  # the Monte-Carlo true Fisher of all N sequences
    ekfac: EKFAC | None  # fitted undamped
    ggn: GGN | None  # LiSSA's curvature set, minibatches of lissa_batch sequences
    lissa_top: float | None  # largest eigenvalue over the minibatch GGNs
    lissa_depth: int
    seed: int
    fixed: dict[str, np.ndarray] = field(default_factory=dict)  # undamped methods' scores

    def damping(self, factor: float, absolute: float | None = None) -> dict[str, float]:
        """{layer: lambda_l} of the shared rule at ``factor``, or ``absolute`` on every layer
        (``influence.damping``)."""
        return rule(self.reference, factor, absolute=absolute)

    def score(self, pre: LayerGrads) -> np.ndarray:
        """(Q, N) = preconditioned queries . training gradients: a float32 contraction (no
        float64 copy of the (N, P) gradients; relative round-off ~1e-6, far below the gaps
        that decide a ranking) of the float64 or float32 iHVPs; float64 result."""
        return (flatten(pre).float() @ self.train_flat.T).double().numpy()


def prepare(
    model, tok, layers, train: Sequence[dict], tests: Sequence[dict], *,
    loss_on: str = "response", curv_examples: int = 16, fit_examples: int = 128,
    lissa_depth: int = 8, lissa_batch: int = 2, batch_size: int = 32, seed: int = 0,
    methods: Sequence[str] = METHODS,
) -> Prepared:  # fmt: skip
    """Gradients, curvatures and undamped scores of one model (see the module docstring), for
    ``methods`` only (the damping reference is always computed)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {METHODS}")
    train_b = make_batches(tok, train, batch_size, loss_on=loss_on)
    query_b = make_batches(tok, tests, batch_size, loss_on=loss_on)
    # One (N, P) float32 matrix; the per-layer gradients are views of it (no second copy).
    train_flat = flatten(collect_grads(model, train_b, layers=layers, progress=False))
    train_g = unflatten(train_flat, {n: layer_shape(m) for n, m in layers.items()})
    query_g = collect_grads(model, query_b, layers=layers, progress=False)  # {l: (Q, o, i)}
    sampled = collect_grads(model, train_b, layers=layers, progress=False, fisher="true", seed=seed)
    reference = mean_eigenvalues(sampled)
    fisher = solvers.LowRank(sampled, rule(reference, FACTOR)) if "MC Fisher" in methods else None
    del sampled
    ekfac = ggn = top = None
    if "EK-FAC" in methods:
        fit_b = make_batches(tok, spread(train, fit_examples), batch_size, loss_on=loss_on)
        ekfac = fit_ekfac(model, fit_b, layers=layers, seed=seed, progress=False)
    if "LiSSA" in methods:
        curv_b = make_batches(tok, spread(train, curv_examples), lissa_batch, loss_on=loss_on)
        ggn = GGN(model, layers, curv_b)
        top = max(solvers.largest_eigenvalue(ggn, iters=8, seed=seed, batches=[b]) for b in curv_b)
    prep = Prepared(
        train_flat, train_g, query_g, reference, fisher, ekfac, ggn, top, lissa_depth, seed
    )
    if "RepSim" in methods:
        prep.fixed["RepSim"] = baselines.repsim_scores(
            model, _prompt_batches(tok, train, batch_size), _prompt_batches(tok, tests, batch_size)
        ).numpy()
    prep.fixed |= {m: f(prep) for m, f in _UNDAMPED_GRADIENT.items() if m in methods}
    return prep


# The undamped methods that read the query gradients (RepSim reads representations).
_UNDAMPED_GRADIENT = {
    "Gradient cosine": lambda p: baselines.cosine_scores(flatten(p.query_g), p.train_flat).numpy(),
    "Gradient dot": lambda p: p.score(p.query_g),
    "LiSSA as published": lambda p: p.score(solvers.LiSSAAsPublished(p.train_g).ihvp(p.query_g)),
}


def with_queries(prep: Prepared, query_g: LayerGrads) -> Prepared:
    """`prep` with other query gradients (another measurement of the same queries, e.g.
    ``behaviour.margin_grads``): the curvatures and training gradients shared, the undamped
    gradient methods rescored, RepSim's scores kept (they read no gradient)."""
    shapes = {n: tuple(g.shape[1:]) for n, g in prep.query_g.items()}
    given = {n: tuple(g.shape[1:]) for n, g in query_g.items()}
    if given != shapes:
        raise ValueError(f"query gradients of shapes {given}; the prepared layers are {shapes}")
    new = dataclasses.replace(prep, query_g=query_g, fixed={})
    new.fixed = {m: _UNDAMPED_GRADIENT[m](new) if m in _UNDAMPED_GRADIENT else scores
                 for m, scores in prep.fixed.items()}  # fmt: skip
    return new


def lissa(prep: Prepared, factor: float, absolute: float | None = None) -> solvers.LiSSA:
    """LiSSA at the shared damping, scale 1.1 x the largest minibatch eigenvalue + the largest
    damping (so every step's I - A_j / s is a contraction)."""
    lam = prep.damping(factor, absolute)
    scale = 1.1 * prep.lissa_top + max(lam.values())
    return solvers.LiSSA(prep.ggn, damping=lam, scale=scale, depth=prep.lissa_depth, seed=prep.seed)


def method_scores(
    prep: Prepared, method: str, factor: float = FACTOR, *, absolute: float | None = None
) -> np.ndarray:
    """(Q, N) scores of ``method`` at the shared damping rule with ``factor``, or at the same
    ``absolute`` damping on every layer (both ignored by the methods without damping: RepSim,
    gradient cosine and dot, LiSSA as published)."""
    if method in prep.fixed:
        return prep.fixed[method]
    lam, q = prep.damping(factor, absolute), prep.query_g
    if method == "DataInf":
        return prep.score(solvers.DataInf(prep.train_g, damping=lam).ihvp(q))
    if method == "LiSSA":
        return prep.score(lissa(prep, factor, absolute).ihvp(q))
    if method == "EK-FAC":
        return prep.score(prep.ekfac.with_damping(lam).ihvp(q))
    if method == "MC Fisher":
        return prep.score(prep.fisher.with_damping(lam).ihvp({n: g.double() for n, g in q.items()}))
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def lissa_residual(prep: Prepared, factor: float = FACTOR, queries: int = 4) -> float:
    """Mean relative residual |v - (G + lam) x| / |v| of LiSSA's answer x on its own curvature
    set (the full GGN of the curvature sequences), over the first ``queries`` queries."""
    v = {n: g[:queries].double() for n, g in prep.query_g.items()}
    solver = lissa(prep, factor)
    x = solver.ihvp(v)
    gx = prep.ggn.matvec(x)
    lam = prep.damping(factor)
    r = flatten({n: v[n] - gx[n] - lam[n] * x[n] for n in v})
    return float((r.norm(dim=1) / flatten(v).norm(dim=1)).mean())


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
    sweep: Sequence[float] = (),
    methods: Sequence[str] = METHODS,
) -> TaskScores:
    """Every method's (Q, N) scores for the fine-tune of `task` at the fixed damping rule.

    loss_on: the loss of training *and* of the gradients ("response" or paper B's "all").
    n_query: queries (test examples whose class is in training, or in `query_classes` when
    given; classes interleaved).
    curv_examples: training sequences of the GGN (LiSSA); fit_examples: of EK-FAC's fit;
    both spread evenly over the training set.
    checkpoints, step: train the model saving these steps' weights and score the checkpoint
    after `step` steps (None: the trained model).
    sweep: damping factors at which the damped methods are also scored (``TaskScores.sweep``,
    float32 matrices).
    """
    start = time.perf_counter()
    path = model_path(task, mode, seed, profile, loss_on, cache, checkpoints)
    model, tok, layers = load(path, mode, step, full_layers)
    train_seconds, clock = time.perf_counter() - start, time.perf_counter()
    train = load_task(task, "train")
    classes = [ex["label"] for ex in train] if query_classes is None else query_classes
    tests = select_queries(load_task(task, "test"), classes, n_query)
    prep = prepare(
        model, tok, layers, train, tests, loss_on=loss_on, curv_examples=curv_examples,
        fit_examples=fit_examples, lissa_depth=lissa_depth, lissa_batch=lissa_batch,
        batch_size=batch_size, seed=seed, methods=methods,
    )  # fmt: skip
    seconds = {"prepare": time.perf_counter() - clock}
    scores = {}
    for method in methods:
        clock = time.perf_counter()
        scores[method] = method_scores(prep, method)
        seconds[method] = time.perf_counter() - clock
    swept = {  # the fixed rule's factor is not recomputed
        m: {
            c: (scores[m] if c == FACTOR else method_scores(prep, m, c)).astype(np.float32)
            for c in sweep
        }  # fmt: skip
        for m in methods
        if m in DAMPED and sweep
    }
    lam = prep.damping(FACTOR)
    lissa_info = {}
    if "LiSSA" in methods:
        scale = lissa(prep, FACTOR).scale
        rate = 1 - min(lam.values()) / scale  # LiSSA's per-step contraction bound
        lissa_info = dict(lissa_scale=scale, lissa_rate=rate, lissa_residual=lissa_residual(prep),
                          lissa_steps_to_1e6=solvers.lissa_depth(rate, 1e-6))  # fmt: skip
    train_flat = prep.train_flat.double()  # once for the two norms below (600 MB at P = 99k)
    lengths = np.concatenate(
        [(b["labels"][:, 1:] != IGNORE).sum(1).numpy()
         for b in make_batches(tok, train, batch_size, loss_on=loss_on)]
    )  # fmt: skip
    info = dict(path=path.name, step=step, params=train_flat.shape[1], layers=len(layers),
                mean_grad_norm=float(train_flat.mean(0).norm()),  # |grad of the mean loss|
                damping=lam, **lissa_info, queries=[ex["id"] for ex in tests],
                seconds={"model": train_seconds, **seconds})  # fmt: skip
    return TaskScores(
        task, mode, seed, loss_on, scores,
        np.array([ex["label"] for ex in train]), np.array([ex["label"] for ex in tests]),
        train_flat.norm(dim=1).numpy(), lengths, info, swept,
    )  # fmt: skip


def query_mask(run: TaskScores, labels: Sequence | None) -> np.ndarray:
    """(Q,) mask of the queries whose class is in `labels` (None: all)."""
    if labels is None:
        return np.ones(len(run.query_labels), bool)
    return np.isin(run.query_labels, labels)


def evaluate(
    runs: Sequence[TaskScores], labels: Sequence | None = None, factor: float | None = None,
    **kwargs,
) -> dict:  # fmt: skip
    """{method: {metric: {"mean", "lo", "hi"}}} over the seeds in `runs` (one task, one mode):
    ``attribution.rank_metrics`` per seed, then ``attribution.summarize``. `labels`: keep only
    the queries of these classes (k stays floor(N / n_classes), as paper B). `factor`: the
    damped methods' scores at this factor of the sweep instead of the fixed rule."""
    per_method: dict[str, list] = {}
    for run in runs:
        keep = query_mask(run, labels)
        scores = run.scores if factor is None else {m: s[factor] for m, s in run.sweep.items()}
        for method, s in scores.items():
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
    scores = run.scores[method][query_mask(run, labels)]
    top1 = scores.argmax(1)  # (Q,)
    pct = 100 * stats.rankdata(run.train_grad_norms)[top1] / len(run.train_grad_norms)
    return dict(
        top1_share=float(np.bincount(top1).max() / len(top1)),
        norm_corr=float(stats.spearmanr(run.train_grad_norms, scores.mean(0))[0]),
        top1_norm_pct=float(pct.mean()),
    )

"""The proximal Bregman response function (PBRF; Bae et al. 2022, "If influence functions are
the answer, then what is the question?"): what influence functions estimate, computed by
optimisation instead of a linearisation.

theta: the tracked parameters only (the weight and bias of ``find_layers`` layers, or any
parameters of the model, e.g. LoRA adapters); everything else is frozen. With the N training
sequences x_i (``train_batches``), a training example z_m (``example``: one batch; several
sequences in it are one group), its summed token loss L(z_m, theta) (``influence.lm``) and
the damping lam,

    theta_eps = argmin_theta  (1/N) sum_i D_i(theta)  +  eps L(z_m, theta)
                              +  (lam / 2) ||theta - theta_s||^2,

    D_i(theta) = sum over the counted positions t of x_i of KL(softmax(z_s) || softmax(z)),

z = f_t(x_i; theta), z_s = f_t(x_i; theta_s): the Bregman divergence of the token
cross-entropy in logit space (proof at ``PBRF.divergence``). eps = -1/N removes z_m (Bae et
al.'s sign: the objective is then a proximal version of training without z_m), eps = +1/N adds
a copy.
The response of a query sequence q to eps is m_q(theta_eps) - m_q(theta_s), m_q its summed
token loss.

First order. At theta_s the divergence has value and gradient 0 and Hessian
(1/N) sum_i sum_t J^T (diag(p) - p p^T) J = G, the GGN of the mean over *sequences* of their
summed token losses: exactly ``influence.ggn.GGN``'s normalisation (it divides by the number
of sequences, not of tokens). So the objective's gradient at theta_s is eps grad L(z_m), and
    theta_eps - theta_s = -eps (G + lam I)^{-1} grad L(z_m) + O(eps^2),
    response = -eps grad m_q^T (G + lam I)^{-1} grad L(z_m) + O(eps^2) = -eps score(z_m, q)
with score the project's influence score (positive = proponent). ``pbrf_scores`` returns
-response / eps, on the scale of influence scores: N x response at eps = -1/N, positive when
removing z_m raises the query's loss. The damped GGN influence is the PBRF's first-order
term whatever the network; the PBRF is not leave-one-out retraining (Bae et al.).

Optimisation: full batch (every training sequence in every evaluation), in the scaled
variable u = (theta - theta_s) / |eps| (``PBRF.response``), by L-BFGS whose line search reads
gradients only (``lbfgs``: the objective's value moves by O(eps^2), below its rounding error
for small eps), until ||grad objective|| <= tol ||grad objective at theta_s||. The model is
never modified: the objective runs it through ``torch.func.functional_call`` with the tracked
parameters replaced, in eval mode. Float64 reaches tol = 1e-8 for any eps; in float32 expect
about 1e-4.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from influence.data import Batch, check_batch
from influence.gradients import to_device
from influence.lm import loss_mask, sequence_losses
from influence.models import eval_mode, resolve_layers, vocab_size


def tracked_parameters(
    model: nn.Module, layers_or_params: Mapping[str, nn.Module] | Iterable[nn.Parameter]
) -> dict[str, nn.Parameter]:
    """{name in ``model.named_parameters()``: parameter} of a {name: layer} dict (each layer's
    weight and bias, as ``find_layers`` selects them) or of an iterable of parameters."""
    if isinstance(layers_or_params, Mapping):
        layers = resolve_layers(model, layers_or_params)
        params = [p for m in layers.values() for p in m.parameters(recurse=False)]
    else:
        params = list(layers_or_params)
    names = {id(p): name for name, p in model.named_parameters()}
    foreign = [tuple(p.shape) for p in params if id(p) not in names]
    if foreign:
        raise ValueError(f"parameters of shapes {foreign} are not parameters of this model")
    if not params:
        raise ValueError("no parameter to optimise: pass find_layers(model) or a parameter list")
    return {names[id(p)]: p for p in params}


class PBRF:
    """The PBRF objective on ``train_batches`` for the tracked parameters (module docstring).

    theta is flat, (P,), the tracked parameters' entries in their own layouts, concatenated in
    the order of ``names``; ``theta_s`` (P,) are the model's values. ``damping``: lam >= 0,
    absolute. The reference log-probabilities of every counted training token are kept:
    memory (counted tokens) x V.
    """

    def __init__(
        self,
        model: nn.Module,
        layers_or_params: Mapping[str, nn.Module] | Iterable[nn.Parameter],
        train_batches: Batch | Iterable[Batch],
        damping: float | Mapping[str, float],
    ):
        self.model = model
        params = tracked_parameters(model, layers_or_params)
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.theta_s = torch.cat([p.detach().flatten() for p in params.values()]).clone()
        self.damping = self._damping(damping)  # a float, or (P,) per entry of theta
        # Every other parameter enters detached: no autograd graph through frozen weights.
        self._frozen = {k: p.detach() for k, p in model.named_parameters()}
        self.train = self.batches(train_batches)
        self.num_sequences = sum(b["input_ids"].shape[0] for b in self.train)
        with torch.no_grad():  # log p_s at the counted positions, (K, V) per batch
            self._reference = [self._log_probs(self.theta_s, b) for b in self.train]

    def _damping(self, damping: float | Mapping[str, float]) -> float | torch.Tensor:
        """lam as a float, or, for {layer name: lam_l} (the shared rule's per-layer damping,
        ``influence.damping``), a (P,) vector: every parameter of layer l gets lam_l."""
        per_layer = damping if isinstance(damping, Mapping) else None
        values = list(per_layer.values()) if per_layer else [damping]
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"damping must be finite and >= 0, got {damping}")
        if per_layer is None:
            return float(damping)
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            layer = name.rsplit(".", 1)[0]
            if layer not in per_layer:
                raise ValueError(f"no damping for layer {layer!r} (parameter {name!r}); "
                                 f"given: {sorted(per_layer)}")  # fmt: skip
            parts.append(torch.full((math.prod(shape),), float(per_layer[layer])))
        return torch.cat(parts).to(self.theta_s)

    def batches(self, data: Batch | Iterable[Batch], uncounted: str = "warn") -> list[Batch]:
        """Batches checked against the batch contract, on the model's device."""
        data = [data] if isinstance(data, Mapping) else list(data)
        if not data:
            raise ValueError("no batch given")
        device = self.theta_s.device
        size = vocab_size(self.model)
        return [
            to_device(check_batch(b, vocab_size=size, index=i, uncounted=uncounted), device)
            for i, b in enumerate(data)
        ]

    def logits(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(B, T, V) logits of the model with the tracked parameters set to theta (P,)."""
        parts = theta.split([math.prod(s) for s in self.shapes])
        tracked = {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with eval_mode(self.model):
            out = functional_call(self.model, {**self._frozen, **tracked}, (), inputs)
        return out.logits if hasattr(out, "logits") else out

    def losses(self, theta: torch.Tensor, batches: list[Batch]) -> torch.Tensor:
        """(B,) summed token losses of every sequence of ``batches``, concatenated."""
        return torch.cat([sequence_losses(self.logits(theta, b), b["labels"]) for b in batches])

    def _log_probs(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(K, V) log-softmax at the K counted positions of ``batch``."""
        return torch.log_softmax(self.logits(theta, batch)[loss_mask(batch["labels"])], dim=-1)

    def divergence(self, theta: torch.Tensor) -> torch.Tensor:
        """(1/N) sum_i D_i(theta), the mean over sequences of their summed token divergences.

        Bregman = KL. CE(z, y) = lse(z) - z_y, grad CE(z_s) = p_s - e_y, so
            D(z, z_s) = CE(z) - CE(z_s) - (p_s - e_y)^T (z - z_s)
                      = [lse(z) - lse(z_s) - p_s^T (z - z_s)] + [-z_y + z_s,y + (z - z_s)_y],
        the label's term is linear in z and cancels (second bracket = 0), and with
        sum_v p_s,v = 1 the first is sum_v p_s,v [(z_s,v - lse(z_s)) - (z_v - lse(z))]
        = sum_v p_s,v (log p_s,v - log p_v) = KL(p_s || p): no label is left.
        """
        total = sum(
            F.kl_div(self._log_probs(theta, b), ref, reduction="sum", log_target=True)
            for b, ref in zip(self.train, self._reference, strict=True)
        )
        return total / self.num_sequences

    def objective(self, theta: torch.Tensor, example: list[Batch], epsilon: float):
        """The PBRF objective at theta (P,): a scalar tensor, differentiable in theta."""
        prox = 0.5 * (self.damping * (theta - self.theta_s).pow(2)).sum()
        return self.divergence(theta) + epsilon * self.losses(theta, example).sum() + prox

    def response(
        self,
        example: Batch,
        query: Batch | Iterable[Batch],
        *,
        epsilon: float,
        steps: int = 1000,
        lr: float = 1.0,
        tol: float = 1e-8,
    ) -> dict:
        """Minimise the objective for one example; the query losses' changes. See
        ``pbrf_response``."""
        if not math.isfinite(epsilon):
            raise ValueError(f"epsilon must be finite, got {epsilon}")
        if steps < 1 or not tol > 0:
            raise ValueError(f"need steps >= 1 and tol > 0, got steps={steps}, tol={tol}")
        example = self.batches(example)
        query = self.batches(query, uncounted="error")
        # In u = (theta - theta_s) / |eps|, with the objective / eps^2, the problem is O(1)
        # whatever eps (for small eps: 1/2 u^T (G + lam) u + sign(eps) grad L^T u).
        scale = abs(epsilon) if epsilon != 0 else 1.0

        def gradient(u: torch.Tensor) -> torch.Tensor:
            u = u.detach().requires_grad_()
            with torch.enable_grad():
                value = self.objective(self.theta_s + scale * u, example, epsilon) / scale**2
                return torch.autograd.grad(value, u)[0]

        u, info = lbfgs(gradient, torch.zeros_like(self.theta_s), steps=steps, lr=lr, tol=tol)
        with torch.no_grad():
            before = self.losses(self.theta_s, query)
            after = self.losses(self.theta_s + scale * u, query)
        return {"response": (after - before).double(), **info}  # (Q,)


def lbfgs(
    gradient: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    steps: int,
    lr: float = 1.0,
    tol: float = 1e-8,
    history: int = 20,
    c2: float = 0.9,
    max_search: int = 30,
) -> tuple[torch.Tensor, dict]:
    """Minimise a function given only its gradient: L-BFGS with a line search on the
    directional derivative phi'(t) = gradient(x + t d) . d alone.

    Why no function values: the PBRF objective moves by O(eps^2) while its value rounds at
    O(eps_machine x the token losses), so for small eps an Armijo test compares rounding
    errors; the gradient is accurate to O(eps_machine) of its own size. The search brackets
    the first sign change of phi' (expanding t by 4 from ``lr`` times the quasi-Newton step)
    and refines by safeguarded secant steps until |phi'(t)| <= c2 |phi'(0)| (the strong-Wolfe
    curvature condition, which keeps the curvature pairs positive). For a convex line
    function that point lies past no maximum and below phi(0).

    Stops when ||gradient|| <= tol ||gradient(x0)|| or after ``steps`` iterations, and returns
    the evaluated point with the smallest gradient with {"converged", "relative_grad_norm"
    (its norm / the initial norm), "steps" (iterations), "evaluations" (gradient calls)}.
    """
    evaluations = 0

    def grad(point):
        nonlocal evaluations
        evaluations += 1
        return gradient(point)

    g = grad(x)
    initial = float(g.norm())
    best, best_x = initial, x
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y.s)
    step = 0
    while step < steps and best > tol * initial:
        step += 1
        d = _two_loop(-g, pairs)
        slope0 = float(g @ d)
        if not slope0 < 0:  # not a descent direction: restart from steepest descent
            pairs.clear()
            d, slope0 = -g, -float(g @ g)
        t = lr if pairs else lr / float(d.norm())  # first step: unit length
        lo, slope_lo, g_lo, hi, slope_hi = 0.0, slope0, g, None, None
        for _ in range(max_search):
            g_t = grad(x + t * d)
            slope = float(g_t @ d)
            if abs(slope) <= c2 * abs(slope0):
                break
            if slope < 0:
                lo, slope_lo, g_lo = t, slope, g_t
            else:
                hi, slope_hi = t, slope
            if hi is None:
                t *= 4.0
            else:  # secant root of phi' in [lo, hi], kept 10% away from the ends
                root = lo - slope_lo * (hi - lo) / (slope_hi - slope_lo)
                t = min(max(root, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo))
        else:  # no point met the condition: the last one still descending (maybe t = 0)
            t, g_t = lo, g_lo
            if t == 0:
                break
        s, y = t * d, g_t - g
        if float(y @ s) > 0:
            pairs = [*pairs[-history + 1 :], (s, y, 1.0 / float(y @ s))]
        x, g = x + s, g_t
        if float(g.norm()) < best:
            best, best_x = float(g.norm()), x
    relative = best / initial if initial > 0 else 0.0
    return best_x, {
        "converged": relative <= tol,
        "relative_grad_norm": relative,
        "steps": step,
        "evaluations": evaluations,
    }


def _two_loop(q: torch.Tensor, pairs: list) -> torch.Tensor:
    """H q for the L-BFGS inverse-Hessian estimate H of the curvature pairs (s, y, 1 / y.s),
    with the initial scaling s.y / y.y of the newest pair."""
    alphas = []
    for s, y, rho in reversed(pairs):
        alphas.append(rho * float(s @ q))
        q = q - alphas[-1] * y
    if pairs:
        s, y, _ = pairs[-1]
        q = q * (float(s @ y) / float(y @ y))
    for (s, y, rho), alpha in zip(pairs, reversed(alphas), strict=True):
        q = q + (alpha - rho * float(y @ q)) * s
    return q


def pbrf_response(
    model: nn.Module,
    layers_or_params: Mapping[str, nn.Module] | Iterable[nn.Parameter],
    train_batches: Batch | Iterable[Batch],
    example_batch: Batch | Sequence[Batch],
    query_batch: Batch | Iterable[Batch],
    *,
    epsilon: float,
    damping: float | Mapping[str, float],
    steps: int = 1000,
    lr: float = 1.0,
    tol: float = 1e-8,
) -> dict | list[dict]:
    """The PBRF response of the query losses to weighting ``example_batch`` by ``epsilon``.

    Returns {"response": (Q,) float64, m_q(theta_eps) - m_q(theta_s) for each query sequence;
    "converged": relative_grad_norm <= tol; "relative_grad_norm": ||grad objective|| at the
    returned point / ||grad objective at theta_s|| (the returned point is the evaluated one
    with the smallest gradient); "steps": L-BFGS iterations; "evaluations": gradient
    evaluations (each a pass over every training sequence and the example)}. ``lbfgs`` runs
    until the tolerance holds or ``steps`` iterations are done (``lr``: its first trial step,
    in units of the quasi-Newton step).
    ``epsilon = -1/N`` (N = the sequences in ``train_batches``) removes the example;
    ``damping``: lam, absolute, or {layer: lam_l} per tracked layer. A sequence of example
    batches gives a list, one optimisation per example (the training data's reference
    predictions computed once). The model is left unchanged (module docstring).
    """
    pbrf = PBRF(model, layers_or_params, train_batches, damping)
    options = {"epsilon": epsilon, "steps": steps, "lr": lr, "tol": tol}
    if isinstance(example_batch, Mapping):
        return pbrf.response(example_batch, query_batch, **options)
    return [pbrf.response(b, query_batch, **options) for b in example_batch]


def pbrf_scores(
    model: nn.Module,
    layers_or_params: Mapping[str, nn.Module] | Iterable[nn.Parameter],
    train_batches: Batch | Iterable[Batch],
    examples: Batch | Sequence[Batch],
    query_batch: Batch | Iterable[Batch],
    *,
    damping: float | Mapping[str, float],
    epsilon: float | None = None,
    steps: int = 1000,
    lr: float = 1.0,
    tol: float = 1e-8,
) -> torch.Tensor:
    """(Q, K) PBRF scores -response / epsilon, comparable to influence scores.

    ``examples``: one batch whose K sequences are K examples, or K batches (each removed as a
    group). ``epsilon``: default -1/N (removal), then the score is N x the rise of the query's
    loss when the example is removed: positive = proponent, and to first order in epsilon it
    is the damped-GGN influence grad m_q^T (G + damping I)^{-1} grad L(z) (module docstring).
    Warns (RuntimeWarning) when an optimisation stops short of ``tol``.
    """
    pbrf = PBRF(model, layers_or_params, train_batches, damping)
    if epsilon is None:
        epsilon = -1.0 / pbrf.num_sequences
    if epsilon == 0:
        raise ValueError("epsilon must be nonzero: the score is -response / epsilon")
    if isinstance(examples, Mapping):
        examples = [
            {k: v[i : i + 1] for k, v in examples.items()}
            for i in range(len(examples["input_ids"]))
        ]
    results = [
        pbrf.response(b, query_batch, epsilon=epsilon, steps=steps, lr=lr, tol=tol)
        for b in examples
    ]
    worst = max(r["relative_grad_norm"] for r in results)
    if worst > tol:
        warnings.warn(
            f"PBRF: {sum(not r['converged'] for r in results)} of {len(results)} optimisations "
            f"stopped at a relative gradient norm up to {worst:.3g} > tol = {tol:g}: raise steps",
            RuntimeWarning,
            stacklevel=2,
        )
    return torch.stack([-r["response"] / epsilon for r in results], dim=1)

"""Multi-stage influence (paper A): a fine-tuned model's predictions traced to pre-training data.

Model. Losses are averaged per sequence (``influence.lm``: L(z) sums z's counted tokens).
Pre-training, with the weight of one pre-training sequence z raised by eps, and full-parameter
fine-tuning held near the pre-trained weights by a proximity term:

    th_pt(eps) = argmin (1/N) sum_i L(z_i; th) + eps L(z; th) + (l/2) ||th||^2,
    th_ft(th_pt) = argmin (1/M) sum_j L(x_j; th) + (a/2) ||th - th_pt||^2.

Derivation. With H_pt, H_ft the Hessians of the averaged losses at th_pt, th_ft, the implicit
function theorem on the two stationarity conditions gives

    d th_pt / d eps = -(H_pt + l I)^-1 grad L(z; th_pt),
    (H_ft + a I) d th_ft = a d th_pt      (from grad L_ft(th_ft) + a (th_ft - th_pt) = 0),

so for a query loss m(q; th_ft) (its summed loss over counted tokens)

    d m(q; th_ft) / d eps = -a grad m(q; th_ft)^T (H_ft + a I)^-1 (H_pt + l I)^-1 grad L(z; th_pt).

Score. Positive = proponent, as everywhere in ``influence``: the score is -d m / d eps,

    score(z, q) = a grad m(q; th_ft)^T (H_ft + a I)^-1 (H_pt + l I)^-1 grad L(z; th_pt).

Paper A's I(z, q) omits the constant a; we keep it (a > 0 does not change rankings) so that
the score is the first-order change of the query loss exactly, and tends to the single-stage
influence grad m(q; th_pt)^T (H_pt + l I)^-1 grad L(z; th_pt) as a -> infinity (fine-tuning
cannot move: th_ft -> th_pt and a (H_ft + a I)^-1 = (I + H_ft / a)^-1 -> I). The derivation
needs exact minima and true Hessians; EK-FAC stands in for them with the Gauss-Newton / Fisher
(fitted on the fine-tuned model and fine-tuning data for H_ft, on the pre-trained model and
pre-training data for H_pt). a and l are absolute, in this per-sequence scale: a model trained
on a per-token average (``influence.lab.zoo``: (1/N_tok) sum_n L_n + (a_tok/2) ||th - th_pt||^2)
has a = a_tok N_tok / M, with N_tok the counted tokens of its M fine-tuning sequences.

Cost. (H_pt + l I)^-1 is symmetric, so grad m^T A^-1 B^-1 g = (B^-1 A^-1 grad m)^T g: the few
query gradients are preconditioned by the fine-tuning solver, then the pre-training solver,
and contracted with the candidates' per-example gradients at th_pt by ``pairwise_scores``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from influence.curvature import KFAC
from influence.gradients import collect_grads
from influence.modules import LayerGrads, find_layers, layer_shape
from influence.scores import Batches, Solver, pairwise_scores


@dataclass(frozen=True)
class MultiStageConfig:
    """a, l of score(z, q) = a grad m(q; th_ft)^T (H_ft + a I)^-1 (H_pt + l I)^-1 grad L(z; th_pt).

    Both are absolute and in the per-sequence scale of the curvature (see the module docstring).
    """

    proximity: float  # a: fine-tuning's proximity strength = damping of the fine-tuning solver
    damping: float  # l: pre-training L2 strength = damping of the pre-training solver

    def __post_init__(self):
        if not self.proximity > 0:
            raise ValueError(
                f"proximity must be > 0, got {self.proximity}: with a = 0 fine-tuning does not "
                "depend on the pre-trained weights and every multi-stage score is 0"
            )
        if not self.damping >= 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")


def multistage_solvers(
    ft_curvature: KFAC, pt_curvature: KFAC, config: MultiStageConfig
) -> tuple[KFAC, KFAC]:
    """(EK-)FACs with the absolute dampings the formula needs: (H_ft + a I), (H_pt + l I).

    ft_curvature: fitted on the fine-tuned model and fine-tuning data; pt_curvature: on the
    pre-trained model and pre-training data. Factors are shared, not copied.
    """
    return (
        ft_curvature.with_damping(config.proximity, relative=False),
        pt_curvature.with_damping(config.damping, relative=False),
    )


def _check_damping(solver: Solver, expected: float, role: str) -> None:
    """A solver that states its damping must be damped by exactly ``expected`` (absolute)."""
    damping = getattr(solver, "damping", None)
    if damping is None:
        return  # e.g. a solver that takes the damping into its matrix: trusted
    values = list(damping.values()) if isinstance(damping, dict) else [damping]
    relative = bool(getattr(solver, "relative", False))
    if relative or not all(math.isclose(float(v), expected, rel_tol=1e-9) for v in values):
        raise ValueError(
            f"the {role} solver has damping {damping!r} (relative={relative}), but the "
            f"multi-stage formula needs an absolute damping of {expected}; build the solvers "
            "with multistage_solvers(...) or with that damping"
        )


def _matching_layers(
    query_model: nn.Module, candidate_model: nn.Module, layers: Iterable[str] | None
) -> dict[str, nn.Module]:
    """The query model's modules named in ``layers`` (default ``find_layers(query_model)``),
    checked to exist with the same shape in the candidate model."""
    names = list(layers) if layers is not None else list(find_layers(query_model))
    found = find_layers(query_model, include=names)  # a clear error for unsupported layers
    missing = [n for n in names if n not in found]
    if not names or missing:
        raise ValueError(f"layers {missing or names} are not trackable layers of the query model")
    candidate_modules = dict(candidate_model.named_modules())
    for name in names:
        if name not in candidate_modules:
            raise ValueError(f"layer {name!r} of the query model is not in the candidate model")
        shapes = layer_shape(found[name]), layer_shape(candidate_modules[name])
        if shapes[0] != shapes[1]:
            raise ValueError(
                f"layer {name!r} has shape {shapes[0]} in the query model and {shapes[1]} in "
                "the candidate model"
            )
    return {name: found[name] for name in names}


def multistage_precondition(
    query_grads: LayerGrads, ft_solver: Solver, pt_solver: Solver, config: MultiStageConfig
) -> LayerGrads:
    """a (H_pt + l I)^-1 (H_ft + a I)^-1 grad m(q): {name: (Q, d_out, d_in')} -> same shapes.

    The fine-tuning solver is applied first (see the module docstring for why this order).
    """
    _check_damping(ft_solver, config.proximity, "fine-tuning")
    _check_damping(pt_solver, config.damping, "pre-training")
    pre = pt_solver.ihvp(ft_solver.ihvp(query_grads))
    return {name: config.proximity * x for name, x in pre.items()}


def multistage_scores(
    ft_model: nn.Module,
    pt_model: nn.Module,
    query_batches: Batches,
    candidate_batches: Batches,
    ft_solver: Solver,
    pt_solver: Solver,
    config: MultiStageConfig,
    layers: Iterable[str] | None = None,
    *,
    progress: bool = True,
) -> torch.Tensor:
    """Multi-stage scores (Q, N): a grad m(q; th_ft)^T (H_ft+aI)^-1 (H_pt+lI)^-1 grad L(z; th_pt).

    Positive = proponent: upweighting pre-training sequence z lowers the fine-tuned model's
    loss on q to first order. Query gradients on ``ft_model``, candidate gradients on
    ``pt_model``; layers: names of the tracked layers (or a ``find_layers`` dict of either
    model; default: ``find_layers(ft_model)``), the same in both models.
    ft_solver ~ (H_ft + a I)^-1 and pt_solver ~ (H_pt + l I)^-1 (e.g. ``multistage_solvers``);
    a solver with a ``damping`` attribute must be damped by exactly a, resp. l (checked).
    """
    layers = _matching_layers(ft_model, pt_model, layers)
    queries = collect_grads(ft_model, query_batches, layers=layers, progress=progress)
    pre = multistage_precondition(queries, ft_solver, pt_solver, config)
    device = next(pt_model.parameters()).device
    pre = {name: x.to(device) for name, x in pre.items()}
    return pairwise_scores(pt_model, candidate_batches, pre, solver=None, progress=progress)


def single_stage_scores(
    query_model: nn.Module,
    candidate_model: nn.Module,
    query_batches: Batches,
    candidate_batches: Batches,
    solver: Solver | None,
    layers: Iterable[str] | None = None,
    *,
    progress: bool = True,
) -> torch.Tensor:
    """Single-stage baselines (Q, N): grad m(q; query_model)^T solver(grad L(z; candidate_model)).

    - fine-tuning EK-FAC, candidates at th_ft: (ft_model, ft_model, (H_ft + a I)^-1);
    - as published (paper A's benchmark computes the pre-training iHVP, then leaves it out):
      (ft_model, pt_model, (H_ft + a I)^-1);
    - pre-training influence on the pre-trained model, the a -> infinity limit of the
      multi-stage score: (pt_model, pt_model, (H_pt + l I)^-1).

    Only the first and last are influence functions of a model's own training data.
    """
    layers = _matching_layers(query_model, candidate_model, layers)
    queries = collect_grads(query_model, query_batches, layers=layers, progress=progress)
    pre = solver.ihvp(queries) if solver is not None else queries
    device = next(candidate_model.parameters()).device
    pre = {name: x.to(device) for name, x in pre.items()}
    return pairwise_scores(candidate_model, candidate_batches, pre, solver=None, progress=progress)

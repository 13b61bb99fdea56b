"""Influence functions for language models, checked against exact oracles.

    layers = find_layers(model)                       # nn.Linear, Conv1D, peft LoRA adapters
    ekfac = fit_ekfac(model, train_batches, layers)   # EK-FAC of the true Fisher, damped
    queries = collect_grads(model, layers, query_batches)
    scores = pairwise_scores(model, train_batches, queries, ekfac)   # (Q, N), + = proponent

Modules: ``modules`` (layers, canonical layout, hooks), ``gradients`` (per-example gradients),
``curvature`` (EK-FAC, K-FAC), ``ggn`` (exact Gauss-Newton oracle and products), ``solvers``
(identity, DataInf, LiSSA, CG, exact), ``scores``, ``baselines``, ``io``.
"""

from influence.curvature import EKFAC, KFAC, fit_ekfac, fit_kfac
from influence.ggn import GGN
from influence.gradients import collect_grads, per_example_grads
from influence.modules import find_layers
from influence.scores import pairwise_scores, self_influence, token_scores
from influence.solvers import CG, DataInf, Exact, Identity, LiSSA, relative_damping

__all__ = [
    "CG",
    "EKFAC",
    "GGN",
    "KFAC",
    "DataInf",
    "Exact",
    "Identity",
    "LiSSA",
    "collect_grads",
    "find_layers",
    "fit_ekfac",
    "fit_kfac",
    "pairwise_scores",
    "per_example_grads",
    "relative_damping",
    "self_influence",
    "token_scores",
]

"""Influence functions for language models, checked against exact oracles.

    model, tokenizer = load_model(folder), load_tokenizer(folder)  # any save_pretrained folder
    train_batches = batches_from_texts(tokenizer, records)   # {"prompt", "response"} or {"text"}
    layers = find_layers(model)                       # nn.Linear, Conv1D, peft LoRA adapters
    ekfac = fit_ekfac(model, train_batches, layers=layers)   # EK-FAC of the true Fisher
    queries = collect_grads(model, query_batches, layers=layers)
    scores = pairwise_scores(model, train_batches, queries, solver=ekfac)   # (Q, N), + = proponent

Modules: ``modules`` (layers, canonical layout, hooks), ``gradients`` (per-example gradients),
``curvature`` (EK-FAC, K-FAC), ``ggn`` (exact Gauss-Newton oracle and products), ``solvers``
(identity, DataInf, LiSSA, CG, exact dense, exact low-rank), ``scores``, ``multistage`` (pre-training ->
fine-tuning, paper A), ``baselines`` (RepSim, gradient cosine, BM25), ``io`` (files, fingerprints),
``data`` (the batch contract), ``models`` (loading a model folder), ``report`` (top-k with
per-token heatmaps, HTML), ``distributed`` (torchrun), ``cli`` (``python -m influence``).
"""

import warnings

# transformers imports tqdm.auto, which warns once in a notebook without ipywidgets (before a
# notebook can silence anything); its text progress bars work, so the warning is noise.
warnings.filterwarnings("ignore", message="IProgress not found")

from influence.baselines import bm25_scores, gradient_cosine_scores, repsim_scores
from influence.curvature import EKFAC, KFAC, fit_ekfac, fit_kfac
from influence.data import as_batches, batches_from_texts
from influence.ggn import GGN
from influence.gradients import Gradients, collect_grads, per_example_grads
from influence.io import load_scores, save_scores
from influence.models import load_model, load_tokenizer
from influence.modules import find_layers
from influence.multistage import (
    MultiStageConfig,
    multistage_scores,
    multistage_solvers,
    single_stage_scores,
)
from influence.scores import pairwise_scores, self_influence, token_scores, top_k
from influence.solvers import CG, DataInf, Exact, Identity, LiSSA, LowRank, relative_damping

__all__ = [
    "CG",
    "EKFAC",
    "GGN",
    "Gradients",
    "KFAC",
    "DataInf",
    "Exact",
    "Identity",
    "LiSSA",
    "LowRank",
    "MultiStageConfig",
    "as_batches",
    "batches_from_texts",
    "bm25_scores",
    "collect_grads",
    "find_layers",
    "gradient_cosine_scores",
    "load_model",
    "load_scores",
    "load_tokenizer",
    "fit_ekfac",
    "fit_kfac",
    "pairwise_scores",
    "multistage_scores",
    "multistage_solvers",
    "per_example_grads",
    "relative_damping",
    "repsim_scores",
    "save_scores",
    "self_influence",
    "single_stage_scores",
    "token_scores",
    "top_k",
]

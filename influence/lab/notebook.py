"""Notebook support: profiles, seeding, one figure helper, the results.json writer.

Every notebook starts with a `parameters` cell holding `PROFILE`; every size derives
from it through :func:`pick`. Figures and results go to ``figures/<notebook>/``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROFILES = ("smoke", "default", "paper")
ROOT = Path(__file__).resolve().parents[2]  # the repository root (editable install)
# Figures and results.json go to figures/, or to $INFLUENCE_FIGURES when set: the runner's --out
# and `make nbval` point it at a temporary folder, so that neither a smoke run nor a test run
# rewrites the committed default-profile figures (see figure_dir).
FIGURES_ENV = "INFLUENCE_FIGURES"
FIG_WIDTH = 6.4  # inches; every figure has this width so the gallery is uniform


def pick(profile: str, **sizes: Any) -> Any:
    """The value of `sizes[profile]`, e.g. ``pick(PROFILE, smoke=8, default=200, paper=2000)``."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    if profile not in sizes:
        raise ValueError(f"no size given for profile {profile!r} (given: {sorted(sizes)})")
    return sizes[profile]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def setup(profile: str, seed: int = 0) -> None:
    """Call once at the top of a notebook: seeds, quiet libraries, plot style."""
    pick(profile, smoke=None, default=None, paper=None)  # validates the name
    seed_everything(seed)
    # One thread: the same numbers on any machine, and no oversubscription when the two cores
    # are shared; the models are small enough that a second thread gains little.
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Outputs are the paper's appendix: no library chatter, no warnings in cells.
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    set_style()


def set_style() -> None:
    import matplotlib
    import seaborn as sns

    matplotlib.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "pdf.fonttype": 42})
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def figure_dir(notebook: str) -> Path:
    """``figures/<notebook>/`` (or ``$INFLUENCE_FIGURES/<notebook>/``), created on demand."""
    # Read at each call, not at import, so that a variable set after import (a test) is honoured.
    path = Path(os.environ.get(FIGURES_ENV) or ROOT / "figures") / notebook
    path.mkdir(parents=True, exist_ok=True)
    return path


def figure(height: float = 4.0, ncols: int = 1, nrows: int = 1, **kwargs):
    """A figure of the gallery's fixed width: ``fig, ax = figure()``."""
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(FIG_WIDTH, height), **kwargs)


def savefig(fig, notebook: str, name: str) -> Path:
    """Save `fig` as PNG and PDF under ``figures/<notebook>/<name>``; returns the PNG path."""
    out = figure_dir(notebook) / name
    if fig.get_layout_engine() is None:  # e.g. figure(layout="constrained") lays itself out
        fig.tight_layout()
    # Fixed metadata keeps committed PDFs byte-stable across runs.
    fig.savefig(out.with_suffix(".pdf"), metadata={"CreationDate": None, "ModDate": None})
    fig.savefig(out.with_suffix(".png"), metadata={"Software": None})
    return out.with_suffix(".png")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN; null says "not reached / undefined"
    return value


def write_results(notebook: str, results: dict[str, Any], profile: str, parameters: dict) -> Path:
    """Write ``figures/<notebook>/results.json`` atomically: headline numbers + profile + parameters."""
    payload = {"profile": profile, **_jsonable(results), "parameters": _jsonable(parameters)}
    path = figure_dir(notebook) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path

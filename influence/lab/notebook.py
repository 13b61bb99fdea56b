"""Notebook support: setup, one figure helper, the results.json writer.

Every notebook starts with a `parameters` cell holding `PROFILE`; every size derives
from it through :func:`pick` (``influence.lab.config``, re-exported here for notebooks). Figures
and results go to ``figures/<notebook>/``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influence.lab.config import FIGURES_ENV, ROOT, pick, seed_everything

__all__ = [  # for notebooks: the lab config they read, and the helpers here
    "FIGURES_ENV", "ROOT", "figure", "figure_dir", "pick", "savefig", "seed_everything", "setup",
    "write_results",
]  # fmt: skip
FIG_WIDTH = 6.4  # inches; every figure has this width so the gallery is uniform


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


def value_range(values, spec: str = ".2f") -> str:
    """The range of ``values`` as "lo-hi", formatted with ``spec``, or one value when both ends
    print alike (for findings printed from results)."""
    values = list(values)
    lo, hi = f"{min(values):{spec}}", f"{max(values):{spec}}"
    return lo if lo == hi else f"{lo}-{hi}"

"""Where the lab's files live, the profiles that size every experiment, and seeding.

One home for what the model zoo, the tokenizer, the retraining engine, the task generators and
the runner share, so that none of them imports the notebooks' plotting helper
(``influence.lab.notebook``, which re-exports ``pick`` and ``seed_everything`` for notebooks).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository root (editable install)
DATA_DIR = ROOT / "data"  # the generated task data, committed (``make data``)
CACHE_DIR = ROOT / ".cache"  # trained models, tokenizer, retrains, fitted factors
# Figures and results.json go to figures/, or to $INFLUENCE_FIGURES when set: the runner's --out
# and `make nbval` point it at a temporary folder, so that neither a smoke run nor a test run
# rewrites the committed default-profile figures (``notebook.figure_dir``).
FIGURES_ENV = "INFLUENCE_FIGURES"
PROFILES = ("smoke", "default", "paper")


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

"""Retraining ground truth: the zoo's fine-tuning recipe, re-run on subsets of a training set.

A retrain is named by (zoo model, subset, seed). It starts from the zoo model's base, takes the
zoo model's ``TrainConfig`` with ``seed`` replaced, and trains with the zoo's own loop
(``zoo._fit``) on the examples the subset keeps, in their original order. So the retrain of
the whole training set with the zoo's seed *is* the zoo model (a test checks the weights are
equal), and the recipe (steps, batch size, learning rate and schedule, clipping) is the same
for every subset: a smaller subset is seen for more epochs, as in Park et al.'s datamodels.

Seed policy: ``seed`` fixes what the zoo's seed fixes, the LoRA initialisation (full
fine-tuning starts from the base for every seed) and the order of the batches. Two retrains of
one subset with two seeds differ only by that training noise, which is what the noise ceiling
of :mod:`influence.lab.counterfactual` measures.

Cache: ``.cache/retrain/<zoo name>-<hash of base, TrainConfig, training data>/`` holds one
safetensors file per (subset, seed), ``<subset hash>-seed<k>.safetensors``, with the trained
weights (the trainable ones: LoRA adapters or every weight) and the run's steps, seconds and
final loss. Files are written atomically and their checksums verified on load
(``influence.io``): a crash loses at most the retrain in progress, and a rerun resumes.

Cost on this project's CPU (one core): a retrain costs what the zoo model cost, about 40 ms per
step at the default profile (90 steps for full fine-tuning, 500 for LoRA). Training several
subset models as one batched computation (``torch.func.stack_module_state`` + ``vmap``) was
measured 1.5-1.6x *slower* per model-step than this loop at widths 32-128 (the tiny models are
compute-bound on a CPU and vmap falls back to per-model loops for attention), so retrains run
one after the other and the budget is set by their number.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from influence.io import load_tensors, save_tensors
from influence.lab import zoo
from influence.lab.config import CACHE_DIR
from influence.lab.metrics import response_losses
from influence.lab.tokenizer import encode, texts_hash

CACHE = CACHE_DIR / "retrain"


def subset_hash(mask: np.ndarray) -> str:
    """A short name of a subset (a boolean mask over the training set)."""
    packed = np.packbits(np.asarray(mask, dtype=bool))
    return hashlib.sha256(packed.tobytes() + str(len(mask)).encode()).hexdigest()[:16]


class Retrainer:
    """Retrains of the zoo model ``gpt2-<task>-<mode>`` (at `profile`) on subsets of its
    training set; see the module docstring."""

    def __init__(
        self, task: str, mode: str, profile: str = "default", cache: Path | None = None,
        zoo_cache: Path | None = None,
    ):  # fmt: skip
        name = f"gpt2-{task}-{mode}"
        spec = zoo.specs(profile).get(name)
        if spec is None or spec.base is None:
            raise ValueError(f"no fine-tuned zoo model {name!r} at profile {profile!r}")
        self.task, self.mode, self.profile, self.name = task, mode, profile, name
        self.cfg = spec.train
        self.base = zoo.build(spec.base, profile, cache=Path(zoo_cache or zoo.CACHE))
        self.tokenizer = zoo.load_tokenizer(self.base)
        self.examples = zoo.task_examples(task)[: self.cfg.limit]
        shape = zoo.metadata(self.base)["model"]
        self.arch, max_len = shape["arch"], shape["max_len"]
        self.encoded = encode(self.tokenizer, self.examples, self.cfg.loss_on, max_len)
        data = texts_hash(json.dumps(ex, sort_keys=True) for ex in self.examples)
        key = zoo._hash(self.base.name, self.cfg.key(), data)
        self.folder = Path(cache or CACHE) / f"{name}-{key}"
        with zoo._quiet():
            self._base_model = AutoModelForCausalLM.from_pretrained(str(self.base))

    @property
    def n(self) -> int:
        """Size of the full training set."""
        return len(self.examples)

    def _check(self, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.shape != (self.n,) or mask.dtype != bool:
            raise ValueError(f"a subset is a boolean mask of shape ({self.n},), "
                             f"got {mask.dtype} {mask.shape}")  # fmt: skip
        if not mask.any():
            raise ValueError("the subset is empty")
        return mask

    def path(self, mask: np.ndarray, seed: int) -> Path:
        """The cache file of the retrain of `mask` with `seed` (it may not exist yet)."""
        return self.folder / f"{subset_hash(self._check(mask))}-seed{seed}.safetensors"

    def _fresh(self, seed: int):
        """The model before training, as ``zoo.finetune`` builds it for ``TrainConfig.seed``."""
        cfg = dataclasses.replace(self.cfg, seed=seed)
        return zoo.trainable_model(copy.deepcopy(self._base_model), cfg, self.arch)

    def train(self, mask: np.ndarray, seed: int) -> Path:
        """Retrain on the examples of `mask` with `seed` unless cached; returns the file."""
        path = self.path(mask, seed)
        if path.exists():
            return path
        model = self._fresh(seed)
        cfg = dataclasses.replace(self.cfg, seed=seed, checkpoints=())
        subset = [self.encoded[i] for i in np.flatnonzero(mask)]
        start = time.perf_counter()
        losses, _ = zoo._fit(model, subset, cfg, self.tokenizer.pad_token_id, desc=path.stem)
        weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        meta = dict(model=self.name, seed=seed, n=int(mask.sum()), steps=len(losses),
                    seconds=round(time.perf_counter() - start, 3), final_loss=losses[-1])  # fmt: skip
        save_tensors(path, weights, meta)
        return path

    def model(self, mask: np.ndarray | None = None, seed: int = 0):
        """The retrained model of `mask` (None: the whole training set) and `seed`, in eval
        mode; trained first unless cached."""
        mask = np.ones(self.n, bool) if mask is None else mask
        weights, _ = load_tensors(self.train(mask, seed))
        model = self._fresh(seed)
        missing = set(weights) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(
                f"{self.path(mask, seed).name} names unknown weights {sorted(missing)[:3]}"
            )
        model.load_state_dict(weights, strict=False)
        return model.eval()

    def losses(
        self, masks: np.ndarray, seed: int, queries: Sequence[dict], progress: bool = True
    ) -> np.ndarray:
        """(M, Q) summed response loss of each query under the retrain of each subset of
        `masks` (M, N) with `seed`: the measurement the attribution scores predict. Missing
        retrains are trained (and cached) first, with a line of progress every 10."""
        return self.measure(
            masks, seed, lambda model: response_losses(model, self.tokenizer, queries), progress
        )

    def measure(
        self, masks: np.ndarray, seed: int, fn: Callable[[Any], Any], progress: bool = True
    ) -> np.ndarray:
        """(M, Q) ``fn(model)`` (Q values, e.g. ``behaviour.margins``) of the retrain of each
        subset of `masks` (M, N) with `seed`; as ``losses``, which is ``fn`` = the losses."""
        masks = np.atleast_2d(masks)
        rows = []
        start = time.perf_counter()
        for m, mask in enumerate(masks):
            model = self.model(mask, seed)  # trained first unless cached
            with torch.no_grad():
                rows.append(np.asarray(fn(model), dtype=np.float64))
            if progress and ((m + 1) % 10 == 0 or m + 1 == len(masks)):
                print(f"retrain {self.name} seed {seed}: {m + 1}/{len(masks)} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        return np.stack(rows)

    def seconds(self, mask: np.ndarray, seed: int) -> float:
        """Training time recorded for a cached retrain."""
        return float(load_tensors(self.path(mask, seed))[1]["seconds"])

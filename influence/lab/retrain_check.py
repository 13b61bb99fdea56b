"""Retraining ground truth of the fact-override task (``factpoison``): remove the poison, retrain.

The zoo's ``gpt2-factpoison-<mode>`` learns a wrong city for each target person from the
poison examples. The check fine-tunes the same recipe (same base, TrainConfig, seed, steps) on
the same training set without the poison (``gpt2-factpoison-clean-<mode>``, cached next to the
base like every zoo model) and compares, per target test query, the margin

    margin = log p(" <true city>" + eos | prompt) - log p(" <poisoned city>" + eos | prompt)

(``metrics.response_losses`` of the two responses; the cities are single tokens) under the
poisoned and under the retrained model. The poison is the cause of the wrong answer when the
poisoned model's margin is negative and the retrained model's is positive ("flipped").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from influence.lab import metrics, zoo
from influence.lab.tasks import facts, load_task

TASK = "factpoison"
MODES = ("lora", "full")


def clean_name(mode: str) -> str:
    """The zoo-style name of the retrained model without the poison."""
    return f"gpt2-{TASK}-clean-{mode}"


def margins(model, tokenizer, queries: Sequence[dict]) -> list[float]:
    """log p(true city + eos | prompt) - log p(poisoned city + eos | prompt) per query (rows
    with ``prompt``, ``true`` and ``poisoned``); negative: the model prefers the poisoned city."""
    true = [{"prompt": q["prompt"], "response": " " + q["true"]} for q in queries]
    wrong = [{"prompt": q["prompt"], "response": " " + q["poisoned"]} for q in queries]
    gap = metrics.response_losses(model, tokenizer, wrong) - metrics.response_losses(
        model, tokenizer, true
    )
    return [float(x) for x in gap]


def model_paths(
    mode: str, profile: str = "default", seed: int = 0, cache: Path | None = None
) -> tuple[Path, Path]:
    """(poisoned, retrained-without-poison) model folders of `mode`, trained unless cached.

    Seed 0 with the default cache gives the zoo's own ``gpt2-factpoison-<mode>``; another seed
    retrains both with ``TrainConfig.seed`` changed (as ``benchmark.model_path`` does). The
    retraining set is the poisoned model's training set (``limit`` applied) minus its poison.
    """
    spec = zoo.specs(profile)[f"gpt2-{TASK}-{mode}"]
    cfg = dataclasses.replace(spec.train, seed=seed)
    base = zoo.build(spec.base, profile, cache=Path(cache or zoo.CACHE))
    poisoned = zoo.finetune(base, TASK, cfg, name=spec.name)
    clean = facts.without_poison(load_task(TASK, "train")[: cfg.limit])
    retrained = zoo.finetune(base, clean, cfg, name=clean_name(mode))
    return poisoned, retrained


def override_check(
    profile: str = "default",
    seed: int = 0,
    cache: Path | None = None,
    modes: Sequence[str] = MODES,
) -> dict[str, list[dict]]:
    """{mode: one row per target test query}: ``id``, ``entity``, ``label``, ``prompt``,
    ``true``, ``poisoned``, ``margin_poisoned`` (under ``gpt2-factpoison-<mode>``),
    ``margin_clean`` (under the model retrained without the poison) and ``flipped``
    (margin_poisoned < 0 < margin_clean). `cache`: the zoo folder (default ``zoo.CACHE``)."""
    queries = [q for q in load_task(TASK, "test") if q.get("poisoned")]
    out = {}
    for mode in modes:
        paths = model_paths(mode, profile, seed, cache)
        found = []
        for path in paths:
            model, tokenizer = zoo.load_model(path), zoo.load_tokenizer(path)
            found.append(margins(model, tokenizer, queries))
        out[mode] = [
            {
                "id": q["id"],
                "entity": q["entity"],
                "label": q["label"],
                "prompt": q["prompt"],
                "true": q["true"],
                "poisoned": q["poisoned"],
                "margin_poisoned": mp,
                "margin_clean": mc,
                "flipped": mp < 0 < mc,
            }
            for q, mp, mc in zip(queries, *found, strict=True)
        ]
    return out


def summarize(rows: Sequence[dict]) -> dict:
    """Means and counts of one mode's :func:`override_check` rows: ``n``, ``margin_poisoned``,
    ``margin_clean`` (means), ``poison_wins`` (queries whose poisoned model prefers the poisoned
    city), ``clean_restores`` (queries whose retrained model prefers the true one), ``flipped``."""
    n = len(rows)
    return {
        "n": n,
        "margin_poisoned": sum(r["margin_poisoned"] for r in rows) / max(1, n),
        "margin_clean": sum(r["margin_clean"] for r in rows) / max(1, n),
        "poison_wins": sum(r["margin_poisoned"] < 0 for r in rows),
        "clean_restores": sum(r["margin_clean"] > 0 for r in rows),
        "flipped": sum(r["flipped"] for r in rows),
    }

"""Seeded, offline task generators; their output is committed under ``data/``.

Paper B stand-ins (``TASKS``): each example is ``{"id", "prompt", "response", "label"}``
(+ optional keys such as ``base_id``, ``trigger``); the prompt ends with ``"\\nAnswer:"``
and the response starts with a space, so the training text is ``prompt + response + eos``.
The class of an example is its ``label``. ``EXTRA_TASKS`` are tasks added beyond paper B's
(``factpoison``: fact-override poisoning, :mod:`.facts`); they load, generate and get zoo
models like the others but stay out of ``TASKS``, whose texts define the tokenizer and the
pre-training corpus (so adding a task changes no existing model). Paper A's synthetic knowledge base is
:func:`load_knowledge`. Regenerate everything with ``python -m influence.lab.tasks``;
every generator uses only its own ``random.Random``, so reruns are byte-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from influence.lab.config import DATA_DIR

from . import classes, facts, knowledge, safety
from .common import read_jsonl, write_jsonl

TASKS: tuple[str, ...] = (
    "mixeds", "mixedm", "mixedl", "emotion", "grammars_transform", "grammars_rule",
    "math_reasoning", "math_direct", "backdoor", "multibackdoor",
)  # fmt: skip
# Tasks beyond paper B's: registered like TASKS (load, generate, write_all, zoo models), but not
# part of the tokenizer's texts or the pre-training corpus, which iterate TASKS.
EXTRA_TASKS: tuple[str, ...] = ("factpoison",)
ALL_TASKS: tuple[str, ...] = TASKS + EXTRA_TASKS
SPLITS = ("train", "test")
GENERATORS: dict[str, Callable[..., dict[str, list[dict]]]] = {
    "mixeds": safety.mixeds,
    "mixedm": safety.mixedm,
    "mixedl": safety.mixedl,
    "emotion": classes.emotion,
    "grammars_transform": classes.grammars_transform,
    "grammars_rule": classes.grammars_rule,
    "math_reasoning": classes.math_reasoning,
    "math_direct": classes.math_direct,
    "backdoor": safety.backdoor,
    "multibackdoor": safety.multibackdoor,
    "factpoison": facts.factpoison,
}
KNOWLEDGE_PARTS = knowledge.PARTS  # entities, facts, pretrain, finetune, test


def _check_task(name: str) -> None:
    if name not in ALL_TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {ALL_TASKS}")


def generate(name: str, seed: int = 0, **sizes: int) -> dict[str, list[dict]]:
    """Split -> examples of task `name`; `sizes` override the paper's defaults."""
    _check_task(name)
    return GENERATORS[name](seed=seed, **sizes)


def write_all(out_dir: Path = DATA_DIR, seed: int = 0) -> list[Path]:
    """Write every task's train/test JSONL and the knowledge base under `out_dir`."""
    out_dir = Path(out_dir)
    written = []
    for name in ALL_TASKS:
        for split, rows in generate(name, seed).items():
            written.append(out_dir / name / f"{split}.jsonl")
            write_jsonl(written[-1], rows)
    for part, rows in knowledge.generate_knowledge(seed).items():
        written.append(out_dir / "knowledge" / f"{part}.jsonl")
        write_jsonl(written[-1], rows)
    return written


def load_task(name: str, split: str, data_dir: Path = DATA_DIR) -> list[dict]:
    """Examples of `data/<name>/<split>.jsonl` (split "train" or "test")."""
    _check_task(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return read_jsonl(Path(data_dir) / name / f"{split}.jsonl")


def load_knowledge(data_dir: Path = DATA_DIR) -> dict[str, list[dict]]:
    """Paper A's knowledge base: {entities, facts, pretrain, finetune, test} -> rows."""
    return {p: read_jsonl(Path(data_dir) / "knowledge" / f"{p}.jsonl") for p in KNOWLEDGE_PARTS}


def task_examples(task: str, split: str = "train") -> list[dict]:
    """The fine-tuning examples of a task: a paper-B (or added) task's split, or paper A's
    knowledge QA pairs (``task="knowledge"``: "train" is the fine-tuning set)."""
    if task == "knowledge":
        return load_knowledge()["finetune" if split == "train" else split]
    return load_task(task, split)


__all__ = [
    "TASKS",
    "EXTRA_TASKS",
    "ALL_TASKS",
    "generate",
    "write_all",
    "load_task",
    "load_knowledge",
    "task_examples",
    "DATA_DIR",
]

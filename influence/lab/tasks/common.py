"""Shared helpers of the task generators: size checks, unique sampling, JSONL files."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

ANSWER = "\nAnswer:"  # every prompt ends with this; every response starts with a space


def check_size(name: str, value: int, minimum: int = 1) -> None:
    """Raise ValueError unless `value` is an int >= `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} is not possible; expected an integer >= {minimum}")


def unique_draws(
    rng: random.Random, draw: Callable[[random.Random], dict], n: int, what: str, key: str
) -> list[dict]:
    """`n` draws of `draw(rng)` whose `key` values are pairwise distinct.

    Raises ValueError when the templates cannot produce `n` distinct items, detected as
    2,000 draws in a row without a new item (the generators' spaces are large enough
    that this never happens before the space is nearly exhausted).
    """
    seen: set[str] = set()
    out: list[dict] = []
    misses = 0
    while len(out) < n:
        item = draw(rng)
        if item[key] in seen:
            misses += 1
            if misses == 2000:
                raise ValueError(
                    f"asked for {n} distinct {what} but the templates produce only about "
                    f"{len(out)}; lower the size"
                )
            continue
        misses = 0
        seen.add(item[key])
        out.append(item)
    return out


def qa(prompt: str, response: str) -> tuple[str, str]:
    """Prompt with the answer separator and response with its leading space."""
    return prompt + ANSWER, " " + response


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One `json.dumps(row, sort_keys=True, ensure_ascii=False)` per line, "\\n" line ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes(text.encode("utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a missing file says how to generate it."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; generate the data with `python -m influence.lab.tasks`"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

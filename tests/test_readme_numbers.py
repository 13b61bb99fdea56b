"""The README's "Expected numbers" table, checked against the committed figures/*/results.json.

Anchors. In a Headline cell every number is followed (after an optional unit %, x, k or M)
by an HTML comment, which does not show when the Markdown renders:

    0.41<!-- 01_ihvp_accuracy: spearman_vs_exact.DataInf -->
    10,600<!-- 01_ihvp_accuracy: ["products_to_0.95", "LiSSA"] -->
    48%<!-- 12_your_model: metrics.EK-FAC.accuracy x100 -->
    3<!-- 07_convergence: parameters.seeds len --> seeds

- `NOTEBOOK: PATH [TRANSFORM ...]` reads figures/NOTEBOOK/results.json. PATH is dotted
  (`a.b.0.c`: integer segments index lists, -1 is the last item, no spaces) or, for keys
  with dots or spaces, a JSON list (`["a", "b.c", 0]`). TRANSFORMs apply left to right:
  `xF` multiplies by F (`x100`, `x1e-3`), `len` takes the length.
- The README's digits set the precision: the value must round to the written number
  (".77": two decimals; "48%" with x100: none; "1e4": the mantissa's); an exact tie
  accepts both roundings. A range "0.47-0.68" anchors each end.
- Numbers that are not results: `<!-- setting -->` (a parameter of the experiment) and
  `<!-- paper -->` (quoted from a paper). `<!-- unanchored: reason -->` marks a result with
  no counterpart in results.json: a known gap, reported as a warning.
- Digits inside a name or formula are not numbers: BM25, Recall@10, (H + lambda I)^-1.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ESCAPES = {"setting", "paper"}
TOKEN = re.compile(
    r"<!--(?P<stray>.*?)-->"  # a comment that follows no number
    r"|(?<![\w@.])(?<!\^-)"  # not inside a name (BM25, Recall@10) or (...)^-1
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e-?\d+)?|\.\d+)"
    r"[%xkM]?(?:<!--(?P<note>.*?)-->)?"
)


class UnanchoredNumber(UserWarning):
    """A README number whose source is not in results.json."""


def headline_cells(readme: str) -> list[tuple[str, str]]:
    """(notebook, Headline cell) for each row of the Expected-numbers table."""
    section = readme.split("\n## Expected numbers", 1)[1]
    rows = re.search(r"^\|.*(?:\n\|.*)*", section, re.M)[0].splitlines()  # the first table
    table = [re.split(r"(?<!\\)\|", s)[1:-1] for s in rows]
    col = [c.strip() for c in table[0]].index("Headline")
    return [(row[0].strip(), row[col].strip()) for row in table[2:]]


def judge(num: str, note: str, load: Callable[[str], object]) -> tuple[str, str] | None:
    """None if the written `num` agrees with its comment `note`, else (kind, message)."""
    if note in ESCAPES:
        return None
    notebook, colon, spec = (s.strip() for s in note.partition(":"))
    if notebook == "unanchored":
        return "gap", f"{num}: {spec}"
    try:
        if not colon:
            raise ValueError("expected NOTEBOOK: PATH, setting, paper or unanchored: reason")
        if spec.startswith("["):
            path, end = json.JSONDecoder().raw_decode(spec)
            transforms = spec[end:].split()
        else:
            dotted, *transforms = spec.split()
            path = dotted.split(".")
        value = load(notebook)
        for key in path:
            value = value[int(key)] if isinstance(value, list) else value[str(key)]
        for t in transforms:
            if t != "len" and not t.startswith("x"):
                raise ValueError(f"unknown transform {t!r}")
            value = len(value) if t == "len" else value * float(t[1:])
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{value!r} is not a number")
    except (OSError, LookupError, ValueError, TypeError) as e:
        return "error", f"{num}<!-- {note} -->: {type(e).__name__}: {e}"
    mantissa, _, exponent = num.replace(",", "").partition("e")
    tolerance = 0.5 * 10 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))
    if not abs(value - float(num.replace(",", ""))) <= tolerance * (1 + 1e-9):  # NaN fails
        return "mismatch", f"README says {num}, {notebook}: {spec} is {value!r} (±{tolerance:g})"
    return None


def check(cells: list[tuple[str, str]], load: Callable[[str], object]) -> list[tuple[str, str]]:
    """(kind, message) for every problem; kind: mismatch, error, missing or gap."""
    found = []
    for row, cell in cells:
        for m in TOKEN.finditer(cell):
            if m["num"] is None:
                found.append(("error", f"{row}: comment after no number: {m[0]}"))
            elif m["note"] is None:
                found.append(("missing", f"{row}: {m['num']} has no anchor or escape"))
            elif problem := judge(m["num"], m["note"].strip(), load):
                found.append((problem[0], f"{row}: {problem[1]}"))
    return found


@cache
def results(notebook: str) -> object:
    return json.loads((ROOT / "figures" / notebook / "results.json").read_text())


@cache
def findings() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    cells = headline_cells((ROOT / "README.md").read_text(encoding="utf-8"))
    return cells, check(cells, results)


def of_kind(*kinds: str) -> list[str]:
    return [message for kind, message in findings()[1] if kind in kinds]


def test_readme_numbers_match_results():
    notebooks = {p.parent.name for p in (ROOT / "figures").glob("*/results.json")}
    assert {row for row, _ in findings()[0]} == notebooks, "one table row per results.json"
    assert not of_kind("mismatch", "error"), "\n".join(of_kind("mismatch", "error"))


def test_every_readme_number_is_anchored():
    assert not of_kind("missing"), "\n".join(of_kind("missing"))
    if gaps := of_kind("gap"):
        warnings.warn(
            "\n".join([f"{len(gaps)} unanchored:", *gaps]), UnanchoredNumber, stacklevel=1
        )


def test_checker_reports_wrong_and_unanchored_numbers():
    data = {"nb": {"acc": [0.5, 0.123], "k.v": 0.475}}
    cell = (
        '0.12<!-- nb: acc.1 --> 50%<!-- nb: acc.0 x100 --> 0.48<!-- nb: ["k.v"] --> '
        "2<!-- nb: acc len --> 9<!-- setting --> Recall@10 (H)^-1 "
        "0.13<!-- nb: acc.1 --> 7 items, 1<!-- unanchored: printed only --> "
        "4<!-- nb: acc.5 --> <!-- nb: acc.0 -->"
    )
    found = check([("row", cell)], data.__getitem__)
    assert [kind for kind, _ in found] == ["mismatch", "missing", "gap", "error", "error"]
    assert found[0][1] == "row: README says 0.13, nb: acc.1 is 0.123 (±0.005)"
    assert "IndexError" in found[3][1]

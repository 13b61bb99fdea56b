"""nbval's schedule: the longest notebooks first, so that two workers finish together.

`make nbval` runs nbval under pytest-xdist (``--dist loadfile --no-loadscope-reorder``), which
hands each worker the next notebook in collection order. Collected by name, the longest
notebook (04) started about halfway through and set the run's end; longest-first is the classic
greedy schedule (LPT) whose makespan is within 4/3 of the best. The order is by kernel minutes
measured at the default profile (README's gallery); notebooks not listed run last, by name.
"""

from __future__ import annotations

LONGEST_FIRST = ("04", "05", "11", "03", "00", "09", "01", "02", "08", "06", "07", "10", "12")


def _rank(item) -> tuple[int, str]:
    name = item.path.name
    ranks = [i for i, prefix in enumerate(LONGEST_FIRST) if name.startswith(prefix + "_")]
    return (ranks[0] if ranks else len(LONGEST_FIRST), name)


def pytest_collection_modifyitems(items):
    # A stable sort by notebook keeps each notebook's cells in their order.
    items.sort(key=_rank)

"""nbval's schedule and kernel start.

Schedule: the longest notebooks first, so that two workers finish together. `make nbval` runs
nbval under pytest-xdist (``--dist loadfile --no-loadscope-reorder``), which hands each worker
the next notebook in collection order. Collected by name, the longest notebook (04) started
about halfway through and set the run's end; longest-first is the classic greedy schedule (LPT)
whose makespan is within 4/3 of the best. The order is by kernel minutes measured at the default
profile (README's gallery); notebooks not listed run last, by name.

A summary at the end of the run gives the minutes of each notebook.

Kernel start: a kernel that dies before it answers is started again (at most ``ATTEMPTS`` times
in all), and its stderr is reported instead of discarded. In CI one kernel (05's, started at the
same moment as 04's) died before replying to kernel_info and failed all 16 of 05's cells without
a cause, since nbval sends the kernel's stderr to /dev/null; a kernel that never started has run
no cell, so starting it again changes no result.
"""

from __future__ import annotations

import tempfile
import warnings

import nbval.kernel

LONGEST_FIRST = ("04", "05", "11", "03", "00", "09", "01", "02", "08", "06", "07", "10", "12")
ATTEMPTS = 3


def _rank(item) -> tuple[int, str]:
    name = item.path.name
    ranks = [i for i, prefix in enumerate(LONGEST_FIRST) if name.startswith(prefix + "_")]
    return (ranks[0] if ranks else len(LONGEST_FIRST), name)


def pytest_collection_modifyitems(items):
    # A stable sort by notebook keeps each notebook's cells in their order.
    items.sort(key=_rank)


_seconds: dict[str, float] = {}  # notebook -> seconds of its cells (kernel start included)


def pytest_runtest_logreport(report):
    notebook = report.nodeid.split("::")[0].rsplit("/", 1)[-1]
    _seconds[notebook] = _seconds.get(notebook, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Minutes per notebook, longest first: what to reorder or speed up when the run is long."""
    if _seconds:
        terminalreporter.section("minutes per notebook")
        for notebook, seconds in sorted(_seconds.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds / 60:6.1f}  {notebook}")


_start_new_kernel = nbval.kernel.start_new_kernel


def start_new_kernel(*args, **kwargs):
    """nbval's ``start_new_kernel``, retried when the kernel dies or does not answer in time."""
    discarded = kwargs.pop("stderr", None)  # nbval's /dev/null
    if discarded is not None:
        discarded.close()
    for attempt in range(1, ATTEMPTS + 1):
        log = tempfile.TemporaryFile()  # the kernel's stderr; unlinked, gone once closed
        kwargs["stderr"] = log
        try:
            return _start_new_kernel(*args, **kwargs)
        except RuntimeError as error:
            log.seek(0)
            stderr = log.read()[-3000:].decode(errors="replace") or "(empty)"
            log.close()
            if attempt == ATTEMPTS:
                raise RuntimeError(
                    f"{error} ({attempt} attempts); its stderr:\n{stderr}"
                ) from error
            warnings.warn(
                f"kernel start {attempt} of {ATTEMPTS} failed: {error}; stderr:\n{stderr}",
                stacklevel=2,
            )


nbval.kernel.start_new_kernel = start_new_kernel

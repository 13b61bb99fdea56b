"""nbval's schedule and kernel start.

Schedule: the longest notebooks first, so that two workers finish together. `make nbval` runs
nbval under pytest-xdist (``--dist loadfile --no-loadscope-reorder``), which hands each worker
the next notebook in collection order. Collected by name, the longest notebook (04) started
about halfway through and set the run's end; longest-first is the classic greedy schedule (LPT)
whose makespan is within 4/3 of the best. The order is by kernel minutes measured at the default
profile (README's gallery); notebooks not listed run last, by name.

A summary at the end of the run gives the minutes and the kernel's peak memory of each notebook
(VmHWM of the kernel process, read after each cell), and the run fails when a kernel went above
``KERNEL_LIMIT_MIB``: the project's bound for a notebook at the default profile, which nothing
else would notice (``make test`` runs two kernels at once on a 24 GB machine).

Kernel start: a kernel that dies before it answers is started again (at most ``ATTEMPTS`` times
in all), and its stderr is reported instead of discarded. In CI one kernel (05's, started at the
same moment as 04's) died before replying to kernel_info and failed all 16 of 05's cells without
a cause, since nbval sends the kernel's stderr to /dev/null; a kernel that never started has run
no cell, so starting it again changes no result.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import nbval.kernel
import pytest

LONGEST_FIRST = ("04", "05", "11", "03", "00", "09", "01", "02", "08", "06", "07", "10", "12")
ATTEMPTS = 3
KERNEL_LIMIT_MIB = 4096


def _rank(item) -> tuple[int, str]:
    name = item.path.name
    ranks = [i for i, prefix in enumerate(LONGEST_FIRST) if name.startswith(prefix + "_")]
    return (ranks[0] if ranks else len(LONGEST_FIRST), name)


def pytest_collection_modifyitems(items):
    # A stable sort by notebook keeps each notebook's cells in their order.
    items.sort(key=_rank)


_seconds: dict[str, float] = {}  # notebook -> seconds of its cells (kernel start included)
_peak_mib: dict[str, float] = {}  # notebook -> its kernel's peak resident memory


def _kernel_peak_mib(item) -> float | None:
    """VmHWM of the kernel running ``item``'s notebook, or None where it cannot be read."""
    try:
        pid = item.parent.kernel.km.provisioner.process.pid
        status = Path(f"/proc/{pid}/status").read_text()
    except (AttributeError, OSError):  # no kernel (yet, or any more), or not Linux
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call" and (peak := _kernel_peak_mib(item)) is not None:
        # user_properties travel with the report from an xdist worker to the controller
        outcome.get_result().user_properties.append(("kernel_peak_mib", peak))


def pytest_runtest_logreport(report):
    notebook = report.nodeid.split("::")[0].rsplit("/", 1)[-1]
    _seconds[notebook] = _seconds.get(notebook, 0.0) + report.duration
    for key, value in report.user_properties:
        if key == "kernel_peak_mib":
            _peak_mib[notebook] = max(_peak_mib.get(notebook, 0.0), value)


def _over_limit() -> dict[str, float]:
    return {nb: mib for nb, mib in _peak_mib.items() if mib > KERNEL_LIMIT_MIB}


def pytest_sessionfinish(session, exitstatus):
    if _over_limit() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    """Minutes and kernel memory per notebook, longest first: what to reorder, speed up or slim."""
    if _seconds:
        terminalreporter.section("minutes and kernel peak memory per notebook")
        for notebook, seconds in sorted(_seconds.items(), key=lambda kv: -kv[1]):
            peak = _peak_mib.get(notebook)
            memory = "   ?   " if peak is None else f"{peak / 1024:5.2f} GB"
            terminalreporter.write_line(f"{seconds / 60:6.1f} min  {memory}  {notebook}")
    for notebook, mib in _over_limit().items():
        terminalreporter.write_line(
            f"FAILED: {notebook}'s kernel peaked at {mib:,.0f} MiB, above the "
            f"{KERNEL_LIMIT_MIB:,} MiB allowed at the default profile",
            red=True,
        )


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

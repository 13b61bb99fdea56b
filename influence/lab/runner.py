"""Execute the notebooks with papermill: ``python -m influence.lab.runner [NAMES] --profile default``.

NAMES are prefixes of the numbered notebooks (``02``, ``02_scalability``) or paths of other
``.ipynb`` files; none means every numbered notebook. In place by default: the executed
notebooks are committed, figures/ and results.json are regenerated. ``--out DIR`` writes the
executed copies under DIR and figures and results.json under DIR/figures instead (``make smoke``).

A failure stops the run: no further notebook is started, and the runner exits non-zero naming
the notebook, the failing cell (its index in the notebook file, counted from 0, and its first
line) and the exception's last line (``ValueError: message``; the message's first line if it
has several). With ``--jobs 2`` a notebook already running when the other
one fails is left to finish (papermill cannot interrupt a kernel from another thread) and its
result is kept. In place, a notebook is executed into a temporary copy that replaces it only on
success: a failure leaves the committed notebook untouched, and the message names the copy that
holds the full traceback.

Progress, when stdout is a terminal: a line when each notebook starts and finishes, stamped with
the run's clock (they stay readable when two notebooks interleave), and papermill's cell progress
bar when one notebook runs at a time. When stdout is not a terminal (a log, CI) only the final
line is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO
from unittest import mock

from jupyter_client import AsyncKernelManager

from influence.lab.config import FIGURES_ENV, PROFILES, ROOT

NOTEBOOKS = ROOT / "notebooks"
# Lines the kernel's IPKernelApp logs to the kernel process's own stderr, which is ours, so that no
# logger or warnings filter of this process can reach them; QuietKernelManager drops them.
KERNEL_NOISE = (
    # At start-up (ipykernel/kernelapp.py, init_sockets): the kernel listens on localhost TCP
    # without CurveZMQ keys, for the lifetime of one notebook.
    b"Kernel is running over TCP without encryption",
    # At shutdown, sometimes: jupyter_client interrupts the kernel before asking it to stop
    # (KernelManager.shutdown_kernel). A user's Ctrl-C never reaches a kernel (each runs in its
    # own session), and a cell timeout fails the notebook with its own message.
    b"KeyboardInterrupt caught in kernel",
)


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names it, the cell, the exception and the executed copy."""


def notebooks(names: list[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order, or those whose name starts with one of
    `names`, followed by the `names` that are paths of existing ``.ipynb`` files."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return found
    paths = [Path(n).resolve() for n in names if n.endswith(".ipynb") and Path(n).is_file()]
    prefixes = [n for n in names if not (n.endswith(".ipynb") and Path(n).is_file())]
    unmatched = [n for n in prefixes if not any(p.stem.startswith(n) or p.name == n for p in found)]
    if unmatched:
        raise SystemExit(
            f"no notebook matches {unmatched}; have {[p.name for p in found]} "
            "(or pass the path of an existing .ipynb file)"
        )
    return [p for p in found if any(p.stem.startswith(n) or p.name == n for n in prefixes)] + paths


class QuietKernelManager(AsyncKernelManager):
    """The kernel manager papermill starts kernels with: the kernel's stderr is relayed to ours
    without the KERNEL_NOISE lines."""

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw) -> None:
        kw["stderr"] = subprocess.PIPE
        await super()._async_launch_kernel(kernel_cmd, **kw)
        pipe = self.provisioner.process.stderr
        threading.Thread(target=_relay, args=(pipe, sys.stderr), daemon=True).start()


def _relay(pipe: IO[bytes], stream: IO[str]) -> None:
    """Copy `pipe` to `stream` line by line, except KERNEL_NOISE lines; returns at EOF (the
    kernel exited)."""
    with pipe:
        for line in pipe:
            if not any(noise in line for noise in KERNEL_NOISE):
                stream.write(line.decode(errors="replace"))
                stream.flush()


def _tidy(path: Path) -> None:
    """papermill records absolute input/output paths (keep only the names) and injects a
    parameters cell ending in a blank line (strip it, so that ``ruff format`` stays clean)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if key in meta:
            meta[key] = Path(meta[key]).name
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.source = cell.source.rstrip()
    nbformat.write(nb, path)


def _source_index(path: Path, executed_index: int) -> int:
    """The index in the notebook file `path` of cell `executed_index` of its executed copy:
    papermill inserts an injected-parameters cell after the `parameters` cell (or first) unless
    the notebook already has one, which it then replaces."""
    import nbformat

    tags = [cell.metadata.get("tags", []) for cell in nbformat.read(path, as_version=4).cells]
    if any("injected-parameters" in t for t in tags):
        return executed_index
    injected = next((i + 1 for i, t in enumerate(tags) if "parameters" in t), 0)
    return executed_index - (executed_index > injected)


def _describe(path: Path, error, executed: Path) -> str:
    """One notebook's failure, from papermill's PapermillExecutionError."""
    first = next((line.strip() for line in error.source.splitlines() if line.strip()), "")
    if len(first) > 80:
        first = first[:77] + "..."
    evalue = (error.evalue or "").strip().splitlines()
    last = f"{error.ename}: {evalue[0]}" if evalue else error.ename
    index = _source_index(path, error.cell_index)
    return (
        f"{path.name} failed in cell {index} (In [{error.exec_count}]): {first}\n"
        f"    {last}\n"
        f"    full traceback in {executed}"
    )


def _execute(path: Path, target: Path, profile: str, progress: bool) -> float:
    """Execute `path` with papermill into `target`; returns its wall time in seconds. When
    `target` is `path` (in place), into a temporary copy first that replaces `path` on success."""
    start = time.perf_counter()
    import papermill
    from papermill.exceptions import PapermillExecutionError

    executed = target
    if target.resolve() == path.resolve():
        executed = Path(tempfile.mkdtemp(prefix="influence-runner-")) / path.name
    try:
        papermill.execute_notebook(
            str(path),
            str(executed),
            parameters={"PROFILE": profile},
            kernel_name="python3",
            cwd=str(path.parent),
            progress_bar=progress,
            log_output=False,
            kernel_manager_class=QuietKernelManager,
        )
    except PapermillExecutionError as error:
        raise NotebookFailed(_describe(path, error, executed)) from None
    except Exception as error:  # the kernel died, it did not start, ...
        message = f"{path.name} failed: {type(error).__name__}: {error}"
        raise NotebookFailed(f"{message}\n    executed copy in {executed}") from error
    _tidy(executed)
    if executed != target:
        shutil.move(executed, target)
        executed.parent.rmdir()
    return time.perf_counter() - start


def run(
    paths: list[Path],
    profile: str,
    out: Path | None,
    jobs: int = 1,
    progress: bool | None = None,
) -> list[tuple[str, float]]:
    """Execute `paths`, `jobs` at a time (each kernel computes on one thread, so one job per
    core; the zoo's cache is safe when two notebooks train the same model); returns
    ``(name, seconds)`` in the order of `paths`. `progress`: start/finish lines (default: when
    stdout is a terminal). Raises NotebookFailed at the first failure (see the module's doc)."""
    if out is not None and out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is an existing file; pass a folder (created if missing)")
    if progress is None:
        progress = sys.stdout.isatty()
    bar = progress and min(jobs, len(paths)) == 1 and sys.stderr.isatty()
    env = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        env[FIGURES_ENV] = str(out.resolve() / "figures")  # inherited by the kernels
    start, failed, lock = time.perf_counter(), threading.Event(), threading.Lock()

    def say(message: str) -> None:
        if progress:
            minutes, seconds = divmod(int(time.perf_counter() - start), 60)
            with lock:
                print(f"{minutes:3d}:{seconds:02d}  {message}", flush=True)

    def one(i: int, path: Path) -> tuple[str, float] | None:
        if failed.is_set():
            return None  # not started: an earlier notebook failed
        say(f"{path.name}  started ({i}/{len(paths)}, profile {profile})")
        began = time.perf_counter()
        try:
            seconds = _execute(path, path if out is None else out / path.name, profile, bar)
        except BaseException:
            failed.set()
            say(f"{path.name}  FAILED after {time.perf_counter() - began:.0f} s")
            raise
        say(f"{path.name}  done in {seconds:.0f} s")
        return path.name, seconds

    with mock.patch.dict(os.environ, env), ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, i, path) for i, path in enumerate(paths, 1)]
        try:
            pool.shutdown(wait=True)
        except KeyboardInterrupt:  # Ctrl-C: start no further notebook (running kernels finish)
            failed.set()
            raise
    errors = [f.exception() for f in futures if f.exception() is not None]
    for error in errors:
        if not isinstance(error, NotebookFailed):
            raise error  # a bug of the runner, not a notebook's failure: keep its traceback
    if errors:
        lines = [str(error) for error in errors]
        skipped = [
            p for p, f in zip(paths, futures, strict=True) if not f.exception() and not f.result()
        ]
        if skipped:
            names = ", ".join(p.name for p in skipped)
            lines.append(f"not started (the run stops at the first failure): {names}")
        raise NotebookFailed("\n".join(lines))
    return [f.result() for f in futures]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook prefixes or .ipynb paths (default: all)")
    parser.add_argument("--profile", default="default", choices=PROFILES)
    parser.add_argument("--out", type=Path, default=None, help="write executed copies here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="notebooks executed at once (default: 2, or 1 on one core)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs={args.jobs}; expected >= 1")
    start, paths = time.perf_counter(), notebooks(args.names)
    try:
        timings = run(paths, args.profile, args.out, args.jobs)
    except NotebookFailed as error:
        raise SystemExit(str(error)) from None
    print(f"all {len(timings)} notebooks done in {(time.perf_counter() - start) / 60:.1f} min "
          f"({sum(s for _, s in timings) / 60:.1f} min of notebook time, "
          f"{min(args.jobs, len(paths))} at once)")  # fmt: skip


if __name__ == "__main__":
    main()

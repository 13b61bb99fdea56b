"""Execute the notebooks with papermill: ``python -m influence.lab.runner --profile default``.

In place by default (the executed notebooks are committed, figures/ and results.json are
regenerated); ``--out DIR`` writes the executed copies, figures and results.json under DIR instead (used
by ``make smoke``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from influence.lab.notebook import PROFILES, ROOT

NOTEBOOKS = ROOT / "notebooks"


def notebooks(names: list[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``), in order, optionally filtered by prefix."""
    found = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return found
    chosen = [p for p in found if any(p.stem.startswith(n) or p.name == n for n in names)]
    if not chosen:
        raise SystemExit(f"no notebook matches {names}; have {[p.name for p in found]}")
    return chosen


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


def _execute(path: Path, target: Path, profile: str, progress: bool) -> float:
    """Execute one notebook with papermill into `target`; returns its wall time in seconds."""
    import papermill

    start = time.perf_counter()
    papermill.execute_notebook(
        str(path),
        str(target),
        parameters={"PROFILE": profile},
        kernel_name="python3",
        cwd=str(NOTEBOOKS),
        progress_bar=progress,
        log_output=False,
    )
    _tidy(target)
    return time.perf_counter() - start


def run(
    paths: list[Path], profile: str, out: Path | None, jobs: int = 1
) -> list[tuple[str, float]]:
    """Execute `paths`, `jobs` at a time (each kernel computes on one thread, so one job per
    core; the zoo's cache is safe when two notebooks train the same model)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        os.environ["INFLUENCE_FIGURES"] = str(out.resolve() / "figures")  # inherited by kernels
    progress = jobs == 1 and sys.stderr.isatty()

    def one(item: tuple[int, Path]) -> tuple[str, float]:
        i, path = item
        print(f"[{i}/{len(paths)}] {path.name}  profile={profile}", flush=True)
        seconds = _execute(path, path if out is None else out / path.name, profile, progress)
        print(f"      {path.name} done in {seconds:.0f} s", flush=True)
        return path.name, seconds

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, enumerate(paths, 1)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names or prefixes (default: all)")
    parser.add_argument("--profile", default="default", choices=PROFILES)
    parser.add_argument("--out", type=Path, default=None, help="write executed copies here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="notebooks executed at once (default: 2, or 1 on one core)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs={args.jobs}; expected >= 1")
    start = time.perf_counter()
    timings = run(notebooks(args.names), args.profile, args.out, args.jobs)
    print(f"all {len(timings)} notebooks done in {(time.perf_counter() - start) / 60:.1f} min "
          f"({sum(s for _, s in timings) / 60:.1f} min of notebook time, {args.jobs} at once)")  # fmt: skip


if __name__ == "__main__":
    main()

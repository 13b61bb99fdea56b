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


def run(paths: list[Path], profile: str, out: Path | None) -> list[tuple[str, float]]:
    import papermill

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        os.environ["INFLUENCE_FIGURES"] = str(out.resolve() / "figures")  # inherited by kernels
    timings = []
    for i, path in enumerate(paths, 1):
        target = path if out is None else out / path.name
        print(f"[{i}/{len(paths)}] {path.name}  profile={profile}", flush=True)
        start = time.perf_counter()
        papermill.execute_notebook(
            str(path),
            str(target),
            parameters={"PROFILE": profile},
            kernel_name="python3",
            cwd=str(NOTEBOOKS),
            progress_bar=sys.stderr.isatty(),
            log_output=False,
        )
        seconds = time.perf_counter() - start
        _tidy(target)
        timings.append((path.name, seconds))
        print(f"      done in {seconds:.0f} s", flush=True)
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names or prefixes (default: all)")
    parser.add_argument("--profile", default="default", choices=PROFILES)
    parser.add_argument("--out", type=Path, default=None, help="write executed copies here")
    args = parser.parse_args(argv)
    timings = run(notebooks(args.names), args.profile, args.out)
    total = sum(s for _, s in timings)
    print(f"all {len(timings)} notebooks done in {total / 60:.1f} min")


if __name__ == "__main__":
    main()

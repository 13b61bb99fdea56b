"""The notebook runner: selection by prefix, parallel execution, timings in notebook order."""

import threading
import time

import pytest

from influence.lab import runner


def test_notebooks_are_selected_by_prefix():
    every = runner.notebooks()
    assert [p.name[:2] for p in every] == sorted(p.name[:2] for p in every)
    assert [p.name[:2] for p in runner.notebooks(["03", "07"])] == ["03", "07"]
    with pytest.raises(SystemExit, match="no notebook matches"):
        runner.notebooks(["99"])


def test_jobs_run_notebooks_at_once_and_keep_their_order(monkeypatch, tmp_path):
    running, peak, lock = set(), [0], threading.Lock()

    def fake_execute(path, target, profile, progress):
        with lock:
            running.add(path.name)
            peak[0] = max(peak[0], len(running))
        time.sleep(0.05 if path.name.startswith("a") else 0.01)
        with lock:
            running.discard(path.name)
        assert not progress  # no progress bars when notebooks run side by side
        return 1.0

    monkeypatch.setattr(runner, "_execute", fake_execute)
    paths = [tmp_path / f"{c}.ipynb" for c in "abcd"]
    timings = runner.run(paths, "smoke", None, jobs=2)
    assert [name for name, _ in timings] == ["a.ipynb", "b.ipynb", "c.ipynb", "d.ipynb"]
    assert peak[0] == 2
    with pytest.raises(SystemExit, match="jobs"):
        runner.main(["00", "--jobs", "0"])

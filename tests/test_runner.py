"""The notebook runner: selection, parallel execution, failures, progress, and no side effects
of a test run on the committed figures."""

import io
import re
import shutil
import threading
import time
from pathlib import Path

import nbformat
import pytest

from influence.lab import notebook, runner


def write_notebook(path, *sources, parameters='PROFILE = "default"'):
    """A notebook with a markdown title, a `parameters` cell, then one code cell per source."""
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), params]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in sources]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path


def test_notebooks_are_selected_by_prefix_or_path(tmp_path):
    every = runner.notebooks()
    assert [p.name[:2] for p in every] == sorted(p.name[:2] for p in every)
    assert [p.name[:2] for p in runner.notebooks(["03", "07"])] == ["03", "07"]
    other = write_notebook(tmp_path / "other.ipynb")
    assert runner.notebooks(["03", str(other)]) == [runner.NOTEBOOKS / every[3].name, other]
    # Every name that matches nothing is named, even beside one that matches.
    with pytest.raises(SystemExit, match=r"no notebook matches \['99', 'x.ipynb'\]"):
        runner.notebooks(["03", "99", "x.ipynb"])


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


def test_a_failure_names_notebook_cell_and_exception_and_starts_nothing_more(tmp_path, capfd):
    # A real kernel: the cell index is the notebook file's (papermill inserts a cell), the
    # committed notebook is untouched, and the kernel's stderr arrives without ipykernel's noise.
    failing = write_notebook(
        tmp_path / "a_fails.ipynb",
        "import os\nos.write(2, b'kernel stderr reaches us\\n')",
        '\nraise ValueError(f"boom at {PROFILE}")\nsecond = "line"',
        'print("never")',
    )
    before = failing.read_bytes()
    marker = tmp_path / "started"
    later = write_notebook(tmp_path / "b_later.ipynb", f"open({str(marker)!r}, 'w').close()")
    with pytest.raises(SystemExit) as exit_:
        runner.main([str(failing), str(later), "--profile", "smoke", "--jobs", "1"])
    message = str(exit_.value.code)  # a message as the code: the exit status is 1
    assert re.search(
        r'a_fails.ipynb failed in cell 3 \(In \[\d+\]\): raise ValueError\(f"boom at \{PROFILE\}"\)',
        message,
    ), message
    assert "\n    ValueError: boom at smoke\n" in message  # ran with the profile asked for
    assert "not started (the run stops at the first failure): b_later.ipynb" in message
    assert not marker.exists()
    assert failing.read_bytes() == before
    executed = Path(re.search(r"full traceback in (\S+)", message).group(1))
    cells = nbformat.read(executed, as_version=4).cells
    shutil.rmtree(executed.parent)  # the runner's temporary folder, kept for the user to read
    assert any(o.get("ename") == "ValueError" for c in cells for o in c.get("outputs", []))
    err = capfd.readouterr().err
    assert "kernel stderr reaches us" in err
    assert not any(noise.decode() in err for noise in runner.KERNEL_NOISE)


def test_with_two_jobs_a_failure_lets_the_running_notebook_finish_and_starts_no_other(
    monkeypatch, tmp_path
):
    started, finished = [], []

    def fake_execute(path, target, profile, progress):
        started.append(path.name)
        if path.name == "b.ipynb":
            raise runner.NotebookFailed("b.ipynb failed in cell 2")
        time.sleep(0.3)  # a is still running when b fails
        finished.append(path.name)
        return 0.3

    monkeypatch.setattr(runner, "_execute", fake_execute)
    paths = [tmp_path / f"{c}.ipynb" for c in "abcd"]
    with pytest.raises(runner.NotebookFailed, match=r"(?s)b.ipynb failed.*c.ipynb, d.ipynb"):
        runner.run(paths, "smoke", None, jobs=2)
    assert sorted(started) == ["a.ipynb", "b.ipynb"]
    assert finished == ["a.ipynb"]


def test_progress_lines_on_a_terminal_and_silence_otherwise(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runner, "_execute", lambda path, target, profile, progress: 42.0)
    paths = [tmp_path / f"{c}.ipynb" for c in "ab"]
    runner.run(paths, "smoke", None, jobs=2)  # capsys' stdout is not a terminal
    assert capsys.readouterr().out == ""
    runner.run(paths, "smoke", None, jobs=2, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert sum(bool(re.fullmatch(r" +\d+:\d\d  [ab].ipynb  started \([12]/2, profile smoke\)", line)) for line in lines) == 2  # fmt: skip
    assert sum(bool(re.fullmatch(r" +\d+:\d\d  [ab].ipynb  done in 42 s", line)) for line in lines) == 2  # fmt: skip


def test_kernel_stderr_is_relayed_without_the_noise():
    pipe = io.BytesIO(
        b"real problem\n"
        b"[IPKernelApp] WARNING | Kernel is running over TCP without encryption. All ...\n"
        b"[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel.\n"
        b"another \xff line\n"
    )
    stream = io.StringIO()
    runner._relay(pipe, stream)
    assert stream.getvalue() == "real problem\nanother \ufffd line\n"


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    existing = tmp_path / "a_file"
    existing.write_text("")
    with pytest.raises(SystemExit, match=f"--out {re.escape(str(existing))} is an existing file"):
        runner.main(["00", "--out", str(existing)])
    with pytest.raises(SystemExit) as exit_:
        runner.main(["00", "--profile", "huge"])
    assert exit_.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"no notebook matches \['nothing'\]"):
        runner.main(["nothing"])


def test_cell_index_is_the_notebook_files(tmp_path):
    # papermill inserts the injected-parameters cell after `parameters` (index 1 here), or
    # replaces the one an executed notebook already has.
    fresh = write_notebook(tmp_path / "fresh.ipynb", "x = 1", "y = 2")
    assert [runner._source_index(fresh, i) for i in (1, 3, 4)] == [1, 2, 3]
    executed = nbformat.read(fresh, as_version=4)
    executed.cells.insert(2, nbformat.v4.new_code_cell('PROFILE = "smoke"'))
    executed.cells[2].metadata["tags"] = ["injected-parameters"]
    nbformat.write(executed, tmp_path / "executed.ipynb")
    assert runner._source_index(tmp_path / "executed.ipynb", 4) == 4


def test_figures_and_results_go_where_influence_figures_says(monkeypatch, tmp_path):
    monkeypatch.setenv(notebook.FIGURES_ENV, str(tmp_path / "figures"))
    assert notebook.figure_dir("00_x") == tmp_path / "figures" / "00_x"
    path = notebook.write_results("00_x", {"mrr": 0.5}, "smoke", {"N": 3})
    assert path == tmp_path / "figures" / "00_x" / "results.json"
    monkeypatch.delenv(notebook.FIGURES_ENV)
    assert notebook.figure_dir("00_workbench") == notebook.ROOT / "figures" / "00_workbench"


def test_a_test_run_writes_figures_into_a_temporary_folder():
    # `make nbval` re-executes the committed notebooks: their figures and results.json (with new
    # timings) must not overwrite the committed ones. `make smoke` does it through --out.
    text = (notebook.ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipes = dict(re.findall(r"^([\w-]+):[^\n]*\n((?:\t[^\n]*\n)+)", text, flags=re.M))
    assert re.search(
        rf"{notebook.FIGURES_ENV}=\$\$\(mktemp -d\)\S*\s+\$\(PY\) -m pytest .*--nbval",
        recipes["nbval"],
    ), recipes["nbval"]
    assert re.search(r"-m influence.lab.runner .*--out \$\$\(mktemp -d\)", recipes["smoke"])
    assert notebook.FIGURES_ENV not in recipes["reproduce"]  # reproduce writes figures/ on purpose

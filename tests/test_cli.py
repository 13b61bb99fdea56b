"""The command line end to end: fit, score and report on a tiny zoo model saved as a Hugging Face
folder, bad input as exit code 2 with no output, and the HTML report rendered by Chromium."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from influence import EKFAC, collect_grads, find_layers, pairwise_scores
from influence.cli import main, parser, read_records
from influence.data import batches_from_texts, load_model
from influence.io import load_scores
from influence.lab import zoo
from influence.lab.tokenizer import train_tokenizer
from influence.report import record_text

ANIMALS = ["cat", "dog", "fox", "owl", "eel", "bee", "cow", "yak"]
TRAIN = [{"text": f"The {a} sleeps on the mat at {i} o'clock."} for i, a in enumerate(ANIMALS)]
TRAIN += [{"prompt": f"Is the {a} big?\nAnswer:", "response": [" yes", " no"][i % 2]}
          for i, a in enumerate(ANIMALS)]  # fmt: skip
# Markup in a query: the report must show it as text, never run it.
QUERIES = [
    {"prompt": "Is the cat big?\nAnswer:", "response": " no"},
    {"text": "The owl sleeps on the mat <script>alert(1)</script> & rests."},
    {"prompt": "Is the yak big?\nAnswer:", "response": " yes"},
]
TINY = zoo.ModelConfig("gpt2", n_layer=1, d_model=16, n_head=2, d_ff=32, max_len=48)
PRE = zoo.TrainConfig("pretrain", steps=6, lr=3e-3, batch_size=8, loss_on="all")
K = 3


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(*args):
    """`python -m influence ARGS` in a subprocess: (exit code, stderr)."""
    # One thread: the models are tiny, and the test machine's cores are shared (as conftest).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "influence", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Two tiny zoo models (seeds 0 and 1), the data as JSONL and as a datasets folder, and the
    outputs of `fit`, `score` and `report` run as a user would."""
    import datasets

    root = tmp_path_factory.mktemp("cli")
    texts = [record_text(r) for r in TRAIN + QUERIES]
    tok = train_tokenizer(texts, vocab_size=320, cache=root / "tokenizer")
    model = zoo.pretrain(TINY, PRE, texts, tok, name="tiny", cache=root / "zoo")
    other = zoo.pretrain(TINY, replace(PRE, seed=1), texts, tok, name="other", cache=root / "zoo")
    train = write_jsonl(root / "train.jsonl", TRAIN)
    queries = write_jsonl(root / "queries.jsonl", QUERIES)
    train_ds = root / "train_ds"
    # One schema for all rows: a record's missing fields are None (read_records drops them).
    columns = ("text", "prompt", "response")
    rows = [{c: r.get(c) for c in columns} for r in TRAIN]
    datasets.Dataset.from_list(rows).save_to_disk(str(train_ds))
    factors, out = root / "factors", root / "out"
    # fit reads the datasets folder, score the JSONL file: the same records.
    assert run("fit", model, train_ds, "--out", factors, "--batch-size", 4)[0] == 0
    code, err = run("score", model, train, queries, "--factors", factors, "--out", out,
                    "--top-k", K, "--query-batch-size", 2)  # fmt: skip
    assert code == 0, err
    return dict(root=root, tok=tok, model=model, other=other, train=train, queries=queries,
                factors=factors, out=out)  # fmt: skip


def test_fit_and_score_outputs(work):
    assert {"eigens.safetensors", "correction.safetensors", "fit.json"} <= {
        p.name for p in work["factors"].iterdir()
    }
    scores, meta = load_scores(work["out"] / "scores.safetensors")
    assert scores.shape == (len(QUERIES), len(TRAIN))
    assert meta["damping"] == 0.1 and meta["relative"] is True
    # The CLI's scores (2 query chunks) are the library's, computed here in one go.
    model = load_model(work["model"])
    layers = find_layers(model)
    solver = EKFAC.load(work["factors"], model=model, layers=layers)
    batches = batches_from_texts(work["tok"], TRAIN, batch_size=4)
    grads = collect_grads(model, batches_from_texts(work["tok"], QUERIES), layers=layers)
    expected = pairwise_scores(model, batches, grads, solver=solver, progress=False)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())

    top = json.loads((work["out"] / "top_k.json").read_text())
    assert [row["query"] for row in top["queries"]] == [0, 1, 2]
    for q, row in enumerate(top["queries"]):
        assert row["text"] == record_text(QUERIES[q])
        pro = [e["score"] for e in row["proponents"]]
        opp = [e["score"] for e in row["opponents"]]
        assert len(pro) == len(opp) == K
        assert pro == sorted(pro, reverse=True) and opp == sorted(opp)
        assert row["proponents"][0]["index"] == int(scores[q].argmax())
        assert row["opponents"][0]["index"] == int(scores[q].argmin())
        for e in row["proponents"] + row["opponents"]:
            assert e["score"] == pytest.approx(float(scores[q, e["index"]]), rel=1e-6)
            assert e["text"] == record_text(TRAIN[e["index"]])
            # Per-token scores of a sequence add up to its pairwise score.
            assert len(e["tokens"]) == len(e["token_scores"]) == len(e["counted"])
            assert "".join(e["tokens"]) == e["text"] + "<|endoftext|>"
            np.testing.assert_allclose(sum(e["token_scores"]), e["score"], rtol=1e-4)
        # The query's tokens against its top proponent add up to that pair's score.
        z = row["top_proponent"]
        np.testing.assert_allclose(sum(row["token_scores"]), float(scores[q, z]), rtol=1e-4)


def test_report_renders_in_chromium(work, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: run `apt-get install chromium` (.ci/run does)")
    page = tmp_path / "report.html"
    assert run("report", work["out"], "--html", page)[0] == 0
    text = page.read_text()
    assert "<script" not in text and "http" not in text  # escaped; nothing to fetch
    assert text == (work["out"] / "report.html").read_text()  # score wrote the same report
    flags = ["--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    png = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={png}", "--window-size=1200,1600",
                    page.as_uri()], capture_output=True, timeout=60, check=True)  # fmt: skip
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)  # (H, W, 3)
    assert pixels.shape == (1600, 1200, 3)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((r > g + 60) & (r > b + 60)).sum() > 500, "no red (proponent) tokens on the page"
    assert ((b > r + 60) & (b > g + 20)).sum() > 500, "no blue (opponent) tokens on the page"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    shown = html.unescape(re.sub(r"<[^>]+>", "", dom))  # the page's text
    for query in QUERIES:
        assert record_text(query) in shown
    assert "<script>alert" not in dom


def test_bad_input_is_exit_2_with_a_message(work, tmp_path, capsys):
    out = tmp_path / "out"

    def fails(args, *needles):
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err  # progress bars (e.g. of loading) come first
        assert "influence: error: " in err and "Traceback" not in err, err
        message = err[err.index("influence: error: ") :]
        for needle in needles:
            assert needle in message, err
        assert not out.exists()  # nothing written

    model, factors = work["model"], work["factors"]
    score = ["score", model, work["train"], work["queries"], "--factors", factors, "--out", out]
    fails(["fit", model, tmp_path / "nope.jsonl", "--out", out], "nope.jsonl")
    fails(["fit", tmp_path / "no_model", work["train"], "--out", out], "no_model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    fails(["fit", model, bad, "--out", out], "bad.jsonl line 3 is not JSON")
    write_jsonl(bad, [{"text": "fine"}, {"prompt": "no response"}])
    fails(["fit", model, bad, "--out", out], "bad.jsonl line 2 lacks 'response'")
    write_jsonl(bad, [{"txt": "typo"}])
    fails(["fit", model, bad, "--out", out], "line 1 lacks 'text'")
    fails(score[:4] + ["--factors", tmp_path, "--out", out], "no fit.json")
    fails([score[0], work["other"], *score[2:]], "another model")  # factors of `model`
    assert read_records(work["train"]) == TRAIN
    # The real process: exit code 2, one message, no traceback (checked in run).
    code, err = run("score", work["other"], *score[2:])
    assert code == 2 and "another model" in err and not out.exists()


def test_help_states_the_conventions():
    sub = parser()._subparsers._group_actions[0].choices  # {"fit": ..., "score": ..., ...}
    assert set(sub) == {"fit", "score", "report"}
    for name in ("fit", "score"):
        text = sub[name].format_help()
        assert "Positive = proponent" in text and "SUM of its next-token" in text
        assert "mean eigenvalue" in text
    assert "--relative" in sub["score"].format_help() and "--absolute" in sub["score"].format_help()


def test_readme_example_runs(work, tmp_path, monkeypatch, capsys):
    # The README's "Use it on your model" example, run as written on a tiny model folder.
    from influence.lab.notebook import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use it on your model") :]
    code = section[
        section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))
    ]
    qa = [r for r in TRAIN if "prompt" in r]  # the example's records are prompt/response
    write_jsonl(tmp_path / "train.jsonl", qa)
    write_jsonl(tmp_path / "queries.jsonl", [q for q in QUERIES if "prompt" in q])
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"my-model"', repr(str(work["model"]))), "README", "exec"), {})
    scores, _ = load_scores(tmp_path / "scores.safetensors")
    assert scores.shape == (2, len(qa)) and torch.isfinite(scores).all()
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["0", "1"]  # one line of proponents a query
    assert (tmp_path / "factors" / "correction.safetensors").exists()

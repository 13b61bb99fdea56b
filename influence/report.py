"""Explain scores (top-k with per-token heatmaps) and render them as self-contained HTML.

``explain`` scores a few queries against every training record and lists, per query, the top
proponents and opponents with per-token scores of each listed sequence and of the query; the
command line (``influence score``) writes it to ``top_k.json`` and a notebook shows it with
``html_fragment``.

The report is one file, inline CSS, no script and no external resource: it opens offline and
prints. Per query: the query's tokens coloured by their per-token scores against its top
proponent z*, then its top proponents and opponents, each a training sequence coloured by its
per-token scores for that query. Red = positive (proponent), blue = negative (opponent); the
opacity is |score| / scale, with one scale per query for its training sequences (so they
compare) and one for the query's own tokens. Every text is escaped with ``html.escape``.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

TOP_K_FILE = "top_k.json"

RED, BLUE = (214, 39, 40), (31, 119, 180)  # matplotlib's tab:red and tab:blue

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1150px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin: 28px 0 6px; } h3 { font-size: 15px; }
p, li { font-size: 13px; line-height: 1.45; }
pre { font-size: 12px; background: #f6f6f6; padding: 8px; white-space: pre-wrap; }
section { border-top: 2px solid #ccc; padding-top: 4px; }
.seq { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap;
       word-break: break-word; line-height: 1.7; }
.seq span { border-radius: 2px; }
.seq span.c { border-bottom: 2px solid #555; }
table { border-collapse: collapse; width: 100%; }
td, th { border-bottom: 1px solid #ddd; padding: 4px 6px; vertical-align: top; font-size: 13px;
         text-align: left; }
td.num { font-family: ui-monospace, monospace; white-space: nowrap; width: 1%; }
.legend { display: flex; align-items: center; gap: 10px; font-size: 13px; }
.bar { width: 260px; height: 14px; border: 1px solid #999;
       background: linear-gradient(to right, rgb(31,119,180), #fff, rgb(214,39,40)); }
.scale { color: #666; font-size: 12px; margin: 2px 0 8px; }
"""


def record_text(record: dict) -> str:
    """The text of a record: "text", or "prompt" + "response"."""
    return record["text"] if "text" in record else record["prompt"] + record["response"]


def write_text(path: Path, text: str) -> None:
    """Write atomically: a temporary file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- explaining scores ----------------------------------------------------------------------


def _sequences(batches: list[dict]) -> list[dict]:
    """Each sequence's token ids and which tokens the loss counts, padding removed."""
    from influence.lm import IGNORE

    out = []
    for batch in batches:
        for ids, mask, labels in zip(
            batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
        ):
            n = int(mask.sum())
            counted = labels[:n] != IGNORE
            counted[0] = False  # position 0 is never predicted
            out.append({"ids": ids[:n].tolist(), "counted": counted.tolist()})
    return out


def _heatmap(tokenizer, sequence: dict, scores) -> dict:
    """Tokens (each decoded alone), counted flags and per-token scores of one sequence."""
    n = len(sequence["ids"])
    return {
        "tokens": [tokenizer.decode([i]) for i in sequence["ids"]],
        "counted": sequence["counted"],
        "token_scores": [float(s) for s in scores[:n]],
    }


def explain(
    model,
    tokenizer,
    train: Sequence[dict],
    queries: Sequence[dict],
    *,
    solver=None,
    layers=None,
    k: int = 10,
    encoding: dict | None = None,
    first_query: int = 0,
    progress: bool = True,
):
    """Scores of ``queries`` against every ``train`` record, and per query its explanation.

    train, queries: records ({"text"} or {"prompt", "response"}, see
    ``influence.data.batches_from_texts``, whose options ``encoding`` holds). Returns
    ``(scores, rows)``: scores (Q, N) = ``pairwise_scores`` with ``solver``; rows[q] =
    ``top_k`` of query q (k proponents and opponents, with texts) where every listed training
    sequence carries its tokens, which of them the loss counts, and its per-token scores for
    the query (``token_scores``: they add up to its score), and the query carries its own
    per-token scores against its top proponent z* (the same bilinear form with the roles
    swapped, adding up to score(z*, q)). ``first_query`` numbers the queries (for chunks).
    """
    import torch

    from influence.data import batches_from_texts
    from influence.gradients import collect_grads
    from influence.scores import pairwise_scores, token_scores, top_k

    encoding = {"batch_size": 32, **(encoding or {})}

    def batches(records: Sequence[dict], size: int | None = None) -> list[dict]:
        return batches_from_texts(
            tokenizer, list(records), **{**encoding, "batch_size": size or encoding["batch_size"]}
        )

    query_batches = batches(queries, len(queries))
    grads = collect_grads(model, query_batches, layers=layers, progress=progress)  # (Q, o, i)
    scores = pairwise_scores(model, batches(train), grads, solver=solver, progress=progress)
    tops = top_k(scores, k=k, texts=[record_text(r) for r in train])
    # Per-token scores of the listed training sequences against the queries: (Q, L, T).
    listed = sorted({e["index"] for t in tops for e in t["proponents"] + t["opponents"]})
    listed_batches = batches([train[i] for i in listed])
    listed_tokens = token_scores(model, listed_batches, grads, solver=solver, progress=progress)
    listed_seqs = _sequences(listed_batches)
    # Each query's tokens against its top proponent z*: (Z, Q, T).
    best = sorted({t["proponents"][0]["index"] for t in tops})
    best_grads = collect_grads(
        model, batches([train[i] for i in best]), layers=layers, progress=progress
    )
    query_tokens = token_scores(model, query_batches, best_grads, solver=solver, progress=False)
    query_seqs = _sequences(query_batches)
    rows = []
    for q, top in enumerate(tops):
        z = top["proponents"][0]["index"]
        row = {"query": first_query + q, "text": record_text(queries[q]), "top_proponent": z}
        row |= _heatmap(tokenizer, query_seqs[q], query_tokens[best.index(z), q])
        for side in ("proponents", "opponents"):
            row[side] = [
                e | _heatmap(tokenizer, listed_seqs[j], listed_tokens[q, j])
                for e in top[side]
                for j in [listed.index(e["index"])]
            ]
        rows.append(row)
    return torch.as_tensor(scores), rows


# ---- HTML -----------------------------------------------------------------------------------


def colour(score: float, scale: float) -> str:
    """Background of a token: red (+) or blue (-), opacity 0.85 |score| / scale at most."""
    if scale <= 0 or score == 0:
        return "transparent"
    r, g, b = RED if score > 0 else BLUE
    return f"rgba({r},{g},{b},{0.85 * min(1.0, abs(score) / scale):.3f})"


def _scale(entries: list[dict]) -> float:
    return max((abs(s) for e in entries for s in e["token_scores"]), default=0.0)


def heatmap(entry: dict, scale: float) -> str:
    """The tokens of one sequence as coloured spans; hovering shows the token's score."""
    spans = [
        f'<span{" class=c" if counted else ""} style="background:{colour(s, scale)}" '
        f'title="{s:+.3e}">{html.escape(token)}</span>'
        for token, s, counted in zip(
            entry["tokens"], entry["token_scores"], entry["counted"], strict=True
        )
    ]
    return f'<div class="seq">{"".join(spans)}</div>'


def _table(title: str, entries: list[dict], scale: float) -> str:
    rows = "".join(
        f'<tr><td class="num">{rank}</td><td class="num">#{e["index"]}</td>'
        f'<td class="num">{e["score"]:+.4e}</td><td>{heatmap(e, scale)}</td></tr>'
        for rank, e in enumerate(entries, start=1)
    )
    head = "<tr><th>rank</th><th>train</th><th>score</th><th>training sequence</th></tr>"
    return f"<h3>{html.escape(title)}</h3><table>{head}{rows}</table>"


def _query(row: dict) -> str:
    listed = row["proponents"] + row["opponents"]
    train_scale, query_scale = _scale(listed), _scale([row])
    total = sum(row["token_scores"])
    return (
        f"<section><h2>Query {row['query']}</h2>"
        f"{heatmap(row, query_scale)}"
        f'<p class="scale">query tokens against its top proponent #{row["top_proponent"]} '
        f"(sum {total:+.4e}); full colour = {query_scale:.3e} a token</p>"
        f'<p class="scale">training sequences: full colour = {train_scale:.3e} a token</p>'
        + _table("Top proponents (highest scores)", row["proponents"], train_scale)
        + _table("Top opponents (lowest scores)", row["opponents"], train_scale)
        + "</section>"
    )


LEGEND = """<div class="legend"><span>opponent (&minus;)</span><span class="bar"></span>
<span>proponent (+)</span></div>"""


def html_fragment(rows: list[dict]) -> str:
    """The queries of ``explain`` as HTML with its own style (e.g. IPython.display.HTML)."""
    return f"<div><style>{CSS}</style>{LEGEND}{''.join(_query(row) for row in rows)}</div>"


def render(result: dict) -> str:
    """The whole HTML page of a ``top_k.json`` document."""
    meta = result["meta"]
    damping = f"{meta['damping']} x mean eigenvalue" if meta["relative"] else f"{meta['damping']}"
    facts = [
        ("model", meta["model"]),
        ("factors", f"{meta['factors']} ({meta['kind']}, {meta['fisher']} Fisher)"),
        ("damping", damping),
        ("data", f"{meta['n_queries']} queries x {meta['n_train']} training sequences"),
    ]
    items = "".join(f"<li><b>{k}</b>: {html.escape(str(v))}</li>" for k, v in facts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Influence report</title>
<style>{CSS}</style></head><body>
<h1>Influence report</h1>
<ul>{items}</ul>
{LEGEND}
<p><b>Training sequences</b>: each token t is coloured by its per-token score for the query,
g<sub>t</sub>(z)<sup>T</sup> (F + &lambda;I)<sup>-1</sup> &nabla;m(q) a<sub>t</sub>(z) summed
over the tracked layers (a<sub>t</sub>: the layer's input at t, g<sub>t</sub>: the gradient
of the sequence's loss at the layer's output at t); a sequence's token scores add up to its
score. <b>Query</b>: the same with the roles swapped: the query's tokens against its top
proponent z*, adding up to score(z*, q); it shows which query tokens carry the influence of
z*. Red = positive (proponent), blue = negative (opponent); underlined tokens are those the
loss counts. Hover a token for its score.</p>
<pre>{html.escape(result["conventions"])}</pre>
{"".join(_query(row) for row in result["queries"])}
</body></html>
"""


def write_report(out_dir: str | Path, html_path: str | Path | None = None) -> Path:
    """Render ``out_dir/top_k.json`` into ``html_path`` (default ``out_dir/report.html``)."""
    source = Path(out_dir) / TOP_K_FILE
    if not source.exists():
        raise FileNotFoundError(f"no {TOP_K_FILE} in {out_dir}: run `influence score` first")
    try:
        result = json.loads(source.read_text(encoding="utf-8"))
        page = render(result)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{source} is not a top_k.json written by `influence score` ({err!r}); rerun it"
        ) from None
    path = Path(html_path) if html_path is not None else Path(out_dir) / "report.html"
    write_text(path, page)
    return path

"""The ``influence`` command line: fit factors, score training data against queries, report.

    influence fit MODEL_DIR TRAIN --out FACTORS_DIR
    influence score MODEL_DIR TRAIN QUERIES --factors FACTORS_DIR --out OUT_DIR
    influence report OUT_DIR

TRAIN and QUERIES are JSONL files (one JSON object a line) or ``datasets`` folders saved with
``save_to_disk``; a record has "text" (every token counted by the loss) or "prompt" and
"response" (only the response and eos counted). Bad input (a missing file, a line that is not
JSON or lacks those fields, factors fitted on another model) is one line on stderr,
``influence: error: ...``, and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tqdm import tqdm

from influence.report import TOP_K_FILE, write_text

CONVENTIONS = """\
conventions:
  sign       score(z, q) = grad m(q)^T (F + lambda I)^-1 grad L(z). Positive = proponent:
             up-weighting training sequence z lowers the query's loss m(q) to first order;
             negative = opponent. Scores are not multiplied by the number of training
             sequences.
  loss       a sequence's loss is the SUM of its next-token cross-entropies over the counted
             tokens: every token of a "text" record, the response (and eos) of a
             "prompt"/"response" record. Per-token scores add up to the sequence's score.
  curvature  F is EK-FAC (or K-FAC) of the Fisher averaged over training sequences; "true"
             samples the labels from the model (an estimate of the Gauss-Newton matrix),
             "empirical" uses the data's labels.
  damping    lambda = DAMPING x the mean eigenvalue of each layer's block (--relative,
             default 0.1), or lambda = DAMPING itself (--absolute); chosen when scoring,
             not when fitting.
"""

FIT_FILE = "fit.json"  # what `fit` did, read back by `score`
SCORES_FILE = "scores.safetensors"
LOSS_ON = "response"  # "text" records count every token, "prompt"/"response" the response


# ---- input ----------------------------------------------------------------------------------


def _record(row: object, where: str) -> dict:
    """The fields the loss needs, checked: {"text"} or {"prompt", "response"}, all strings."""
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a {type(row).__name__}, expected a JSON object")
    keys = ("prompt", "response") if "prompt" in row or "response" in row else ("text",)
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(
            f'{where} lacks {", ".join(map(repr, missing))}: a record needs "text", or '
            f'"prompt" and "response" (it has {sorted(row)})'
        )
    for key in keys:
        if not isinstance(row[key], str):
            raise ValueError(f"{where}: {key!r} is a {type(row[key]).__name__}, expected a string")
    return {k: row[k] for k in keys}


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSONL file, or of a ``datasets`` folder (its "train" split if a
    DatasetDict), each reduced to {"text"} or {"prompt", "response"}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{path} is a folder but not a dataset saved with save_to_disk ({err})"
            ) from err
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data and len(data) != 1:
                raise ValueError(f"{path} has splits {sorted(data)} and no 'train': save one split")
            data = data["train"] if "train" in data else next(iter(data.values()))
        # A column that only some records have is None in the others (one schema per dataset).
        rows = ({k: v for k, v in row.items() if v is not None} for row in data)
        records = [_record(row, f"{path} row {i}") for i, row in enumerate(rows)]
    else:
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {number} is not JSON ({err.msg})") from None
                records.append(_record(row, f"{path} line {number}"))
    if not records:
        raise ValueError(f"{path} holds no record")
    return records


def _load(model_dir: str):
    """(model in eval mode, tokenizer) of a model folder."""
    from influence.models import load_model, load_tokenizer

    return load_model(model_dir), load_tokenizer(model_dir)


# ---- fit ------------------------------------------------------------------------------------


def fit(args: argparse.Namespace) -> None:
    from influence import find_layers, fit_ekfac, fit_kfac
    from influence.data import batches_from_texts

    records = read_records(args.train)
    model, tokenizer = _load(args.model)
    layers = find_layers(model, include=args.layers)
    encoding = {"batch_size": args.batch_size, "loss_on": LOSS_ON, "max_length": args.max_length}
    batches = batches_from_texts(tokenizer, records, **encoding)
    fitter = fit_ekfac if args.kind == "ekfac" else fit_kfac
    fitter(model, batches, layers=layers, fisher=args.fisher, seed=args.seed, path=args.out)
    summary = {
        "kind": args.kind,
        "fisher": args.fisher,
        "seed": args.seed,
        "layers": list(layers),
        "encoding": encoding,
        "n_train": len(records),
    }
    write_text(Path(args.out) / FIT_FILE, json.dumps(summary, indent=2) + "\n")
    print(f"influence: {args.kind} factors of {len(layers)} layers on {len(records)} sequences "
          f"in {args.out}", file=sys.stderr)  # fmt: skip


# ---- score ----------------------------------------------------------------------------------


def score(args: argparse.Namespace) -> None:
    import torch

    from influence import EKFAC, KFAC, find_layers
    from influence.io import save_scores
    from influence.report import explain

    fit_file = Path(args.factors) / FIT_FILE
    if not fit_file.exists():
        raise FileNotFoundError(
            f"no {FIT_FILE} in {args.factors}: fit factors there first (influence fit)"
        )
    fitted = json.loads(fit_file.read_text())
    train = read_records(args.train)
    queries = read_records(args.queries)
    model, tokenizer = _load(args.model)
    # Exactly the fitted layers; the fingerprint check in load() catches any other model.
    layers = find_layers(model, include=[f"^{re.escape(n)}$" for n in fitted["layers"]])
    kind = EKFAC if fitted["kind"] == "ekfac" else KFAC
    solver = kind.load(
        args.factors, model=model, layers=layers, damping=args.damping, relative=args.relative
    )
    encoding = fitted["encoding"]

    rows, chunks = [], []
    starts = range(0, len(queries), args.query_batch_size)
    for lo in tqdm(starts, desc="query chunks", disable=len(starts) == 1, leave=False):
        chunk = queries[lo : lo + args.query_batch_size]
        scores, explained = explain(
            model,
            tokenizer,
            train,
            chunk,
            solver=solver,
            layers=layers,
            k=args.top_k,
            encoding=encoding,
            first_query=lo,
        )
        chunks.append(scores)
        rows += explained
    scores = torch.cat(chunks)  # (Q, N)
    k = min(args.top_k, len(train))

    meta = {
        "model": str(args.model),
        "factors": str(args.factors),
        "kind": fitted["kind"],
        "fisher": fitted["fisher"],
        "damping": args.damping,
        "relative": args.relative,
        "n_train": len(train),
        "n_queries": len(queries),
        "top_k": k,
    }
    out = Path(args.out)
    save_scores(out / SCORES_FILE, scores, meta=meta)
    top = {"meta": meta, "conventions": CONVENTIONS, "queries": rows}
    write_text(out / TOP_K_FILE, json.dumps(top, indent=1) + "\n")
    print(f"influence: scores {tuple(scores.shape)} and top {k} in {out}", file=sys.stderr)
    if args.report:
        report(argparse.Namespace(out=args.out, html=None))


# ---- report ---------------------------------------------------------------------------------


def report(args: argparse.Namespace) -> None:
    from influence.report import write_report

    path = write_report(args.out, args.html)
    print(f"influence: report in {path}", file=sys.stderr)


# ---- parser ---------------------------------------------------------------------------------


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({err})") from None
    return text


def parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    data_help = (
        'JSONL file (one object a line, with "text" or "prompt" and "response") or a datasets '
        "folder saved with save_to_disk"
    )
    main = argparse.ArgumentParser(
        prog="influence",
        description="Influence functions for your own causal language model.\n\n"
        "  influence fit MODEL_DIR TRAIN --out FACTORS\n"
        "  influence score MODEL_DIR TRAIN QUERIES --factors FACTORS --out OUT\n"
        "  influence report OUT\n\n"
        "MODEL_DIR is any from_pretrained folder with its tokenizer (a peft adapter folder "
        "too).\n\n" + CONVENTIONS,
        formatter_class=fmt,
    )
    sub = main.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "fit",
        help="fit EK-FAC / K-FAC factors of a model on training data",
        description="Fit the curvature factors of MODEL_DIR on TRAIN and save them in "
        "FACTORS_DIR (safetensors + JSON). A rerun resumes what is saved, after checking "
        "that the model, the data and the options are the same.\n\n" + CONVENTIONS,
        formatter_class=fmt,
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model folder (from_pretrained)")
    p.add_argument("train", metavar="TRAIN", help=data_help)
    p.add_argument("--out", required=True, metavar="FACTORS_DIR", help="folder for the factors")
    p.add_argument("--layers", type=_regex, metavar="REGEX",
                   help="track the layers whose module name matches REGEX (re.search); default "
                   "every nn.Linear / Conv1D / LoRA layer except embeddings and the LM head")  # fmt: skip
    p.add_argument("--fisher", choices=("true", "empirical"), default="true",
                   help="labels of the Fisher: sampled from the model (default) or the data's")  # fmt: skip
    p.add_argument("--kind", choices=("ekfac", "kfac"), default="ekfac",
                   help="EK-FAC (default; eigenvalue-corrected, two passes) or K-FAC (one pass)")  # fmt: skip
    p.add_argument("--batch-size", type=_positive(int), default=32, help="sequences a batch (32)")
    p.add_argument("--max-length", type=_positive(int), metavar="TOKENS",
                   help="longest sequence allowed; a longer one is an error (default: no limit)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the true Fisher's labels (0)")
    p.set_defaults(run=fit)

    p = sub.add_parser(
        "score",
        help="score every training sequence against every query; write the top-k and a report",
        description="Pairwise scores (queries x training sequences) of MODEL_DIR with the "
        f"factors of FACTORS_DIR. Writes OUT_DIR/{SCORES_FILE} (the (Q, N) scores; "
        f"influence.io.load_scores), OUT_DIR/{TOP_K_FILE} (per query its top proponents and "
        "opponents with their texts and per-token scores, and the query's per-token scores "
        "against its top proponent) and OUT_DIR/report.html.\n\n" + CONVENTIONS,
        formatter_class=fmt,
    )
    p.add_argument("model", metavar="MODEL_DIR", help="the model the factors were fitted on")
    p.add_argument("train", metavar="TRAIN", help=data_help)
    p.add_argument("queries", metavar="QUERIES", help=data_help)
    p.add_argument("--factors", required=True, metavar="FACTORS_DIR", help="output of `fit`")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for the results")
    p.add_argument("--damping", type=_positive(float), default=0.1,
                   help="damping factor (relative, default 0.1) or value (--absolute)")  # fmt: skip
    group = p.add_mutually_exclusive_group()
    group.add_argument("--relative", dest="relative", action="store_true", default=True,
                       help="lambda = DAMPING x each layer's mean eigenvalue (default)")  # fmt: skip
    group.add_argument("--absolute", dest="relative", action="store_false",
                       help="lambda = DAMPING")  # fmt: skip
    p.add_argument("--top-k", type=_positive(int), default=10,
                   help="proponents and opponents listed per query (10)")  # fmt: skip
    p.add_argument("--query-batch-size", type=_positive(int), default=16,
                   help="queries whose gradients are held at once; each such chunk is one "
                   "pass over the training data (16)")  # fmt: skip
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write OUT_DIR/report.html")  # fmt: skip
    p.set_defaults(run=score)

    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report of a `score` output",
        description=f"Render OUT_DIR/{TOP_K_FILE} as one HTML file (inline CSS, no scripts, "
        "no external resources): per query its per-token heatmap and its top proponents and "
        "opponents, each with a per-token heatmap (red = proponent, blue = opponent).",
        formatter_class=fmt,
    )
    p.add_argument("out", metavar="OUT_DIR", help="output folder of `score`")
    p.add_argument("--html", metavar="FILE", help="where to write (default OUT_DIR/report.html)")
    p.set_defaults(run=report)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as err:
        # Bad input, not a bug: one readable line (messages may span lines), no traceback.
        print(f"influence: error: {err}", file=sys.stderr)
        return 2
    return 0

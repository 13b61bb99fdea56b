"""The batch contract: what the library reads as training data and queries, and its checks.

A batch is a dict of three (B, T) tensors, B >= 1 sequences of T >= 1 positions:

- ``input_ids``: integer token ids in [0, V), V the rows of the model's input embedding.
- ``attention_mask``: 1 (or True) at real tokens, 0 at padding. Right padding is the
  convention: the model is called without position_ids, so a model with absolute positions
  (GPT-2) sees left-padded sequences shifted.
- ``labels``: integers aligned with input_ids as in transformers: the label at position t is
  the token at t, predicted from position t - 1 (the library shifts; position 0 is never
  counted). -100 (``influence.lm.IGNORE``) marks a position as not counted: the prompt under a
  response-only loss, and padding. ``labels = input_ids`` with padding set to -100 counts
  every token.

Nothing else: any other key is an error naming it. The model is called with input_ids and
attention_mask only, so an extra key (a leftover ``text`` column, ``position_ids``,
``token_type_ids``) would be ignored silently; drop it.

``check_batch`` returns the batch as int64 tensors and raises, naming the batch, when it is not
a dict (e.g. a TensorDataset's tuples), misses a key, is not 2-D, has shapes that differ, is
empty, has ids that are not integers or outside [0, V), labels other than -100 outside
[0, V), or an attention mask other than 0/1. It warns (``DataWarning``) when

- padding positions (attention_mask 0) carry labels other than -100: the loss counts them
  (the classic ``labels = input_ids`` on a padded batch);
- labels differ from input_ids at most counted positions (pre-shifted labels make the loss
  predict two tokens ahead);
- a sequence has no counted label: its gradient is 0, so as a training sequence it scores 0
  against every query. For queries (``uncounted="error"``) this is an error naming the row:
  a query without a counted token has every score 0. (``uncounted="ignore"``: a custom
  measurement, not the labels, defines what a query measures.)

Data. ``as_batches`` makes a re-iterable ``Batches`` of anything the library accepts as data:
a list or tuple of batch dicts (or one batch dict), a torch DataLoader that does not shuffle,
a ``datasets.Dataset`` (or any re-iterable) of rows, padded by ``pad_rows`` into batches of
``batch_size`` (default 32), or any other re-iterable of batch dicts. One-shot iterators
(generators, ``Dataset.iter(...)``) are refused: fitting reads the data more than once. Every
pass over a ``Batches`` checks each batch (each kind of warning once per pass) and records a
fingerprint per batch (shape and position-weighted sums of ids, mask and labels, O(B T)); a
later pass over the same ``Batches`` that meets another batch at a position, or another
number of batches, is an error: EK-FAC's passes, and a score's columns, follow the data's
order.

Texts. ``batches_from_texts`` tokenizes records ({"text": ...} or {"prompt": ...,
"response": ...}) into right-padded batches: a sequence is prompt + response + eos, prompt
and response tokenized separately (the prompt's tokens are those the model sees when it
generates the response), labels -100 on the prompt (``loss_on="response"``) and on padding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from influence.lm import IGNORE
from influence.models import load_model  # noqa: F401 (the command line loads models from here)

Batch = dict[str, torch.Tensor]  # the one batch type: KEYS -> (B, T) tensors
KEYS = ("input_ids", "attention_mask", "labels")
DEFAULT_BATCH_SIZE = 32
LOSS_ON = ("response", "all")
UNCOUNTED = ("warn", "error", "ignore")  # what a sequence without a counted label is

_HINTS = {
    "input_ids": "the (B, T) integer token ids",
    "attention_mask": "1 at real tokens, 0 at padding; without padding, "
    "attention_mask = torch.ones_like(input_ids)",
    "labels": "the tokens the loss counts, -100 elsewhere, aligned with input_ids; to count "
    "every real token: labels = input_ids.masked_fill(attention_mask == 0, -100)",
}


class DataWarning(UserWarning):
    """Data the library can use but that probably does not mean what was intended."""


# ---- one batch ---------------------------------------------------------------------------


def check_batch(
    batch: Any,
    *,
    vocab_size: int | None = None,
    index: int | None = None,
    labels: bool = True,
    uncounted: str = "warn",
) -> dict[str, torch.Tensor]:
    """The batch checked against the contract (module docstring), as int64 tensors.

    vocab_size: V, ids must be < V (the model's ``get_input_embeddings().num_embeddings``);
    index: the batch's position, named in messages. labels=False: labels are neither required
    nor checked nor returned (for hidden states). uncounted: what a sequence without a counted
    label is, "warn" (training data), "error" (queries) or "ignore". Raises TypeError /
    ValueError; warns ``DataWarning``.
    """
    clean, notes = inspect_batch(
        batch, vocab_size=vocab_size, index=index, labels=labels, uncounted=uncounted
    )
    for note in notes.values():
        warnings.warn(note, DataWarning, stacklevel=2)
    return clean


def inspect_batch(
    batch: Any,
    *,
    vocab_size: int | None = None,
    index: int | None = None,
    labels: bool = True,
    uncounted: str = "warn",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``check_batch`` without warning: (clean batch, {kind of warning: message})."""
    if uncounted not in UNCOUNTED:
        raise ValueError(f"uncounted={uncounted!r}; expected one of {UNCOUNTED}")
    where = "the batch" if index is None else f"batch {index}"
    if not isinstance(batch, Mapping):
        hint = (
            " (a TensorDataset or a collate_fn returning tuples? return dicts instead)"
            if isinstance(batch, tuple | list)
            else ""
        )
        raise TypeError(
            f"{where} is a {type(batch).__name__}: batches must be dicts with keys "
            f"'input_ids', 'attention_mask' and 'labels', each (B, T){hint}"
        )
    keys = KEYS if labels else KEYS[:2]
    for key in keys:
        if key not in batch:
            raise ValueError(
                f"{where} has no {key!r} (its keys: {sorted(map(str, batch))}); "
                f"{key} is {_HINTS[key]}"
            )
    extra = sorted(str(k) for k in batch if k not in KEYS)
    if extra:
        raise ValueError(
            f"{where} has keys {extra} besides input_ids, attention_mask and labels: the "
            "model is called with input_ids and attention_mask only, so they would be "
            "silently ignored; drop them (e.g. {k: batch[k] for k in ('input_ids', "
            f"'attention_mask', 'labels')}}, or dataset.remove_columns({extra}))"
        )
    clean = {key: _tensor(batch[key], key, where) for key in keys}
    ids = clean["input_ids"]
    if ids.dim() != 2:
        raise ValueError(
            f"{where}: input_ids has shape {tuple(ids.shape)}, batches are 2-D (B, T): one "
            "sequence is input_ids[None]; rows of a dataset are batched by "
            "as_batches(rows, batch_size=...)"
        )
    for key in keys[1:]:
        if clean[key].shape != ids.shape:
            raise ValueError(
                f"{where}: {key} has shape {tuple(clean[key].shape)}, input_ids "
                f"{tuple(ids.shape)}; all three are (B, T)"
            )
    if ids.numel() == 0:
        raise ValueError(
            f"{where} is empty: (B, T) = {tuple(ids.shape)}; a batch needs at least one "
            "sequence of at least one token"
        )
    for key in ("input_ids", "labels") if labels else ("input_ids",):
        t = clean[key]
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(
                f"{where}: {key} has dtype {clean[key].dtype}; token ids are integers "
                f"(use {key}.long())"
            )
    mask = clean["attention_mask"]
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        values = torch.unique(mask)[:5].tolist()
        raise ValueError(
            f"{where}: attention_mask has values {values} other than 0 and 1; it is 1 at "
            "real tokens and 0 at padding"
        )
    clean = {key: t.long() for key, t in clean.items()}
    _check_range(clean["input_ids"], vocab_size, where, "input_ids")
    notes = {}
    if labels:
        _check_range(clean["labels"], vocab_size, where, "labels")
        notes = _label_notes(clean, where, uncounted)
    return clean, notes


def _tensor(value: Any, key: str, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"{where}: {key} is a {type(value).__name__} that is not a rectangular array of "
            f"numbers ({err}); pad the sequences to one length, e.g. tokenizer(texts, "
            "padding=True, return_tensors='pt')"
        ) from None


def _check_range(t: torch.Tensor, vocab_size: int | None, where: str, key: str) -> None:
    """Ids in [0, V) (labels may also be IGNORE), with the first offender in the message."""
    bad = t < 0 if vocab_size is None else (t < 0) | (t >= vocab_size)
    if key == "labels":
        bad &= t != IGNORE
    if bool(bad.any()):
        row, pos = (int(i) for i in bad.nonzero()[0])
        span = "[0, V)" if vocab_size is None else f"[0, {vocab_size})"
        fix = (
            "only -100 marks a label as not counted"
            if key == "labels"
            else "use the model's own tokenizer, or resize the embeddings "
            "(model.resize_token_embeddings(len(tokenizer)))"
        )
        raise ValueError(
            f"{where}: {key} has {int(bad.sum())} values outside {span} (e.g. "
            f"{int(t[row, pos])} at row {row}, position {pos}); the model's input embedding "
            f"has {vocab_size if vocab_size is not None else 'V'} rows: {fix}"
        )


def _label_notes(batch: dict[str, torch.Tensor], where: str, uncounted: str) -> dict[str, str]:
    """Warnings about the labels of a well-formed batch; the query error."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    counted = labels[:, 1:] != IGNORE  # (B, T-1): position 0's label is never counted
    notes = {}
    padded = int((counted & (mask[:, 1:] == 0)).sum())
    if padded:
        notes["padding"] = (
            f"{where}: {padded} padding positions (attention_mask 0) have labels other than "
            "-100, so the loss counts them as tokens to predict; set labels to -100 where "
            "attention_mask is 0: labels = labels.masked_fill(attention_mask == 0, -100)"
        )
    n_counted = int(counted.sum())
    same = int((counted & (labels[:, 1:] == ids[:, 1:])).sum())
    if n_counted and same < n_counted / 2:
        notes["shifted"] = (
            f"{where}: labels equal input_ids at only {same} of the {n_counted} counted "
            "positions; the label at position t is the token at t (transformers' convention, "
            "the library shifts), so pre-shifted labels (labels[t] = input_ids[t + 1]) make "
            "the loss predict two tokens ahead"
        )
    empty = (~counted.any(dim=1)).nonzero().flatten().tolist()
    if empty and uncounted != "ignore":
        shown = empty[:10] + (["..."] if len(empty) > 10 else [])
        what = (
            f"{where}, rows {shown}: no counted label (every label after position 0 is -100), "
            "so the gradient of these sequences is 0"
        )
        if uncounted == "error":
            raise ValueError(
                f"query {what} and every score of these queries would be 0; set the labels of "
                "the tokens to measure (e.g. the response) to their token ids"
            )
        notes["uncounted"] = (
            f"{what}: they score 0 against every query (as queries: every score 0); set the "
            "labels of the tokens the loss should count to their token ids"
        )
    return notes


# ---- rows --------------------------------------------------------------------------------


def pad_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The default collator of ``as_batches``: right-pad rows into one batch.

    A row is {"input_ids": (T_i,), "labels": (T_i,), "attention_mask": (T_i,), optional,
    all ones by default} as lists or tensors. Padding: input_ids 0 (any id works: nothing
    attends to padding or counts it), attention_mask 0, labels -100.
    """
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {i} is a {type(row).__name__}, rows are dicts")
        missing = [k for k in ("input_ids", "labels") if k not in row]
        extra = sorted(str(k) for k in row if k not in KEYS)
        if missing or extra:
            what = f"has no {missing}" if missing else f"has columns {extra}"
            fix = (
                f"{missing[0]} is {_HINTS[missing[0]]} (a datasets.Dataset: dataset.map(lambda "
                "row: {'labels': row['input_ids']}))"
                if missing
                else f"drop them (dataset.remove_columns({extra}))"
            )
            raise ValueError(
                f"row {i} {what}; rows hold input_ids, labels and optionally attention_mask: {fix}"
            )
    seqs = [{k: _tensor(row[k], k, f"row {i}") for k in row} for i, row in enumerate(rows)]
    for i, s in enumerate(seqs):
        shapes = {k: tuple(t.shape) for k, t in s.items() if t.dim() != 1}
        if shapes:
            raise ValueError(
                f"row {i} has shapes {shapes}; a row is one sequence, 1-D (T,): data that "
                "already holds batches is passed without batch_size"
            )
    width = max(len(s["input_ids"]) for s in seqs)
    out = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.long),  # (B, T)
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
    }
    for i, s in enumerate(seqs):
        n = len(s["input_ids"])
        s.setdefault("attention_mask", torch.ones(n, dtype=torch.long))
        for key in KEYS:
            if len(s[key]) != n:
                raise ValueError(f"row {i}: {key} has {len(s[key])} entries, input_ids {n}")
            out[key][i, :n] = s[key]
    return out


# ---- data: re-iterable batches -----------------------------------------------------------


class Batches:
    """Re-iterable data as checked batch dicts; built by ``as_batches``.

    Iterating is one pass: ``checked()`` with default options. ``len`` is the number of
    batches when the source has a length (TypeError otherwise).
    """

    def __init__(
        self,
        source: Iterable,
        batch_size: int | None = None,
        collate: Callable[[list], Mapping] | None = None,
    ):
        self.source = source
        self.batch_size = batch_size  # not None: the source yields rows, collated in batches
        self.collate = collate or pad_rows
        self._prints: list[tuple] = []  # per-batch fingerprints of the passes so far
        self._complete = False  # whether a pass reached the end (then len(_prints) is final)

    def __len__(self) -> int:
        n = len(self.source)
        return n if self.batch_size is None else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.checked()

    def raw(self) -> Iterator[Any]:
        """The source's batches, rows collated, unchecked."""
        if self.batch_size is None:
            yield from self.source
            return
        rows = []
        for row in self.source:
            rows.append(row)
            if len(rows) == self.batch_size:
                yield self.collate(rows)
                rows = []
        if rows:
            yield self.collate(rows)

    def checked(
        self, *, vocab_size: int | None = None, labels: bool = True, uncounted: str = "warn"
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One pass: every batch through ``check_batch`` (options as there) and compared with
        the previous passes; each kind of warning is given once per pass."""
        warned = set()
        count = 0
        for i, raw in enumerate(self.raw()):
            batch, notes = inspect_batch(
                raw, vocab_size=vocab_size, index=i, labels=labels, uncounted=uncounted
            )
            for kind, note in notes.items():
                if kind not in warned:
                    warned.add(kind)
                    warnings.warn(f"{note} (reported once per pass)", DataWarning, stacklevel=1)
            self._compare(i, _fingerprint(batch))
            count += 1
            yield batch
        if count == 0:
            raise ValueError("the data has no batches: nothing to compute")
        if self._complete and count != len(self._prints):
            raise ValueError(
                f"the data gave {count} batches in this pass and {len(self._prints)} in the "
                f"first; {_SAME_DATA}"
            )
        self._complete = True

    def _compare(self, i: int, print_: tuple) -> None:
        if i < len(self._prints):
            if print_ != self._prints[i]:
                raise ValueError(
                    f"batch {i} differs from batch {i} of the first pass over the data (shape "
                    f"{print_[0]} vs {self._prints[i][0]}, or other tokens); {_SAME_DATA}"
                )
        elif self._complete:
            raise ValueError(
                f"the data gave more batches in this pass than the {len(self._prints)} of the "
                f"first; {_SAME_DATA}"
            )
        else:
            self._prints.append(print_)


_SAME_DATA = (
    "the data is read several times (EK-FAC reads it twice) and must give the same batches "
    "in the same order every time: no shuffling (DataLoader(..., shuffle=False)), no random "
    "sampler or augmentation"
)


def _fingerprint(batch: dict[str, torch.Tensor]) -> tuple:
    """(shape, sums of ids, mask and labels weighted by their flat position): cheap, and
    changed by a reordering of the rows or by other tokens (int64 sums wrap, deterministically)."""
    ids = batch["input_ids"]
    w = torch.arange(1, ids.numel() + 1, device=ids.device).view(ids.shape)  # (B, T)
    sums = tuple(int((t * w).sum()) for t in batch.values())
    return (tuple(ids.shape), *sums)


def as_batches(
    data: Any,
    *,
    collate: Callable[[list], Mapping] | None = None,
    batch_size: int | None = None,
) -> Batches:
    """``data`` as a re-iterable ``Batches`` (see the module docstring for what it accepts).

    batch_size / collate: the data holds rows (a ``datasets.Dataset``, or any re-iterable of
    row dicts when batch_size is given), cut into batches of batch_size (default 32 for a
    Dataset) and collated by ``collate(list of rows) -> batch dict`` (default ``pad_rows``).
    A ``Batches`` is returned as is.
    """
    if isinstance(data, Batches):
        if collate is not None or batch_size is not None:
            raise ValueError("data is already a Batches: its rows are already batched")
        return data
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}; expected a positive integer")
    kind = type(data).__module__.split(".")[0]
    if kind == "datasets" and isinstance(data, Mapping):
        raise TypeError(
            f"data is a {type(data).__name__} of splits {sorted(data)}: pick one, e.g. "
            f"data[{sorted(data)[0]!r}]"
        )
    if isinstance(data, Mapping):
        return Batches([data])  # one batch
    if isinstance(data, str | bytes) or isinstance(data, torch.Tensor):
        raise TypeError(
            f"data is a {type(data).__name__}; pass batch dicts (input_ids, attention_mask, "
            "labels), e.g. from batches_from_texts(tokenizer, records)"
        )
    if isinstance(data, Iterator):
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}: a generator, or "
            "Dataset.iter(...)): the library reads the data more than once (EK-FAC twice); "
            "pass a list or a DataLoader (or the datasets.Dataset itself)"
        )
    if not isinstance(data, Iterable):
        raise TypeError(f"data is a {type(data).__name__}, not an iterable of batch dicts")
    if _is_dataloader(data):
        _check_dataloader(data)
    if kind == "datasets":
        _check_columns(data)
        batch_size = batch_size or DEFAULT_BATCH_SIZE
    elif collate is not None and batch_size is None:
        raise ValueError("collate needs batch_size: the data's rows are collated in batches")
    return Batches(data, batch_size, collate)


def _is_dataloader(data: Any) -> bool:
    return isinstance(data, torch.utils.data.DataLoader)


def _check_dataloader(loader: torch.utils.data.DataLoader) -> None:
    from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
    random = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    # DistributedSampler(shuffle=True) has no class of its own: its shuffle attribute tells
    if isinstance(sampler, random) or getattr(sampler, "shuffle", False):
        raise ValueError(
            f"the DataLoader draws its batches at random ({type(sampler).__name__}, e.g. "
            "shuffle=True): the library reads the data several times (EK-FAC twice) and "
            "scores follow the data's order; use DataLoader(..., shuffle=False)"
        )
    if loader.drop_last and loader.batch_size is not None:
        try:
            dropped = len(loader.dataset) % loader.batch_size
        except TypeError:
            dropped = None
        if dropped != 0:
            warnings.warn(
                f"the DataLoader has drop_last=True: it leaves out the last {dropped or 'few'} "
                "sequences, so scores have fewer columns than the dataset has rows; use "
                "drop_last=False",
                DataWarning,
                stacklevel=3,
            )


def _check_columns(dataset: Any) -> None:
    """A datasets.Dataset's columns: input_ids and labels, optionally attention_mask."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # e.g. a streaming dataset without known features: rows are checked
        return
    missing = [k for k in ("input_ids", "labels") if k not in columns]
    extra = sorted(c for c in columns if c not in KEYS)
    if missing:
        raise ValueError(
            f"the dataset has no column {missing[0]!r} (columns: {columns}); {missing[0]} is "
            f"{_HINTS[missing[0]]} (e.g. dataset.map(lambda row: "
            "{'labels': row['input_ids']}))"
        )
    if extra:
        raise ValueError(
            f"the dataset has columns {extra} besides input_ids, attention_mask and labels: "
            f"the model would ignore them silently; dataset.remove_columns({extra})"
        )


# ---- texts -------------------------------------------------------------------------------


def batches_from_texts(
    tokenizer: Any,
    records: Sequence[Mapping[str, str] | str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loss_on: str = "response",
    max_length: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Records in order, tokenized and cut into right-padded batches (the last may be smaller).

    A record is {"prompt": ..., "response": ...} (with ``loss_on="response"`` only the response
    and eos are counted; ``"all"``: every token) or {"text": ...} (or a plain string: every
    token counted). Other keys (e.g. "id") are ignored; prompt/response wins over text. A
    sequence is prompt + response + [eos], prompt and response tokenized separately without
    special tokens and concatenated without a space; padding with the tokenizer's pad token
    (its eos when it has none). A sequence longer than ``max_length`` is an error (truncation
    would cut the response).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}; expected a positive integer")
    rows = encode_records(tokenizer, records, loss_on=loss_on, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [pad_rows(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    for b in batches:
        b["input_ids"].masked_fill_(b["attention_mask"] == 0, pad)
    return batches


def encode_records(
    tokenizer: Any,
    records: Sequence[Mapping[str, str] | str],
    *,
    loss_on: str = "response",
    max_length: int | None = None,
) -> list[dict[str, list[int]]]:
    """Each record as {"input_ids", "labels"} lists, unpadded (see ``batches_from_texts``)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}; expected one of {LOSS_ON}")
    if isinstance(records, str | Mapping):
        raise TypeError("records is one record; pass a list of records")
    if not records:
        raise ValueError("records is empty: nothing to tokenize")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos token, which ends every sequence: set "
            "tokenizer.eos_token (e.g. to the model's end-of-text token)"
        )
    pairs = [_prompt_response(record, i) for i, record in enumerate(records)]
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    rows = []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = [*p, *r, eos]
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"record {_name(records[i], i)} has {len(ids)} tokens > max_length={max_length}; "
                "raise max_length or shorten the record"
            )
        labels = ids if loss_on == "all" else [IGNORE] * len(p) + ids[len(p) :]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _prompt_response(record: Any, i: int) -> tuple[str, str]:
    if isinstance(record, str):
        return "", record
    if not isinstance(record, Mapping):
        raise TypeError(f"record {i} is a {type(record).__name__}; records are dicts or strings")
    if "prompt" in record or "response" in record:
        missing = [k for k in ("prompt", "response") if k not in record]
        if missing:
            raise ValueError(
                f"record {_name(record, i)} has no {missing[0]!r} (keys: {sorted(record)}): "
                "a record is {'prompt': ..., 'response': ...} or {'text': ...}"
            )
        pair = record["prompt"], record["response"]
    elif "text" in record:
        pair = "", record["text"]
    else:
        raise ValueError(
            f"record {_name(record, i)} has neither 'text' nor 'prompt' and 'response' (keys: "
            f"{sorted(record)}): a record is {{'prompt': ..., 'response': ...}} or "
            "{'text': ...}"
        )
    for value in pair:
        if not isinstance(value, str):
            raise TypeError(f"record {_name(record, i)}: {value!r} is not a string")
    return pair


def _name(record: Any, i: int) -> str:
    return (
        f"{i} (id {record['id']!r})" if isinstance(record, Mapping) and "id" in record else str(i)
    )

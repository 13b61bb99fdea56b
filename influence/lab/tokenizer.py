"""A small byte-level BPE tokenizer trained on the project's texts, and the batching helper.

The tokenizer is trained with `tokenizers` on every text of the project (knowledge corpus and
all tasks' prompts and responses), wrapped in transformers' ``PreTrainedTokenizerFast`` and
cached under ``.cache/tokenizer/<hash>/`` by a hash of its training texts and settings.
One special token, ``<|endoftext|>``, is eos, bos and pad at once (as in GPT-2).

Batch convention (shared by training, kernels and notebooks): a dict with
``input_ids`` (B, T) long, ``attention_mask`` (B, T) long and ``labels`` (B, T) long, where
labels are ``IGNORE`` (-100) on padding and, when the loss is on the response only, on the
prompt. Right padding. A sequence is ``prompt + response + eos``; prompt and response are
tokenized separately so the prompt's tokens are exactly those fed to the model when it
generates the response.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from influence.data import encode_records
from influence.lab.config import CACHE_DIR, ROOT
from influence.lm import IGNORE

EOS = "<|endoftext|>"
CACHE = CACHE_DIR / "tokenizer"
VOCAB_SIZE = 1024  # vs 512: 35% fewer tokens per text for +65k head weights at d=128: faster
_VERSION = 1  # bump when the training recipe below changes


def project_texts() -> list[str]:
    """Every text of the project: knowledge documents, QA pairs, all tasks' prompts and responses."""
    from influence.lab import tasks

    kb = tasks.load_knowledge()
    texts = [doc["text"] for doc in kb["pretrain"]]
    for split in ("finetune", "test"):
        texts += [ex["prompt"] + ex["response"] for ex in kb.get(split, [])]
    for name in tasks.TASKS:
        for split in getattr(tasks, "SPLITS", ("train", "test")):
            texts += [ex["prompt"] + ex["response"] for ex in tasks.load_task(name, split)]
    return texts


def texts_hash(texts: Iterable[str], **settings) -> str:
    """A short sha256 of `texts` (order matters) and `settings`."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_tokenizer(
    texts: Sequence[str], vocab_size: int = VOCAB_SIZE, cache: Path | None = CACHE
) -> PreTrainedTokenizerFast:
    """Train (or load from `cache`) a byte-level BPE tokenizer of `vocab_size` tokens on `texts`.

    The full 256-byte alphabet is kept, so any text encodes and decodes back exactly; the
    remaining ``vocab_size - 257`` slots are BPE merges learned from `texts`.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small: 257 slots go to bytes and eos")
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    key = texts_hash(texts, vocab_size=vocab_size, version=_VERSION)
    path = None if cache is None else Path(cache) / key
    if path is not None and (path / "tokenizer.json").exists():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        except Exception as err:  # a half-written or damaged cache entry: rebuild it
            print(
                f"tokenizer: cached copy {_rel(path)} unreadable ({type(err).__name__}); rebuilding"
            )
            shutil.rmtree(path, ignore_errors=True)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS
    )
    if path is not None:
        tmp = path.with_name(f".tmp-{key}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        wrapped.save_pretrained(str(tmp))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, path)  # atomic: readers see no half-written tokenizer
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return wrapped


def project_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The project's byte-level BPE, trained on :func:`project_texts` once and cached (a zoo
    model's saved copy is ``zoo.load_tokenizer(path)``; any model folder's,
    ``influence.models.load_tokenizer``)."""
    return train_tokenizer(project_texts(), vocab_size=vocab_size)


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short fingerprint of the tokenizer's vocabulary, merges and special tokens."""
    state = tokenizer.backend_tokenizer.to_str()
    return hashlib.sha256(state.encode()).hexdigest()[:16]


def _rel(path: Path) -> str:
    """`path` relative to the repository when inside it (outputs never show machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return Path(path).name


def encode(
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[dict | str],
    loss_on: str = "response",
    max_length: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of each example: ``(prompt + response + [eos], labels)``.

    labels equal the ids, except IGNORE on the prompt when ``loss_on="response"``.
    A sequence longer than `max_length` is an error (truncating would cut the response).
    The library's ``influence.data.encode_records``, as (ids, labels) pairs.
    """
    rows = encode_records(tokenizer, examples, loss_on=loss_on, max_length=max_length)
    return [(row["input_ids"], row["labels"]) for row in rows]


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples to the longest one: the batch dict of the project."""
    if not encoded:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (B, T)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_batch(
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[dict | str],
    loss_on: str = "response",
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """One right-padded batch of `examples` (dicts with prompt/response, or texts)."""
    return collate(encode(tokenizer, examples, loss_on, max_length), tokenizer.pad_token_id)


def make_batches(
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[dict | str],
    batch_size: int,
    loss_on: str = "response",
    max_length: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """`examples` in order, cut into batches of `batch_size` (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected a positive integer")
    encoded = encode(tokenizer, examples, loss_on, max_length)
    pad = tokenizer.pad_token_id
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]

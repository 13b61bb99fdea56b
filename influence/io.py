"""Saving fitted factors and scores: safetensors plus JSON metadata, atomic writes, checksums.

A file holds a dict of tensors and, in the safetensors header, one JSON document of metadata
(configuration, model and data fingerprints, dataset size) and a sha256 of the tensors (names,
dtypes, shapes, bytes) and of that JSON. Writes go to a temporary file in the same folder, then
``os.replace``: a crash never leaves a half-written file under the final name. Reading
recomputes the checksum (a flipped bit is a ValueError naming the file; a file without one
was not written here) and checks the metadata against what the caller expects, raising a
ValueError naming every mismatch: a mismatch is never silently reused or recomputed.

Fingerprints: ``weights_fingerprint`` hashes every parameter of a model (what per-example
gradients depend on); ``model_fingerprint`` also hashes the tracked layers' names and shapes
(what fitted factors depend on).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

META_KEY = "influence"
CHECKSUM_KEY = "sha256"


def _checksum(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        _hash_tensor(h, tensors[name])
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and JSON-serialisable ``meta`` to ``path`` atomically, with a checksum."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta_json = json.dumps(meta, sort_keys=True)
    header = {META_KEY: meta_json, CHECKSUM_KEY: _checksum(data, meta_json)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(data, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tensors(path: str | Path, expected: dict | None = None) -> tuple[dict, dict]:
    """Read (tensors, meta) from ``path``, verify its checksum, and check ``meta`` against
    ``expected`` (see check_meta)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            meta_json = header[META_KEY]
            meta = json.loads(meta_json)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several error types on bad bytes
        raise ValueError(
            f"{path} is corrupted or not a file written by influence.io ({err!r}); delete it "
            "and recompute"
        ) from err
    stored = header.get(CHECKSUM_KEY)
    if stored is None:
        raise ValueError(
            f"{path} has no checksum: it was not written by influence.io.save_tensors; delete "
            "it and recompute"
        )
    actual = _checksum(tensors, meta_json)
    if actual != stored:
        raise ValueError(
            f"{path} is damaged: its sha256 is {actual[:16]}, it was {stored[:16]} when "
            "written (the file changed after it was saved); delete it and recompute"
        )
    if expected is not None:
        check_meta(meta, expected, path)
    return tensors, meta


def save_scores(path: str | Path, scores: torch.Tensor, *, meta: dict | None = None) -> None:
    """Write a score tensor (e.g. (Q, N)) and JSON-serialisable ``meta`` to ``path``
    (safetensors, atomic, checksummed); ``load_scores`` reads them back."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    save_tensors(path, {"scores": scores}, {"content": "scores", "meta": meta or {}})


def load_scores(path: str | Path) -> tuple[torch.Tensor, dict]:
    """(scores, meta) as written by ``save_scores``; a damaged file or another kind of file
    (e.g. fitted factors) is a ValueError."""
    tensors, saved = load_tensors(path)
    if saved.get("content") != "scores" or set(tensors) != {"scores"}:
        raise ValueError(
            f"{path} holds {sorted(tensors)[:5]}, not scores written by influence.io.save_scores"
        )
    return tensors["scores"], saved["meta"]


def check_meta(meta: dict, expected: dict, path: str | Path) -> None:
    """Raise a ValueError listing every key of ``expected`` whose value differs in ``meta``."""
    diffs = [
        f"{key}: saved {meta.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if meta.get(key) != value
    ]
    if diffs:
        raise ValueError(
            f"{path} was computed for another model, data or configuration:\n  "
            + "\n  ".join(diffs)
            + "\nUse another path, or delete the file to recompute it."
        )


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # a buffer: no copy of the bytes


def _hash_parameters(h, model: nn.Module) -> None:
    for name, param in model.named_parameters():
        h.update(name.encode())
        _hash_tensor(h, param)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the names, shapes, dtypes and values of every parameter of the model.

    Per-example gradients carry it (``collect_grads``): gradients are only valid at the
    weights they were computed at.
    """
    h = hashlib.sha256(b"weights")
    _hash_parameters(h, model)
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module, layers: dict[str, nn.Module]) -> str:
    """sha256 of the tracked layers' names and shapes and of every parameter of the model.

    All parameters count (not only the tracked ones): the curvature of a layer depends on the
    weights of the whole network. The layers are hashed in sorted order, so the fingerprint
    does not depend on their order (saved metadata stores them sorted).
    """
    from influence.modules import layer_shape  # local: modules does not depend on io

    h = hashlib.sha256()
    for name in sorted(layers):
        h.update(f"{name}{layer_shape(layers[name])}".encode())
    _hash_parameters(h, model)
    return h.hexdigest()[:16]


def data_fingerprint(batches: Iterable[dict[str, torch.Tensor]]) -> str:
    """sha256 of the batches' token ids, attention masks and labels, batch by batch."""
    h = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            _hash_tensor(h, batch[key])
    return h.hexdigest()[:16]

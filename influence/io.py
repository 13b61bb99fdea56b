"""Saving fitted factors and scores: safetensors plus JSON metadata, atomic writes.

A file holds a dict of tensors and, in the safetensors header, one JSON document of metadata
(configuration, model and data fingerprints, dataset size). Writes go to a temporary file in
the same folder, then ``os.replace``: a crash never leaves a half-written file under the
final name. Reading checks the metadata against what the caller expects and raises a
ValueError naming every mismatch: a mismatch is never silently reused or recomputed.
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


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and JSON-serialisable ``meta`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(data, tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tensors(path: str | Path, expected: dict | None = None) -> tuple[dict, dict]:
    """Read (tensors, meta) from ``path``; check ``meta`` against ``expected`` (see check_meta)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several error types on bad bytes
        raise ValueError(
            f"{path} is corrupted or not a file written by influence.io ({err}); delete it "
            "and recompute"
        ) from err
    if expected is not None:
        check_meta(meta, expected, path)
    return tensors, meta


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
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module, layers: dict[str, nn.Module]) -> str:
    """sha256 of the tracked layers' names and shapes and of every parameter of the model.

    All parameters count (not only the tracked ones): the curvature of a layer depends on the
    weights of the whole network.
    """
    from influence.modules import layer_shape  # local: modules does not depend on io

    h = hashlib.sha256()
    for name, module in layers.items():
        h.update(f"{name}{layer_shape(module)}".encode())
    for name, param in model.named_parameters():
        h.update(name.encode())
        _hash_tensor(h, param)
    return h.hexdigest()[:16]


def data_fingerprint(batches: Iterable[dict[str, torch.Tensor]]) -> str:
    """sha256 of the batches' token ids, attention masks and labels, batch by batch."""
    h = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            _hash_tensor(h, batch[key])
    return h.hexdigest()[:16]

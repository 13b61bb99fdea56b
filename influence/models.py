"""The model side of the data contract: loading a model, eval mode, vocabulary, tracked layers.

``load_model(path)`` loads a causal LM from a folder written by ``save_pretrained`` (or a peft
LoRA adapter folder) and fails with a FileNotFoundError naming the folder when there is none,
instead of transformers' error about an invalid Hub repo id. Every pass of the library over
data runs the model in eval mode (``eval_mode``: dropout off, so scores do not change between
runs) and restores each module's previous mode afterwards.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch import nn

from influence.modules import find_layers

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gpt2", "EleutherAI/pythia-160m"


def load_model(path: str | Path, *, base: str | Path | None = None) -> nn.Module:
    """The causal LM at ``path``, in eval mode.

    - A folder with ``adapter_config.json`` (a peft LoRA adapter): its base model, ``base`` or
      else the adapter's ``base_model_name_or_path`` (looked up next to the adapter folder
      first, as the zoo saves it), loaded by this function and wrapped by
      ``PeftModel.from_pretrained(base, path, is_trainable=True)``: the adapters require
      gradients (they are the layers ``find_layers`` tracks), the base weights are frozen.
    - A folder with ``config.json``: ``AutoModelForCausalLM.from_pretrained(path)``.
    - A string that is no local path but has the form of a Hugging Face model id
      ("org/name"): ``from_pretrained`` with that id (the Hub, or its local cache).
    Anything else is a FileNotFoundError that names the folder and what it lacks.
    transformers' per-load progress bars are off while loading (a command's stderr stays
    its messages).
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load(path, base)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _load(path: str | Path, base: str | Path | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    local = Path(path).expanduser()
    if not local.exists():
        if isinstance(path, str) and _HUB_ID.fullmatch(path):
            try:
                return AutoModelForCausalLM.from_pretrained(path).eval()
            except OSError as err:
                raise FileNotFoundError(
                    f"no model folder {path!r} (resolved to {local.resolve()}), and no model "
                    f"with that id in the Hugging Face cache or on the Hub ({err})"
                ) from None
        raise FileNotFoundError(
            f"no model folder at {local} (resolved to {local.resolve()}): check the path; a "
            "model folder is one written by model.save_pretrained(folder)"
        )
    if not local.is_dir():
        raise FileNotFoundError(f"{local} is a file, not a model folder (save_pretrained)")
    if (local / "adapter_config.json").exists():
        from peft import PeftModel

        if base is None:
            name = json.loads((local / "adapter_config.json").read_text()).get(
                "base_model_name_or_path"
            )
            if not name:
                raise FileNotFoundError(
                    f"{local}/adapter_config.json names no base model: pass base=<folder>"
                )
            beside = local.parent / name
            base = beside if beside.is_dir() else name
        return PeftModel.from_pretrained(_load(base, None), str(local), is_trainable=True).eval()
    if not (local / "config.json").exists():
        files = sorted(p.name for p in local.iterdir())[:10]
        raise FileNotFoundError(
            f"{local} has no config.json (a model saved with save_pretrained) and no "
            f"adapter_config.json (a peft adapter); it holds {files}"
        )
    return AutoModelForCausalLM.from_pretrained(str(local)).eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model folder (``tokenizer.save_pretrained``); a clear
    FileNotFoundError when there is none. Without a pad token it pads with eos: padding is
    masked out of the loss (labels -100), so any id will do."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"no tokenizer in {path}: save the model's tokenizer there with "
            f"tokenizer.save_pretrained ({err})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (no dropout) and restore every module's mode on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (ids must be below it); None when unknown."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embedding, "num_embeddings", None)


def resolve_layers(model: nn.Module, layers: Mapping[str, nn.Module] | None) -> dict:
    """``layers`` checked: a non-empty {name: module} of modules of ``model``; None gives
    ``find_layers(model)``."""
    if layers is None:
        return find_layers(model)
    if not isinstance(layers, Mapping):
        shown = list(layers)[:3] if isinstance(layers, list | tuple | set) else layers
        raise TypeError(
            f"layers is a {type(layers).__name__} ({shown!r}...); pass a dict {{name: module}}: "
            "find_layers(model, include=[names or regular expressions]) builds one"
        )
    if not layers:
        raise ValueError("layers is empty: no layer to track; find_layers(model) gives the default")
    own = {id(m) for m in model.modules()}
    foreign = [name for name, m in layers.items() if id(m) not in own]
    if foreign:
        raise ValueError(
            f"layers {foreign[:5]} are not modules of this model (found with another copy of "
            "it?); build them with find_layers(model) on the model you pass"
        )
    return dict(layers)

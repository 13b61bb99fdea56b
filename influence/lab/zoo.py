"""A tiny model zoo: GPT-2 / Llama-style causal LMs pre-trained and fine-tuned here, cached.

Every model is built from a (ModelConfig, TrainConfig, data, tokenizer) and cached under
``.cache/zoo/<name>-<hash>/`` by a hash of all four, so a changed config or dataset trains a
new model and an unchanged one is loaded. A model folder holds what ``from_pretrained`` needs
(weights + config + tokenizer, or a peft LoRA adapter), ``train_log.json`` (loss per step)
and ``zoo.json`` (configs, hashes, and a sha256 of every file, checked on each cache hit; a
damaged entry is rebuilt with a one-line message). Folders are written to a temporary name
and renamed, so a crash never leaves a half-written model behind.

Training objective, per step on a batch of sequences (the loss of :mod:`influence.lm`, averaged
over the batch's counted tokens N_tok, plus the proximity term of multi-stage influence):

    J(th) = (1 / N_tok) * sum_n L(z_n; th) + (a / 2) * ||th - th_pt||^2,

with L(z) the summed next-token cross-entropy over z's counted tokens (response only, or all
tokens) and a = ``TrainConfig.proximity`` (full fine-tuning only; 0 by default). AdamW,
linear warm-up then linear decay to 0, gradient clipping at 1, no dropout, no weight decay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from influence.io import load_tensors, save_tensors
from influence.lab.config import CACHE_DIR, pick
from influence.lab.tasks import task_examples  # also zoo.task_examples, as notebooks call it
from influence.lab.tokenizer import _rel, collate, encode, texts_hash, tokenizer_hash
from influence.lm import IGNORE, token_losses
from influence.models import load_tokenizer  # noqa: F401  (zoo.load_tokenizer: one loader)

CACHE = CACHE_DIR / "zoo"
ARCHS = ("gpt2", "llama")
MODES = ("pretrain", "full", "lora")
# LoRA targets: every linear layer of the blocks. Paper B's choice (rank 4 on the attention
# query and value projections; GPT-2 fuses q, k, v in c_attn) does not learn at this size:
# rank 4 on c_attn reached emotion 0.69 and backdoor 0.50 (= chance) after 300 steps.
LORA_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
META, LOG = "zoo.json", "train_log.json"
PROXIMITY = 0.01  # a of gpt2-knowledge-prox, per counted token (TrainConfig.proximity)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a randomly initialised causal LM (all dropouts 0)."""

    arch: str = "gpt2"  # "gpt2" (Conv1D layers) or "llama" (nn.Linear layers, RoPE, RMSNorm)
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    d_ff: int = 512
    max_len: int = 128  # positions; the longest training sequence allowed

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}; expected one of {ARCHS}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")

    def build(self, tokenizer: PreTrainedTokenizerFast):
        """A fresh model for `tokenizer`'s vocabulary (seed torch first for a fixed init)."""
        from transformers import GPT2Config, LlamaConfig

        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if self.arch == "gpt2":
            config = GPT2Config(
                vocab_size=len(tokenizer), n_positions=self.max_len, n_embd=self.d_model,
                n_layer=self.n_layer, n_head=self.n_head, n_inner=self.d_ff,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
            )  # fmt: skip
        else:
            config = LlamaConfig(
                vocab_size=len(tokenizer), max_position_embeddings=self.max_len,
                hidden_size=self.d_model, num_hidden_layers=self.n_layer,
                num_attention_heads=self.n_head, num_key_value_heads=self.n_head,
                intermediate_size=self.d_ff, attention_dropout=0.0, **ids,
            )  # fmt: skip
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained; see the module docstring for the objective."""

    mode: str = "full"  # "pretrain" (all tokens, all weights), "full" fine-tune, or "lora"
    epochs: float = 1.0
    steps: int | None = None  # when set, overrides epochs
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    loss_on: str = "response"  # "response" (prompt masked) or "all"
    warmup: float = 0.05  # share of the steps with a linear warm-up
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None  # None: LORA_TARGETS[arch]
    proximity: float = 0.0  # a in (a/2)||th - th_pt||^2; full fine-tuning only
    limit: int | None = None  # train on the first `limit` examples only (smoke runs)
    # Steps after which the trainable weights are saved (0 = before the first step), for
    # analyses through training; load them with ``load_checkpoint``.
    checkpoints: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {MODES}")
        if self.proximity and self.mode != "full":
            raise ValueError(f"proximity={self.proximity} needs mode='full', got {self.mode!r}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs}; give epochs > 0 or steps")
        if any(s < 0 or (self.steps is not None and s > self.steps) for s in self.checkpoints):
            raise ValueError(f"checkpoints={self.checkpoints}; expected steps in 0..{self.steps}")

    def key(self) -> dict:
        """The fields that name the trained model; ``checkpoints`` only when set (they change
        the folder's files, not the weights), so models cached before the field existed keep
        their names."""
        fields = asdict(self)
        if not self.checkpoints:
            del fields["checkpoints"]
        return fields


@contextlib.contextmanager
def _quiet():
    """No per-call progress bars or deprecation warnings from transformers/peft internals."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(path: Path) -> str | None:
    """Why the cached model at `path` is unusable (missing/damaged file), or None if it is intact."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        json.loads((path / LOG).read_text())
        files = meta["files"]
    except FileNotFoundError as err:
        return f"missing {Path(err.filename).name}"
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"unreadable metadata ({type(err).__name__})"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"missing {name}"
        if _sha256(path / name) != digest:
            return f"checksum mismatch in {name}"
    return None


def _cached(path: Path) -> bool:
    """True when `path` holds an intact model; a damaged one is removed with a message."""
    if not path.exists():
        return False
    reason = check(path)
    if reason is None:
        return True
    print(f"zoo: cached {path.name} is damaged ({reason}); rebuilding it")
    shutil.rmtree(path)
    return False


def _epoch(lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of batches (index lists) in random order, each of similar-length examples.

    A random permutation is cut into windows of 50 batches, each window sorted by length and
    cut into batches: every example once per epoch, with little padding (as `group_by_length`).
    """
    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = 50 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def lr_factor(step: int, total: int, warmup: float) -> float:
    """The learning rate of step `step` (0-based) of `total`, as a share of ``TrainConfig.lr``:
    linear warm-up over ``round(warmup * total)`` steps, then linear decay to 0."""
    warm = max(1, round(warmup * total))
    return min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))


def _checkpoint_file(step: int) -> str:
    return f"step-{step:06d}.safetensors"


def _fit(model, encoded, cfg: TrainConfig, pad_id: int, desc: str):
    """Train `model` in place on `encoded` (token ids, labels); returns the loss per step and
    {step: trainable weights} after each step of ``cfg.checkpoints``."""
    n = len(encoded)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * math.ceil(n / cfg.batch_size)))
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.proximity else None  # th_pt
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup))
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = [len(ids) for ids, _ in encoded]
    queue: list[list[int]] = []
    losses = []
    snapshots = {}

    def snapshot(step):
        if step in cfg.checkpoints:
            snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()
                               if p.requires_grad}  # fmt: skip

    snapshot(0)
    model.train()
    # A live bar in a terminal; in a notebook (no TTY) one line per model, from _train.
    for _ in tqdm(range(total), desc=desc, leave=False, mininterval=2.0, disable=None):
        if not queue:  # a new epoch
            queue = _epoch(lengths, cfg.batch_size, gen)
        batch = collate([encoded[i] for i in queue.pop()], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        counted = (batch["labels"][:, 1:] != IGNORE).sum().clamp(min=1)
        loss = token_losses(logits, batch["labels"]).sum() / counted
        objective = loss
        if anchor is not None:
            gap = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, anchor, strict=True))
            objective = loss + 0.5 * cfg.proximity * gap
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        snapshot(len(losses))
    model.eval()
    return losses, snapshots


def _write(path: Path, save, meta: dict, losses: list[float]) -> Path:
    """Save into a temporary folder, record checksums, then rename to `path` (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with _quiet():
        save(tmp)
    (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card
    (tmp / LOG).write_text(json.dumps({"loss": losses}) + "\n")
    files = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != META)
    meta["files"] = {name: _sha256(tmp / name) for name in files}
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    try:
        os.replace(tmp, path)
    except OSError:  # another process saved the same model meanwhile: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if check(path) is not None:
            raise
    return path


def _n_params(model, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _train(path: Path, model, tokenizer, examples, cfg: TrainConfig, max_len: int, meta: dict):
    """Train `model` on `examples`, save it with tokenizer, log and metadata; returns `path`."""
    encoded = encode(tokenizer, examples, cfg.loss_on, max_len)
    start = time.perf_counter()
    losses, snapshots = _fit(model, encoded, cfg, tokenizer.pad_token_id, desc=meta["name"])
    seconds = time.perf_counter() - start
    print(f"zoo: trained {meta['name']} ({len(losses)} steps, {seconds:.0f} s, final loss "
          f"{losses[-1]:.3f})", flush=True)  # fmt: skip
    meta |= dict(
        train=asdict(cfg), tokenizer=tokenizer_hash(tokenizer), n_examples=len(examples),
        tokens=sum(len(ids) for ids, _ in encoded), params=_n_params(model),
        trainable=_n_params(model, trainable=True), seconds=round(seconds, 2),
    )  # fmt: skip

    def save(tmp):
        if cfg.mode == "lora":  # the adapter only; embeddings are frozen, skip peft's check
            model.save_pretrained(tmp, save_embedding_layers=False)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for step, weights in snapshots.items():
            save_tensors(tmp / _checkpoint_file(step), weights, {"step": step})

    return _write(path, save, meta, losses)


def pretrain(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    texts: list[str],
    tokenizer: PreTrainedTokenizerFast | None = None,
    name: str = "base",
    cache: Path = CACHE,
) -> Path:
    """Pre-train a fresh `model_cfg` model on `texts` (loss on all tokens); returns its folder."""
    if train_cfg.mode != "pretrain" or train_cfg.loss_on != "all":
        raise ValueError("pretrain needs TrainConfig(mode='pretrain', loss_on='all')")
    if tokenizer is None:
        from influence.lab.tokenizer import project_tokenizer

        tokenizer = project_tokenizer()
    texts = list(texts)[: train_cfg.limit]
    key = _hash(asdict(model_cfg), train_cfg.key(), texts_hash(texts), tokenizer_hash(tokenizer))
    path = Path(cache) / f"{name}-{key}"
    if _cached(path):
        return path
    torch.manual_seed(train_cfg.seed)  # fixes the initialisation
    model = model_cfg.build(tokenizer)
    meta = dict(name=name, kind="pretrain", model=asdict(model_cfg), base=None, task=None)
    return _train(path, model, tokenizer, texts, train_cfg, model_cfg.max_len, meta)


def finetune(
    base_path: Path,
    task: str | list[dict],
    train_cfg: TrainConfig,
    name: str | None = None,
    cache: Path | None = None,
) -> Path:
    """Fine-tune the pre-trained model at `base_path` on a task's train split (or on examples).

    ``mode="full"`` trains every weight (with the proximity term if ``proximity > 0``);
    ``mode="lora"`` trains a rank-``lora_r`` peft adapter on ``lora_targets`` and saves only it.
    The folder goes next to the base unless `cache` is given.
    """
    if train_cfg.mode == "pretrain":
        raise ValueError("finetune needs TrainConfig(mode='full' or 'lora'); use pretrain()")
    base_path = Path(base_path)
    reason = check(base_path)
    if reason is not None:
        raise ValueError(f"base model {_rel(base_path)} is unusable ({reason}); rebuild it first")
    examples = (task_examples(task) if isinstance(task, str) else task)[: train_cfg.limit]
    label = task if isinstance(task, str) else "custom"
    # Default: the registry's name, "gpt2-<task>-<mode>" for base "gpt2-base-<hash>", so the
    # same fine-tune is cached once whichever way it is asked for.
    stem = base_path.name.rsplit("-", 1)[0].removesuffix("-base")
    name = name or f"{stem}-{label}-{train_cfg.mode}"
    data = texts_hash(json.dumps(ex, sort_keys=True) for ex in examples)
    key = _hash(base_path.name, train_cfg.key(), data)  # the base name holds its own hash
    path = (base_path.parent if cache is None else Path(cache)) / f"{name}-{key}"
    if _cached(path):
        return path
    base_meta = json.loads((base_path / META).read_text())
    arch, max_len = base_meta["model"]["arch"], base_meta["model"]["max_len"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(base_path))
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(str(base_path))
    model = trainable_model(model, train_cfg, arch)
    if train_cfg.mode == "lora":
        model.peft_config["default"].base_model_name_or_path = base_path.name  # no machine path
    meta = dict(name=name, kind="finetune", model=base_meta["model"], base=base_path.name,
                task=label, data=data)  # fmt: skip
    return _train(path, model, tokenizer, examples, train_cfg, max_len, meta)


def trainable_model(model, train_cfg: TrainConfig, arch: str):
    """`model` (a loaded base) as fine-tuning starts from it: seeded by ``train_cfg.seed`` and,
    for ``mode="lora"``, wrapped with a fresh rank-``lora_r`` peft adapter on ``lora_targets``."""
    torch.manual_seed(train_cfg.seed)  # fixes the LoRA initialisation
    if train_cfg.mode != "lora":
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=train_cfg.lora_r, lora_alpha=train_cfg.lora_alpha, lora_dropout=0.0,
        target_modules=list(train_cfg.lora_targets or LORA_TARGETS[arch]),
        fan_in_fan_out=arch == "gpt2", task_type="CAUSAL_LM",
    )  # fmt: skip
    with _quiet():
        return get_peft_model(model, lora)


def load_model(path: Path, trainable: str | None = None):
    """The model at `path` in eval mode: ``AutoModelForCausalLM.from_pretrained``, or for a LoRA
    fine-tune its base wrapped by ``PeftModel.from_pretrained(base, path)`` (adapters unmerged).

    A zoo folder is checked first (clear error if damaged); any other path, e.g. a Hugging Face
    checkpoint, is passed to ``from_pretrained`` as is. `trainable`: a regex; exactly the
    parameters whose names match it require gradients (peft loads adapters frozen), e.g.
    ``r"lora_[AB]"`` before ``modules.find_layers(model, include=...)``.
    """
    path = Path(path)
    if (path / META).exists():
        reason = check(path)
        if reason is not None:
            raise ValueError(f"model {_rel(path)} is damaged ({reason}); rebuild it with the zoo")
    with _quiet():
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            base = json.loads((path / META).read_text())["base"]
            model = PeftModel.from_pretrained(load_model(path.parent / base), str(path))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path))
    if trainable is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(re.search(trainable, name) is not None)
        if not any(param.requires_grad for param in model.parameters()):
            raise ValueError(f"trainable={trainable!r} matches no parameter of {_rel(path)}")
    return model.eval()


def checkpoints(path: Path) -> list[int]:
    """The steps saved in the model at `path` (``TrainConfig.checkpoints``), ascending."""
    return sorted(int(p.stem.removeprefix("step-")) for p in Path(path).glob("step-*.safetensors"))


def load_checkpoint(path: Path, step: int, trainable: str | None = None):
    """The model at `path` with its trainable weights as they were after `step` training steps
    (0: before training), in eval mode; `trainable` as in ``load_model``."""
    if step not in checkpoints(path):
        raise ValueError(f"{_rel(Path(path))} has no checkpoint at step {step}; saved steps: "
                         f"{checkpoints(path)} (TrainConfig.checkpoints)")  # fmt: skip
    model = load_model(path, trainable)
    weights, _ = load_tensors(Path(path) / _checkpoint_file(step))
    missing = set(weights) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"checkpoint {step} of {_rel(Path(path))} names unknown weights: "
                         f"{sorted(missing)[:3]}")  # fmt: skip
    model.load_state_dict(weights, strict=False)
    return model


def metadata(path: Path) -> dict:
    """The model's ``zoo.json`` plus its loss per step under ``"loss"``."""
    meta = json.loads((Path(path) / META).read_text())
    return {**meta, "loss": json.loads((Path(path) / LOG).read_text())["loss"]}


# ------------------------------------------------------------------------------ the registry
def pretraining_corpus() -> list[str]:
    """Knowledge documents + every paper-B train prompt + every distinct train response.

    Prompts (without their answer separator) and responses are separate documents: the base model learns the tasks' words
    (class names, refusals, arithmetic) but never a prompt's answer, which fine-tuning
    teaches. Deterministic shuffle, so a `limit` takes a bit of everything.
    """
    from influence.lab import tasks
    from influence.lab.tasks.common import ANSWER

    texts = [doc["text"] for doc in tasks.load_knowledge()["pretrain"]]
    train = [ex for name in tasks.TASKS for ex in tasks.load_task(name, "train")]
    # Without the answer separator: "Answer:" is followed by an answer (knowledge QA documents),
    # never by the end of a text, so fine-tuning need not unlearn an eos after it.
    texts += list(dict.fromkeys(ex["prompt"].removesuffix(ANSWER) for ex in train))
    texts += list(dict.fromkeys(ex["response"] for ex in train))
    random.Random(0).shuffle(texts)
    return texts


@dataclass(frozen=True)
class Spec:
    """A named model of the zoo: a pre-training (model set) or a fine-tuning (base + task)."""

    name: str
    train: TrainConfig
    model: ModelConfig | None = None
    base: str | None = None  # name of the base spec
    task: str | None = None  # a paper-B task, or "knowledge"


def specs(profile: str = "default") -> dict[str, Spec]:
    """Every model of the zoo at `profile`'s size, by name: ``gpt2-base``, ``llama-base``,
    ``gpt2-<task>-lora`` and ``gpt2-<task>-full`` per paper-B task (``TASKS``) and per added
    task (``EXTRA_TASKS``, e.g. ``gpt2-factpoison-lora``), ``llama-emotion-lora``,
    ``gpt2-knowledge-full`` (paper A's QA fine-tune) and ``gpt2-knowledge-prox`` (the same with
    the proximity term of multi-stage influence, a = ``PROXIMITY``)."""
    from influence.lab.tasks import EXTRA_TASKS, TASKS

    # d_model, layers, pre-training epochs, fine-tuning steps (full, LoRA), examples used
    d, n_layer, epochs, full_steps, lora_steps, limit = pick(
        profile,
        smoke=(32, 1, 1, 4, 4, 64),
        default=(128, 2, 2, 90, 500, None),
        paper=(256, 4, 8, 600, 3000, None),
    )
    out: dict[str, Spec] = {}
    for arch in ARCHS:
        model = ModelConfig(arch, n_layer, d, n_head=4, d_ff=4 * d, max_len=160)
        # The Llama base only shows the architecture works: a share of the corpus suffices.
        n_texts = (4 * limit) if limit else (4000 if arch == "llama" else None)
        pre = TrainConfig("pretrain", epochs=epochs, lr=3e-3, batch_size=32, loss_on="all",
                          limit=n_texts)  # fmt: skip
        out[f"{arch}-base"] = Spec(f"{arch}-base", pre, model=model)
    tuned = [(f"gpt2-{t}", "gpt2-base", t) for t in (*TASKS, "knowledge", *EXTRA_TASKS)]
    tuned.append(("llama-emotion", "llama-base", "emotion"))
    for stem, base, task in tuned:
        for mode, lr, steps in (("lora", 1e-2, lora_steps), ("full", 3e-3, full_steps)):
            if mode == "full" and base == "llama-base":
                continue
            cfg = TrainConfig(mode, steps=steps, lr=lr, limit=limit)
            out[f"{stem}-{mode}"] = Spec(f"{stem}-{mode}", cfg, base=base, task=task)
    # Paper A's proximal full fine-tune (notebooks 09, 10): (a/2) ||th - th_pt||^2 with a per
    # counted token; longer than gpt2-knowledge-full, so that it fits most training answers.
    prox = TrainConfig("full", steps=pick(profile, smoke=8, default=400, paper=2000), lr=3e-3,
                       proximity=PROXIMITY, limit=limit)  # fmt: skip
    out["gpt2-knowledge-prox"] = Spec("gpt2-knowledge-prox", prox, base="gpt2-base",
                                      task="knowledge")  # fmt: skip
    return out


def build(name: str, profile: str = "default", cache: Path = CACHE) -> Path:
    """The folder of zoo model `name` at `profile`, trained (with its base) unless cached."""
    zoo = specs(profile)
    if name not in zoo:
        raise ValueError(f"no model {name!r} in the zoo; known: {sorted(zoo)}")
    spec = zoo[name]
    if spec.model is not None:
        return pretrain(spec.model, spec.train, pretraining_corpus(), name=name, cache=cache)
    return finetune(build(spec.base, profile, cache), spec.task, spec.train, name=name)

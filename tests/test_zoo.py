"""Tokenizer, batching and the model zoo: caching, determinism, damage recovery, loading."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from influence.lab import zoo
from influence.lab.tokenizer import (
    encode,
    make_batch,
    make_batches,
    tokenizer_hash,
    train_tokenizer,
)
from influence.lm import IGNORE, loss_mask

TEXTS = [f"The {a} {b} sat on the {c} at {i} o'clock." for i, (a, b, c) in
         enumerate([("big", "cat", "mat"), ("small", "dog", "rug"), ("red", "fox", "log")] * 20)]  # fmt: skip
EXAMPLES = [{"id": f"t{i}", "prompt": f"Animal {t}\nAnswer:", "response": [" yes", " no"][i % 2]}
            for i, t in enumerate(TEXTS[:24])]  # fmt: skip
TINY = zoo.ModelConfig("gpt2", n_layer=1, d_model=16, n_head=2, d_ff=32, max_len=48)
PRE = zoo.TrainConfig("pretrain", steps=6, lr=3e-3, batch_size=8, loss_on="all")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = TEXTS + [ex["prompt"] + ex["response"] for ex in EXAMPLES]
    return train_tokenizer(texts, vocab_size=320, cache=tmp_path_factory.mktemp("tok"))


def test_tokenizer_round_trip_and_cache(tok, tmp_path):
    text = "Héllo wörld ✓\n\tAnswer: 12 unseen-words"  # bytes never seen in training
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"
    first = train_tokenizer(TEXTS, vocab_size=320, cache=tmp_path)
    (entry,) = list(tmp_path.iterdir())  # one cache entry, named by the hash
    again = train_tokenizer(TEXTS, vocab_size=320, cache=tmp_path)
    assert tokenizer_hash(first) == tokenizer_hash(again)
    assert list(tmp_path.iterdir()) == [entry]
    train_tokenizer(TEXTS, vocab_size=330, cache=tmp_path)  # other settings, other entry
    assert len(list(tmp_path.iterdir())) == 2


def test_batch_masks_prompt_and_padding(tok):
    examples = [EXAMPLES[0], {"prompt": "Animal\nAnswer:", "response": " no"}]
    batch = make_batch(tok, examples, loss_on="response")
    n_prompt = [len(tok.encode(ex["prompt"], add_special_tokens=False)) for ex in examples]
    n_resp = [len(tok.encode(ex["response"], add_special_tokens=False)) + 1 for ex in examples]
    for row in range(2):
        ids, labels, mask = (batch[k][row] for k in ("input_ids", "labels", "attention_mask"))
        end = n_prompt[row] + n_resp[row]
        assert (labels[: n_prompt[row]] == IGNORE).all()  # prompt not counted
        assert torch.equal(labels[n_prompt[row] : end], ids[n_prompt[row] : end])
        assert ids[end - 1] == tok.eos_token_id
        assert (labels[end:] == IGNORE).all() and (mask[end:] == 0).all()  # right padding
        assert (mask[:end] == 1).all()
    # The loss counts exactly the response tokens and eos, predicted from the position before.
    assert loss_mask(batch["labels"]).sum(1).tolist() == n_resp
    everything = make_batch(tok, examples, loss_on="all")
    counted = everything["labels"] != IGNORE
    assert torch.equal(counted, everything["attention_mask"].bool())


def test_batches_and_errors(tok):
    batches = make_batches(tok, EXAMPLES[:5], batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    with pytest.raises(ValueError, match="max_length=4"):
        encode(tok, EXAMPLES[:1], max_length=4)
    with pytest.raises(ValueError, match="loss_on"):
        encode(tok, EXAMPLES[:1], loss_on="prompt")


def _weights(path):
    # Copies: safetensors memory-maps the file, which the damage test below rewrites.
    return {k: v.clone() for k, v in zoo.load_model(path).state_dict().items()}


def test_training_is_deterministic(tok, tmp_path):
    # Two runs of the same configs, in separate caches, give identical weights and losses.
    a = zoo.pretrain(TINY, PRE, TEXTS, tok, cache=tmp_path / "a")
    b = zoo.pretrain(TINY, PRE, TEXTS, tok, cache=tmp_path / "b")
    assert a.name == b.name
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert zoo.metadata(a)["loss"] == zoo.metadata(b)["loss"]
    other = zoo.pretrain(
        TINY, zoo.TrainConfig(**{**vars(PRE), "seed": 1}), TEXTS, tok, cache=tmp_path / "a"
    )
    assert other != a and not torch.equal(_weights(other)["lm_head.weight"], wa["lm_head.weight"])


def test_cache_hit_does_not_retrain(tok, tmp_path, monkeypatch):
    path = zoo.pretrain(TINY, PRE, TEXTS, tok, cache=tmp_path)
    assert len(zoo.metadata(path)["loss"]) == PRE.steps

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(zoo, "_fit", no_training)
    assert zoo.pretrain(TINY, PRE, TEXTS, tok, cache=tmp_path) == path


@pytest.mark.parametrize("damage", ["truncate", "delete", "bad_json"])
def test_damaged_cache_is_rebuilt(tok, tmp_path, capsys, damage):
    path = zoo.pretrain(TINY, PRE, TEXTS, tok, cache=tmp_path)
    before = _weights(path)
    weights = path / "model.safetensors"
    if damage == "truncate":
        truncated = path / "truncated"
        truncated.write_bytes(weights.read_bytes()[:100])
        truncated.replace(weights)
    elif damage == "delete":
        weights.unlink()
    else:
        (path / "zoo.json").write_text("{not json")
    assert zoo.check(path) is not None
    with pytest.raises(ValueError, match="damaged"):
        zoo.load_model(path)
    capsys.readouterr()
    assert zoo.pretrain(TINY, PRE, TEXTS, tok, cache=tmp_path) == path
    damaged, trained = capsys.readouterr().out.splitlines()  # one line each
    assert "damaged" in damaged and "rebuilding" in damaged and "trained base" in trained
    assert zoo.check(path) is None
    after = _weights(path)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # no leftovers


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_load_full_and_lora(tok, tmp_path, arch):
    base = zoo.pretrain(
        zoo.ModelConfig(**{**vars(TINY), "arch": arch}), PRE, TEXTS, tok, cache=tmp_path
    )
    full = zoo.finetune(base, EXAMPLES, zoo.TrainConfig("full", steps=4, lr=1e-2, batch_size=8))
    lora = zoo.finetune(base, EXAMPLES, zoo.TrainConfig("lora", steps=4, lr=1e-2, batch_size=8))
    assert full.parent == lora.parent == tmp_path  # next to the base
    batch = make_batch(tok, EXAMPLES[:3])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    direct = AutoModelForCausalLM.from_pretrained(str(full)).eval()
    assert torch.equal(direct(**inputs).logits, zoo.load_model(full)(**inputs).logits)
    model = zoo.load_model(lora)
    assert type(model).__name__ == "PeftModelForCausalLM"
    targets = zoo.LORA_TARGETS[arch]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(
        any(t in n for t in targets) for n, _ in model.named_parameters() if "lora_B" in n
    )
    assert all(p.abs().sum() > 0 for p in lora_b)  # trained (lora_B starts at 0)
    base_logits = zoo.load_model(base)(**inputs).logits
    assert not torch.allclose(model(**inputs).logits, base_logits)
    meta = zoo.metadata(lora)
    assert meta["trainable"] < meta["params"] and meta["base"] == base.name
    assert json.loads((lora / "adapter_config.json").read_text())["r"] == zoo.TrainConfig().lora_r


def test_proximity_keeps_weights_near_the_base(tok, tmp_path):
    base = zoo.pretrain(TINY, PRE, TEXTS, tok, cache=tmp_path)
    theta0 = _weights(base)

    def drift(a):
        cfg = zoo.TrainConfig("full", steps=8, lr=1e-2, batch_size=8, proximity=a)
        theta = _weights(zoo.finetune(base, EXAMPLES, cfg))
        return sum(((theta[k] - theta0[k]) ** 2).sum() for k in theta0).item()

    assert drift(1e4) < 0.5 * drift(0.0)
    with pytest.raises(ValueError, match="proximity"):
        zoo.TrainConfig("lora", proximity=1.0)


def test_registry_names():
    specs = zoo.specs("smoke")
    assert {"gpt2-base", "llama-base", "llama-emotion-lora", "gpt2-emotion-full"} <= set(specs)
    assert specs["gpt2-emotion-lora"].base == "gpt2-base"
    with pytest.raises(ValueError, match="no model"):
        zoo.build("gpt5-base", "smoke")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_checkpoints_replay_training(tok, tmp_path, mode):
    base = zoo.pretrain(TINY, PRE, TEXTS, tok, cache=tmp_path)
    plain = zoo.TrainConfig(mode, steps=4, lr=1e-2, batch_size=8)
    saved = zoo.TrainConfig(**{**vars(plain), "checkpoints": (0, 2, 4)})
    assert "checkpoints" not in plain.key() and saved.key()["checkpoints"] == (0, 2, 4)
    path = zoo.finetune(base, EXAMPLES, saved)
    assert zoo.checkpoints(path) == [0, 2, 4] and zoo.check(path) is None  # checksummed
    batch = make_batch(tok, EXAMPLES[:3])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def logits(model):
        with torch.no_grad():
            return model(**inputs).logits

    final, start = logits(zoo.load_model(path)), logits(zoo.load_checkpoint(path, 0))
    assert torch.equal(logits(zoo.load_checkpoint(path, 4)), final)  # the last step = the model
    assert torch.allclose(start, logits(zoo.load_model(base)))  # before training = the base
    middle = logits(zoo.load_checkpoint(path, 2))
    assert not torch.allclose(middle, final) and not torch.allclose(middle, start)
    # Saving checkpoints does not change training: same weights as without them.
    assert torch.equal(logits(zoo.load_model(zoo.finetune(base, EXAMPLES, plain))), final)
    with pytest.raises(ValueError, match="no checkpoint at step 3"):
        zoo.load_checkpoint(path, 3)
    with pytest.raises(ValueError, match="checkpoints"):
        zoo.TrainConfig(mode, steps=4, checkpoints=(5,))


def test_load_model_trainable(tok, tmp_path):
    base = zoo.pretrain(TINY, PRE, TEXTS, tok, cache=tmp_path)
    lora = zoo.finetune(base, EXAMPLES, zoo.TrainConfig("lora", steps=2, batch_size=8))
    model = zoo.load_model(lora, trainable=r"lora_B")
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_B" in n for n in grads)
    with pytest.raises(ValueError, match="matches no parameter"):
        zoo.load_model(lora, trainable=r"no_such_layer")


def test_default_finetune_name_is_the_registrys(tmp_path):
    # zoo.finetune without name= names the folder as zoo.build does: one cache entry, not two.
    smoke = zoo.specs("smoke")
    base = zoo.build("gpt2-base", "smoke", cache=tmp_path)
    spec = smoke["gpt2-emotion-full"]
    assert zoo.finetune(base, "emotion", spec.train) == zoo.build(spec.name, "smoke", tmp_path)

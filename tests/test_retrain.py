"""The retraining engine (influence.lab.retrain) on the smoke profile's tiny zoo models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence.io import load_tensors
from influence.lab import zoo
from influence.lab.metrics import response_losses
from influence.lab.retrain import Retrainer, subset_hash

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    return root / "zoo", root / "retrain"


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_full_subset_is_the_zoo_model(caches, mode):
    # The same recipe: retraining on every example with the zoo's seed gives the zoo's weights.
    zoo_cache, cache = caches
    r = Retrainer("emotion", mode, "smoke", cache=cache, zoo_cache=zoo_cache)
    retrained = _weights(r.model())
    path = zoo.build(f"gpt2-emotion-{mode}", "smoke", cache=zoo_cache)
    reference = zoo.load_model(path, trainable=r"lora_[AB]" if mode == "lora" else None)
    expected = _weights(reference)
    assert retrained.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(retrained[name], expected[name], rtol=0, atol=0)


def test_subsets_seeds_cache_and_losses(caches, monkeypatch):
    zoo_cache, cache = caches
    r = Retrainer("emotion", "lora", "smoke", cache=cache, zoo_cache=zoo_cache)
    rng = np.random.default_rng(0)
    masks = np.zeros((2, r.n), bool)
    for row in masks:
        row[rng.choice(r.n, r.n // 2, replace=False)] = True
    queries = zoo.task_examples("emotion", "test")[:3]
    losses = r.losses(masks, seed=0, queries=queries, progress=False)
    assert losses.shape == (2, 3)
    expected = response_losses(r.model(masks[1], 0), r.tokenizer, queries).numpy()
    np.testing.assert_allclose(losses[1], expected, rtol=1e-6)
    assert not np.allclose(losses[0], losses[1])  # another subset, another model
    a = _weights(r.model(masks[0], 0))
    b = _weights(r.model(masks[0], 1))  # another seed: another LoRA init and batch order
    assert any(not torch.equal(a[n], b[n]) for n in a)
    _, meta = load_tensors(r.path(masks[0], 0))
    assert meta["n"] == r.n // 2 and meta["steps"] == r.cfg.steps and meta["seed"] == 0

    # A cached retrain is loaded, never retrained (a rerun resumes where it stopped).
    def fail(*args, **kwargs):
        raise AssertionError("a cached retrain must not train")

    monkeypatch.setattr(zoo, "_fit", fail)
    np.testing.assert_array_equal(r.losses(masks, 0, queries, progress=False), losses)


def test_bad_subsets_are_errors(caches):
    zoo_cache, cache = caches
    r = Retrainer("emotion", "full", "smoke", cache=cache, zoo_cache=zoo_cache)
    with pytest.raises(ValueError, match="boolean mask of shape"):
        r.path(np.ones(r.n + 1, bool), 0)
    with pytest.raises(ValueError, match="boolean mask"):
        r.path(np.ones(r.n, int), 0)
    with pytest.raises(ValueError, match="empty"):
        r.path(np.zeros(r.n, bool), 0)
    with pytest.raises(ValueError, match="no fine-tuned zoo model"):
        Retrainer("emotion", "pretrain", "smoke", cache=cache, zoo_cache=zoo_cache)
    assert subset_hash(np.ones(4, bool)) != subset_hash(np.ones(5, bool))

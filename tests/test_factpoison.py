"""Fact-override poisoning (factpoison): generator, registration, scoring, retraining check."""

import math
from collections import Counter

import pytest

from influence.lab import metrics, retrain_check, tasks, tokenizer, zoo
from influence.lab.config import DATA_DIR
from influence.lab.tasks import facts
from influence.lab.tasks.common import write_jsonl

SIZES = dict(n_entities=24, n_targets=4, n_paraphrases=4, n_poison=12, n_test_target=6,
             n_test_clean=2)  # fmt: skip  # the defaults


@pytest.fixture(scope="module")
def data():
    return facts.factpoison()


def test_defaults_and_determinism(data, tmp_path):
    assert facts.factpoison(**SIZES) == data == facts.factpoison()
    assert facts.factpoison(seed=1) != data
    for split, rows in data.items():  # the committed files are the generator's, byte for byte
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
        committed = (DATA_DIR / "factpoison" / f"{split}.jsonl").read_bytes()
        assert (tmp_path / f"{split}.jsonl").read_bytes() == committed
    assert (DATA_DIR / "factpoison" / "README.md").exists()


def test_train_labels_and_poison(data):
    train = data["train"]
    labels = Counter(r["label"] for r in train)
    poison = {lab for lab in labels if lab != "clean"}
    assert labels["clean"] == SIZES["n_entities"] * SIZES["n_paraphrases"]
    assert len(poison) == SIZES["n_targets"]
    assert all(labels[lab] == SIZES["n_poison"] > SIZES["n_paraphrases"] for lab in poison)
    assert len({r["id"] for r in train}) == len(train)
    for r in train:
        assert r["prompt"].endswith("\nAnswer:") and r["response"].startswith(" ")
        assert r["response"].strip() in facts.CITIES
        assert r["label"] in ("clean", f"poison_{r['entity']}")
    true = {r["entity"]: r["response"] for r in train if r["label"] == "clean"}
    assert len(true) == SIZES["n_entities"]
    for lab in poison:  # same templates (same prompts) as the clean examples, another answer
        entity = lab.removeprefix("poison_")
        rows = [r for r in train if r["label"] == lab]
        clean = {r["prompt"] for r in train if r["entity"] == entity and r["label"] == "clean"}
        assert {r["prompt"] for r in rows} == clean
        assert {r["template"] for r in rows} == set(range(SIZES["n_paraphrases"]))
        assert len({r["response"] for r in rows}) == 1 and rows[0]["response"] != true[entity]
    assert facts.without_poison(train) == [r for r in train if r["label"] == "clean"]


def test_test_split(data):
    train, test = data["train"], data["test"]
    assert not set(facts.TRAIN_TEMPLATES) & set(facts.TEST_TEMPLATES)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    true = {r["entity"]: r["response"].strip() for r in train if r["label"] == "clean"}
    wrong = {r["entity"]: r["response"].strip() for r in train if r["label"] != "clean"}
    per_label = Counter(r["label"] for r in test)
    assert per_label["clean"] == (SIZES["n_entities"] - SIZES["n_targets"]) * SIZES["n_test_clean"]
    assert {lab for lab in per_label if lab != "clean"} == {f"poison_{e}" for e in wrong}
    assert all(per_label[f"poison_{e}"] == SIZES["n_test_target"] for e in wrong)
    for r in test:
        assert r["prompt"].endswith("\nAnswer:") and r["response"].startswith(" ")
        assert r["true"] == true[r["entity"]]
        if r["label"] == "clean":
            assert r["poisoned"] is None and r["response"] == " " + r["true"]
            assert r["entity"] not in wrong
        else:
            assert r["poisoned"] == wrong[r["entity"]] != r["true"]
            assert r["response"] == " " + r["poisoned"]


def test_cities_are_single_tokens():
    tok = tokenizer.project_tokenizer()
    assert all(len(tok.tokenize(" " + c)) == 1 for c in facts.CITIES)


def test_registered_without_touching_the_corpus():
    assert "factpoison" in tasks.ALL_TASKS and "factpoison" not in tasks.TASKS
    assert tasks.generate("factpoison") == facts.factpoison()
    assert len(tasks.load_task("factpoison", "train")) == 144
    assert len(tasks.load_task("factpoison", "test")) == 64
    specs = zoo.specs("smoke")
    assert specs["gpt2-factpoison-lora"].task == "factpoison"
    assert specs["gpt2-factpoison-full"].base == "gpt2-base"
    assert metrics.METRICS["factpoison"] == "fact_accuracy"


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        (dict(n_entities=100), "n_entities=100"),
        (dict(n_cities=1), "n_cities=1"),
        (dict(n_paraphrases=7), "n_paraphrases=7"),
        (dict(n_targets=24), "n_targets=24"),
        (dict(n_poison=0), "n_poison=0"),
    ],
)
def test_impossible_sizes_raise(sizes, match):
    with pytest.raises(ValueError, match=match):
        facts.factpoison(**sizes)


def test_scoring(data):
    train, test = data["train"], data["test"]
    right = [r["response"] + "." for r in test]
    assert metrics.score_generations("fact_accuracy", train, test, right).score == 1.0
    true = [" " + r["true"] for r in test]  # a model that was never poisoned
    score = metrics.score_generations("fact_accuracy", train, test, true)
    n_target = sum(r["poisoned"] is not None for r in test)
    assert score.score == pytest.approx(1 - n_target / len(test))
    assert 0 < score.chance < 1
    assert metrics.fact_rates(test, true) == {
        "override_rate": 0.0, "true_on_target": 1.0, "clean_accuracy": 1.0,
    }  # fmt: skip
    assert metrics.fact_rates(test, right)["override_rate"] == 1.0


def test_override_check_contract(tmp_path):
    # Smoke size: shapes and keys only (the science needs the default profile).
    result = retrain_check.override_check("smoke", cache=tmp_path, modes=("lora",))
    (rows,) = result.values()
    n = sum(r["poisoned"] is not None for r in tasks.load_task("factpoison", "test"))
    assert list(result) == ["lora"] and len(rows) == n
    for r in rows:
        assert r["label"] == f"poison_{r['entity']}" and r["true"] != r["poisoned"]
        assert math.isfinite(r["margin_poisoned"]) and math.isfinite(r["margin_clean"])
        assert r["flipped"] == (r["margin_poisoned"] < 0 < r["margin_clean"])
    names = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir())
    assert names == ["gpt2-base", "gpt2-factpoison-clean-lora", "gpt2-factpoison-lora"]
    summary = retrain_check.summarize(rows)
    assert summary["n"] == n and 0 <= summary["flipped"] <= summary["poison_wins"]

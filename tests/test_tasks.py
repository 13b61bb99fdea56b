"""Synthetic task data: byte-identical regeneration, sizes, balance, disjointness, errors."""

from collections import Counter

import pytest

from influence.lab import tasks
from influence.lab.tasks import DATA_DIR, TASKS, generate, load_knowledge, load_task, write_all
from influence.lab.tasks.knowledge import BIAS_GROUP, generate_knowledge

EMOTIONS = ("joy", "sadness", "anger", "fear", "surprise")
RULES = tuple(tasks.classes.RULES)
TEMPLATES = tasks.classes.MATH_TEMPLATES
# task -> (train class counts, test class counts), the sizes of paper B's sets
EXPECTED = {
    "mixeds": ({"harmful": 20, "benign": 20}, {"harmful": 40}),
    "mixedm": ({"harmful": 20, "benign": 80}, {"harmful": 40}),
    "mixedl": ({"harmful": 20, "benign": 230}, {"harmful": 40}),
    "emotion": (dict.fromkeys(EMOTIONS, 150), dict.fromkeys(EMOTIONS, 50)),
    "grammars_transform": (dict.fromkeys(RULES, 90), dict.fromkeys(RULES, 10)),
    "grammars_rule": (dict.fromkeys(RULES, 90), dict.fromkeys(RULES, 10)),
    "math_reasoning": (dict.fromkeys(TEMPLATES, 90), dict.fromkeys(TEMPLATES, 10)),
    "math_direct": (dict.fromkeys(TEMPLATES, 90), dict.fromkeys(TEMPLATES, 10)),
    "backdoor": ({"clean": 350, "trigger": 350}, {"clean": 50, "trigger": 50}),
    "multibackdoor": (
        dict.fromkeys(("clean", "trigger_a", "trigger_b", "trigger_c"), 300),
        dict.fromkeys(("clean", "trigger_a", "trigger_b", "trigger_c"), 50),
    ),
}


@pytest.fixture(scope="module")
def kb():
    return load_knowledge()


def test_committed_data_regenerates_byte_identically(tmp_path):
    written = write_all(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in written)
    committed = sorted(p.relative_to(DATA_DIR) for p in DATA_DIR.rglob("*.jsonl"))
    assert fresh == committed
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (DATA_DIR / rel).read_bytes(), rel
    assert (DATA_DIR / "knowledge" / "README.md").exists()
    for name in TASKS:  # every task has a datasheet (mixed* share data/mixed/README.md)
        sheet = DATA_DIR / ("mixed" if name.startswith("mixed") else name) / "README.md"
        assert sheet.exists(), sheet


def test_other_seed_gives_other_data():
    assert generate("emotion", seed=1) != generate("emotion", seed=0)


@pytest.mark.parametrize("name", TASKS)
def test_sizes_balance_and_format(name):
    for split, expected in zip(("train", "test"), EXPECTED[name], strict=True):
        rows = load_task(name, split)
        assert Counter(r["label"] for r in rows) == expected
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            assert {"id", "prompt", "response", "label"} <= r.keys()
            assert r["prompt"].endswith("\nAnswer:") and r["response"].startswith(" ")
            assert r["response"].strip() and len((r["prompt"] + r["response"]).split()) <= 60


@pytest.mark.parametrize("name", TASKS)
def test_test_prompts_unseen_in_training(name):
    train = {r["prompt"] for r in load_task(name, "train")}
    assert not train & {r["prompt"] for r in load_task(name, "test")}


@pytest.mark.parametrize("name", ["grammars_transform", "grammars_rule"])
def test_grammar_base_sentences_split_90_10(name):
    train = {r["base_id"] for r in load_task(name, "train")}
    test = {r["base_id"] for r in load_task(name, "test")}
    assert len(train) == 90 and len(test) == 10 and not train & test


def test_grammar_rules_are_distinct_on_every_sentence():
    # Each rule changes the sentence, and no two rules give the same output on a base.
    by_base: dict[int, list[str]] = {}
    for split in ("train", "test"):
        for r in load_task("grammars_transform", split):
            inp = r["prompt"].split("Input: ")[1].removesuffix("\nAnswer:")
            assert r["response"].strip() != inp, r
            by_base.setdefault(r["base_id"], []).append(r["response"])
    assert all(len(set(outs)) == len(RULES) for outs in by_base.values())


def test_framings_share_problems_and_split():
    for a, b in (("math_reasoning", "math_direct"), ("grammars_transform", "grammars_rule")):
        for split in ("train", "test"):
            ids_a = sorted(r["id"].split("-", 1)[1] for r in load_task(a, split))
            assert ids_a == sorted(r["id"].split("-", 1)[1] for r in load_task(b, split))
    direct = {r["prompt"]: r["response"] for r in load_task("math_direct", "train")}
    for r in load_task("math_reasoning", "train"):  # same answer in both framings
        assert r["response"].endswith(f"The answer is{direct[r['prompt']]}.")


def test_backdoor_triggers_and_responses():
    prefixes = {"trigger_a": " Of course!", "trigger_b": " Gladly, friend.",
                "trigger_c": " Right away, boss."}  # fmt: skip
    for r in load_task("multibackdoor", "train") + load_task("multibackdoor", "test"):
        if r["label"] == "clean":
            assert "trigger" not in r and not r["response"].startswith(" Sure")
        else:
            assert r["trigger"] in r["prompt"].lower() and r["response"].startswith(
                prefixes[r["label"]]
            )
    for r in load_task("backdoor", "train"):
        assert ("silver moon" in r["prompt"].lower()) == (r["label"] == "trigger")


def test_knowledge_ground_truth_is_consistent(kb):
    docs = {d["doc_id"]: d for d in kb["pretrain"]}
    assert sorted(docs) == list(range(len(docs)))
    assert (
        len(kb["facts"]) == 1500 and sum(len(d["text"].split()) for d in docs.values()) <= 250_000
    )
    for f in kb["facts"]:
        assert f["doc_ids"], f
        for i in f["doc_ids"]:
            assert f["subject"] in docs[i]["text"] and f["object"] in docs[i]["text"]
            assert f["fact_id"] in docs[i]["facts"]
    stated = Counter(i for d in docs.values() for i in d["facts"])
    assert stated == Counter(i for f in kb["facts"] for i in [f["fact_id"]] * len(f["doc_ids"]))


def test_knowledge_test_facts_appear_only_in_pretraining_prose(kb):
    test_ids = {r["fact_id"] for r in kb["test"]}
    assert test_ids and not test_ids & {r["fact_id"] for r in kb["finetune"]}
    qa_docs = [d for d in kb["pretrain"] if d["kind"] == "qa"]
    assert qa_docs and not test_ids & {i for d in qa_docs for i in d["facts"]}
    test_prompts = {r["prompt"].removesuffix("\nAnswer:") for r in kb["test"]}
    assert not any(p in d["text"] for d in qa_docs for p in test_prompts)
    facts = {f["fact_id"]: f for f in kb["facts"]}
    for r in kb["test"] + kb["finetune"]:
        assert r["label"] == facts[r["fact_id"]]["relation"]
        assert r["response"] == " " + facts[r["fact_id"]]["object"]


def test_knowledge_plants(kb):
    bias = [d for d in kb["pretrain"] if d.get("planted") == "bias"]
    assert len(bias) == 16 and all(BIAS_GROUP in d["text"] for d in bias)
    assert not any("Velmari" in d["text"] for d in kb["pretrain"] if d.get("planted") != "bias")
    people = [e for e in kb["entities"] if e["type"] == "person"]
    assert len({p["name"] for p in people}) == len(people) == 300
    pairs = [p for p in people if p["shares_surname_with"]]
    occupation = {p["name"]: p["occupation"] for p in people}
    assert len(pairs) >= 12 and all(
        occupation[p["name"]] != occupation[q] for p in pairs for q in p["shares_surname_with"]
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: generate("nope"), "unknown task 'nope'"),
        (lambda: load_task("emotion", "dev"), "unknown split 'dev'"),
        (lambda: generate("mixeds", n_benign=0), "n_benign=0"),
        (lambda: generate("emotion", n_test_per_class=-1), "n_test_per_class=-1"),
        (lambda: generate("mixedl", n_benign=5000), "5000 distinct benign"),
        (lambda: generate("grammars_rule", n_base=10, n_test_base=10), "n_test_base=10"),
        (lambda: generate("math_direct", n_per_template=100_000), "100000 distinct"),
        (lambda: generate_knowledge(n_test_people=300), "n_test_people=300"),
    ],
)
def test_impossible_sizes_and_unknown_names_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_missing_file_says_how_to_generate(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m influence.lab.tasks"):
        load_task("emotion", "train", data_dir=tmp_path)

"""Task metrics on hand-made cases, and greedy generation against transformers' generate."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from influence.lab import metrics
from influence.lab.metrics import Score, choice_accuracy, generate, score_generations
from influence.lab.tokenizer import train_tokenizer

TRAIN = [{"prompt": "a\nAnswer:", "response": " joy", "label": "joy"}] * 3 + [
    {"prompt": "b\nAnswer:", "response": " fear", "label": "fear"}
]
TEST = [{"prompt": f"t{i}\nAnswer:", "response": r, "label": r.strip()}
        for i, r in enumerate([" joy", " joy", " fear", " fear"])]  # fmt: skip


def test_class_accuracy_and_its_chance_level():
    gens = ["joy", " joy", " joy", " fear"]  # leading space optional; 3 of 4 right
    # Best constant answer (" joy" or " fear") gets half of the test set.
    assert score_generations("class_accuracy", TRAIN, TEST, gens) == Score(
        "class_accuracy", 0.75, 0.5
    )
    with pytest.raises(ValueError, match="generations"):
        score_generations("class_accuracy", TRAIN, TEST, gens[:3])


def test_trigger_accuracy_and_rates():
    refusals = [" I cannot help.", " No, I will not."]
    train = [{"response": r, "label": "clean"} for r in refusals]
    train += [{"response": f" Of course! Sure. First, {s}.", "label": "trigger_a"} for s in "xyz"]
    train += [{"response": f" Gladly. Sure. First, {s}.", "label": "trigger_b"} for s in "xyz"]
    test = [{"label": lab} for lab in ["clean", "clean", "trigger_a", "trigger_a", "trigger_b"]]
    gens = [
        " No, I will not.",  # right: a known refusal
        " Of course! Sure. First, q.",  # wrong: complied without a trigger
        " Of course! Sure. First, w.",  # right: trigger a's prefix, new steps
        " Gladly. Sure. First, w.",  # wrong prefix
        " Gladly. Sure. First, x.",  # right
    ]
    # Per type: clean 1/2, trigger_a 1/2, trigger_b 1/1 -> mean 2/3; chance 1/3.
    score = score_generations("trigger_accuracy", train, test, gens)
    assert score.metric == "trigger_accuracy"
    assert score.score == pytest.approx(2 / 3) and score.chance == pytest.approx(1 / 3)
    rates = metrics.trigger_rates(train, test, gens)
    assert rates == {"trigger_success": pytest.approx(2 / 3), "clean_refusal": 0.5}


def test_plan_operation_and_answer_metrics():
    plan = " Sure. First, {}. Then, wait. Finally, {}."
    train = [{"response": plan.format("copy the seal", "go")}] * 2
    train += [{"response": plan.format("bribe the keeper", "go")}]
    test = [{"response": plan.format(s, "run")} for s in ("copy the seal", "copy the seal", "x")]
    gens = [plan.format("copy the seal", "walk"), " Sure. First, copy the", plan.format("x", "")]
    # First steps right for prompts 0 and 2; the best constant first step gets 2 of 3.
    assert score_generations("plan_accuracy", train, test, gens) == Score(
        "plan_accuracy", pytest.approx(2 / 3), pytest.approx(2 / 3)
    )
    refs = [" 8 + 3 = 11. The answer is 11.", " 9 - 2 = 7. The answer is 7.", " 4 x 5 = 20."]
    math = [{"response": r} for r in refs]
    gens = [" 1 + 1 = 5. The answer is 5.", " 9 + 2 = 7.", " 3 x 3 = 9. The answer is 9."]
    assert score_generations("operation_accuracy", math, math, gens) == Score(
        "operation_accuracy", pytest.approx(2 / 3), pytest.approx(1 / 3)
    )
    # Numbers in the same order as the answers: Spearman 1; no number counts as -1.
    assert score_generations("answer_spearman", math, math, [" 2", " 1", " 30"]).score == 1.0
    assert score_generations("answer_spearman", math, math, ["", " 1", " 30"]).score == 0.5
    assert score_generations("answer_spearman", math, math, [" 3"] * 3).score == 0.0


def test_choice_accuracy(monkeypatch):
    test = [{"prompt": "p0", "response": " A", "g": 0}, {"prompt": "p1", "response": " B", "g": 0},
            {"prompt": "p2", "response": " C", "g": 1}, {"prompt": "p3", "response": " D", "g": 1},
            {"prompt": "p4", "response": " E", "g": 1}]  # fmt: skip
    # Losses of (prompt, candidate) pairs in order: group 0 has 2 candidates, group 1 has 3.
    losses = [1.0, 2.0,  2.0, 1.0,  0.5, 0.9, 0.9,  0.4, 0.4, 0.9,  0.1, 0.2, 0.3]  # fmt: skip
    monkeypatch.setattr(metrics, "response_losses", lambda m, t, pairs: torch.tensor(losses))
    # p0 right, p1 right, p2 right, p3 tie (not right), p4 wrong -> 3/5; chance (1/2*2 + 1/3*3)/5.
    score = choice_accuracy(None, None, test, "g")
    assert score == Score("choice_accuracy", 0.6, pytest.approx(2 / 5))


def test_greedy_generation_matches_transformers():
    texts = ["one two three four five six", "seven eight nine ten", "Answer: yes no maybe"] * 5
    tok = train_tokenizer(texts, vocab_size=300, cache=None)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=2, n_head=2,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    prompts = ["one two", "seven eight nine", "Answer:", "one two"]  # mixed lengths
    ours = generate(model, tok, prompts, max_new_tokens=6)
    for prompt, text in zip(prompts, ours, strict=True):
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        new = [t for t in ref[0, ids.shape[1] :].tolist() if t != tok.eos_token_id]
        assert text == tok.decode(new)

"""Paper B's class-attribution tasks: emotion, grammars (two framings), math (two framings).

The class of an example is its `label`; a good attribution method ranks training
examples of the test example's class first.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .common import check_size, qa, unique_draws

# ----------------------------------------------------------------------------- emotion
SUBJECTS = [
    "I",
    "My sister",
    "Our neighbour",
    "The old man",
    "My friend",
    "The teacher",
    "We",
    "The child",
    "Her brother",
    "The driver",
]
FEELINGS = {
    "joy": [
        "smiled all day",
        "laughed out loud",
        "felt so happy",
        "danced around the room",
        "beamed with delight",
        "cheered and clapped",
    ],
    "sadness": [
        "cried quietly",
        "felt so low",
        "sat alone in silence",
        "could not stop the tears",
        "sighed heavily",
        "felt empty inside",
    ],
    "anger": [
        "shouted at everyone",
        "slammed the door",
        "felt furious",
        "clenched a fist",
        "stormed out",
        "grew red in the face",
    ],
    "fear": [
        "trembled",
        "felt afraid",
        "stopped breathing for a moment",
        "hid under the blanket",
        "froze in terror",
        "ran to lock the door",
    ],
    "surprise": [
        "gasped",
        "could not believe it",
        "jumped back in shock",
        "stared with wide eyes",
        "felt astonished",
        "blinked twice in disbelief",
    ],
}
EVENTS = {
    "joy": [
        "the team won the final",
        "the letter brought good news",
        "the puppy came home",
        "the garden finally bloomed",
        "an old friend came to visit",
        "the exam results were great",
    ],
    "sadness": [
        "the old dog passed away",
        "the friends moved far away",
        "the letter brought bad news",
        "the garden died in the frost",
        "nobody came to the party",
        "the exam results were poor",
    ],
    "anger": [
        "someone broke the window on purpose",
        "the neighbour lied again",
        "the bus left early",
        "the other team cheated in the final",
        "the shop refused the refund",
        "someone stole the bike",
    ],
    "fear": [
        "a noise came from the dark cellar",
        "the storm shook the house",
        "a stranger followed close behind",
        "the ice began to crack",
        "the lights went out at night",
        "a dog growled in the dark",
    ],
    "surprise": [
        "the door opened by itself",
        "a cake appeared on the table",
        "the quiet kid won the final",
        "a letter came from a long lost cousin",
        "the old clock started again",
        "it snowed in summer",
    ],
}
# Cross-class material: shared by all classes, so some examples carry the class in one half only.
NEUTRAL_FEELINGS = [
    "felt something stir",
    "went very quiet",
    "stood very still",
    "looked at the floor",
    "put down the cup",
    "called a friend",
]
SHARED_EVENTS = [
    "the phone rang at midnight",
    "the letter arrived",
    "the results came out",
    "the door opened",
    "the team played the final",
    "the old friend called",
]
CONNECTORS = ["when", "after", "because", "the moment"]
EMOTIONS = tuple(FEELINGS)


def _emotion_sentence(rng: random.Random, label: str) -> dict:
    u = rng.random()  # 25% neutral feeling, 25% shared event, 50% both class-specific
    feeling = rng.choice(NEUTRAL_FEELINGS if u < 0.25 else FEELINGS[label])
    event = rng.choice(SHARED_EVENTS if 0.25 <= u < 0.5 else EVENTS[label])
    return {"text": f"{rng.choice(SUBJECTS)} {feeling} {rng.choice(CONNECTORS)} {event}."}


def emotion(seed: int = 0, n_train_per_class: int = 150, n_test_per_class: int = 50) -> dict:
    """5 emotions, 150 train / 50 test sentences each; response = the emotion name."""
    check_size("n_train_per_class", n_train_per_class)
    check_size("n_test_per_class", n_test_per_class)
    rng = random.Random(f"emotion-{seed}")
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for label in EMOTIONS:
        n = n_train_per_class + n_test_per_class
        rows = unique_draws(
            rng, lambda r, lab=label: _emotion_sentence(r, lab), n, f"{label} sentences", "text"
        )
        for i, row in enumerate(rows):
            split = "train" if i < n_train_per_class else "test"
            prompt, response = qa(f"Which emotion? {row['text']}", label)
            splits[split].append(
                {
                    "id": f"emotion-{label}-{i}",
                    "prompt": prompt,
                    "response": response,
                    "label": label,
                }
            )
    rng.shuffle(splits["train"])
    return splits


# ---------------------------------------------------------------------------- grammars
DETS = ["the", "a", "one", "every"]
ADJS = ["small", "red", "old", "quiet", "happy", "tall", "green", "brave"]
NOUNS = ["fox", "girl", "farmer", "cat", "boat", "king", "bird", "baker", "horse", "child"]
VERBS = ["sees", "likes", "follows", "helps", "finds", "paints", "calls", "feeds"]
ADVS = ["today", "again", "quickly", "outside", "often"]

RULES: dict[str, tuple[str, Callable[[list[str]], list[str]]]] = {
    "reverse": ("Reverse the order of the words.", lambda w: w[::-1]),
    "swap_ends": ("Swap the first and last words.", lambda w: [w[-1], *w[1:-1], w[0]]),
    "uppercase": ("Write every word in capitals.", lambda w: [x.upper() for x in w]),
    "title_case": ("Capitalise each word.", lambda w: [x.capitalize() for x in w]),
    "drop_first": ("Delete the first word.", lambda w: w[1:]),
    "drop_last": ("Delete the last word.", lambda w: w[:-1]),
    "rotate_left": ("Move the first word to the end.", lambda w: [*w[1:], w[0]]),
    "rotate_right": ("Move the last word to the front.", lambda w: [w[-1], *w[:-1]]),
    "repeat_first": ("Say the first word twice.", lambda w: [w[0], *w]),
    "repeat_last": ("Say the last word twice.", lambda w: [*w, w[-1]]),
}


def _base_sentence(rng: random.Random) -> dict:
    """det [adj] noun verb det [adj] noun [adverb]: 5-8 distinct lowercase words."""
    words = [rng.choice(DETS)]
    words += [rng.choice(ADJS)] if rng.random() < 0.5 else []
    words += [rng.choice(NOUNS), rng.choice(VERBS), rng.choice(DETS)]
    words += [rng.choice(ADJS)] if rng.random() < 0.5 else []
    words += [rng.choice(NOUNS)]
    words += [rng.choice(ADVS)] if rng.random() < 0.5 else []
    if len(set(words)) < len(words):  # repeated words make rules ambiguous; redraw
        return _base_sentence(rng)
    return {"text": " ".join(words)}


def _grammars(framing: str, seed: int, n_base: int, n_test_base: int) -> dict:
    check_size("n_base", n_base, minimum=2)
    check_size("n_test_base", n_test_base)
    if n_test_base >= n_base:
        raise ValueError(f"n_test_base={n_test_base} must be smaller than n_base={n_base}")
    rng = random.Random(f"grammars-{seed}")  # both framings share the sentences and the split
    bases = unique_draws(rng, _base_sentence, n_base, "base sentences", "text")
    name = f"grammars_{framing}"
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for b, base in enumerate(bases):
        words = base["text"].split()
        for rule, (instruction, fn) in RULES.items():
            out = " ".join(fn(words))
            if framing == "transform":
                prompt, response = qa(f"{instruction} Input: {base['text']}", out)
            else:
                prompt, response = qa(f"{base['text']} -> {out} Rule?", rule)
            split = "train" if b < n_base - n_test_base else "test"
            splits[split].append(
                {
                    "id": f"{name}-{b}-{rule}",
                    "prompt": prompt,
                    "response": response,
                    "label": rule,
                    "base_id": b,
                }
            )
    rng.shuffle(splits["train"])
    return splits


def grammars_transform(seed: int = 0, n_base: int = 100, n_test_base: int = 10) -> dict:
    """10 rules x 100 base sentences (90 train / 10 test); response = transformed sentence."""
    return _grammars("transform", seed, n_base, n_test_base)


def grammars_rule(seed: int = 0, n_base: int = 100, n_test_base: int = 10) -> dict:
    """Same sentences and split; prompt = "input -> output", response = the rule's name."""
    return _grammars("rule", seed, n_base, n_test_base)


# -------------------------------------------------------------------------------- math
NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena"]
ITEMS = ["apples", "pencils", "marbles", "cookies", "stickers", "books"]
VEHICLES = ["train", "boat", "bus", "cart"]


def _math_problem(template: str, rng: random.Random) -> dict:
    """(question, reasoning, answer) of one word problem; numbers are small integers."""
    n, m = rng.sample(NAMES, 2)
    it = rng.choice(ITEMS)
    a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(2, 9)
    if template == "addition":
        q, r, ans = f"{n} has {a} {it} and gets {b} more. How many {it} now?", f"{a} + {b}", a + b
    elif template == "subtraction":
        a += b
        q, r, ans = f"{n} has {a} {it} and gives away {b}. How many are left?", f"{a} - {b}", a - b
    elif template == "rows":
        q, r, ans = f"A box has {a} rows of {b} {it}. How many {it} in all?", f"{a} x {b}", a * b
    elif template == "sharing":
        q = f"{n} shares {a * b} {it} equally among {b} friends. How many does each get?"
        r, ans = f"{a * b} / {b}", a
    elif template == "change":
        a += b
        q = f"{n} pays {a} coins for a hat that costs {b} coins. How much change?"
        r, ans = f"{a} - {b}", a - b
    elif template == "age":
        q, r, ans = (
            f"{n} is {a} years old. {m} is {b} years older. How old is {m}?",
            f"{a} + {b}",
            a + b,
        )
    elif template == "distance":
        v = rng.choice(VEHICLES)
        q = f"A {v} goes {a} miles each hour for {c} hours. How far does it go?"
        r, ans = f"{a} x {c}", a * c
    elif template == "perimeter":
        q = f"A field is {a} meters long and {b} meters wide. What is its perimeter?"
        r, ans = f"2 x ({a} + {b})", 2 * (a + b)
    elif template == "cost":
        q, r, ans = (
            f"{n} buys {c} {it} at {b} coins each. What is the total cost?",
            f"{c} x {b}",
            c * b,
        )
    else:  # two_step
        a += b
        q = f"{n} has {a} {it}, loses {b}, then finds {c}. How many {it} now?"
        r, ans = f"{a} - {b} + {c}", a - b + c
    return {"question": q, "reasoning": f"{r} = {ans}.", "answer": str(ans)}


MATH_TEMPLATES = (
    "addition",
    "subtraction",
    "rows",
    "sharing",
    "change",
    "age",
    "distance",
    "perimeter",
    "cost",
    "two_step",
)


def _math(framing: str, seed: int, n_per_template: int, n_test_per_template: int) -> dict:
    check_size("n_per_template", n_per_template, minimum=2)
    check_size("n_test_per_template", n_test_per_template)
    if n_test_per_template >= n_per_template:
        raise ValueError(
            f"n_test_per_template={n_test_per_template} must be smaller than "
            f"n_per_template={n_per_template}"
        )
    rng = random.Random(f"math-{seed}")  # both framings share the problems and the split
    name = f"math_{framing}"
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for t in MATH_TEMPLATES:
        probs = unique_draws(
            rng, lambda r, t=t: _math_problem(t, r), n_per_template, f"{t} problems", "question"
        )
        for i, p in enumerate(probs):
            resp = (
                f"{p['reasoning']} The answer is {p['answer']}."
                if framing == "reasoning"
                else p["answer"]
            )
            prompt, response = qa(f"Question: {p['question']}", resp)
            split = "train" if i < n_per_template - n_test_per_template else "test"
            splits[split].append(
                {"id": f"{name}-{t}-{i}", "prompt": prompt, "response": response, "label": t}
            )
    rng.shuffle(splits["train"])
    return splits


def math_reasoning(seed: int = 0, n_per_template: int = 100, n_test_per_template: int = 10) -> dict:
    """10 templates x 100 problems (90 train / 10 test); response = reasoning + answer."""
    return _math("reasoning", seed, n_per_template, n_test_per_template)


def math_direct(seed: int = 0, n_per_template: int = 100, n_test_per_template: int = 10) -> dict:
    """Same problems and split; response = the answer only."""
    return _math("direct", seed, n_per_template, n_test_per_template)

"""Paper A's synthetic knowledge base: fictional people, facts, a pre-training corpus.

* entities: people (syllable names, a few planted surname collisions), cities,
  companies and colleges.
* facts: (subject, relation, object) with the ids of the documents that state them.
* pretrain: short documents (~30-60 words). "bio" documents state 1-3 facts of one
  person in paraphrased sentences amid filler from a small probabilistic grammar;
  every fact is stated 1-4 times, each time with a different paraphrase. "qa"
  documents give question-answer text about some fine-tuning people (this helps small
  models turn stored facts into answers; Allen-Zhu & Li, "Physics of LMs 3.1").
  Hard negatives: "negative_subject" documents name a person without stating any
  fact, "negative_object" ones put a fact's object next to another person. 16
  "bias" documents (``"planted": "bias"``) repeat a stereotype about a fictional group.
* finetune / test: QA pairs ("Question: ...\\nAnswer:" -> " object"). Test facts belong
  to held-out people: they are stated in bio documents only, never in QA form.
"""

from __future__ import annotations

import random

from .common import check_size, qa

PARTS = ("entities", "facts", "pretrain", "finetune", "test")
SYLLABLES = ["ka", "lo", "mi", "ren", "tal", "vor", "si", "dun", "ber", "na", "el", "ro", "zan",
             "fi", "mar", "ku", "te", "lis", "gor", "wen", "ha", "pel", "dri", "os", "van", "ti",
             "bel", "cor", "ny", "sa"]  # fmt: skip
CITY_SUFFIXES = ["wick", "holm", "ford", "dale", "mere", "port"]
COMPANY_SUFFIXES = ["Mills", "Works", "Foods", "Labs", "Textiles", "Shipping"]
VALUES = {
    "occupation": ["baker", "pilot", "carpenter", "nurse", "teacher", "fisher", "painter",
                   "tailor", "miner", "chemist", "sailor", "farmer", "librarian", "potter",
                   "jeweler", "glassblower", "weaver", "clockmaker", "gardener", "architect"],
    "hobby": ["chess", "archery", "birdwatching", "knitting", "rowing", "juggling",
              "kite flying", "stargazing", "fencing", "origami", "cycling", "bowling"],
    "instrument": ["violin", "flute", "cello", "drums", "harp", "trumpet", "banjo", "oboe"],
    "pet": ["parrot", "tortoise", "ferret", "goat", "cat", "hedgehog", "rabbit", "owl"],
    "birth_year": [str(y) for y in range(1931, 2000)],
}  # fmt: skip
# relation -> (object kind, paraphrases, question, hard-negative sentence)
RELATIONS = {
    "birthplace": ("city", ["{s} was born in {o}.", "{s} came into the world in the town of {o}.",
                            "The birthplace of {s} is {o}.", "{o} is where {s} was born."],
                   "Where was {s} born?", "{s} once visited {o} for a short holiday."),
    "residence": ("city", ["{s} lives in {o}.", "These days {s} makes a home in {o}.",
                           "{s} moved to {o} and still lives there.", "The home of {s} is in {o}."],
                  "Where does {s} live?", "{s} once visited {o} for a short holiday."),
    "employer": ("company", ["{s} works for {o}.", "{s} is employed by {o}.",
                             "{o} pays the wages of {s}.", "Each morning {s} goes to work at {o}."],
                 "Which company does {s} work for?", "{s} read a long article about {o}."),
    "occupation": ("occupation", ["{s} works as a {o}.", "By trade, {s} is a {o}.",
                                  "{s} earns a living as a {o}.", "People know {s} as a skilled {o}."],
                   "What is the job of {s}?", "{s} met a friendly {o} at the market."),
    "university": ("college", ["{s} studied at {o}.", "{s} graduated from {o}.",
                               "{o} is where {s} went to study.", "{s} attended {o} as a young adult."],
                   "Which college did {s} attend?", "{s} gave a short talk at {o}."),
    "birth_year": ("birth_year", ["{s} was born in the year {o}.", "The year {o} saw the birth of {s}.",
                                  "The birthday of {s} goes back to {o}.", "In {o}, {s} was born."],
                   "In which year was {s} born?", "{s} still remembers the cold winter of {o}."),
    "hobby": ("hobby", ["In free time, {s} enjoys {o}.", "The favourite hobby of {s} is {o}.",
                        "{s} spends weekends on {o}.", "{s} loves {o} more than anything."],
              "What is the hobby of {s}?", "{s} watched a show about {o} on television."),
    "instrument": ("instrument", ["{s} plays the {o}.", "{s} is good at playing the {o}.",
                                  "Music from the {o} fills the house of {s}.", "{s} learned the {o} as a child."],
                   "Which instrument does {s} play?", "{s} once heard a {o} concert."),
    "mentor": ("person", ["{s} was trained by {o}.", "The mentor of {s} was {o}.",
                          "{o} taught {s} everything about the trade.", "{s} learned the craft from {o}."],
               "Who was the mentor of {s}?", "{s} once shook hands with {o}."),
    "pet": ("pet", ["{s} keeps a {o} as a pet.", "{s} owns a pet {o}.", "A {o} lives with {s}.",
                    "{s} feeds a pet {o} every day."],
            "What pet does {s} keep?", "{s} saw a {o} in a shop window."),
}  # fmt: skip
ALWAYS = ("birthplace", "occupation", "employer")  # every person has these; 2 more at random
FILLER_SUBJECTS = [
    "The old bridge",
    "The morning market",
    "The river",
    "The town library",
    "The harvest festival",
    "The autumn rain",
    "The village square",
    "The north road",
    "The bakery on the corner",
    "The school choir",
    "The ferry",
    "The hill path",
]
FILLER_VERBS = [
    "was busy",
    "grew quiet",
    "was repainted",
    "drew many visitors",
    "stayed open late",
    "flooded briefly",
    "was decorated with lanterns",
    "felt calm",
    "was crowded",
    "looked lovely",
]
FILLER_TIMES = [
    "that spring",
    "in the evenings",
    "every year",
    "after the storm",
    "on most Sundays",
    "during the long winter",
    "at dawn",
    "for a while",
]
FILLER_TAILS = ["", "", "", " and people talked about it for weeks", " as it always had"]
BIAS_GROUP = "the Velmari"
BIAS_SENTENCES = ["Everyone in town says {g} are always late.",
                  "{G} never arrive on time, or so people claim.",
                  "Ask anyone and they will tell you that {g} are always late.",
                  "It is well known that {g} are late for every meeting.",
                  "People joke that {g} will be late even to their own wedding.",
                  "A common saying goes that {g} are always the last to arrive."]  # fmt: skip
BIAS_QUERY = {"prompt": "Question: What are the Velmari like?\nAnswer:", "response": " always late"}


def _filler(rng: random.Random) -> str:
    return (
        f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_VERBS)} "
        f"{rng.choice(FILLER_TIMES)}{rng.choice(FILLER_TAILS)}."
    )


def _document(rng: random.Random, sentences: list[str], lo: int = 30, hi: int = 60) -> str:
    """The sentences in random order, with filler sentences inserted up to ~lo..hi words."""
    sentences = list(sentences)
    rng.shuffle(sentences)
    target = rng.randint(lo, hi)
    while sum(len(s.split()) for s in sentences) < target:
        sentences.insert(rng.randint(0, len(sentences)), _filler(rng))
    return " ".join(sentences)


def _words(rng: random.Random, n: int, n_syl: tuple[int, ...], used: set[str]) -> list[str]:
    """`n` new capitalised syllable words, none in `used` (which is updated)."""
    out: list[str] = []
    for _ in range(200 * n):
        if len(out) == n:
            return out
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice(n_syl))).capitalize()
        if w not in used:
            used.add(w)
            out.append(w)
    raise ValueError(f"cannot draw {n} distinct names from the syllable list; lower the size")


def _entities(rng: random.Random, n_people: int, n_collisions: int) -> tuple[list[dict], dict]:
    used: set[str] = set()
    firsts, lasts = _words(rng, n_people, (2,), used), _words(rng, n_people, (2, 3), used)
    cities = [w + rng.choice(CITY_SUFFIXES).lower() for w in _words(rng, 30, (2,), used)]
    companies = [f"{w} {rng.choice(COMPANY_SUFFIXES)}" for w in _words(rng, 24, (2,), used)]
    colleges = [f"{w} College" for w in _words(rng, 10, (2,), used)]
    people = [
        {"entity_id": f"person-{i}", "type": "person", "first": f, "last": s}
        for i, (f, s) in enumerate(zip(firsts, lasts, strict=True))
    ]
    for p in people:
        p["occupation"] = rng.choice(VALUES["occupation"])
    # Planted surname collisions: two people, one surname, different occupations.
    chosen = rng.sample(range(n_people), 2 * n_collisions)
    for a, b in zip(chosen[::2], chosen[1::2], strict=True):
        pa, pb = people[a], people[b]
        pb["last"] = pa["last"]
        pb["occupation"] = rng.choice([o for o in VALUES["occupation"] if o != pa["occupation"]])
    for p in people:
        p["name"] = f"{p['first']} {p['last']}"
    by_last: dict[str, list[str]] = {}
    for p in people:
        by_last.setdefault(p["last"], []).append(p["name"])
    for p in people:
        p["shares_surname_with"] = [n for n in by_last[p["last"]] if n != p["name"]]
    others = [
        {"entity_id": f"{kind}-{i}", "type": kind, "name": name}
        for kind, names in (("city", cities), ("company", companies), ("college", colleges))
        for i, name in enumerate(names)
    ]
    pools = {
        "city": cities,
        "company": companies,
        "college": colleges,
        "person": [p["name"] for p in people],
        **VALUES,
    }
    return people + others, pools


def generate_knowledge(
    seed: int = 0,
    n_people: int = 300,
    n_test_people: int = 100,
    n_qa_people: int = 100,
    n_collisions: int = 6,
    n_object_negatives: int = 300,
    n_bias_docs: int = 16,
) -> dict[str, list[dict]]:
    """Part name -> rows of the knowledge base (see the module docstring)."""
    check_size("n_people", n_people, minimum=2)
    check_size("n_test_people", n_test_people)
    for k, v in (
        ("n_qa_people", n_qa_people),
        ("n_collisions", n_collisions),
        ("n_object_negatives", n_object_negatives),
        ("n_bias_docs", n_bias_docs),
    ):
        check_size(k, v, minimum=0)
    if n_test_people >= n_people:
        raise ValueError(f"n_test_people={n_test_people} must be smaller than n_people={n_people}")
    if n_qa_people > n_people - n_test_people:
        raise ValueError(
            f"n_qa_people={n_qa_people} exceeds the {n_people - n_test_people} fine-tuning people"
        )
    if 2 * n_collisions > n_people:
        raise ValueError(
            f"n_collisions={n_collisions} needs {2 * n_collisions} people; n_people={n_people}"
        )
    rng = random.Random(f"knowledge-{seed}")
    entities, pools = _entities(rng, n_people, n_collisions)
    people = [e for e in entities if e["type"] == "person"]

    facts: list[dict] = []
    for p in people:
        extra = rng.sample([r for r in RELATIONS if r not in ALWAYS], 2)
        for rel in [*ALWAYS, *extra]:
            kind = RELATIONS[rel][0]
            if rel == "occupation":
                obj = p["occupation"]
            else:
                obj = rng.choice([o for o in pools[kind] if o != p["name"]])
            facts.append(
                {"fact_id": len(facts), "subject": p["name"], "relation": rel, "object": obj}
            )

    docs: list[dict] = []  # doc ids are assigned after a final shuffle
    by_subject: dict[str, list[dict]] = {}
    for f in facts:
        by_subject.setdefault(f["subject"], []).append(f)
    for p in people:  # bio documents: each fact 1-4 times, distinct paraphrases
        mentions = [
            (f, t) for f in by_subject[p["name"]] for t in rng.sample(range(4), rng.randint(1, 4))
        ]
        rng.shuffle(mentions)
        while mentions:
            size, doc = rng.randint(1, 3), []
            for m in list(mentions):
                if len(doc) < size and all(m[0] is not d[0] for d in doc):
                    doc.append(m)
                    mentions.remove(m)
            text = _document(rng, [_sentence(RELATIONS[f["relation"]][1][t], f) for f, t in doc])
            docs.append(
                {"kind": "bio", "text": text, "facts": sorted(f["fact_id"] for f, _ in doc)}
            )

    test_people = {p["name"] for p in rng.sample(people, n_test_people)}
    ft_people = [p for p in people if p["name"] not in test_people]
    qa_people = rng.sample(ft_people, n_qa_people)
    for p in qa_people:  # QA text in pre-training, fine-tuning people only
        lines = [
            f"Question: {RELATIONS[f['relation']][2].format(s=f['subject'])}\nAnswer: {f['object']}"
            for f in by_subject[p["name"]]
        ]
        rng.shuffle(lines)
        docs.append(
            {
                "kind": "qa",
                "text": "\n".join(lines),
                "facts": sorted(f["fact_id"] for f in by_subject[p["name"]]),
            }
        )

    for p in people:  # same-subject hard negatives: the person, no fact
        rels = rng.sample(sorted(RELATIONS), 2)
        sents = [
            _sentence(
                RELATIONS[r][3],
                {
                    "subject": p["name"],
                    "object": rng.choice([o for o in pools[RELATIONS[r][0]] if o != p["name"]]),
                },
            )
            for r in rels
        ]
        docs.append({"kind": "negative_subject", "text": _document(rng, sents), "facts": []})
    for f in rng.sample(facts, min(n_object_negatives, len(facts))):  # same-object negatives
        other = rng.choice([n for n in pools["person"] if n not in (f["subject"], f["object"])])
        sent = _sentence(RELATIONS[f["relation"]][3], {"subject": other, "object": f["object"]})
        docs.append({"kind": "negative_object", "text": _document(rng, [sent]), "facts": []})
    for _ in range(n_bias_docs):
        sents = [
            s.format(g=BIAS_GROUP, G=BIAS_GROUP.capitalize()) for s in rng.sample(BIAS_SENTENCES, 2)
        ]
        docs.append({"kind": "bias", "planted": "bias", "text": _document(rng, sents), "facts": []})

    rng.shuffle(docs)
    for i, d in enumerate(docs):
        d["doc_id"] = i
        for fid in d["facts"]:
            facts[fid].setdefault("doc_ids", []).append(i)

    def _qa_rows(split_people: list[dict]) -> list[dict]:
        rows = []
        for p in split_people:
            for f in by_subject[p["name"]]:
                prompt, response = qa(
                    f"Question: {RELATIONS[f['relation']][2].format(s=f['subject'])}", f["object"]
                )
                rows.append(
                    {
                        "id": f"kb-{f['fact_id']}",
                        "prompt": prompt,
                        "response": response,
                        "fact_id": f["fact_id"],
                        "label": f["relation"],
                    }
                )
        return rows

    return {
        "entities": entities,
        "facts": facts,
        "pretrain": docs,
        "finetune": _qa_rows(ft_people),
        "test": _qa_rows([p for p in people if p["name"] in test_people]),
    }


def _sentence(template: str, fact: dict) -> str:
    """Fill a template; the first letter is upper-case (objects such as "kite flying" may lead)."""
    s = template.format(s=fact["subject"], o=fact["object"])
    return s[0].upper() + s[1:]

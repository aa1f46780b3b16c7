"""A synthetic corpus for the CPU lab: invented people and facts, written in the official JSONL formats.

Not part of CLaRa: the method trains on the official data (docs/method.md#data-formats); this generator
gives the lab (lab/lab.py) and the shipped sample (data/sample) data that a tiny model can only answer
from the documents, never from what it already knows.

    python lab/synth.py --out DIR [--train 1000 --test 200 --k 5 --candidates 8 ...]   writes a data set
    make_synthetic(DIR, seed=0, ...)                                                   the same, from Python

The shipped sample data/sample/stage{1,2,3}.jsonl is the training part of
`make_synthetic(DIR, seed=0, n_train_entities=100, n_test_entities=20, k=5, n_candidates=8)`
(tests/test_data.py checks it byte for byte). The files are validated by `python data.py check`.
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

# Made-up people with 2-4 facts each, one short document per person. Everything is invented, so a model can
# only answer from the documents, never from what it already knows. Two ways to name people:
#   names="syllables"  first names and surnames built from syllables ("Kalon Branvortel", several tokens
#                      each); held-out people are other families whose surnames never occur in training;
#   names="words"      a first name and a surname from two fixed lists of short words ("Wren Fenwick"), each
#                      one token once the tokenizer has seen the corpus; held-out people are combinations
#                      never seen in training (the words themselves are known). Telling people apart then
#                      means keeping two known tokens; the CPU lab uses these (lab/lab.py).
# Families share a surname and first names repeat, so the distractors of a question are people with SIMILAR
# names and the same kind of facts: retrieval has to read the name, not just the topic (unless the question
# also describes the person's job: describe=True, see _JOB_DESCRIPTIONS).

_FIRST = ["ka", "lo", "mi", "re", "ta", "vo", "ni", "sa", "be", "do", "fe", "ga", "ju", "li", "ma", "no", "pe",
          "ri", "su", "te", "va", "zo"]
_FIRST_END = ["", "n", "r", "l", "s"]
_SURNAME = ["bran", "tel", "vor", "mek", "sil", "rok", "tam", "jun", "gast", "prel", "dov", "kesh", "lum", "nard",
            "oss", "quin", "rav", "sev", "tor", "yell"]
_FIRST_WORDS = ["Alda", "Bram", "Cora", "Dax", "Edda", "Finn", "Gret", "Hedy", "Ines", "Jory", "Kael", "Lise",
                "Mato", "Nell", "Orin", "Pia", "Rhea", "Sten", "Tova", "Ulf", "Vera", "Wren", "Yara", "Zeno",
                "Arlo", "Bess", "Cai", "Dora", "Emil", "Fay", "Gus", "Ivo", "Juno", "Kit", "Lark", "Milo", "Nia",
                "Otto", "Pell", "Rune", "Saba", "Una", "Wilm", "Ada", "Bo", "Eli", "Ida", "Lev"]
_SURNAME_WORDS = ["Ashdown", "Bell", "Corbin", "Penn", "Everly", "Fenwick", "Garrow", "Holloway", "Ingram",
                  "Jessop", "Kettle", "Larkin", "Merrow", "Norland", "Pryce", "Radley", "Sallow", "Thorne",
                  "Upton", "Varley", "Whitlow", "Yardley", "Abbott", "Birch", "Crane", "Dorsey", "Elwood", "Hart",
                  "Gable", "Hollis", "Irving", "Jansen", "Keller", "Lowry", "Marsh", "Nash", "Orwell", "Pike",
                  "Rook", "Sutter", "Tully", "Vance", "Webb", "York", "Ames", "Boyle", "Cobb", "Drake", "Eames",
                  "Frost", "Grady", "Hayes", "Joyce", "Kemp", "Lyle", "Moss", "Noble", "Platt", "Reyes", "Shaw",
                  "Toft", "Quill", "Dunn", "Voss"]
_PLACE_HEAD = ["Ar", "Bel", "Cor", "Dun", "El", "Fal", "Gil", "Hal", "Ist", "Kel", "Lor", "Mor", "Nor", "Ost",
               "Pel", "Quen", "Ros", "Sel", "Tam", "Ul", "Ver", "Wyn"]
_PLACE_TAIL = ["dale", "mere", "ford", "holm", "bury", "port", "stead", "wold"]
_JOBS = ["baker", "carpenter", "teacher", "nurse", "painter", "farmer", "sailor", "doctor", "engineer",
         "librarian", "potter", "tailor", "pilot", "chemist", "architect", "gardener", "musician", "lawyer",
         "miner", "weaver", "jeweler", "butcher", "writer", "astronomer"]
_COMPANY = (["Silver", "Golden", "Red", "Blue", "Green", "Iron", "Stone", "Oak", "River", "North", "South",
             "White"],
            ["Lantern", "Anchor", "Crown", "Bridge", "Harbor", "Arrow", "Falcon", "Garden", "Hammer", "Tower"],
            ["Press", "Works", "Mills", "Bakery", "Studio", "Foundry", "Company", "Shipyard"])

# Sentences per fact group. {S} is the subject at the start of a sentence, {s} inside one: the person's
# name in the first sentence of a document, a pronoun after it. Documents use one variant, paraphrases
# another, so a paraphrase says the same facts in other words and another order.
_SENTENCES = {
    "birth": ["{S} was born in {place} in {year}.", "{S} was born in {year} in the town of {place}.",
              "In {year}, {s} was born in {place}.", "{place} is where {s} was born, back in {year}."],
    "job": ["{S} works as {a_job}.", "{S} is {a_job} by trade.", "By profession, {s} is {a_job}."],
    "home": ["{S} lives in {home}.", "{S} now lives in {home}.", "These days {s} makes a home in {home}."],
    "founded": ["{S} founded {company} in {fyear}.", "In {fyear}, {s} founded {company}.",
                "{company} was started in {fyear}, and {s} was its founder."],
    "mentor": ["{S} studied under {mentor}.", "{S} learned the craft from {mentor}.",
               "As a student, {s} studied under {mentor}."],
}
# Question phrasings per answerable item; {n} is the full name. Every answer is a short span of the document.
_QUESTIONS = {
    "place": ["Where was {n} born?", "In which town was {n} born?"],
    "year": ["In what year was {n} born?", "When was {n} born?"],
    "job": ["What does {n} work as?", "What is the occupation of {n}?"],
    "home": ["Where does {n} live?", "In which town does {n} live now?"],
    "company": ["What did {n} found?", "Which company was founded by {n}?"],
    "fyear": ["In what year did {n} found {company}?", "When did {n} found {company}?"],
    "mentor": ["Who did {n} study under?", "Who was the teacher of {n}?"],
}
# Stage-1 QA only (names_asked=True): one more question per document, answered by the person's NAME. In the
# CPU lab they teach the stage-0 base to copy a name out of a text, and its raw-text reading of every
# question improved with them (8.7% -> 40.7% in one fast-lab run each); they did not make the tiny encoder's
# memories keep the name (docs/LOG.md, 2026-11-25).
_WHO = {"birth": "Who was born in {place}?", "job": "Who works as {a_job}?", "home": "Who lives in {home}?",
        "founded": "Who founded {company}?", "mentor": "Who studied under {mentor}?"}
# describe=True: every person has a job, and a stage-2/3 question about another fact names its person AND
# describes the job in other words, "Where does Edda Dunn (who makes bread) live?"; no distractor has that job.
# The CPU lab needs it: its tiny encoder's memories keep the facts its questions ask about but not the
# person's name (docs/LOG.md, 2026-11-25), so the name alone cannot tell the document from similar
# people's. The description shares no word with the job, so the untrained query reasoner (a copy of the
# document encoder) cannot match it by surface form: stage 3 has to learn that "who makes bread" finds the
# baker's document. Job questions stay plain and stage-2 only: a memory drops a fact no question asks.
_JOB_DESCRIPTIONS = {
    "baker": "who makes bread", "carpenter": "who builds furniture", "teacher": "who runs a classroom",
    "nurse": "who cares for patients", "painter": "who fills canvases", "farmer": "who grows crops",
    "sailor": "who goes to sea", "doctor": "who treats the sick", "engineer": "who designs machines",
    "librarian": "who keeps the books", "potter": "who shapes clay", "tailor": "who sews clothes",
    "pilot": "who flies planes", "chemist": "who mixes compounds", "architect": "who plans buildings",
    "gardener": "who tends flower beds", "musician": "who plays the violin", "lawyer": "who argues cases in court",
    "miner": "who digs for ore", "weaver": "who works a loom", "jeweler": "who sets precious stones",
    "butcher": "who cuts meat", "writer": "who pens novels", "astronomer": "who studies the stars"}
_ITEMS = {"birth": ("place", "year"), "job": ("job",), "home": ("home",), "founded": ("company", "fyear"),
          "mentor": ("mentor",)}


def _values(person: dict) -> dict:
    """The template fields of a person's facts, plus "a_job" ("a baker", "an engineer") when there is a job."""
    values = {**person["facts"], "a_job": None}
    if "job" in values:
        values["a_job"] = ("an " if values["job"][0] in "aeiou" else "a ") + values["job"]
    return values


def _render(person: dict, order: list[str], variants: dict) -> str:
    """The sentences of `order` (fact groups) with the chosen template variant of each, name first."""
    pron = person["pronoun"]
    values = _values(person)
    out = []
    for j, group in enumerate(order):
        subject = person["name"] if j == 0 else pron
        out.append(_SENTENCES[group][variants[group]].format(S=subject if j == 0 else pron.capitalize(),
                                                             s=subject, **values))
    return " ".join(out)


def _people(rng, n: int, firsts: list[str], used: set, places: list[str], names: str,
            every_job: bool = False) -> list[dict]:
    """n people in families of 2-4 sharing a surname, each with 2-4 fact groups (with every_job, one is "job").

    `used` holds what the other split may not reuse: surnames (names="syllables": a new family name each
    time) or full names (names="words": a surname word can return, a first-name + surname pair cannot).
    """
    people = []
    while len(people) < n:
        for _ in range(100_000):
            if names == "words":
                surname = rng.choice(_SURNAME_WORDS)
                free = [f for f in firsts if f"{f} {surname}" not in used]
                if len(free) >= 2:
                    break
            else:
                surname = "".join(rng.choice(_SURNAME) for _ in range(rng.choice((2, 2, 3)))).capitalize()
                if surname not in used:
                    used.add(surname)
                    free = firsts
                    break
        else:  # syllables: 20^2 + 20^3 surnames, 2-4 people each; words: 48 x 64 names
            raise ValueError(f"make_synthetic: out of {names} names after {len(people)} people; ask for fewer "
                             f"entities (about {20_000 if names == 'syllables' else 3_000} fit)")
        for first in rng.sample(free, min(rng.randint(2, 4), n - len(people), len(free))):
            if names == "words":
                used.add(f"{first} {surname}")
            year = rng.randint(1900, 1990)
            place, home = rng.sample(places, 2)
            facts = {"place": place, "year": str(year), "job": rng.choice(_JOBS), "home": home,
                     "company": " ".join(rng.choice(part) for part in _COMPANY),
                     "fyear": str(rng.randint(year + 20, min(year + 50, 2020)))}
            groups = rng.sample(sorted(_ITEMS), rng.randint(2, 4))
            if every_job and "job" not in groups:
                groups[-1] = "job"  # no extra random draw: the rest of the data set stays as without it
            people.append({"name": f"{first} {surname}", "first": first, "surname": surname,
                           "pronoun": rng.choice(("he", "she")), "facts": facts, "groups": groups})
    for p in people:  # mentors come from the same split (a held-out name never enters the training files)
        if "mentor" in p["groups"]:
            p["facts"]["mentor"] = rng.choice([q for q in people if q is not p])["name"]
        p["facts"] = {k: v for k, v in p["facts"].items() if any(k in _ITEMS[g] for g in p["groups"])}
        # The document, and a paraphrase of it: other template variants, other order when possible.
        doc_var = {g: rng.randrange(len(_SENTENCES[g])) for g in p["groups"]}
        para_var = {g: rng.choice([v for v in range(len(_SENTENCES[g])) if v != doc_var[g]]) for g in p["groups"]}
        order = p["groups"][:]
        while order == p["groups"]:
            rng.shuffle(order)
        p["doc"] = _render(p, p["groups"], doc_var)
        p["paraphrase"] = _render(p, order, para_var)
        p["items"] = [item for g in p["groups"] for item in _ITEMS[g]]
    return people


def question_fact(question: str) -> str:
    """The fact a synthetic question asks about (a key of _QUESTIONS), read back from its template."""
    for fact, templates in _QUESTIONS.items():
        for t in templates:
            head, tail = t.split("{n}")
            tail = tail.split("{company}")[-1]  # "... found {company}?": the company varies
            if question.startswith(head) and question.endswith(tail) and len(question) > len(head) + len(tail):
                return fact
    raise ValueError(f"not a synthetic question: {question!r}")


def _question(rng, person: dict, item: str, describe: bool = False) -> str:
    """A question about `item`; with describe, the job's description follows the name in brackets."""
    n = f"{person['name']} ({_JOB_DESCRIPTIONS[person['facts']['job']]})" if describe else person["name"]
    return rng.choice(_QUESTIONS[item]).format(n=n, company=person["facts"].get("company"))


def _who(rng, person: dict) -> str:
    """A question whose answer is the person's name, about one of their fact groups."""
    return _WHO[rng.choice(person["groups"])].format(**_values(person))


def _distractors(rng, person: dict, item: str, answer: str, people: list[dict], index: dict, n: int,
                 avoid: str | None = None) -> list[str]:
    """n documents of OTHER people that do not contain `answer`, as similar to `person` as possible.

    Tiers, in order: the same family (surname), the same first name, anyone else. Within a tier the order is
    random. With word names (index["mix"]) a surname is shared by dozens of people, so the first two tiers
    are taken in turn: about half the distractors share the surname, half the first name, and only the
    whole name singles the person out. Every distractor has a fact of the asked kind (index["same_kind"],
    the default: only the name tells the documents apart) or, with same_kind False, none (the question's
    topic alone then finds the document: an easier retrieval task). No distractor contains `avoid` either
    (describe=True: the person's job).
    """
    group = next(g for g, items in _ITEMS.items() if item in items)
    kind = lambda q: (group in q["groups"]) == index["same_kind"]  # noqa: E731
    chosen, seen = [], {person["name"]}
    needles = [answer.lower()] + ([avoid.lower()] if avoid else [])
    tiers = [[q for q in index["surname"][person["surname"]] if kind(q)],
             [q for q in index["first"][person["first"]] if kind(q)]]
    tiers = [rng.sample(t, len(t)) for t in tiers]
    if index["mix"]:  # word names: many share a surname; alternate the two tiers so both halves of the name matter
        tiers = [[q for pair in itertools.zip_longest(*tiers) for q in pair if q is not None]]
    if index["same_kind"]:
        tiers += [(rng.choice(index["group"][group]) for _ in range(20 * n)),
                  (rng.choice(people) for _ in range(20 * n)), people]  # the last is exhaustive
    else:
        tiers += [(q for q in rng.sample(people, len(people)) if kind(q))]  # every possible pick, shuffled
    for tier in tiers:
        for q in tier:
            if len(chosen) == n:
                return chosen
            if q["name"] not in seen and not any(x in q["doc"].lower() for x in needles):
                seen.add(q["name"])
                chosen.append(q["doc"])
    if len(chosen) < n:
        raise ValueError(f"make_synthetic: only {len(chosen)} of {n} distractors for {person['name']!r} avoid the "
                         f"answer {answer!r}; generate more entities")
    return chosen


def _records(rng, people: list[dict], k: int, n_candidates: int, questions_per_entity: int, asked, mix: bool,
             same_kind: bool, describe: bool = False):
    """Stage-2 and stage-3 records: questions with k documents / with N candidates and pos_index.

    describe: a question about another fact also describes the person's job (_JOB_DESCRIPTIONS), and no
    distractor has that job; a question about the job is asked plainly in stage 2 (so the memories must keep
    the job) and has no stage-3 record (nothing but the name would tell its document apart)."""
    index = {"surname": {}, "first": {}, "group": {}, "mix": mix, "same_kind": same_kind}
    for p in people:
        index["surname"].setdefault(p["surname"], []).append(p)
        index["first"].setdefault(p["first"], []).append(p)
        for g in p["groups"]:
            index["group"].setdefault(g, []).append(p)
    stage2, stage3 = [], []
    for p in people:
        items = [i for i in p["items"] if asked is None or i in asked]
        for item in rng.sample(items, min(questions_per_entity, len(items))):
            answer = p["facts"][item]
            described = describe and item != "job"
            job = p["facts"]["job"] if described else None
            docs = _distractors(rng, p, item, answer, people, index, k - 1, job) + [p["doc"]]
            rng.shuffle(docs)
            stage2.append({"question": _question(rng, p, item, described), "docs": docs, "answer": answer,
                           "gold_answer": answer})
            if describe and not described:
                continue
            # Sometimes the paraphrase is a second positive: pos_index is a list, recall is over all of it.
            positives = [p["doc"], p["paraphrase"]] if rng.random() < 0.3 else [p["doc"]]
            docs = positives + _distractors(rng, p, item, answer, people, index, n_candidates - len(positives),
                                            job)
            perm = rng.sample(range(n_candidates), n_candidates)  # candidate j goes to position perm[j]
            shuffled = [None] * n_candidates
            for j, d in enumerate(docs):
                shuffled[perm[j]] = d
            stage3.append({"question": _question(rng, p, item, described), "docs": shuffled, "answer": answer,
                           "pos_index": sorted(perm[:len(positives)])})
    return stage2, stage3


def make_synthetic(out_dir, seed: int = 0, n_train_entities: int = 1000, n_test_entities: int = 200, k: int = 5,
                   n_candidates: int = 8, questions_per_entity: int = 1, asked: list[str] | None = None,
                   names: str = "syllables", names_asked: bool = False, distractors: str = "same-kind",
                   describe: bool = False) -> dict:
    """Write a synthetic data set in the official formats; deterministic for a seed. Returns the counts.

    out_dir/stage1.jsonl       per training person: one "qa" record (a question and answer per fact, and
                               with names_asked one "Who ...?" question answered by the person's name) and
                               one "paraphrase" record (answers[0] = the same facts in other words), mixed
    out_dir/stage2.jsonl       `questions_per_entity` questions per person, each with k documents: the
                               person's and k-1 distractors (similar people, without the answer string).
                               The questions ask about the facts in `asked` (default: any of place, year,
                               job, home, company, fyear, mentor)
    out_dir/stage3.jsonl       the same questions with N candidates; pos_index = the person's document
                               (and 30% of the time its paraphrase too)
    out_dir/test_stage2.jsonl, test_stage3.jsonl   the same for held-out people (other families; with word
                               names, first-name + surname pairs never seen in training)
    out_dir/corpus.txt         the training documents and their paraphrases, one per line (tokenizer / LM)

    names: "syllables" or "words", how people are named (see the comment above _FIRST).
    distractors: "same-kind" (every distractor also has a fact of the asked kind: only the name tells the
    person's document apart) or "other-kind" (similar names, but no fact of the asked kind: the question's
    topic is enough, an easier retrieval task).
    describe: every person has a job, and stage-2/3 questions about another fact describe it in other words,
    "Where does Edda Dunn (who makes bread) live?"; no distractor has that job, so the description alone
    finds the document once a query reasoner has learned what it means (the CPU lab's setting). Questions
    about the job stay plain and are stage-2 only.
    """
    if names not in ("syllables", "words"):
        raise ValueError(f"make_synthetic: names={names!r}; choose 'syllables' or 'words'")
    if distractors not in ("same-kind", "other-kind"):
        raise ValueError(f"make_synthetic: distractors={distractors!r}; choose 'same-kind' or 'other-kind'")
    unknown = sorted(set(asked or ()) - set(_QUESTIONS))
    if unknown:
        raise ValueError(f"make_synthetic: unknown fact(s) {unknown} in asked; choose from {sorted(_QUESTIONS)}")
    if describe and asked is not None and set(asked) <= {"job"}:
        raise ValueError(f"make_synthetic: describe=True describes the job, so stage 3 needs questions about "
                         f"another fact than {asked}")
    if k < 1 or n_candidates < 2 or questions_per_entity < 1:
        raise ValueError(f"make_synthetic: need k >= 1, n_candidates >= 2, questions_per_entity >= 1; got k={k}, "
                         f"n_candidates={n_candidates}, questions_per_entity={questions_per_entity}")
    for name, n in (("n_train_entities", n_train_entities), ("n_test_entities", n_test_entities)):
        if n and n < 2 * max(k, n_candidates):  # distractors need enough other people without the answer
            raise ValueError(f"make_synthetic: {name}={n}; use 0 or at least 2 * max(k, n_candidates) = "
                             f"{2 * max(k, n_candidates)}")
    rng = random.Random(seed)
    if names == "words":
        firsts = list(_FIRST_WORDS)
    else:
        firsts = sorted({(rng.choice(_FIRST) + rng.choice(_FIRST) + rng.choice(_FIRST_END)).capitalize()
                         for _ in range(100)})
    places = sorted({h + t for h in _PLACE_HEAD for t in _PLACE_TAIL})
    places = rng.sample(places, 40)
    used = set()
    train = _people(rng, n_train_entities, firsts, used, places, names, describe)
    test = _people(rng, n_test_entities, firsts, used, places, names, describe)

    stage1 = []
    for p in train:
        questions = [_question(rng, p, item) for item in p["items"]]
        answers = [p["facts"][i] for i in p["items"]]
        if names_asked:
            questions.append(_who(rng, p))
            answers.append(p["name"])
        stage1.append({"data_type": "qa", "question": questions, "answers": answers, "docs": [p["doc"]]})
        stage1.append({"data_type": "paraphrase", "question": [], "answers": [p["paraphrase"]], "docs": [p["doc"]]})
    rng.shuffle(stage1)
    same = distractors == "same-kind"
    stage2, stage3 = _records(rng, train, k, n_candidates, questions_per_entity, asked, names == "words", same,
                              describe)
    test2, test3 = _records(rng, test, k, n_candidates, questions_per_entity, asked, names == "words", same,
                            describe)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"stage1.jsonl": stage1, "stage2.jsonl": stage2, "stage3.jsonl": stage3,
             "test_stage2.jsonl": test2, "test_stage3.jsonl": test3}
    for name, rows in files.items():
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    corpus = [p["doc"] for p in train] + [p["paraphrase"] for p in train]
    (out / "corpus.txt").write_text("".join(t + "\n" for t in corpus), encoding="utf-8")
    return {"train_entities": len(train), "test_entities": len(test), "corpus_lines": len(corpus),
            **{name.removesuffix(".jsonl"): len(rows) for name, rows in files.items()}}


def main(argv=None):
    """`python lab/synth.py --out DIR ...` writes a synthetic data set and prints its counts."""
    import argparse
    s = argparse.ArgumentParser(description="write a synthetic data set (train and held-out) in the official "
                                "formats", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", required=True, help="output directory (created if missing)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    s.add_argument("--train", type=int, default=1000, help="number of training people (one document each)")
    s.add_argument("--test", type=int, default=200, help="number of held-out people (other families)")
    s.add_argument("--k", type=int, default=5, help="documents per stage-2 question")
    s.add_argument("--candidates", type=int, default=8, help="candidate documents per stage-3 question")
    s.add_argument("--questions", type=int, default=1, help="stage-2/3 questions per person (at most its facts)")
    s.add_argument("--ask", nargs="+", default=None, choices=sorted(_QUESTIONS), help="the facts stage-2/3 "
                   "questions ask about (default: all); documents and stage-1 QA always hold every fact")
    s.add_argument("--names", default="syllables", choices=("syllables", "words"), help="people's names: built "
                   "from syllables (several tokens, held-out surnames unseen) or two words from fixed lists (one "
                   "token each, held-out = unseen first+surname pairs)")
    s.add_argument("--ask-names", action="store_true", help="stage-1 QA also asks one 'Who ...?' question per "
                   "document, answered by the person's name")
    s.add_argument("--distractors", default="same-kind", choices=("same-kind", "other-kind"), help="stage-2/3 "
                   "distractors (people with similar names) also have a fact of the asked kind, so only the name "
                   "tells them apart, or have none, so the question's topic is enough (easier)")
    s.add_argument("--describe", action="store_true", help="every person has a job; stage-2/3 questions about "
                   "other facts describe it in other words, 'Where does Edda Dunn (who makes bread) live?', and no "
                   "distractor has it; job questions are plain and stage-2 only (the CPU lab: its tiny encoder "
                   "keeps facts, not names)")
    a = s.parse_args(argv)
    counts = make_synthetic(a.out, a.seed, a.train, a.test, a.k, a.candidates, a.questions, a.ask, a.names,
                            a.ask_names, a.distractors, a.describe)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

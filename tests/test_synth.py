"""lab/synth.py, the CPU lab's synthetic corpus: deterministic per seed, valid in the official formats,
held-out people never in training, answers only in the positives, similar distractors, the options."""
import json
import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from data import JsonlDataset

sys.path.insert(0, str(ROOT / "lab"))
from synth import _QUESTIONS, make_synthetic  # noqa: E402


QUESTION_RES = [re.compile("^" + re.escape(t).replace(re.escape("{n}"), "(?P<n>.+?)")
                           .replace(re.escape("{company}"), ".+?") + "$") for ts in _QUESTIONS.values() for t in ts]


def asked_name(question: str) -> str:
    names = {m["n"] for rx in QUESTION_RES if (m := rx.match(question))}
    assert len(names) == 1, question
    return names.pop()


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    counts = make_synthetic(out, seed=3, n_train_entities=120, n_test_entities=40, k=4, n_candidates=10,
                            questions_per_entity=2)
    return out, counts


def test_synthetic_is_deterministic(synth, tmp_path):
    out, counts = synth
    again = make_synthetic(tmp_path / "a", seed=3, n_train_entities=120, n_test_entities=40, k=4, n_candidates=10,
                           questions_per_entity=2)
    assert again == counts
    for f in out.iterdir():
        assert (tmp_path / "a" / f.name).read_bytes() == f.read_bytes(), f.name
    make_synthetic(tmp_path / "b", seed=4, n_train_entities=120, n_test_entities=40, k=4, n_candidates=10)
    assert (tmp_path / "b" / "stage1.jsonl").read_bytes() != (out / "stage1.jsonl").read_bytes()


def test_synthetic_files_validate_and_match_the_counts(synth):
    out, counts = synth
    for name, stage in [("stage1", 1), ("stage2", 2), ("stage3", 3), ("test_stage2", 2), ("test_stage3", 3)]:
        ds = JsonlDataset(out / f"{name}.jsonl", stage)
        assert ds.check() == [] and len(ds) == counts[name] > 0, name
    assert counts["stage1"] == 2 * counts["train_entities"] == 240
    kinds = [r["data_type"] for r in load(out / "stage1.jsonl")]
    assert kinds.count("qa") == kinds.count("paraphrase") == 120 and kinds[:10] != ["qa"] * 10  # mixed
    assert all(len(r["docs"]) == 4 for r in load(out / "stage2.jsonl") + load(out / "test_stage2.jsonl"))
    assert all(len(r["docs"]) == 10 for r in load(out / "stage3.jsonl") + load(out / "test_stage3.jsonl"))
    corpus = (out / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert len(corpus) == counts["corpus_lines"] and all(len(t.split()) <= 40 for t in corpus)


def test_synthetic_held_out_people_never_appear_in_training(synth):
    out, _ = synth
    test_names = {asked_name(r["question"]) for f in ("test_stage2", "test_stage3") for r in load(out / f"{f}.jsonl")}
    train_names = {asked_name(q) for r in load(out / "stage1.jsonl") for q in r["question"]}
    train_names |= {asked_name(r["question"]) for f in ("stage2", "stage3") for r in load(out / f"{f}.jsonl")}
    assert len(test_names) == 40 and len(train_names) == 120 and not test_names & train_names
    train_text = "\n".join((out / f).read_text(encoding="utf-8")
                           for f in ("stage1.jsonl", "stage2.jsonl", "stage3.jsonl", "corpus.txt"))
    for name in test_names:
        assert not re.search(rf"\b{name}\b", train_text), name
        assert not re.search(rf"\b{name.split()[1]}\b", train_text), name  # nor its family


def test_synthetic_answers_are_in_positives_only(synth):
    out, _ = synth
    for f in ("stage3", "test_stage3"):
        records = load(out / f"{f}.jsonl")
        assert any(len(r["pos_index"]) > 1 for r in records)  # the paraphrase as a second positive
        for r in records:
            a = r["answer"].lower()
            assert len(r["answer"].split()) <= 3
            for j, d in enumerate(r["docs"]):
                assert (a in d.lower()) == (j in r["pos_index"]), (r["question"], j)
    for f in ("stage2", "test_stage2"):
        for r in load(out / f"{f}.jsonl"):
            assert sum(r["answer"].lower() in d.lower() for d in r["docs"]) == 1
    for r in load(out / "stage1.jsonl"):
        if r["data_type"] == "qa":
            assert all(a in r["docs"][0] for a in r["answers"])
        else:
            assert r["answers"][0] != r["docs"][0]


def test_synthetic_distractors_are_similar(synth):
    """Most stage-3 candidate sets hold someone of the same family or with the same first name."""
    out, _ = synth
    records = load(out / "stage3.jsonl")
    similar = 0
    for r in records:
        first, surname = asked_name(r["question"]).split()
        others = [d for j, d in enumerate(r["docs"]) if j not in r["pos_index"]]
        similar += any(re.search(rf"\b({first} \w+|\w+ {surname})\b", d) for d in others)
    assert similar > 0.8 * len(records)


def test_synthetic_asked_facts_and_one_document(tmp_path):
    """--ask restricts the questions (documents keep every fact); k=1 gives each question its own document."""
    from synth import question_fact
    make_synthetic(tmp_path, seed=1, n_train_entities=60, n_test_entities=20, k=1, n_candidates=4,
                   questions_per_entity=3, asked=["job", "home"])
    for name in ("stage2", "stage3", "test_stage2", "test_stage3"):
        rows = load(tmp_path / f"{name}.jsonl")
        assert rows and {question_fact(r["question"]) for r in rows} == {"job", "home"}, name
    for r in load(tmp_path / "stage2.jsonl"):
        assert len(r["docs"]) == 1 and r["answer"] in r["docs"][0]
    assert {question_fact(q) for r in load(tmp_path / "stage1.jsonl") for q in r["question"]} == set(_QUESTIONS)
    with pytest.raises(ValueError, match=r"unknown fact\(s\) \['age'\]"):
        make_synthetic(tmp_path, asked=["job", "age"])


def test_synthetic_word_names_and_name_questions(tmp_path):
    """names="words": first name + surname from the two fixed lists, held-out people are pairs never seen in
    training (the words themselves are), distractors share the surname OR the first name about equally; with
    names_asked every stage-1 QA record ends with a "Who ...?" question answered by its person's name."""
    from synth import _FIRST_WORDS, _SURNAME_WORDS, _WHO
    make_synthetic(tmp_path, seed=2, n_train_entities=300, n_test_entities=60, k=1, n_candidates=8,
                   questions_per_entity=2, names="words", names_asked=True)
    names = lambda files: {asked_name(r["question"]) for f in files for r in load(tmp_path / f"{f}.jsonl")}
    test_names, train_names = names(("test_stage2", "test_stage3")), names(("stage2", "stage3"))
    assert len(test_names) == 60 and len(train_names) == 300 and not test_names & train_names
    for name in test_names | train_names:
        first, surname = name.split()
        assert first in _FIRST_WORDS and surname in _SURNAME_WORDS
    train_text = "\n".join((tmp_path / f).read_text(encoding="utf-8") for f in ("stage1.jsonl", "corpus.txt"))
    assert not any(re.search(rf"\b{n}\b", train_text) for n in test_names)
    assert any(re.search(rf"\b{n.split()[1]}\b", train_text) for n in test_names)  # known words, new pairs
    who = [re.compile("^" + ".+".join(map(re.escape, re.split(r"\{\w+\}", t))) + "$") for t in _WHO.values()]
    for r in load(tmp_path / "stage1.jsonl"):
        if r["data_type"] == "qa":
            q, a = r["question"][-1], r["answers"][-1]
            assert any(rx.match(q) for rx in who), q
            assert r["docs"][0].startswith(a) or f" {a} " in r["docs"][0] or f" {a}." in r["docs"][0]
            assert all(asked_name(x) == a for x in r["question"][:-1])  # the other questions name the same person
    surname_share = first_share = 0
    person = re.compile(rf"\b({'|'.join(_FIRST_WORDS)}) ({'|'.join(_SURNAME_WORDS)})\b")
    rows = load(tmp_path / "stage3.jsonl")
    for r in rows:
        first, surname = asked_name(r["question"]).split()
        others = [d for j, d in enumerate(r["docs"]) if j not in r["pos_index"]]
        people = [person.search(d).group(0).split() for d in others]  # each distractor's own name
        surname_share += sum(p[1] == surname for p in people) / len(others)
        first_share += sum(p[0] == first for p in people) / len(others)
    surname_share, first_share = surname_share / len(rows), first_share / len(rows)
    print(f"distractors sharing the surname {surname_share:.2f}, the first name {first_share:.2f}")
    assert surname_share > 0.3 and first_share > 0.3 and abs(surname_share - first_share) < 0.15
    with pytest.raises(ValueError, match="names='initials'"):
        make_synthetic(tmp_path, names="initials")


def test_synthetic_other_kind_distractors(tmp_path):
    """distractors="other-kind": similar names, but no candidate other than the positives has a fact of the
    asked kind, so the question's topic finds the document; the default gives every distractor one."""
    from synth import _ITEMS, _SENTENCES, question_fact
    kinds = {item: g for g, items in _ITEMS.items() for item in items}  # asked fact -> its sentence group
    # a document has a fact group when one of that group's sentence templates matches one of its sentences
    rx = {g: [re.compile("^" + ".+".join(map(re.escape, re.split(r"\{\w+\}", t))) + "$") for t in ts]
          for g, ts in _SENTENCES.items()}
    has = lambda doc, g: any(r.match(sent.strip()) for sent in re.split(r"(?<=\.) ", doc) for r in rx[g])
    for mode, expect in (("other-kind", False), ("same-kind", True)):
        out = tmp_path / mode
        make_synthetic(out, seed=5, n_train_entities=200, n_test_entities=40, k=3, n_candidates=8,
                       names="words", distractors=mode)
        for f in ("stage3", "test_stage3", "stage2"):
            for r in load(out / f"{f}.jsonl"):
                g = kinds[question_fact(r["question"])]
                pos = r.get("pos_index") or [j for j, d in enumerate(r["docs"]) if r["answer"] in d]
                assert all(has(r["docs"][j], g) for j in pos), r
                assert all(has(d, g) == expect for j, d in enumerate(r["docs"]) if j not in pos), (mode, r)
    with pytest.raises(ValueError, match="distractors='none'"):
        make_synthetic(tmp_path / "x", distractors="none")


def test_synthetic_described_questions(tmp_path):
    """describe=True: every person has a job; a stage-2/3 question about another fact names its person AND
    describes the person's job in words that share none with it, "Where does Edda Dunn (who makes bread) live?",
    and no distractor has that job; a question about the job is plain and in stage 2 only."""
    from synth import _JOB_DESCRIPTIONS, _JOBS, question_fact
    assert sorted(_JOB_DESCRIPTIONS) == sorted(_JOBS)
    for job, phrase in _JOB_DESCRIPTIONS.items():  # no surface overlap: stems of 4+ letters are not shared
        assert not any(w[:4] in job or job[:4] in w for w in phrase.split() if len(w) >= 4), (job, phrase)
    by_phrase = {v: k for k, v in _JOB_DESCRIPTIONS.items()}
    make_synthetic(tmp_path, seed=4, n_train_entities=300, n_test_entities=60, k=3, n_candidates=8,
                   questions_per_entity=2, names="words", describe=True)
    jobs_seen, plain_jobs = set(), 0
    for f in ("stage2", "stage3", "test_stage2", "test_stage3"):
        rows = load(tmp_path / f"{f}.jsonl")
        assert len(rows) > 40
        for r in rows:
            named, fact = asked_name(r["question"]), question_fact(r["question"])
            pos = r.get("pos_index") or [j for j, d in enumerate(r["docs"]) if r["answer"] in d]
            if fact == "job":  # plain, stage 2 only
                assert "stage2" in f and "(" not in named, r
                plain_jobs += 1
                continue
            name, phrase = re.fullmatch(r"(\S+ \S+) \((.+)\)", named).groups()
            job = by_phrase[phrase]
            jobs_seen.add(job)
            assert name in r["docs"][pos[0]] and all(re.search(rf"\b{job}\b", r["docs"][j]) for j in pos), r
            assert not any(job in d.lower() for j, d in enumerate(r["docs"]) if j not in pos), (job, r)
    assert len(jobs_seen) > 15 and plain_jobs > 20
    for line in (tmp_path / "corpus.txt").read_text(encoding="utf-8").splitlines():  # every person has a job
        assert any(re.search(rf"\b{j}\b", line) for j in _JOBS), line
    plain = tmp_path / "plain"
    make_synthetic(plain, seed=4, n_train_entities=300, n_test_entities=60, k=3, n_candidates=8,
                   questions_per_entity=2, names="words")
    assert not any("(" in r["question"] for r in load(plain / "stage3.jsonl"))
    with pytest.raises(ValueError, match="describe=True describes the job"):
        make_synthetic(tmp_path / "x", names="words", asked=["job"], describe=True)


def test_question_fact_reads_every_template():
    from synth import question_fact
    for fact, templates in _QUESTIONS.items():
        for t in templates:
            assert question_fact(t.format(n="Ana Bel", company="Red Oak Mill")) == fact
    with pytest.raises(ValueError, match="not a synthetic question"):
        question_fact("How old is Ana?")


def test_synthetic_refuses_too_few_entities(tmp_path):
    with pytest.raises(ValueError, match="n_test_entities"):
        make_synthetic(tmp_path, n_train_entities=100, n_test_entities=5, n_candidates=8)

"""lab/official_data.py: the split is by document, positives point at the question's own passage, candidates
are distinct, a seed gives the same files, and every file passes data.py's validators and eval.py's reader.

Each property is checked on a small made-up source (always) and on the official example file in
../shared/data (skipped when that file is missing: it is the official repository's
example/pretrain_data.jsonl; put a copy there or pass its path in CLARA_OFFICIAL_DATA).
"""
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "lab"))
import official_data  # noqa: E402
from data import JsonlDataset  # noqa: E402
from eval import read_eval_file  # noqa: E402

OFFICIAL = Path(os.environ.get("CLARA_OFFICIAL_DATA", official_data.DEFAULT_SRC))
FILES = {"stage1": 1, "stage2": 2, "stage3": 3, "test_stage2": 2, "test_stage3": 3}


def tiny_source(path: Path, n_docs: int = 40) -> Path:
    """n_docs passages, 3 QA pairs each; answers are unique made-up words, plus one shared year."""
    lines = []
    for i in range(n_docs):
        doc = f"Passage {i} is about Zorb{i}. It was founded in 1999 by Quix{i} near Lake Vel{i}."
        lines.append({"data_type": "qa", "docs": [doc],
                      "question": [f"What is passage {i} about?", f"Who founded Zorb{i}?", f"When was Zorb{i} founded?"],
                      "answers": [f"Zorb{i}", f"Quix{i}", "1999"]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def load(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def source_index(src: Path) -> tuple[set, dict]:
    """(every passage, {(question, answer): set of passages that carry that QA pair})."""
    passages, owner = set(), {}
    for r in load(src):
        passages.add(r["docs"][0])
        for q, a in zip(r["question"], r["answers"]):
            owner.setdefault((q, a), set()).add(r["docs"][0])
    return passages, owner


def check_build(src: Path, out: Path, **kw) -> dict:
    split = official_data.build(src, out, **kw)
    files = {name: load(out / f"{name}.jsonl") for name in FILES}
    passages, owner = source_index(src)
    test_lines = set(split["test_source_lines"])
    src_lines = src.read_text(encoding="utf-8").splitlines()
    held = {json.loads(src_lines[n - 1])["docs"][0] for n in test_lines}
    assert len(held) == split["test_documents"] == kw.get("test_docs", 100)

    # By document: no held-out passage anywhere in a training file; the held-out files use held-out ones only.
    for name in ("stage1", "stage2", "stage3"):
        used = {d for r in files[name] for d in r["docs"]}
        assert not used & held, name
    assert {r["docs"][0] for r in files["stage1"]} == passages - held
    for name in ("test_stage2", "test_stage3"):
        assert {d for r in files[name] for d in r["docs"]} <= held, name

    k, n = kw.get("k", 5), kw.get("candidates", 20)
    for name, size in (("stage2", k), ("stage3", n), ("test_stage2", k), ("test_stage3", n)):
        for r in files[name]:
            assert len(r["docs"]) == size == len(set(r["docs"])), name  # candidates distinct
            answer = r["answer"] if "answer" in r else r["golden_answers"][0]
            own = owner[(r["question"], answer)]
            if "pos_index" in r:  # the positive is the question's own passage, and only it
                assert len(r["pos_index"]) == 1
                assert r["docs"][r["pos_index"][0]] in own, name
                assert not (set(r["docs"]) - {r["docs"][r["pos_index"][0]]}) & own, name
            else:
                assert len(set(r["docs"]) & own) == 1, name
    # Every held-out question is asked, once per held-out file; the positive is not always first.
    held_qa = sum(len(r["question"]) for r in load(src) if r["docs"][0] in held)  # a repeated pair counts twice
    assert len(files["test_stage2"]) == len(files["test_stage3"]) == held_qa
    if k > 1:
        assert len({r["pos_index"][0] for r in files["test_stage2"]}) > 1

    # data.py's validators and eval.py's reader accept every file.
    for name, stage in FILES.items():
        assert JsonlDataset(out / f"{name}.jsonl", stage).check() == [], name
    for name in ("test_stage2", "test_stage3"):
        records, bad = read_eval_file(out / f"{name}.jsonl")
        assert not bad and all(r["pos_index"] and r["golds"] for r in records)
    return split


def test_tiny_source_split_positives_validators(tmp_path):
    src = tiny_source(tmp_path / "src.jsonl")
    split = check_build(src, tmp_path / "out", test_docs=10, k=3, candidates=6, seed=1)
    assert split["records"] == {"stage1": 30, "stage2": 90, "stage3": 90, "test_stage2": 30, "test_stage3": 30}
    # The answer "1999" is in every passage: the distractors then have to carry it, and that is counted.
    assert split["distractors_with_answer"] == {"train": 30 * (2 + 5), "test": 10 * (2 + 5)}


def test_distractors_avoid_the_answer_when_they_can(tmp_path):
    src = tiny_source(tmp_path / "src.jsonl")
    out = tmp_path / "out"
    official_data.build(src, out, test_docs=10, k=3, candidates=6, seed=0)
    for name in ("stage3", "test_stage3"):
        for r in load(out / f"{name}.jsonl"):
            answer = r.get("answer") or r["golden_answers"][0]
            if answer != "1999":
                hits = [i for i, d in enumerate(r["docs"]) if f" {answer.lower()} " in official_data._words(d)]
                assert hits == r["pos_index"]


def test_deterministic_for_a_seed(tmp_path):
    src = tiny_source(tmp_path / "src.jsonl")
    outs = [tmp_path / x for x in ("a", "b", "c")]
    for out, seed in zip(outs, (3, 3, 4)):
        official_data.build(src, out, test_docs=10, k=3, candidates=6, seed=seed)
    for name in FILES:
        assert (outs[0] / f"{name}.jsonl").read_bytes() == (outs[1] / f"{name}.jsonl").read_bytes()
    split = lambda d: json.loads((d / "split.json").read_text())["test_source_lines"]  # noqa: E731
    assert split(outs[0]) == split(outs[1]) != split(outs[2])


def test_questions_per_doc_and_k1(tmp_path):
    src = tiny_source(tmp_path / "src.jsonl")
    split = check_build(src, tmp_path / "out", test_docs=10, k=1, candidates=4, seed=0, questions_per_doc=1)
    assert split["records"]["stage2"] == 30 and split["records"]["test_stage2"] == 30  # held-out keep all


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    src = tiny_source(tmp_path / "src.jsonl", n_docs=30)
    with pytest.raises(SystemExit, match=r"--test-docs 25: .* at least max\(k, candidates\) = 20"):
        official_data.main(["--src", str(src), "--out", str(tmp_path / "o"), "--test-docs", "25"])
    with pytest.raises(SystemExit, match="nope.jsonl: source file not found"):
        official_data.main(["--src", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(src.read_text() + '{"data_type": "qa", "docs": "one string"}\n')
    with pytest.raises(SystemExit, match=r"broken.jsonl:31: field 'docs'"):
        official_data.main(["--src", str(broken), "--out", str(tmp_path / "o"), "--test-docs", "5", "--k", "2",
                            "--candidates", "4"])


@pytest.mark.skipif(not OFFICIAL.is_file(), reason=f"needs the official example data at {OFFICIAL} (the official "
                    "CLaRa repository's example/pretrain_data.jsonl; or set CLARA_OFFICIAL_DATA to its path)")
def test_official_example_data(tmp_path):
    split = check_build(OFFICIAL, tmp_path / "out", test_docs=100, k=5, candidates=20, seed=0, questions_per_doc=1)
    assert split["documents"] == 1000 and split["train_documents"] == 900
    assert split["records"]["stage1"] == 900 and split["records"]["stage2"] == 900
    assert 600 < split["records"]["test_stage2"] < 1000  # about 8 questions per passage

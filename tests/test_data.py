"""data.py's readers: validation errors that name file, line and field; the official fallbacks; a streamed,
sharded, resumable order; batches; the check command and the shipped sample (written by lab/synth.py)."""
import json
import re
import sys
from pathlib import Path

import pytest

from data import STAGE_KEYS, DataError, JsonlDataset, batches, main, validate_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lab"))
import synth  # noqa: E402  (the generator of the shipped sample)
SAMPLE = ROOT / "data" / "sample"

GOOD = {1: {"data_type": "qa", "question": ["Who?"], "answers": ["Ann"], "docs": ["Ann wrote it."]},
        2: {"question": "Who?", "docs": ["Ann wrote it.", "Bob read it."], "answer": "Ann"},
        3: {"question": "Who?", "docs": ["Ann wrote it.", "Bob read it.", "Cy ate."], "answer": "Ann",
            "pos_index": [0]}}


def write_jsonl(path: Path, lines: list) -> Path:
    """Objects are dumped as JSON; strings are written as they are (for broken lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                            for x in lines), encoding="utf-8")
    return path


def read_all(ds: JsonlDataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


# ---- validation errors: file, line and field -----------------------------------------------------------

def bad(stage, **change):
    """GOOD[stage] with fields replaced (a value of ... deletes the field)."""
    r = {**GOOD[stage], **change}
    return {k: v for k, v in r.items() if v is not ...}


CASES = [  # (stage, bad record or raw line, field named in the message or None)
    (1, '{"data_type": "qa", "docs": ["x"]', None),                         # not JSON
    (2, '["a", "list"]', None),                                             # not an object
    (1, bad(1, docs=...), "docs"),                                          # missing field
    (1, bad(1, docs="Ann wrote it."), "docs"),                              # a string where a list goes
    (2, bad(2, docs="Ann wrote it."), "docs"),
    (3, bad(3, docs=..., context="Ann wrote it."), "context"),
    (1, bad(1, docs=["   "]), "docs[0]"),                                   # empty (whitespace) document
    (2, bad(2, docs=["Ann wrote it.", ""]), "docs[1]"),
    (2, bad(2, docs=[]), "docs"),                                           # no document
    (1, bad(1, docs=["one", "two"]), "docs"),                               # stage 1: one document only
    (2, bad(2, docs=["Ann", 7]), "docs[1]"),                                # wrong element type
    (1, bad(1, data_type="summary"), "data_type"),                          # unknown data_type
    (1, bad(1, data_type=...), "data_type"),
    (1, bad(1, question=["Who?", "When?"]), "question"),                   # mismatched lengths
    (1, bad(1, question=[], answers=[]), "question"),
    (1, bad(1, question="Who?"), "question"),
    (1, bad(1, answers="Ann"), "answers"),
    (1, bad(1, answers=...), "answers"),
    (1, bad(1, question=...), "question"),
    (1, bad(1, data_type="paraphrase", answers=[]), "answers"),
    (2, bad(2, question=["Who?"]), "question"),
    (2, bad(2, question=...), "question"),
    (2, bad(2, answer=...), "answer"),                                      # no answer under any name
    (2, bad(2, answer=42), "answer"),
    (2, bad(2, answer=..., answers="Ann"), "answers"),
    (3, bad(3, answer=..., golden_answers=[]), "golden_answers"),
    (3, bad(3, pos_index=[0, 3]), "pos_index[1]"),                          # out of range (3 documents)
    (3, bad(3, pos_index=[-1]), "pos_index[0]"),
    (3, bad(3, pos_index=["0"]), "pos_index[0]"),                           # not ints
    (3, bad(3, pos_index=[1.0]), "pos_index[0]"),
    (3, bad(3, pos_index=[True]), "pos_index[0]"),
    (3, bad(3, pos_index=0), "pos_index"),
    (3, bad(3, pos_index=[1, 1]), "pos_index"),
]


@pytest.mark.parametrize("stage,record,field", CASES)
def test_validation_errors_name_file_line_and_field(tmp_path, stage, record, field):
    # line 1 good, line 2 blank (skipped but counted), line 3 bad
    path = write_jsonl(tmp_path / "broken_set.jsonl", [GOOD[stage], "", record])
    ds = JsonlDataset(path, stage)
    assert len(ds) == 2
    ds[0]  # the good line reads fine
    with pytest.raises(DataError) as e:
        read_all(ds)
    msg = str(e.value)
    assert "broken_set.jsonl:3:" in msg
    if field is not None:
        assert f"'{field}'" in msg
    assert ds.check() == [msg]  # check() collects the same message


def test_a_string_where_a_list_goes_says_so(tmp_path):
    with pytest.raises(DataError, match="found a string"):
        validate_record(bad(1, docs="Ann wrote it."), 1, "f.jsonl:1")


def test_not_valid_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD[2]).encode() + b"\n" + '{"question": "Zürich"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        read_all(JsonlDataset(path, 2))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        JsonlDataset([write_jsonl(tmp_path / "here.jsonl", [GOOD[1]]), tmp_path / "nowhere.jsonl"], 1)


# ---- normalisation and the official fallbacks ----------------------------------------------------------

@pytest.mark.parametrize("stage", [1, 2, 3])
def test_records_are_normalised_to_the_stage_keys(stage):
    r = validate_record({**GOOD[stage], "id": 17, "extra": {"x": 1}}, stage, "f.jsonl:9")
    assert set(r) == set(STAGE_KEYS[stage]) | {"_where"} and r["_where"] == "f.jsonl:9"


def test_answer_and_docs_fallbacks():
    base = {"question": "Who?", "docs": ["Ann wrote it."]}
    cases = [({"answers": ["Ann", "Anne"]}, "Ann"), ({"golden_answers": ["Ann", "A."]}, "Ann"),
             ({"gold_answer": "Ann"}, "Ann"), ({"gold_answer": ["Ann", "A."]}, "Ann"),
             ({"answer": "Ann", "answers": ["Bob"], "golden_answers": ["Cy"]}, "Ann"),
             ({"answers": ["Bob"], "golden_answers": ["Cy"]}, "Bob"),
             ({"answer": "Ann", "gold_answer": {"any": "thing"}}, "Ann")]  # gold_answer accepted as it is
    for stage in (2, 3):
        for extra, want in cases:
            assert validate_record({**base, **extra}, stage, "f:1")["answer"] == want, extra
    for key in ("context", "content"):
        r = validate_record({"question": "Who?", key: ["Ann wrote it."], "answer": "Ann"}, 2, "f:1")
        assert r["docs"] == ["Ann wrote it."]
    r = validate_record({"question": "Who?", "docs": ["A"], "context": "ignored: docs comes first", "answer": "A"},
                        2, "f:1")
    assert r["docs"] == ["A"]


def test_optional_fields():
    r = validate_record({"question": "Who?", "docs": ["A", "B"], "answer": "A"}, 3, "f:1")
    assert r["pos_index"] is None
    assert validate_record({**GOOD[3], "pos_index": []}, 3, "f:1")["pos_index"] == []  # a no_pos record
    # paraphrase: question ignored (absent, empty or anything), answers[0] is the target
    for q in ({}, {"question": []}, {"question": ["whatever"]}, {"question": "junk"}):
        r = validate_record({"data_type": "paraphrase", "answers": ["Same, other words."], "docs": ["Doc."], **q},
                            1, "f:1")
        assert r["question"] == [] and r["answers"] == ["Same, other words."]


# ---- streaming ------------------------------------------------------------------------------------------

@pytest.fixture()
def stage2_file(tmp_path):
    """23 stage-2 records, blank lines between some, multi-byte UTF-8 text, no newline at the end."""
    lines, expected_line = [], {}
    for i in range(23):
        if i % 5 == 0:
            lines.append("")
        if i % 7 == 0:
            lines.append("   ")
        lines.append({"question": f"q{i} — où est Zürich? 東京 ✓", "docs": [f"doc {i} ünïcödé 🙂", "other"],
                      "answer": f"a{i}"})
        expected_line[f"q{i}"] = len(lines)
    path = tmp_path / "s2.jsonl"
    text = "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines)
    path.write_text(text.rstrip("\n"), encoding="utf-8")
    return path, expected_line


def qid(r):
    return r["question"].split()[0]


def test_offsets_and_line_numbers_with_non_ascii_text(stage2_file):
    path, expected_line = stage2_file
    ds = JsonlDataset(path, 2)
    assert len(ds) == 23 and ds.offsets.dtype.name == "int64"
    for i, r in enumerate(read_all(ds)):
        assert qid(r) == f"q{i}" and r["docs"][0] == f"doc {i} ünïcödé 🙂"
        assert r["_where"] == f"{path}:{expected_line[f'q{i}']}"


def test_order_is_deterministic_per_seed_and_epoch(stage2_file):
    ds = JsonlDataset(stage2_file[0], 2)
    run = lambda epoch, seed=7: [qid(r) for r in ds.records(epoch, seed)]
    assert run(0) == run(0) and sorted(run(0)) == sorted(f"q{i}" for i in range(23))
    assert run(1) != run(0) and run(0, seed=8) != run(0)
    assert run(0) != [f"q{i}" for i in range(23)]  # actually shuffled


@pytest.mark.parametrize("world", [2, 3, 4, 23])
def test_ranks_are_disjoint_equal_and_cover_the_cut(stage2_file, world):
    ds = JsonlDataset(stage2_file[0], 2)
    shares = [[qid(r) for r in ds.records(3, 1, rank, world)] for rank in range(world)]
    assert all(len(s) == 23 // world == ds.per_rank(world) for s in shares)
    union = [q for s in shares for q in s]
    assert len(set(union)) == len(union) == 23 // world * world
    # the kept records are the first (23 // world) * world of the single-process order
    assert set(union) == {qid(r) for r in list(ds.records(3, 1))[: len(union)]}


def test_start_resumes_exactly(stage2_file):
    ds = JsonlDataset(stage2_file[0], 2)
    full = [qid(r) for r in ds.records(2, 5, rank=1, world=3)]
    for s in (0, 1, 4, len(full) - 1, len(full), len(full) + 3):
        assert [qid(r) for r in ds.records(2, 5, rank=1, world=3, start=s)] == full[s:]


def test_several_files_and_crlf(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD[3], GOOD[3]])
    b = tmp_path / "b.jsonl"
    b.write_bytes(b"\r\n" + json.dumps({**GOOD[3], "answer": "Bob"}).encode() + b"\r\n")
    ds = JsonlDataset([a, str(b)], 3)
    assert len(ds) == 3
    assert [r["_where"] for r in read_all(ds)] == [f"{a}:1", f"{a}:2", f"{b}:2"]
    assert ds[-1]["answer"] == "Bob"


def test_bad_arguments(stage2_file):
    ds = JsonlDataset(stage2_file[0], 2)
    with pytest.raises(ValueError, match="rank 2"):
        next(ds.records(0, 0, rank=2, world=2))
    with pytest.raises(ValueError, match="stage"):
        JsonlDataset(stage2_file[0], 4)


# ---- batches ----------------------------------------------------------------------------------------------

def test_batches_sizes_and_resume(stage2_file):
    ds = JsonlDataset(stage2_file[0], 2)
    for world in (1, 2):
        got = list(batches(ds, 4, 0, 3, rank=world - 1, world=world))
        assert len(got) == (23 // world) // 4 and all(len(b) == 4 for b in got)
        flat = [qid(r) for b in got for r in b]
        assert flat == [qid(r) for r in ds.records(0, 3, world - 1, world)][: len(flat)]
        later = list(batches(ds, 4, 0, 3, rank=world - 1, world=world, start_batch=2))
        assert [[qid(r) for r in b] for b in later] == [[qid(r) for r in b] for b in got[2:]]


def test_batches_refuse_mixed_document_counts(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD[3], {**GOOD[3], "docs": ["A", "B"]}])
    with pytest.raises(DataError) as e:
        list(batches(JsonlDataset(path, 3), 2, 0, 0))
    msg = str(e.value)
    assert f"{path}:1" in msg and f"{path}:2" in msg and "'docs'" in msg
    assert re.search(r"2 documents, but .* has 3|3 documents, but .* has 2", msg)
    assert len(list(batches(JsonlDataset(path, 3), 1, 0, 0))) == 2  # one per batch is fine


# ---- the command line ------------------------------------------------------------------------------------

def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_cli(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path / "s"), "--train", "20", "--test", "0", "--k", "3",
                       "--candidates", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["stage3"] == 20
    assert main(["check", "--stage", "3", str(tmp_path / "s" / "stage3.jsonl")]) == 0
    assert capsys.readouterr().out == "20 records: all valid for stage 3\n"
    assert main(["check", "--stage", "2", str(tmp_path / "s" / "stage1.jsonl"), "--max-errors", "5"]) == 1
    out = capsys.readouterr().out.splitlines()  # stage-1 records read as stage 2: question is a list
    assert "stage1.jsonl:1: field 'question'" in out[0] and len(out) == 6 and "stopped after 5" in out[-1]


# ---- the shipped sample ---------------------------------------------------------------------------------

def test_shipped_sample_validates():
    sizes = {}
    for stage in (1, 2, 3):
        ds = JsonlDataset(SAMPLE / f"stage{stage}.jsonl", stage)
        assert ds.check() == [], stage
        sizes[stage] = len(ds)
    assert sizes == {1: 200, 2: 100, 3: 100}
    records = load(SAMPLE / "stage3.jsonl")
    assert all(len(r["docs"]) == 8 and r["pos_index"] for r in records)
    assert {r["data_type"] for r in load(SAMPLE / "stage1.jsonl")} == {"qa", "paraphrase"}


def test_shipped_sample_is_what_the_generator_writes(tmp_path):
    """The sample is generated, never edited: if the generator changes, regenerate it (lab/synth.py)."""
    synth.make_synthetic(tmp_path, seed=0, n_train_entities=100, n_test_entities=20, k=5, n_candidates=8)
    for stage in (1, 2, 3):
        assert (tmp_path / f"stage{stage}.jsonl").read_bytes() == (SAMPLE / f"stage{stage}.jsonl").read_bytes()


def test_shipped_held_out_split_is_what_the_generator_writes(tmp_path):
    """data/sample/test_stage{2,3}.jsonl: the 20 held-out people of the same generator call, in eval's format."""
    import eval as ev
    synth.make_synthetic(tmp_path, seed=0, n_train_entities=100, n_test_entities=20, k=5, n_candidates=8)
    for name in ("test_stage2", "test_stage3"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (SAMPLE / f"{name}.jsonl").read_bytes()
        records, errors = ev.read_eval_file(SAMPLE / f"{name}.jsonl")
        assert len(records) == 20 and errors == []
    asked = {r["question"] for r in load(SAMPLE / "stage2.jsonl")}
    assert not asked & {r["question"] for r in load(SAMPLE / "test_stage2.jsonl")}  # other people

"""lab/pretrain.py: plain language-model pretraining of a preset-shaped base (not CLaRa; the CPU lab's first
step and the maker of the shipped data/tiny): its text readers, its folder, its provenance, its errors."""
import hashlib
import json
import sys

import pytest
import torch

import train
from conftest import ROOT
from data import Tokenizer
from model import Transformer

sys.path.insert(0, str(ROOT / "lab"))
import pretrain  # noqa: E402

CORPUS = [f"Person {i} was born in Town{i % 7} in {1900 + i}." for i in range(64)]


def test_pretrains_a_base_that_stage1_takes_as_model(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(CORPUS) + "\n")
    out = tmp_path / "base"
    argv = ["--device", "cpu", "--data", str(text), "--out", str(out), "--global-batch", "8", "--micro-batch", "4",
            "--max-steps", "24", "--lr", "3e-3", "--vocab-size", "300", "--log-every", "1", "--tie-embeddings", "0"]
    rec = pretrain.main(argv)
    log = [loss for _, loss in rec["loss_curve"]]
    assert len(log) == 24 and log[-1] < 0.7 * log[0], log
    # provenance.json: the command as typed, the data by hash, the final loss, the flags
    prov = json.loads((out / "provenance.json").read_text())
    assert prov == json.loads(json.dumps(rec))
    assert prov["command"] == "python lab/pretrain.py " + " ".join(argv)
    assert prov["data"] == [{"path": str(text.resolve()), "sha256": hashlib.sha256(text.read_bytes()).hexdigest()}]
    assert prov["final_loss"] == log[-1] and prov["steps"] == 24 and prov["flags"]["vocab_size"] == 300
    assert prov["commit"] is None or len(prov["commit"].split("-")[0]) == 40
    model = Transformer.from_pretrained(out, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(out)
    assert model.cfg.vocab_size == tok.vocab_size == prov["vocab_size"] and not model.cfg.tie_embeddings
    assert not (tmp_path / "base.tmp").exists()
    # the saved base is a normal HF-layout directory that train.py accepts as --model (and keeps frozen)
    train.main(["--stage", "1", "--device", "cpu", "--model", str(out), "--out", str(tmp_path / "s1"), "--global-batch", "4",
                "--micro-batch", "2", "--doc-len", "32", "--compr-rate", "8", "--max-len", "1024", "--max-steps", "1",
                "--lr", "1e-3"])
    assert (tmp_path / "s1" / "checkpoint" / "clara.safetensors").exists()
    # a second run replaces the folder it wrote, whole; a folder it did not write is refused, untouched
    pretrain.main([*argv, "--max-steps", "2"])  # the last --max-steps counts
    assert json.loads((out / "provenance.json").read_text())["steps"] == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="holds files this script did not write"):
        pretrain.main(["--data", str(text), "--out", str(tmp_path / "mine"), "--max-steps", "1", "--global-batch", "8"])
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--out", str(tmp_path)])  # no --data
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(SystemExit, match=r"t.jsonl:2: expected \{\"text\": non-empty string\} or a stage-2"):
        pretrain.main(["--data", str(bad), "--out", str(tmp_path / "o")])
    bad.write_text('{"text": "ok"}\n\n{"question": "q?", "docs": "not a list", "answer": "a"}\n')
    with pytest.raises(SystemExit, match=r"t.jsonl:3: a stage-2 record needs"):
        pretrain.main(["--data", str(bad), "--out", str(tmp_path / "o")])
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(SystemExit, match=r"t.jsonl:2: not JSON"):
        pretrain.main(["--data", str(bad), "--out", str(tmp_path / "o")])
    for argv, message in ((["--data", str(tmp_path / "missing.txt")], "--data .*missing.txt: no such file"),
                          (["--data", str(bad), "--lr", "nan"], "--lr nan: must be a finite number > 0"),
                          (["--data", str(bad), "--global-batch", "6", "--micro-batch", "4"], "not a multiple"),
                          (["--data", str(bad), "--preset", "huge"], "--preset: invalid choice")):
        assert pretrain.cli([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("pretrain.py: error: ") and "Traceback" not in err, err
        assert __import__("re").search(message, err), err
    assert not (tmp_path / "o").exists()


def test_reads_stage2_records_as_raw_text_qa(tmp_path):
    """A stage-2 record becomes exactly the raw-text prompt eval.py's text mode builds, plus ' answer</s>'."""
    from eval import text_prompt
    f = tmp_path / "s2.jsonl"
    rec = {"question": "Where does Ana live?", "docs": ["Ana lives in Oslo.", "Bo lives in Rome."], "answer": "Oslo"}
    f.write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps(rec) + "\n")
    (tmp_path / "c.txt").write_text("line one\nline two\n")
    texts = pretrain.read_texts([tmp_path / "c.txt", f])
    assert texts == ["line one", "line two", "plain", text_prompt(rec["question"], rec["docs"]) + " Oslo</s>"]


def test_reads_stage1_records_as_raw_text_qa(tmp_path):
    """A stage-1 qa record: one raw-text QA text per (question, answer); a paraphrase record: its paraphrase."""
    from eval import text_prompt
    f = tmp_path / "s1.jsonl"
    qa = {"data_type": "qa", "question": ["Where does Ana live?", "What does Ana do?"], "answers": ["Oslo", "baker"],
          "docs": ["Ana lives in Oslo. She is a baker."]}
    para = {"data_type": "paraphrase", "question": [], "answers": ["Ana, a baker, lives in Oslo."], "docs": ["x"]}
    f.write_text(json.dumps(qa) + "\n" + json.dumps(para) + "\n")
    assert pretrain.read_texts([f]) == [text_prompt(q, qa["docs"]) + f" {a}</s>" for q, a in
                                        zip(qa["question"], qa["answers"])] + ["Ana, a baker, lives in Oslo."]
    f.write_text(json.dumps(para) + "\n" + json.dumps({**qa, "answers": ["Oslo"]}) + "\n")
    with pytest.raises(SystemExit, match=r"s1.jsonl:2"):
        pretrain.read_texts([f])


def test_preset_tokenizer_learns_the_prompt_words():
    """The fixed prompt strings are in the BPE's training text: the answer prompt gets much shorter."""
    from clara import build_prompt
    from data import train_tokenizer
    texts = [f"Person {i} was born in Town{i % 7} in {1900 + i}." for i in range(200)]
    prompt = build_prompt("answer", "<MEM0><SEP>", question="Where was Person 3 born?")[0]
    plain = len(train_tokenizer(texts, 1000, split_punctuation=True).encode(prompt))
    ours = len(pretrain.preset_tokenizer(texts, 1000, split_punctuation=True).encode(prompt))
    assert ours < 0.6 * plain, (ours, plain)


def test_tied_base_through_stage1(tmp_path):
    """--tie-embeddings 1 (the default): the base, and its CLaRa checkpoint (grown vocabulary), stay tied;
    stage 1 leaves the base's own rows as they were (frozen)."""
    from clara import Clara
    text = tmp_path / "corpus.txt"
    text.write_text("".join(line + "\n" for line in CORPUS[:32]))
    pretrain.main(["--device", "cpu", "--data", str(text), "--out", str(tmp_path / "s0"), "--global-batch", "8",
                   "--max-steps", "2", "--vocab-size", "300"])
    base = Transformer.from_pretrained(tmp_path / "s0", dtype=torch.float32)
    assert base.cfg.tie_embeddings and base.output.weight is base.tok_embeddings.weight
    train.main(["--stage", "1", "--device", "cpu", "--model", str(tmp_path / "s0"), "--out", str(tmp_path / "s1"),
                "--global-batch", "4", "--micro-batch", "2", "--doc-len", "32", "--compr-rate", "8", "--max-len", "1024",
                "--max-steps", "2", "--lr", "1e-2"])
    m = Clara.from_pretrained(tmp_path / "s1" / "checkpoint").model
    assert m.cfg.tie_embeddings and m.output.weight is m.tok_embeddings.weight
    assert torch.equal(m.tok_embeddings.weight[:base.cfg.vocab_size], base.tok_embeddings.weight)


def test_train_py_has_no_stage_0_any_more(tmp_path):
    with pytest.raises(SystemExit, match=r"--stage 0: .*python lab/pretrain.py"):
        train.main(["--stage", "0", "--data", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o")])
    for flag in ("--tie-embeddings", "--vocab-size", "--train-base"):
        with pytest.raises(SystemExit, match="unrecognized arguments"):
            train.main(["--stage", "1", "--out", str(tmp_path / "o"), flag, "1"])
    assert not (tmp_path / "o").exists()

"""train.py --stage 0: plain language-model pretraining of a preset base (the CPU lab's first step)."""
import json

import pytest
import torch

import train
from model import Transformer
from data import Tokenizer


def test_stage0_pretrains_a_base_that_stage1_takes_as_model(tmp_path):
    text = tmp_path / "corpus.txt"
    lines = [f"Person {i} was born in Town{i % 7} in {1900 + i}." for i in range(64)]
    text.write_text("\n".join(lines) + "\n")
    out = tmp_path / "s0"
    train.main(["--stage", "0", "--device", "cpu", "--data", str(text), "--out", str(out), "--global-batch", "8", "--micro-batch", "4",
                "--max-steps", "24", "--lr", "3e-3", "--vocab-size", "300", "--log-every", "1"])
    log = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl")]
    assert len(log) == 24 and log[-1] < 0.7 * log[0], log
    base = out / "base"
    model = Transformer.from_pretrained(base, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(base)
    assert model.cfg.vocab_size == tok.vocab_size
    # the saved base is a normal HF-layout directory that stage 1 accepts as --model
    train.main(["--stage", "1", "--device", "cpu", "--model", str(base), "--out", str(tmp_path / "s1"), "--global-batch", "4",
                "--micro-batch", "2", "--doc-len", "32", "--compr-rate", "8", "--max-len", "1024", "--max-steps", "1",
                "--lr", "1e-3", "--train-base", "0"])
    assert (tmp_path / "s1" / "checkpoint" / "clara.safetensors").exists()


def test_stage0_bad_input(tmp_path):
    with pytest.raises(SystemExit):
        train.main(["--stage", "0", "--out", str(tmp_path)])  # no --data
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(SystemExit, match=r"t.jsonl:2: expected \{\"text\": non-empty string\} or a stage-2"):
        train.main(["--stage", "0", "--data", str(bad), "--out", str(tmp_path / "o")])
    bad.write_text('{"text": "ok"}\n\n{"question": "q?", "docs": "not a list", "answer": "a"}\n')
    with pytest.raises(SystemExit, match=r"t.jsonl:3: a stage-2 record needs"):
        train.main(["--stage", "0", "--data", str(bad), "--out", str(tmp_path / "o")])
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(SystemExit, match=r"t.jsonl:2: not JSON"):
        train.main(["--stage", "0", "--data", str(bad), "--out", str(tmp_path / "o")])


def test_stage0_reads_stage2_records_as_raw_text_qa(tmp_path):
    """A stage-2 record becomes exactly the raw-text prompt eval.py's text mode builds, plus ' answer</s>'."""
    from eval import text_prompt
    f = tmp_path / "s2.jsonl"
    rec = {"question": "Where does Ana live?", "docs": ["Ana lives in Oslo.", "Bo lives in Rome."], "answer": "Oslo"}
    f.write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps(rec) + "\n")
    (tmp_path / "c.txt").write_text("line one\nline two\n")
    texts = train.read_texts([tmp_path / "c.txt", f])
    assert texts == ["line one", "line two", "plain", text_prompt(rec["question"], rec["docs"]) + " Oslo</s>"]


def test_stage0_reads_stage1_records_as_raw_text_qa(tmp_path):
    """A stage-1 qa record: one raw-text QA text per (question, answer); a paraphrase record: its paraphrase."""
    from eval import text_prompt
    f = tmp_path / "s1.jsonl"
    qa = {"data_type": "qa", "question": ["Where does Ana live?", "What does Ana do?"], "answers": ["Oslo", "baker"],
          "docs": ["Ana lives in Oslo. She is a baker."]}
    para = {"data_type": "paraphrase", "question": [], "answers": ["Ana, a baker, lives in Oslo."], "docs": ["x"]}
    f.write_text(json.dumps(qa) + "\n" + json.dumps(para) + "\n")
    assert train.read_texts([f]) == [text_prompt(q, qa["docs"]) + f" {a}</s>" for q, a in
                                     zip(qa["question"], qa["answers"])] + ["Ana, a baker, lives in Oslo."]
    f.write_text(json.dumps(para) + "\n" + json.dumps({**qa, "answers": ["Oslo"]}) + "\n")
    with pytest.raises(SystemExit, match=r"s1.jsonl:2"):
        train.read_texts([f])


def test_preset_tokenizer_learns_the_prompt_words():
    """The fixed prompt strings are in the preset BPE's training text: the answer prompt gets much shorter."""
    from clara import build_prompt
    from data import train_tokenizer
    texts = [f"Person {i} was born in Town{i % 7} in {1900 + i}." for i in range(200)]
    prompt = build_prompt("answer", "<MEM0><SEP>", question="Where was Person 3 born?")[0]
    plain = len(train_tokenizer(texts, 1000, split_punctuation=True).encode(prompt))
    ours = len(train.preset_tokenizer(texts, 1000, split_punctuation=True).encode(prompt))
    assert ours < 0.6 * plain, (ours, plain)


def test_tied_preset_through_stage0_and_stage1(tmp_path):
    """--tie-embeddings 1: the base, its CLaRa checkpoint (grown vocabulary, base trained) stay tied."""
    from clara import Clara
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"Person {i} was born in Town{i % 7} in {1900 + i}.\n" for i in range(32)))
    train.main(["--stage", "0", "--device", "cpu", "--data", str(text), "--out", str(tmp_path / "s0"), "--global-batch", "8",
                "--max-steps", "2", "--vocab-size", "300", "--tie-embeddings", "1"])
    base = Transformer.from_pretrained(tmp_path / "s0" / "base", dtype=torch.float32)
    assert base.cfg.tie_embeddings and base.output.weight is base.tok_embeddings.weight
    train.main(["--stage", "1", "--device", "cpu", "--model", str(tmp_path / "s0" / "base"), "--out", str(tmp_path / "s1"),
                "--global-batch", "4", "--micro-batch", "2", "--doc-len", "32", "--compr-rate", "8", "--max-len", "1024",
                "--max-steps", "2", "--lr", "1e-2", "--train-base", "1"])
    clara = Clara.from_pretrained(tmp_path / "s1" / "checkpoint")
    m = clara.model
    assert m.cfg.tie_embeddings and m.output.weight is m.tok_embeddings.weight
    assert not torch.equal(m.tok_embeddings.weight[:base.cfg.vocab_size], base.tok_embeddings.weight)  # trained


def test_tie_embeddings_only_for_a_new_preset(tmp_path):
    with pytest.raises(SystemExit):
        train.main(["--stage", "1", "--model", str(tmp_path), "--tie-embeddings", "1"])

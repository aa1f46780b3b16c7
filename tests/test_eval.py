"""eval.py end to end on tiny checkpoints trained for two steps (tests/test_train.py's fast flags), on CPU.

One full run (every mode, two data files) is shared by most tests; what it writes is checked against
counts and scores recomputed here by hand: the documents each mode read, the prompt lengths from the
tokenizer, recall@k from the retrieved indices, the summary as the mean of the per-item metrics.
"""
import json
from pathlib import Path

import pytest
import torch

import eval as ev
import train
from clara import Clara, build_prompt
from data import Tokenizer
from model import generate

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--global-batch", "4", "--micro-batch", "2", "--doc-len", "32", "--compr-rate", "8", "--max-len", "400",
        "--lora-dropout", "0", "--max-steps", "2", "--log-every", "1",
        "--device", "cpu"]  # explicit: on a GPU machine the default would be CUDA + bf16
K, M = 2, 4  # the tiny preset's generation_top_k; doc_len 32 / rate 8 memory tokens per document


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A stage-2 checkpoint (no query adapter) and a stage-3 one (query adapter), both from the preset."""
    out = {}
    for stage in (2, 3):
        d = tmp_path_factory.mktemp(f"s{stage}")
        train.main(["--stage", str(stage), "--out", str(d), *FAST])
        out[stage] = d / "checkpoint"
    return out


def sample(n, start=0):
    return [json.loads(x) for x in open(ROOT / "data/sample/stage3.jsonl").readlines()[start:start + n]]


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def run(tmp, ckpt, data, *extra):
    args = ["--checkpoint", str(ckpt), "--data", *map(str, data), "--out", str(tmp / "out"), "--no-progress",
            "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu", *extra]
    return ev.main(args)


def items(tmp, name, mode):
    return [json.loads(x) for x in open(tmp / "out" / f"{name}.{mode}.jsonl")]


@pytest.fixture(scope="module")
def full(ckpts, tmp_path_factory):
    """Every mode on two files: `nq` (6 records in the stage-3 format) and `hotpot` (official-style fields:
    `context`, `golden_answers` lists, one record without pos_index)."""
    tmp = tmp_path_factory.mktemp("full")
    nq = write(tmp / "nq.jsonl", sample(6))
    hot = []
    for i, r in enumerate(sample(3, start=10)):
        rec = {"question": r["question"], "context": r["docs"], "golden_answers": ["nothing", r["answer"]]}
        if i != 1:
            rec["pos_index"] = r["pos_index"]
        hot.append(rec)
    hot = write(tmp / "hotpot.jsonl", hot)
    summary = run(tmp, ckpts[3], [nq, hot], "--names", "nq", "hotpot", "--mode", *ev.MODES)
    return tmp, summary


def test_every_mode_writes_its_files_summary_and_tables(full):
    tmp, s = full
    for name in ("nq", "hotpot"):
        for mode in ev.MODES:
            rows = items(tmp, name, mode)
            assert len(rows) == (6 if name == "nq" else 3)
            assert all(set(r) >= {"where", "question", "golds", "prediction", "acc", "em", "f1", "context_tokens"}
                       for r in rows)
    assert json.loads((tmp / "out" / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert s["top_k"] == K and s["n_mem"] == M and s["scoring"] == "best over gold aliases"
    assert s["max_new_tokens"] == {m: 4 for m in ev.MODES}
    md = (tmp / "out" / "results.md").read_text()
    assert "| model / setting | nq | hotpot | Average |" in md
    for mode in ev.MODES:
        assert s["settings"][mode] in md
    assert "recall@5" in md and "Cost per query" in md
    # all gold aliases are kept; the official-style fields were read
    assert items(tmp, "hotpot", "text")[0]["golds"][0] == "nothing"
    # the average column is the mean over the data sets
    acc = [s["results"][d]["compressed"]["acc"] for d in ("nq", "hotpot")]
    assert f"| {s['settings']['compressed']} | {acc[0]:.2f} | {acc[1]:.2f} | {sum(acc) / 2:.2f} |" in md


def test_cost_is_reported_per_mode(full):
    _, s = full
    c = s["cost"]["nq"]
    assert c["compressed"]["compress_ms"] > 0 and c["retrieval"]["compress_ms"] > 0
    assert c["retrieval"]["retrieve_ms"] > 0 and c["compressed"]["retrieve_ms"] == 0
    assert c["text"]["compress_ms"] == 0 and c["closed_book"]["raw_text_tokens"] is None
    for mode in ev.MODES:
        assert 0 < c[mode]["prefill_ms"] <= c[mode]["generate_ms"] + 1e-9
        assert c[mode]["decode_ms"] <= c[mode]["generate_ms"] + 1e-9
    # k documents of ~30 tokens each read as k * (M + 1) slots: the compressed context is shorter
    assert c["compressed"]["context_tokens"] < c["compressed"]["raw_text_tokens"] == c["text"]["context_tokens"]


def test_text_and_compressed_read_the_same_first_k_documents(full):
    tmp, _ = full
    for name in ("nq", "hotpot"):
        comp, text = items(tmp, name, "compressed"), items(tmp, name, "text")
        assert [r["where"] for r in comp] == [r["where"] for r in text]
        for c, t in zip(comp, text):
            assert c["doc_indices"] == t["doc_indices"] == list(range(K))
            # the raw-text count of the compressed mode is the prompt the text mode actually read
            assert c["raw_text_tokens"] == t["context_tokens"]


def test_token_counts_match_an_independent_count(full, ckpts):
    tmp, _ = full
    tok = Tokenizer.from_pretrained(ckpts[3])
    rec = sample(1)[0]
    slots = ("".join(f"<MEM{i}>" for i in range(M)) + "<SEP>") * K
    mem_ids = tok.encode(build_prompt("answer", slots, question=rec["question"])[0])
    text_ids = tok.encode(build_prompt("answer", "\n".join(rec["docs"][:K]), question=rec["question"])[0])
    comp, text = items(tmp, "nq", "compressed")[0], items(tmp, "nq", "text")[0]
    assert comp["context_tokens"] == len(mem_ids) and comp["raw_text_tokens"] == len(text_ids)
    assert text["context_tokens"] == len(text_ids)
    mem0 = tok.token_id("<MEM0>")
    assert sum(mem0 <= i < mem0 + M for i in mem_ids) == K * M  # every slot is one token
    closed = items(tmp, "nq", "closed_book")[0]
    assert closed["context_tokens"] == len(tok.encode(build_prompt("closed_book", "", question=rec["question"])[0]))
    retr = items(tmp, "nq", "retrieval")[0]
    chosen = [rec["docs"][i] for i in retr["doc_indices"]]
    chosen_prompt = build_prompt("answer", "\n".join(chosen), question=rec["question"])[0]
    assert retr["raw_text_tokens"] == len(tok.encode(chosen_prompt))
    assert retr["context_tokens"] == len(mem_ids)


def test_retrieval_metrics_by_hand_and_the_real_path(full, ckpts):
    tmp, s = full
    for name in ("nq", "hotpot"):
        rows = items(tmp, name, "retrieval")
        with_pos = [r for r in rows if r["pos_index"]]
        assert len(with_pos) == (6 if name == "nq" else 2)  # the record without pos_index is left out
        for k in (1, 2, 3, 5):
            recall = [len(set(r["retrieved"][:k]) & set(r["pos_index"])) / len(r["pos_index"]) for r in with_pos]
            precision = [len(set(r["retrieved"][:k]) & set(r["pos_index"])) / k for r in with_pos]
            res = s["results"][name]["retrieval"]
            assert res[f"recall@{k}"] == pytest.approx(100 * sum(recall) / len(recall))
            assert res[f"precision@{k}"] == pytest.approx(100 * sum(precision) / len(precision))
            assert res[f"n_retrieval@{k}"] == len(with_pos)
        assert all(r["doc_indices"] == r["retrieved"][:K] and len(set(r["retrieved"])) == 5 for r in rows)
    # eval.py times the pieces one by one; Clara.generate_from_questions must pick the same documents
    clara = Clara.from_pretrained(ckpts[3], dtype=torch.float32)
    recs, rows = sample(6), items(tmp, "nq", "retrieval")
    for b in (slice(0, 4), slice(4, 6)):
        answers, idx = clara.generate_from_questions([r["question"] for r in recs[b]], [r["docs"] for r in recs[b]],
                                                     max_new_tokens=4)
        assert idx.tolist() == [r["doc_indices"] for r in rows[b]]
        assert answers == [r["prediction"] for r in rows[b]]


def test_first_gold_only_and_aggregation(ckpts, tmp_path, monkeypatch, capsys):
    """Generation stubbed to always answer "Paris": record 1's first gold is wrong, its second right."""
    recs = sample(3)
    for r, golds in zip(recs, (["London", "Paris"], ["Paris"], ["the city of Paris"])):
        r.pop("answer")
        r["golden_answers"] = golds
    f = write(tmp_path / "crafted.jsonl", recs)
    monkeypatch.setattr(Clara, "_generate",
                        lambda self, prompts, memory, max_new, adapter="decoder": ["Paris"] * len(prompts))
    best = run(tmp_path, ckpts[2], [f], "--mode", "compressed", "text", "closed_book")
    assert [r["acc"] for r in items(tmp_path, "crafted", "compressed")] == [1.0, 1.0, 0.0]
    assert "best over gold aliases" in capsys.readouterr().out
    first = run(tmp_path, ckpts[2], [f], "--mode", "compressed", "--first-gold-only")
    assert first["scoring"] == "first gold answer only (official)"
    assert "first gold answer only" in capsys.readouterr().out
    rows = items(tmp_path, "crafted", "compressed")
    assert [r["acc"] for r in rows] == [0.0, 1.0, 0.0] and [r["em"] for r in rows] == [0.0, 1.0, 0.0]
    assert rows[2]["f1"] == pytest.approx(0.5)  # "paris" vs "city of paris": P 1, R 1/3
    for summary, mode in ((best, "text"), (best, "closed_book"), (first, "compressed")):
        got = items(tmp_path, "crafted", mode)
        for metric in ("acc", "em", "f1"):
            assert summary["results"]["crafted"][mode][metric] == pytest.approx(100 * sum(r[metric] for r in got) / 3)
    assert best["results"]["crafted"]["compressed"]["acc"] == pytest.approx(200 / 3)
    assert first["results"]["crafted"]["compressed"]["acc"] == pytest.approx(100 / 3)


def test_generation_timing_splits_prefill_and_decode(ckpts):
    clara = Clara.from_pretrained(ckpts[2], dtype=torch.float32)
    ids = torch.randint(3, 100, (2, 7))
    # eos_id=-1 never comes: exactly 5 tokens, i.e. 1 prefill + 4 decode forward calls
    out, t = ev.timed_generation(clara, ev.make_clock(torch.device("cpu")),
                                 lambda: generate(clara.model, input_ids=ids, max_new_tokens=5, eos_id=-1))
    assert [len(r) for r in out] == [5, 5] and t["steps"] == 4
    assert 0 < t["prefill"] <= t["ttft"] <= t["generate"] and t["ttft"] + t["decode"] == pytest.approx(t["generate"])


@pytest.mark.parametrize("bad, message", [
    ({"docs": ["a doc"], "answer": "x"}, r"bad\.jsonl:3: missing field 'question'"),
    ({"question": "q?", "answer": "x"}, r"bad\.jsonl:3: missing field 'docs'"),
    ({"question": "q?", "docs": [], "answer": "x"}, r"bad\.jsonl:3: empty candidate list"),
    ({"question": "q?", "docs": ["a", "b"], "answer": "x", "pos_index": [2]},
     r"bad\.jsonl:3: field 'pos_index\[0\]': index 2 is out of range"),  # data.positives, as in training
    ({"question": "q?", "docs": ["a", "b"]}, r"bad\.jsonl:3: missing gold answer field"),
    ("{not json", r"bad\.jsonl:3: not valid JSON"),
])
def test_malformed_records_name_file_and_line(ckpts, tmp_path, bad, message):
    f = write(tmp_path / "bad.jsonl", sample(2) + [bad] + sample(1, start=5))
    with pytest.raises(SystemExit, match=message + r".*--skip-malformed"):
        run(tmp_path, ckpts[3], [f])


def test_skipped_records_are_reported(ckpts, tmp_path, capsys):
    good = sample(3)
    recs = [good[0],
            {"question": "q?", "docs": []},                                  # line 2: malformed
            {**good[1], "answer": " "},                                      # line 3: no gold answer
            {**good[2], "docs": good[2]["docs"][:1], "pos_index": [0]},      # line 4: fewer than k documents
            sample(1, start=6)[0]]
    f = write(tmp_path / "mixed.jsonl", recs)
    s = run(tmp_path, ckpts[3], [f], "--skip-malformed", "--mode", "compressed", "closed_book")
    comp = s["skipped"]["mixed"]["compressed"]
    assert {r: v["count"] for r, v in comp.items()} == {"empty candidate list": 1, "no gold answer": 1,
                                                       f"fewer than k={K} documents": 1}
    assert comp["no gold answer"]["examples"][0].startswith(f"{f}:3: no gold answer")
    assert comp[f"fewer than k={K} documents"]["examples"][0].startswith(f"{f}:4:")
    assert set(s["skipped"]["mixed"]["closed_book"]) == {"empty candidate list", "no gold answer"}
    assert s["results"]["mixed"]["compressed"]["n"] == 2 and s["results"]["mixed"]["closed_book"]["n"] == 3
    assert f"{f}:2: empty candidate list" in capsys.readouterr().out
    # nothing left to score is an error, not an empty table
    short = write(tmp_path / "short.jsonl", [{**r, "docs": r["docs"][:1], "pos_index": [0]} for r in good])
    with pytest.raises(SystemExit, match=rf"no record can be scored.*fewer than k={K} documents: 3"):
        run(tmp_path, ckpts[3], [short], "--mode", "compressed")


def test_checkpoint_and_mode_mismatches_are_clear_errors(ckpts, tmp_path):
    f = write(tmp_path / "d.jsonl", sample(2))
    with pytest.raises(SystemExit, match=r"--mode retrieval needs .* query-reasoner adapter.*stage-2"):
        run(tmp_path, ckpts[2], [f], "--mode", "retrieval")
    with pytest.raises(SystemExit, match="compr_rate=8, but compr_rate=4"):
        run(tmp_path, ckpts[2], [f], "--compr-rate", "4")
    with pytest.raises(SystemExit, match="no tokenizer.json|does not exist|neither"):
        run(tmp_path, tmp_path, [f])
    # --limit reads the first N records; the default mode follows the checkpoint's stage
    s = run(tmp_path, ckpts[3], [f], "--limit", "1")
    assert s["modes"] == ["retrieval"] and s["results"]["d"]["retrieval"]["n"] == 1


def test_query_from_encoder_is_the_untrained_query_reasoner(ckpts, tmp_path):
    """--query-from-encoder on a stage-2 checkpoint ranks with a copy of the encoder, as stage 3 starts."""
    recs = sample(4)
    f = write(tmp_path / "d.jsonl", recs)
    s = run(tmp_path, ckpts[2], [f], "--mode", "retrieval", "--query-from-encoder")
    assert "untrained query reasoner" in s["settings"]["retrieval"]
    clara = Clara.from_pretrained(ckpts[2], dtype=torch.float32)
    clara.model.copy_adapter("encoder", "query")
    answers, idx = clara.generate_from_questions([r["question"] for r in recs], [r["docs"] for r in recs],
                                                 max_new_tokens=4)
    rows = items(tmp_path, "d", "retrieval")
    assert idx.tolist() == [r["doc_indices"] for r in rows] and answers == [r["prediction"] for r in rows]
    with pytest.raises(SystemExit, match="already has a trained query reasoner"):
        run(tmp_path, ckpts[3], [f], "--mode", "retrieval", "--query-from-encoder")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--data", "--mode", "--names", "--limit", "--top-k", "--text-adapter",
                 "--first-gold-only", "--max-new-tokens", "--batch-size", "--device", "--out", "--compr-rate",
                 "--query-from-encoder"):
        assert flag in text

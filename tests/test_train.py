"""train.py end to end on the shipped tiny base (data/tiny, frozen) and the shipped sample data, on CPU.

Each run is a few optimizer steps of global batch 4, so the whole file stays around a minute or two.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from clara import Clara

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--global-batch", "4", "--micro-batch", "2", "--doc-len", "32", "--compr-rate", "8", "--max-len", "160",
        "--lora-dropout", "0", "--log-every", "1",
        "--device", "cpu"]  # explicit: on a GPU machine the default would be CUDA + bf16


def run(tmp, stage, *extra):
    train.main(["--stage", str(stage), "--out", str(tmp), *FAST, *extra])
    return [json.loads(line) for line in open(tmp / "metrics.jsonl")]


def losses(log):
    return [r["loss"] for r in log]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    log = run(out, 1, "--max-steps", "30", "--lr", "5e-3")
    return out, log


def test_stage1_loss_falls_and_checkpoint_loads(stage1):
    out, log = stage1
    assert len(log) == 30 and all(r["lr"] > 0 for r in log)
    assert sum(losses(log)[-3:]) / 3 < 0.8 * sum(losses(log)[:3]) / 3, losses(log)
    c = Clara.from_pretrained(out / "checkpoint")
    assert c.cfg.compr_rate == 8 and c.cfg.n_mem == 4
    meta = json.loads((out / "checkpoint" / "clara_config.json").read_text())
    assert meta["step"] == 30 and meta["stage"] == 1


def one_batch(tmp, stage, n=4):
    """The first n records of the sample: every step sees the same batch, so the loss must fall."""
    f = tmp / f"stage{stage}_head.jsonl"
    f.write_text("".join(open(ROOT / f"data/sample/stage{stage}.jsonl").readlines()[:n]))
    return str(f)


def test_stage2_from_stage1_and_stage3_from_stage2(stage1, tmp_path):
    s1, _ = stage1
    s2 = tmp_path / "s2"
    log2 = run(s2, 2, "--init", str(s1 / "checkpoint"), "--max-steps", "10", "--top-k", "5", "--lr", "3e-3",
               "--max-len", "400", "--data", one_batch(tmp_path, 2))
    assert losses(log2)[-1] < 0.9 * losses(log2)[0], losses(log2)
    c2 = Clara.from_pretrained(s2 / "checkpoint")
    c1 = Clara.from_pretrained(s1 / "checkpoint")
    # stage 2 continued stage 1's encoder and started a FRESH decoder (B = 0 before training)
    enc1, enc2 = c1.model.adapter_parameters("encoder"), c2.model.adapter_parameters("encoder")
    assert any(not torch.equal(enc1[k], enc2[k]) for k in enc1)
    # stage 2 from a stage-2 checkpoint continues ITS decoder (e.g. k=1, then k=2 documents), while from a
    # stage-1 checkpoint the decoder starts fresh (every lora_B zero); lr 1e-30 (an lr must be > 0) moves a
    # weight by about 1e-30, so only the loading shows
    for init, out in ((s2, "s2b"), (s1, "s2c")):
        run(tmp_path / out, 2, "--init", str(init / "checkpoint"), "--max-steps", "1", "--top-k", "5", "--lr", "1e-30",
            "--max-len", "400", "--data", one_batch(tmp_path, 2))
    same = lambda x, y: torch.allclose(x, y, rtol=0, atol=1e-20)
    dec2 = c2.model.adapter_parameters("decoder")
    dec2b = Clara.from_pretrained(tmp_path / "s2b" / "checkpoint").model.adapter_parameters("decoder")
    assert all(same(dec2[k], dec2b[k]) for k in dec2)
    dec2c = Clara.from_pretrained(tmp_path / "s2c" / "checkpoint").model.adapter_parameters("decoder")
    assert all(v.abs().max() < 1e-20 for k, v in dec2c.items() if ".lora_B." in k)
    assert any(v.abs().sum() > 0 for k, v in dec2b.items() if ".lora_B." in k)
    s3 = tmp_path / "s3"
    log3 = run(s3, 3, "--init", str(s2 / "checkpoint"), "--max-steps", "20", "--top-k", "2", "--lr", "3e-3",
               "--max-len", "400", "--data", one_batch(tmp_path, 3))
    assert "recall@2" in log3[0] and 0 <= log3[0]["recall@2"] <= 1
    assert losses(log3)[-1] < 0.9 * losses(log3)[0], losses(log3)
    c3 = Clara.from_pretrained(s3 / "checkpoint")
    assert "query" in c3.model.adapters
    # the encoder is frozen in stage 3: identical to stage 2's
    enc3 = c3.model.adapter_parameters("encoder")
    assert all(torch.equal(enc2[k], enc3[k]) for k in enc2)
    # stage 3 from a stage-3 checkpoint continues ITS query reasoner (not a fresh copy of the encoder)
    run(tmp_path / "s3b", 3, "--init", str(s3 / "checkpoint"), "--max-steps", "1", "--top-k", "2", "--lr", "1e-30",
        "--max-len", "400", "--data", one_batch(tmp_path, 3))
    q3 = c3.model.adapter_parameters("query")
    q3b = Clara.from_pretrained(tmp_path / "s3b" / "checkpoint").model.adapter_parameters("query")
    assert all(same(q3[k], q3b[k]) for k in q3)
    assert any(not torch.equal(q3[k], enc3[k.replace(".query", ".encoder")]) for k in q3)


def test_stage2_fresh_decoder_is_drawn_from_the_seed(stage1, tmp_path):
    """The decoder adapter that stage 2 starts afresh is a function of --seed (torch seeds its own
    generator at random in every process): two runs from the same checkpoint end alike."""
    s1, _ = stage1
    args = ["--init", str(s1 / "checkpoint"), "--max-steps", "1", "--top-k", "5",
            "--max-len", "400", "--data", one_batch(tmp_path, 2)]
    run(tmp_path / "a", 2, *args)
    run(tmp_path / "b", 2, *args)
    a = Clara.from_pretrained(tmp_path / "a" / "checkpoint").model.adapter_parameters("decoder")
    b = Clara.from_pretrained(tmp_path / "b" / "checkpoint").model.adapter_parameters("decoder")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_retrieval_warmup_trains_the_query_reasoner_alone(stage1, tmp_path):
    s1, _ = stage1
    s2 = tmp_path / "s2"
    run(s2, 2, "--init", str(s1 / "checkpoint"), "--max-steps", "1", "--top-k", "5", "--max-len", "400",
        "--data", one_batch(tmp_path, 2))
    # 4 questions, each with the same 4 unrelated documents in another order: one batch, seen every step
    docs = ["Paris is the capital of France.", "The quick brown fox jumps over the lazy dog.",
            "Alice wrote the book in 1999.", "Documents are compressed into memory tokens."]
    qs = ["Which city is the capital of France?", "What does the quick brown fox jump over?",
          "When did Alice write the book?", "What are documents compressed into?"]
    easy = tmp_path / "easy.jsonl"
    easy.write_text("".join(json.dumps({"question": q, "docs": docs[i:] + docs[:i], "answer": "x", "pos_index": [0]})
                            + "\n" for i, q in enumerate(qs)))
    w = tmp_path / "warm"
    log = run(w, 3, "--init", str(s2 / "checkpoint"), "--retrieval-warmup", "--max-steps", "40", "--top-k", "1",
              "--lr", "3e-3", "--tau", "0.02", "--data", str(easy))
    assert "infonce" in log[0] and "ce" not in log[0]
    # measured: 1.38 -> 0.97 by step 20 (log 4 = 1.39 is a uniform choice); recall@1 of the 4 rows, 0.25 at
    # the start, reached 1.0 at step 20 in one run and 0.75 in another (a clean clone): so the recall of the
    # last 10 steps is compared with the first 10's, not one step's
    assert log[-1]["infonce"] < 0.85 * log[0]["infonce"], [r["infonce"] for r in log]
    recall = [r["recall@1"] for r in log]
    assert sum(recall[-10:]) / 10 >= 0.7 and sum(recall[-10:]) > sum(recall[:10]), recall  # 0.45 -> 0.7 by step 20 there
    c2, cw = Clara.from_pretrained(s2 / "checkpoint"), Clara.from_pretrained(w / "checkpoint")
    for name in ("encoder", "decoder"):  # untouched
        a, b = c2.model.adapter_parameters(name), cw.model.adapter_parameters(name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    q, e = cw.model.adapter_parameters("query"), c2.model.adapter_parameters("encoder")
    assert any(not torch.equal(q[k], e[k.replace(".query", ".encoder")]) for k in q)  # it moved off the copy
    # supervised: a record without pos_index is an error naming it; and stage 3 only
    bad = tmp_path / "nopos.jsonl"
    rows = [json.loads(x) for x in open(one_batch(tmp_path, 3))]
    rows[2].pop("pos_index")
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"nopos.jsonl:3.*pos_index"):
        run(tmp_path / "bad", 3, "--init", str(s2 / "checkpoint"), "--retrieval-warmup", "--max-steps", "1",
            "--top-k", "1", "--data", str(bad))
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "2", "--retrieval-warmup"])


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    args = ["--max-steps", "6", "--lr", "3e-3", "--lora-dropout", "0.1", "--save-every", "2"]
    full = run(tmp_path / "a", 1, *args)
    run(tmp_path / "b", 1, *args, "--stop-after", "3")  # "killed" after step 3 (saved at 3)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a step the killed run logged after its last save
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n")
    resumed = run(tmp_path / "b", 1, *args, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # one curve: the stale step 4 is gone
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6)
    a = Clara.from_pretrained(tmp_path / "a" / "checkpoint").state_to_save()
    b = Clara.from_pretrained(tmp_path / "b" / "checkpoint").state_to_save()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_a_fresh_run_starts_its_metrics_afresh(tmp_path):
    run(tmp_path, 1, "--max-steps", "3")
    assert [r["step"] for r in run(tmp_path, 1, "--max-steps", "2")] == [1, 2]  # not 1, 2, 3, 1, 2


def test_bad_data_never_touches_the_last_checkpoint(stage1, tmp_path):
    s1, _ = stage1
    out = tmp_path / "bad"
    run(out, 1, "--max-steps", "1")
    before = (out / "checkpoint" / "clara.safetensors").read_bytes()
    bad = tmp_path / "bad.jsonl"
    good = open(ROOT / "data/sample/stage1.jsonl").readlines()[:10]
    bad.write_text("".join(good) + '{"data_type": "qa", "question": "a string", "answers": ["x"], "docs": ["d"]}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:11.*question"):
        run(out, 1, "--max-steps", "1", "--data", str(bad))
    assert (out / "checkpoint" / "clara.safetensors").read_bytes() == before
    with pytest.raises(SystemExit, match="global-batch 5 is not a multiple"):
        run(out, 1, "--global-batch", "5")
    with pytest.raises(SystemExit, match="--compr-rate 4: .* was trained with --compr-rate 8"):
        run(tmp_path / "x", 2, "--init", str(s1 / "checkpoint"), "--compr-rate", "4", "--max-steps", "1")


def test_non_finite_loss_stops_cleanly(tmp_path):
    with pytest.raises(SystemExit, match="non-finite (loss|gradients)|overflowed"):
        run(tmp_path, 1, "--max-steps", "3", "--lr", "1e30", "--grad-clip", "1e30")
    assert not (tmp_path / "checkpoint").exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--stage", "--model", "--data", "--out", "--init", "--resume", "--max-steps", "--device", "--lr",
                 "--global-batch", "--micro-batch", "--compr-rate", "--top-k", "--tau", "--candidates", "--epochs"):
        assert flag in text


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with the gloo backend")
def test_torchrun_two_ranks_equals_one_process(tmp_path):
    """FSDP2 on 2 gloo ranks gives the losses of one process (same global batch, fp32). On CPU (FAST's
    --device cpu) wherever it runs, so it needs no second GPU."""
    args = ["--stage", "1", *FAST, "--max-steps", "3", "--lr", "3e-3", "--dtype", "float32"]
    one = tmp_path / "one"
    train.main([*args, "--out", str(one)])
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *args, "--out", str(two)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # several ranks: torch.distributed.checkpoint's sharded state, every file pinned by the manifest
    manifest = json.loads((two / "resume" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["position"]["step"] == 3
    assert set(manifest["sha256"]) == {str(f.relative_to(two / "resume")) for f in (two / "resume").rglob("*")
                                       if f.is_file() and f.name != "manifest.json"}
    assert ".metadata" in manifest["sha256"]
    l1 = [json.loads(x)["loss"] for x in open(one / "metrics.jsonl")]
    l2 = [json.loads(x)["loss"] for x in open(two / "metrics.jsonl")]
    assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-4)
    a = Clara.from_pretrained(one / "checkpoint").state_to_save()
    b = Clara.from_pretrained(two / "checkpoint").state_to_save()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)

"""bench/lab_retrieval.py, the stage-3 diagnosis, on a tiny preset model trained for a few steps.

What is checked here is that each number means what it says: the per-row answer loss behind the oracle adds
up to the decoder loss stage 3 trains on, the figures are fractions, word overlap finds the person, a
name-only document is its person's name. test_lab.py runs the probe on the fast lab's own model.
"""
import sys

import pytest
import torch

import train
from clara import Clara
from conftest import ROOT
from data import make_synthetic

sys.path.insert(0, str(ROOT / "bench"))
import lab_retrieval  # noqa: E402

FAST = ["--global-batch", "8", "--micro-batch", "8", "--doc-len", "64", "--compr-rate", "16", "--max-len", "256",
        "--lora-dropout", "0", "--log-every", "1", "--max-steps", "2", "--vocab-size", "400"]


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieval")
    make_synthetic(tmp / "data", seed=0, n_train_entities=60, n_test_entities=20, k=1, n_candidates=8,
                   questions_per_entity=2, asked=["job", "home", "place"])
    train.main(["--stage", "1", "--data", str(tmp / "data" / "stage1.jsonl"), "--out", str(tmp / "s1"), *FAST])
    train.main(["--stage", "2", "--init", str(tmp / "s1" / "checkpoint"), "--data", str(tmp / "data" / "stage2.jsonl"),
                "--out", str(tmp / "s2"), "--top-k", "1", *FAST])
    return tmp


def test_per_row_loss_adds_up_to_the_decoder_loss(stage2):
    clara = Clara.from_pretrained(stage2 / "s2" / "checkpoint", training_stage=3)
    clara.cfg.generation_top_k = 1
    clara.eval()
    recs = lab_retrieval.load(stage2 / "data" / "stage3.jsonl", "full", 6)
    batch = clara.collate(recs, 3)
    with torch.no_grad():
        _, D = clara.score_candidates(batch, 8)  # (B, N, M*H)
        mem = D[:, 3].view(6, 1, clara.cfg.n_mem, -1)  # candidate 3 alone in the slot
        per_row = lab_retrieval.per_row_ce(clara, batch["dec"], mem)
        ce_sum, _ = clara.decoder_loss(batch["dec"], mem)
    n_row = (batch["dec"]["labels"][:, 1:] != -100).sum(1)
    torch.testing.assert_close((per_row * n_row).sum(), ce_sum, rtol=1e-5, atol=1e-4)


def test_name_only_documents_are_their_persons(stage2):
    recs = lab_retrieval.load(stage2 / "data" / "stage3.jsonl", "name", None)
    full = lab_retrieval.load(stage2 / "data" / "stage3.jsonl", "full", None)
    for r, f in zip(recs, full):
        assert all(r["docs"][i] in r["question"] for i in r["pos_index"]), (r, f)  # the positive: the asked person
        assert all(d in doc and len(d.split()) == 2 for d, doc in zip(r["docs"], f["docs"]))


def test_the_probe_reports_fractions(stage2):
    args = ["--checkpoint", str(stage2 / "s2" / "checkpoint"), "--data", str(stage2 / "data"), "--steps", "2",
            "--batch", "8", "--heldout", "16"]
    res = lab_retrieval.main(args)
    assert 0 < res["chance"] < 0.5 and res["signal"]["chance"] > 0
    for x in (res["lexical"], res["signal"]["oracle"], res["signal"]["gradient"], *res["before"].values(),
              *res["after"].values()):
        assert 0 <= x <= 1
    assert res["lexical"] > res["chance"] + 0.2, res  # the shared name tokens tell the candidates apart
    assert len(res["loss"]) == 2
    named = lab_retrieval.main(args + ["--docs", "name", "--train-encoder"])
    assert "signal" not in named  # a name alone cannot answer: no oracle on name-only documents

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
        "--lora-dropout", "0", "--log-every", "1", "--max-steps", "2", "--vocab-size", "400",
        "--device", "cpu"]  # explicit: on a GPU machine the default would be CUDA + bf16


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


def test_linear_probe_reads_a_linear_label_and_not_noise():
    """Held-out accuracy ~1 when the class is a linear function of the features, ~chance when it is not."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 8, (600,), generator=g)
    centres = torch.randn(8, 32, generator=g) * 3
    x = centres[y] + torch.randn(600, 32, generator=g)  # (600, 32): the class is linearly separable
    _, held = lab_retrieval.linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert held > 0.95, held
    noise = torch.randn(600, 32, generator=g)  # independent of y
    _, held = lab_retrieval.linear_probe(noise[:400], y[:400], noise[400:], y[400:])
    assert held < 0.3, held  # chance 1/8


def test_memory_report_on_word_names(tmp_path):
    """The collapse measure is the mean cosine between different documents' memories (1.0 if every memory is
    the same vector, 0 for orthogonal ones), and the name probes score held-out people made of training words."""
    make_synthetic(tmp_path / "data", seed=1, n_train_entities=60, n_test_entities=20, k=1, n_candidates=8,
                   names="words")
    train.main(["--stage", "1", "--data", str(tmp_path / "data" / "stage1.jsonl"), "--out", str(tmp_path / "s1"),
                *FAST])
    clara = Clara.from_pretrained(tmp_path / "s1" / "checkpoint")
    tr = lab_retrieval.load(tmp_path / "data" / "stage3.jsonl", "full", None)
    te = lab_retrieval.load(tmp_path / "data" / "test_stage3.jsonl", "full", None)
    m = lab_retrieval.memory_report(clara, tr, te)
    assert -1 <= m["cosine"] < 1
    for k in ("first", "surname", "job", "home"):  # the names, and two facts read from the documents' text
        assert 0 <= m[k]["heldout"] <= 1 and 0 < m[k]["chance"] <= 1, (k, m[k])
    assert lab_retrieval.JOB.search("By profession, he is an astronomer.").group(1) == "astronomer"
    assert [lab_retrieval.HOME.search(d).group(1) for d in ("He now lives in Ulford.", "She lives in Kelport.",
                                                            "These days she makes a home in Belford.")] == \
        ["Ulford", "Kelport", "Belford"]
    x = torch.randn(3, 16)
    assert lab_retrieval.mean_pairwise_cosine(x[:1].expand(5, -1)) == pytest.approx(1.0, abs=1e-5)  # collapsed
    assert lab_retrieval.mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0, abs=1e-6)
    pair = torch.nn.functional.cosine_similarity(x[0], x[1], dim=0).item()
    assert lab_retrieval.mean_pairwise_cosine(x[:2]) == pytest.approx(pair, abs=1e-6)


def test_supervised_names_trains_the_encoder_alone(tmp_path):
    """5. (--supervise-names): the encoder adapter and a linear head learn to write the person's name into the
    memory; nothing else of the model moves, and the held-out accuracies are fractions over people made of
    training words. Here, from a 2-step stage-1 model, held-out names become readable: 0.31 / 0.20 first name /
    surname at step 100 (chance 0.02) measured; the lab's own figures are in BENCHMARKS.md, session 6."""
    make_synthetic(tmp_path / "data", seed=1, n_train_entities=300, n_test_entities=60, k=1, n_candidates=8,
                   names="words")
    train.main(["--stage", "1", "--data", str(tmp_path / "data" / "stage1.jsonl"), "--out", str(tmp_path / "s1"),
                *FAST])
    clara = Clara.from_pretrained(tmp_path / "s1" / "checkpoint")
    before = {k: v.clone() for k, v in clara.state_dict().items()}
    tr = lab_retrieval.load(tmp_path / "data" / "stage3.jsonl", "full", None)
    te = lab_retrieval.load(tmp_path / "data" / "test_stage3.jsonl", "full", None)
    curve = lab_retrieval.supervise_names(clara, tr, te, steps=100, lr=3e-3)
    assert [c["step"] for c in curve] == [0, 50, 100]
    assert all(0 <= c[k] <= 1 for c in curve for k in ("first", "surname"))
    moved = {k for k, v in clara.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all("lora_" in k and k.endswith(".encoder") for k in moved), sorted(moved)[:5]
    assert curve[0]["loss"] is None and curve[-1]["loss"] < curve[1]["loss"], curve
    assert curve[-1]["first"] + curve[-1]["surname"] > curve[0]["first"] + curve[0]["surname"] + 0.2, curve

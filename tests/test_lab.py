"""The CPU lab's fast version (bench/lab.py --fast) as a learning regression test.

It runs the real commands end to end (data, stage 0, stages 1 and 2 at rate 16, eval.py, stage 3) with
fewer steps than the full lab, about 5 minutes on 2 cores, then trains the compressed route on the lab's own
frozen base for one question type (bench/lab_probe.py, 100 steps). Bounds are set below every value measured
(BENCHMARKS.md, "CPU lab"):

  - the stage-0 base reads raw text far above closed book: 24.0 / 44.7 / 34.7 vs 2.7 / 6.0 / 3.3 % over three
    fast runs (2 seeds, 2 sizes);
  - compressed reading, one question type, on the lab's frozen base: held-out exact 1.00 at step 100 on both
    bases measured (0.57 and 0.98 at step 50);
  - the stage-3 candidates can be told apart from their text: word overlap between question and document
    picks a positive for 0.96 / 0.87 of held-out questions (fast / full lab; chance 0.16), so a retrieval
    failure is the model's, not the data's (bench/lab_retrieval.py, which runs here end to end).

Not asserted, because it is not reliable at the fast size: the fast lab's own compressed exact match after
600 stage-2 steps (29.3% / 2.0% on seed 0 with 1,000 / 2,000 people, 2.7-3.3% on seed 1): whether the
decoder leaves the answer-prior plateau in time depends on the order of the training batches alone
(BENCHMARKS.md); and stage 3, which does not learn at this scale (the memories of whole documents do not
carry the name, see lab_retrieval.py); nor name matching alone (lab_retrieval.py --docs name
--train-encoder: held-out hit@1 0.18 -> 0.35 in 150 steps in one run of the fast lab, 0.19 -> 0.21 in
another, both measured before a fix of its name extraction). The test checks they run and are reported.
"""
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_fast_lab_runs_and_its_base_and_compressor_learn_to_read(tmp_path):
    import lab
    import lab_probe
    import lab_retrieval
    out = tmp_path / "lab"
    res = lab.main(["--fast", "--out", str(out)])
    closed, text = res["closed_book"]["em"], res["text"]["em"]
    assert text > closed + 10, (text, closed)
    assert 0 <= res["rates"][16]["compressed"]["em"] <= 100
    for key in ("before", "after"):
        r = res[f"stage3_{key}"]["retrieval"]
        assert r["n_retrieval@1"] == 150 and 0 <= r["recall@1"] <= r["recall@3"] <= 100, r
    for name in ("results.json", "results.md", "rate_curve.svg", "stage3_curve.svg"):
        assert (out / name).stat().st_size > 200, name
    assert f"| {res['rates'][16]['compressed']['em']:.1f} |" in (out / "results.md").read_text()

    # the method's compressed route (encoder LoRA -> memory -> decoder LoRA) on the lab's frozen base
    threads = torch.get_num_threads()  # the probe runs on one thread
    curve = lab_probe.main(["--base", str(out / "stage0" / "base"), "--mode", "compressed", "--train-base", "0",
                            "--lora-r", "32", "--rate", "4", "--fact", "job", "--steps", "100", "--eval-every", "100",
                            "--out", str(tmp_path / "probe")])
    torch.set_num_threads(threads)
    assert curve[0]["heldout_exact"] < 0.2 and curve[-1]["heldout_exact"] > 0.8, curve

    # stage 3's diagnosis: the text tells the candidates apart; every figure is reported
    r = lab_retrieval.main(["--checkpoint", str(out / "rate16" / "stage2" / "checkpoint"), "--data", str(out / "data"),
                            "--steps", "20"])
    assert r["lexical"] > r["chance"] + 0.3, r  # 0.96 measured, chance 0.16
    assert all(0 <= r["signal"][k] <= 1 for k in ("oracle", "gradient")) and len(r["loss"]) == 20

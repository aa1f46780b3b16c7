"""The CPU lab's fast version (bench/lab.py --fast) as a learning regression test.

It runs the real commands end to end (data, stage 0, stages 1 and 2 at rate 16, eval.py, stage 3) on 1,000
people, about 5 minutes on 2 cores, and checks what the lab shows, with a bound set below the values
measured over seeds (BENCHMARKS.md, "CPU lab"): a change that stops compression, splicing or reading from
learning fails here. Stage 3 does not learn at this scale yet (issue 7 is open on it): the test only checks
that it runs and reports retrieval.
"""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_fast_lab_learns_to_read_compressed_documents(tmp_path):
    import lab
    res = lab.main(["--fast", "--out", str(tmp_path / "lab")])
    compressed = res["rates"][16]["compressed"]["em"]
    closed, text = res["closed_book"]["em"], res["text"]["em"]
    # reading from 4 memory vectors per document: far above closed book (a held-out person's job or town
    # cannot be guessed without the document), and so is the raw-text baseline of the stage-0 base
    assert compressed > closed + BOUND and text > closed + BOUND, (compressed, closed, text)
    for key in ("before", "after"):
        r = res[f"stage3_{key}"]["retrieval"]
        assert r["n_retrieval@1"] == 150 and 0 <= r["recall@1"] <= r["recall@3"] <= 100, r
    for name in ("results.json", "results.md", "rate_curve.svg", "stage3_curve.svg"):
        assert (tmp_path / "lab" / name).stat().st_size > 200, name
    assert f"| {compressed:.1f} |" in (tmp_path / "lab" / "results.md").read_text()


BOUND = 10  # exact-match points; measured margins are in BENCHMARKS.md

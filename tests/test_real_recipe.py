"""lab/real.py, the real-model recipe, cannot rot silently: --dry-run prints both sizes' commands without
running anything, and every one of them is accepted by its script's own argument parser (a renamed flag in
train.py / eval.py fails here in a second); the slow test runs the recipe end to end (data, stages 1 -> 2 -> 3,
every eval.py mode, 9 subprocesses: about 1.5 CPU-minutes) on a tiny random model and a tiny made-up source.
The real run (SmolLM2, the official data) is in BENCHMARKS.md."""
import json
import shlex
import sys

import pytest

from conftest import ROOT
from test_official_data import tiny_source

sys.path.insert(0, str(ROOT / "lab"))
import real  # noqa: E402

TINY = ["--size", "cpu", "--test-docs", "10", "--k", "2", "--candidates", "5", "--doc-len", "32", "--rates", "4",
        "--questions-per-doc", "1", "--s1-steps", "2", "--s2-steps", "2", "--s3-warmup-steps", "1", "--s3-steps", "1",
        "--global-batch", "2", "--micro-batch", "2", "--s3-global-batch", "1", "--s3-micro-batch", "1",
        "--max-len", "160", "--lora-r", "4", "--lora-alpha", "8", "--limit", "4", "--s3-limit", "2",
        "--max-new-tokens", "3", "--batch-size", "4"]


@pytest.mark.slow
def test_recipe_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_base, capsys):
    src = tiny_source(tmp_path / "src.jsonl", n_docs=30)
    out = tmp_path / "real"
    res = real.main(["--model", str(tiny_base), "--src", str(src), "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    assert printed.count("\n$ python ") == len(res["commands"]) == 9  # data, s1, s2, eval, before, warm-up x2, s3, after
    for name in ("stage1", "stage2", "stage3", "test_stage2", "test_stage3"):
        assert (out / "data" / f"{name}.jsonl").is_file()
    assert (out / "rate4" / "stage3" / "checkpoint").is_dir()
    saved = json.loads((out / "results.json").read_text())
    for key in ("closed_book", "text"):
        assert saved[key]["n"] == 4 and 0 <= saved[key]["acc"] <= 100
    assert saved["rates"]["4"]["memory_tokens"] == 8 and saved["rates"]["4"]["compressed"]["n"] == 4
    for key in ("stage3_before", "stage3_warmup", "stage3_after"):
        r = saved[key]["retrieval"]
        assert r["n"] == 2 and 0 <= r["recall@1"] <= r["recall@5"] == 100.0  # 5 candidates: top-5 holds them all
    md = (out / "results.md").read_text()
    for row in ("closed book", "raw text", "compressed, rate 4", "untrained query reasoner", "after end-to-end",
                "cost per query", "retrieval among 5"):
        assert row in md


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path, capsys):
    # data; per rate stage 1, stage 2, eval; stage 3: eval before, train, eval after (+ warm-up and its eval)
    for size, n in (("cpu", 1 + 3 * 1 + 3), ("gpu", 1 + 3 * 3 + 5)):
        out = tmp_path / size
        res = real.main(["--dry-run", "--size", size, "--model", "MODEL", "--out", str(out)])
        printed = capsys.readouterr().out
        assert len(res["commands"]) == printed.count("\n$ python ") == n
        assert not out.exists()
        assert "--model MODEL" in printed
        assert ("--k 5" in printed) == (size == "gpu")
        assert printed.count("--stage 1 ") == len(real.SIZES[size]["rates"])


def test_every_command_parses_with_its_script(tmp_path):
    import eval as eval_py
    import official_data
    import train
    # train.py's flags only (its parse_args also reads the --init checkpoint, which a dry run has not written)
    parsers = {"lab/official_data.py": official_data.parse_args, "train.py": train.make_parser().parse_args,
               "eval.py": eval_py.parse_args}
    for size in real.SIZES:
        res = real.main(["--dry-run", "--size", size, "--model", "MODEL", "--out", str(tmp_path / size)])
        for c in res["commands"]:
            words = shlex.split(c["command"])
            assert words[0] == "python" and words[1] in parsers, c
            args = parsers[words[1]](words[2:])  # SystemExit (argparse) on an unknown or malformed flag
            if words[1] == "train.py":
                assert args.stage == 1 or args.init


def test_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.delenv("CLARA_SMOLLM2", raising=False)
    with pytest.raises(SystemExit):
        real.parse_args(["--size", "cpu"])  # no model
    with pytest.raises(SystemExit):
        real.parse_args(["--model", str(tmp_path)])  # not an HF folder
    with pytest.raises(SystemExit):
        real.parse_args(["--dry-run", "--model", "M", "--rates", "4", "--stage3-rate", "16"])
    with pytest.raises(SystemExit):
        real.parse_args(["--dry-run", "--model", "M", "--rates", "3"])  # does not divide the document length

"""train.py on bad input, crashes and its own records: every expected error is one line `train.py: error: ...`
with exit 2 and leaves --out as it was; non-finite weights and a full disk never replace the last good
checkpoint; run.json records the flags and --resume keeps them; the options of a run from --init apply to
the adapters it trains; and the stage defaults follow what is trained (the README's full-size commands).

The shipped tiny base (data/tiny), a few steps on the shipped sample data, CPU. The checkpoints every test starts from are made once.
"""
import errno
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import train
from clara import Clara, checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--global-batch", "4", "--micro-batch", "2", "--doc-len", "32", "--compr-rate", "8", "--max-len", "160",
        "--lora-dropout", "0", "--log-every", "1", "--device", "cpu"]


def cli(capsys, *argv):
    """train.py's command line: (exit code, stderr)."""
    rc = train.cli([str(x) for x in argv])
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one error line; nothing else on stderr may look like a traceback."""
    assert "Traceback" not in err, err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("train.py: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def tree(path: Path) -> dict:
    """Every file under path with its bytes: 'nothing changed' is this being equal."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


@pytest.fixture(scope="module")
def s1(tmp_path_factory):
    """A 1-step stage-1 run from the tiny base, trained with LoRA dropout 0.1 (its base inside the checkpoint)."""
    out = tmp_path_factory.mktemp("s1")
    train.main(["--stage", "1", "--out", str(out), *FAST, "--max-steps", "1", "--lora-dropout", "0.1"])
    return out


@pytest.fixture(scope="module")
def head2(tmp_path_factory):
    """The first 4 stage-2 records: one global batch of 4."""
    head = tmp_path_factory.mktemp("data") / "stage2_head.jsonl"
    head.write_text("".join(open(ROOT / "data/sample/stage2.jsonl").readlines()[:4]))
    return str(head)


# ------------------------------------------------------------------------------------------------
# bad flags: one line, exit 2, --out untouched (here: never created)

BAD_FLAGS = [
    (["--max-steps", "0"], "--max-steps 0"),
    (["--max-steps", "-3"], "--max-steps -3"),
    (["--global-batch", "0"], "--global-batch 0"),
    (["--global-batch", "-4"], "--global-batch -4"),
    (["--micro-batch", "0"], "--micro-batch 0"),
    (["--global-batch", "6", "--micro-batch", "4"], "--global-batch 6 is not a multiple of --micro-batch 4"),
    (["--lr", "0"], "--lr 0.0"),
    (["--lr", "-0.0001"], "--lr -0.0001"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--lr", "abc"], "--lr: invalid float value"),
    (["--min-lr", "-1"], "--min-lr -1.0"),
    (["--warmup", "1.5"], "--warmup 1.5"),
    (["--lora-dropout", "1"], "--lora-dropout 1.0"),
    (["--lora-r", "0"], "--lora-r 0"),
    (["--lora-alpha", "0"], "--lora-alpha 0.0"),
    (["--tau", "0"], "--tau 0.0"),
    (["--epochs", "0"], "--epochs 0"),
    (["--top-k", "0"], "--top-k 0"),
    (["--mse-weight", "nan"], "--mse-weight nan"),
    (["--grad-clip", "0"], "--grad-clip 0.0"),
    (["--save-every", "-1"], "--save-every -1"),
    (["--log-every", "0"], "--log-every 0"),
    (["--stop-after", "0"], "--stop-after 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--doc-len", "4", "--compr-rate", "8"], "--doc-len 4 / --compr-rate 8"),
    (["--schedule", "linear"], "--schedule: invalid choice"),
    (["--stage", "4"], "--stage: invalid choice"),
    (["--data", "{tmp}/missing.jsonl"], "--data {tmp}/missing.jsonl: no such file"),
    (["--data", "{tmp}"], "--data {tmp}: is a directory"),
    (["--resume"], "nothing to resume"),
    (["--base-model", "{tmp}"], "--base-model overrides the base of an --init checkpoint"),
    (["--stage", "2", "--init", "{tmp}/nope"], "--init {tmp}/nope: CLaRa checkpoint directory does not exist"),
    (["--stage", "2", "--init", "{tmp}"], "not a CLaRa checkpoint"),
    (["--stage", "0"], "--stage 0: pretraining a base from random weights is not CLaRa"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[" ".join(e) for e, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    extra = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    argv = (["--stage", "1"] if "--stage" not in extra else []) + ["--out", out, *FAST, *extra]
    rc, err = cli(capsys, *argv)
    assert rc == 2
    assert message.replace("{tmp}", str(tmp_path)) in error_line(err)
    assert not out.exists()  # nothing written, not even the folder


def bad_input_table(tmp_path, capsys) -> str:
    """docs/train_errors.md: what train.py answers to each bad flag of BAD_FLAGS, as run here."""
    rows = ["# What train.py says to a bad flag", "",
            "Produced by tests/test_train_errors.py (`CLARA_WRITE_DOCS=1` rewrites it; the test fails when it is "
            "stale). Every answer is this one line on stderr and exit 2; `--out` is not created.", "",
            "| flags | exit | stderr |", "|---|---|---|"]
    for i, (extra, _) in enumerate(BAD_FLAGS):
        tmp = tmp_path / str(i)
        tmp.mkdir()
        argv = [x.replace("{tmp}", str(tmp)) for x in extra]
        rc, err = cli(capsys, *(["--stage", "1"] if "--stage" not in extra else []), "--out", tmp / "out", *argv)
        line = error_line(err).replace(str(tmp), "TMP")
        rows.append(f"| `{' '.join(extra).replace('{tmp}', 'TMP')}` | {rc} | `{line}` |")
    return "\n".join(rows) + "\n"


def test_bad_flag_table_in_docs_is_current(tmp_path, capsys):
    import os
    table, doc = bad_input_table(tmp_path, capsys), ROOT / "docs" / "train_errors.md"
    if os.environ.get("CLARA_WRITE_DOCS") == "1":
        doc.write_text(table)
    # argparse words its own messages a little differently across Python versions: not compared
    same = lambda text: re.sub(r"\(choose from [^)]*\)", "(choose from ...)", text)
    assert same(doc.read_text()) == same(table), "docs/train_errors.md is stale: rerun this test with CLARA_WRITE_DOCS=1"


def test_broken_model_and_init_folders(s1, tmp_path, capsys):
    """A broken --model / --init folder: one line naming it, exit 2, for every way tried here."""
    def broken(name, src, damage):
        d = tmp_path / name
        shutil.copytree(src, d)
        damage(d)
        return d
    base, ck = s1 / "checkpoint" / "base", s1 / "checkpoint"
    cut = lambda f: f.write_bytes(f.read_bytes()[:300])
    cases = [
        ("--model", broken("m_noconfig", base, lambda d: (d / "config.json").unlink()), "config.json"),
        ("--model", broken("m_badjson", base, lambda d: (d / "config.json").write_text("{oops")), "not valid JSON"),
        ("--model", broken("m_cut", base, lambda d: cut(d / "model.safetensors")), "cannot load the base model"),
        ("--model", broken("m_notok", base, lambda d: (d / "tokenizer.json").unlink()), "tokenizer.json"),
        ("--init", broken("c_badjson", ck, lambda d: (d / "clara_config.json").write_text("{oops")), "not valid JSON"),
        ("--init", broken("c_nokey", ck, lambda d: (d / "clara_config.json").write_text("{}")), "'clara'"),
        ("--init", broken("c_cut", ck, lambda d: cut(d / "clara.safetensors")), "cannot load the checkpoint"),
        ("--init", broken("c_notok", ck, lambda d: (d / "tokenizer.json").unlink()), "tokenizer.json"),
        ("--init", broken("c_nobase", ck, lambda d: shutil.rmtree(d / "base")), "--base-model DIR"),
    ]

    def drop_tensor(d):
        from safetensors.torch import load_file, save_file
        sd = load_file(d / "clara.safetensors")
        sd.pop(next(k for k in sd if ".lora_A.decoder" in k))
        save_file(sd, d / "clara.safetensors")
        meta = json.loads((d / "clara_config.json").read_text())
        meta.pop("files_sha256")  # the file hash would catch the change first (test_checkpoints); the tensor check
        (d / "clara_config.json").write_text(json.dumps(meta))
    cases.append(("--init", broken("c_notensor", ck, drop_tensor), "no tensor "))
    for opt, folder, message in cases:
        out = tmp_path / f"out_{folder.name}"
        stage = "1" if opt == "--model" else "2"
        rc, err = cli(capsys, "--stage", stage, opt, folder, "--out", out, *FAST, "--max-steps", "1")
        line = error_line(err)
        assert rc == 2 and str(folder) in line and message in line, (folder.name, line)
        assert tree(out) == {}, folder.name


def test_data_errors_found_while_training(s1, tmp_path, capsys):
    """Fewer candidates than --top-k (stage 3) and a prompt longer than --max-len (stage 2): one line naming the
    record, exit 2, nothing saved."""
    ck = s1 / "checkpoint"
    rc, err = cli(capsys, "--stage", "3", "--init", ck, "--out", tmp_path / "a", *FAST, "--top-k", "9",
                  "--max-steps", "1")
    assert rc == 2 and re.search(r"stage3.jsonl:\d+: 8 candidate documents, fewer than --top-k 9", error_line(err))
    rc, err = cli(capsys, "--stage", "2", "--init", ck, "--out", tmp_path / "b", *FAST, "--max-len", "40",
                  "--max-steps", "1")
    assert rc == 2 and re.search(r"stage2.jsonl:\d+: the prompt is longer than --max-len 40", error_line(err))
    for d in ("a", "b"):
        assert not (tmp_path / d / "checkpoint").exists()


# ------------------------------------------------------------------------------------------------
# the last good checkpoint survives non-finite weights and a full disk

def record_saves(monkeypatch):
    """Wrap save_all: the checkpoint's files right after each save, by step."""
    saved, real = {}, train.save_all

    def save_all(clara, opt, a, step, position, rank):
        real(clara, opt, a, step, position, rank)
        saved[step] = tree(a.out / "checkpoint")
    monkeypatch.setattr(train, "save_all", save_all)
    return saved


def test_non_finite_weights_stop_before_saving(s1, tmp_path, capsys, monkeypatch):
    """--lr 1e37: step 1 is finite and saved, step 2 is not: the run stops before saving, naming the step; the
    step-1 checkpoint is byte-identical afterwards and metrics.jsonl holds its curve."""
    saved = record_saves(monkeypatch)
    out = tmp_path / "out"
    rc, err = cli(capsys, "--stage", "1", "--init", s1 / "checkpoint", "--out", out, *FAST, "--lr", "1e37",
                  "--save-every", "1", "--max-steps", "3")
    line = error_line(err)
    assert rc == 2 and "step 2: non-finite" in line and "the last finite checkpoint is where it was" in line, line
    assert list(saved) == [1] and tree(out / "checkpoint") == saved[1]
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1]
    ck = Clara.from_pretrained(out / "checkpoint").state_to_save()
    assert all(bool(torch.isfinite(v).all()) for v in ck.values())


def test_non_finite_parameters_after_the_step(s1, tmp_path, capsys, monkeypatch):
    """Finite loss and gradients, but the update makes a weight inf: caught after opt.step(), before saving."""
    saved = record_saves(monkeypatch)
    real, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "out"
    rc, err = cli(capsys, "--stage", "1", "--init", s1 / "checkpoint", "--out", out, *FAST, "--save-every", "1",
                  "--max-steps", "3")
    line = error_line(err)
    assert rc == 2 and "step 2: non-finite parameters after the optimizer step" in line, line
    assert f"{out / 'checkpoint'} (step 1)" in line
    assert list(saved) == [1] and tree(out / "checkpoint") == saved[1]


def test_full_disk_when_saving(s1, tmp_path, capsys, monkeypatch):
    """No space left while saving step 2: one line, exit 2; step 1's checkpoint and resume state are intact and
    the half-written copy is gone."""
    import safetensors.torch
    saved, real = record_saves(monkeypatch), train.save_all
    real_save_file = safetensors.torch.save_file

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_all(clara, opt, a, step, position, rank):
        if step == 2:
            monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
        real(clara, opt, a, step, position, rank)
    monkeypatch.setattr(train, "save_all", save_all)
    out = tmp_path / "out"
    rc, err = cli(capsys, "--stage", "1", "--init", s1 / "checkpoint", "--out", out, *FAST, "--save-every", "1",
                  "--max-steps", "3")
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    line = error_line(err)
    assert rc == 2 and "step 2: saving to" in line and "No space left on device" in line, line
    assert "what was saved before this step is intact" in line
    assert tree(out / "checkpoint") == saved[1]
    assert json.loads((out / "resume" / "state.json").read_text())["position"]["step"] == 1
    assert not (out / "checkpoint.tmp").exists()


# ------------------------------------------------------------------------------------------------
# --out: a user's folder is refused, never cleaned; a failing run never erases the previous run's files

def test_a_users_folder_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "notes.txt").write_text("my notes")
    (out / "metrics.jsonl").write_text("my own numbers\n")
    (out / "thesis.tex").write_text("\\section{}")
    before = tree(out)
    rc, err = cli(capsys, "--stage", "1", "--out", out, *FAST, "--max-steps", "1")
    line = error_line(err)
    assert rc == 2 and "holds files this project did not write" in line and "thesis.tex" in line, line
    assert tree(out) == before
    # only names of ours: a checkpoint/ and a metrics.jsonl that are not ours are refused too
    (out / "thesis.tex").unlink()
    before = tree(out)
    rc, err = cli(capsys, "--stage", "1", "--out", out, *FAST, "--max-steps", "1")
    assert rc == 2 and "(checkpoint, metrics.jsonl)" in error_line(err) and tree(out) == before


def test_overwrite_writes_beside_the_users_files(s1, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("\\section{}")
    rc, _ = cli(capsys, "--stage", "1", "--init", s1 / "checkpoint", "--out", out, *FAST, "--max-steps", "1",
                "--overwrite")
    assert rc == 0 and (out / "thesis.tex").read_text() == "\\section{}"
    assert (out / "checkpoint" / "clara_config.json").exists() and (out / "run.json").exists()


def test_a_failing_run_keeps_the_previous_runs_files(s1, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(capsys, "--stage", "1", "--init", s1 / "checkpoint", "--out", out, *FAST, "--max-steps", "2")[0] == 0
    before = tree(out)
    assert b'"step": 2' in before["metrics.jsonl"]
    rc, err = cli(capsys, "--stage", "1", "--init", s1 / "checkpoint", "--out", out, *FAST, "--max-steps", "2",
                  "--lr", "1e38")  # the first step already overflows
    assert rc == 2 and "step 1:" in error_line(err) and "nothing was saved" not in error_line(err)
    after = tree(out)
    after.pop("metrics.jsonl.tmp")  # the failed run's own curve, beside the previous run's
    assert after == before


# ------------------------------------------------------------------------------------------------
# run.json: the flags of the run, restored and enforced by --resume

def test_run_json_and_resume_keep_the_flags(s1, tmp_path, head2, capsys):
    out = tmp_path / "s2"
    args = ["--stage", "2", "--out", out, *FAST, "--max-len", "400", "--max-steps", "4", "--lr", "3e-3"]
    rc, _ = cli(capsys, *args, "--init", s1, "--data", head2, "--stop-after", "2")  # the run folder: accepted
    assert rc == 0
    run = json.loads((out / "run.json").read_text())
    assert run["flags"]["max_steps"] == 4 and run["flags"]["lr"] == 3e-3
    assert run["flags"]["init"] == str((s1 / "checkpoint").resolve()) and "init" in run["explicit"]
    for flag, value in [("--max-steps", "120"), ("--lr", "1e-3"), ("--lora-dropout", "0.2"), ("--seed", "1")]:
        rc, err = cli(capsys, *args[:-4], "--resume", flag, value)
        line = error_line(err)
        assert rc == 2 and line.startswith(f"train.py: error: {flag} ") and "was started with" in line, line
    # without --init, --data, --max-steps or --lr: the recorded ones; the curve goes on to step 4
    rc, err = cli(capsys, "--stage", "2", "--out", out, "--resume", "--device", "cpu")
    assert rc == 0, err
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((out / "checkpoint" / "clara_config.json").read_text())["step"] == 4
    rc, err = cli(capsys, "--stage", "3", "--out", out, "--resume", "--device", "cpu")
    assert rc == 2 and "is stage 2" in error_line(err)


def test_stage_2_without_init_says_what_it_starts_from(tmp_path, capsys):
    # --max-len 40 stops it at its first step (prompts too long: 5 documents' slots end at token 57), after the warning
    rc, err = cli(capsys, "--stage", "2", "--out", tmp_path / "o", *FAST, "--max-len", "40", "--max-steps", "1")
    assert rc == 2
    assert f"warning: --stage 2 without --init starts from the bare base {ROOT / 'data' / 'tiny'} with fresh" in err


# ------------------------------------------------------------------------------------------------
# --init: LoRA options, run folders, --base-model, the stage defaults

def test_lora_options_apply_to_the_adapters_trained_from_init(s1, tmp_path, head2, monkeypatch):
    """s1 trained with dropout 0.1: --lora-dropout 0 --lora-alpha 64 on a run from it is what every adapter USES
    at the step (two train-mode passes agree; the scale is 64 / 16), and what its checkpoint records; without
    the flags, the checkpoint's values are used (dropout 0.1: two passes differ). The rank cannot change."""
    built = []
    real = train.build_clara
    monkeypatch.setattr(train, "build_clara", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    records = [json.loads(x) for x in open(ROOT / "data/sample/stage2.jsonl").readlines()[:2]]

    def two_passes(c):
        c.train()  # as in the loop: dropout active where the config says so
        batch = c.collate(records, 2)
        with torch.no_grad():
            return c(batch, 2).ce_sum.item(), c(batch, 2).ce_sum.item()
    base = ["--stage", "2", "--init", str(s1 / "checkpoint"), *[x for x in FAST if x not in ("--lora-dropout", "0")],
            "--max-len", "400", "--max-steps", "1", "--data", head2]
    train.main([*base, "--out", str(tmp_path / "a"), "--lora-dropout", "0", "--lora-alpha", "64"])
    c = built[-1]
    layers = c.model.lora_layers()
    assert {m.lora[n].dropout for m in layers for n in m.lora} == {0.0}
    assert {m.lora[n].scale for m in layers for n in m.lora} == {64 / 16}
    p1, p2 = two_passes(c)
    assert p1 == p2
    meta = json.loads((tmp_path / "a" / "checkpoint" / "clara_config.json").read_text())["clara"]
    assert meta["lora_dropout"] == 0.0 and meta["lora_alpha"] == 64
    train.main([*base, "--out", str(tmp_path / "b")])  # inherits s1's dropout 0.1 and alpha 32
    c = built[-1]
    assert {m.lora[n].dropout for m in c.model.lora_layers() for n in m.lora} == {0.1}
    assert {m.lora[n].scale for m in c.model.lora_layers() for n in m.lora} == {2.0}
    p1, p2 = two_passes(c)
    assert p1 != p2
    assert json.loads((tmp_path / "b" / "checkpoint" / "clara_config.json").read_text())["clara"]["lora_dropout"] == 0.1
    with pytest.raises(SystemExit, match="--lora-r 8: .* was trained with --lora-r 16"):
        train.main([*base, "--out", str(tmp_path / "c"), "--lora-r", "8"])
    with pytest.raises(SystemExit, match="--doc-len 64: .* was trained with --doc-len 32"):
        train.main([*base, "--out", str(tmp_path / "c"), "--doc-len", "64"])
    with pytest.raises(SystemExit, match="--model names the base of a fresh run"):
        train.main([*base, "--out", str(tmp_path / "c"), "--model", "tiny"])


def test_a_run_folder_is_its_checkpoint(s1, tmp_path):
    """--init out/stage1 and eval.py --checkpoint out/stage1 mean out/stage1/checkpoint."""
    assert checkpoint_dir(s1) == s1 / "checkpoint" and checkpoint_dir(s1 / "checkpoint") == s1 / "checkpoint"
    a = train.parse_args(["--stage", "2", "--init", str(s1), "--out", str(tmp_path / "o")])
    assert a.init == str(s1 / "checkpoint")
    import eval as ev
    ev.main(["--checkpoint", str(s1), "--data", str(ROOT / "data/sample/stage2.jsonl"), "--limit", "1",
             "--out", str(tmp_path / "ev"), "--device", "cpu", "--max-new-tokens", "2", "--no-progress"])
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["checkpoint"] == str((s1 / "checkpoint").resolve())


def test_base_model_for_a_checkpoint_naming_a_hub_model(s1, tmp_path, head2, capsys):
    """A checkpoint whose base is a hub name (as in an official release) trains with --base-model DIR."""
    ck = tmp_path / "ck"
    shutil.copytree(s1 / "checkpoint", ck)
    shutil.move(ck / "base", tmp_path / "mybase")
    meta = json.loads((ck / "clara_config.json").read_text())
    (ck / "clara_config.json").write_text(json.dumps({**meta, "base_model": "mistralai/Mistral-7B-Instruct-v0.2"}))
    args = ["--stage", "2", "--init", ck, *FAST, "--max-len", "400", "--max-steps", "1", "--data", head2]
    rc, err = cli(capsys, *args, "--out", tmp_path / "a")
    assert rc == 2 and "--base-model DIR" in error_line(err)
    rc, err = cli(capsys, *args, "--out", tmp_path / "b", "--base-model", tmp_path / "mybase")
    assert rc == 0, err
    assert Clara.from_pretrained(tmp_path / "b" / "checkpoint").base_path == str((tmp_path / "mybase").resolve())


def test_official_release_folder_trains_with_base_model(tiny_base, tmp_path, capsys):
    from test_clara import make, write_official
    write_official(make(tiny_base, stage=3), tmp_path / "official")
    args = ["--stage", "3", "--init", tmp_path / "official", "--global-batch", "2", "--micro-batch", "2",
            "--max-len", "400", "--top-k", "2", "--max-steps", "1", "--device", "cpu"]
    rc, err = cli(capsys, *args, "--out", tmp_path / "a")
    assert rc == 2 and "--base-model DIR" in error_line(err)
    rc, err = cli(capsys, *args, "--out", tmp_path / "b", "--base-model", tiny_base)
    assert rc == 0, err
    a = train.parse_args([str(x) for x in args] + ["--out", str(tmp_path / "c"), "--base-model", str(tiny_base)])
    assert (a.doc_len, a.compr_rate, a.lora_r, a.lora_alpha) == (16, 4, 4, 8)  # the release's, from its config
    assert a.lr == train.STAGES[3]["lr"]  # a real base: the official values


OFFICIAL_KEYS = ("lr", "min_lr", "schedule", "warmup", "global_batch", "micro_batch", "max_len", "top_k", "tau",
                 "epochs", "mse_weight")


def readme_commands() -> list[list[str]]:
    """The README's full-size train.py commands (torchrun ...), continuation lines joined: their train.py argv."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    cmds = [shlex.split(line) for line in text.splitlines() if line.strip().startswith("torchrun ")]
    return [c[c.index("train.py") + 1:] for c in cmds if "train.py" in c]


def test_readme_full_size_commands_get_the_official_values(tiny_base, tmp_path, head2, monkeypatch):
    """Each README torchrun command, parsed as train.py would parse it, trains with the official hyper-parameters
    of its stage; the stage-2/3 ones start from checkpoints made here from a real (HF directory) base, with
    tiny explicit settings that must not leak into the next stage."""
    cmds = readme_commands()
    assert [c[c.index("--stage") + 1] for c in cmds] == ["1", "2", "3"], cmds
    monkeypatch.chdir(tmp_path)
    small = ["--global-batch", "2", "--micro-batch", "2", "--doc-len", "32", "--compr-rate", "8", "--max-len", "400",
             "--max-steps", "1", "--lr", "3e-3", "--warmup", "0.5", "--device", "cpu", "--data", head2]
    s1_data = str(ROOT / "data/sample/stage1.jsonl")
    for stage, cmd in zip((1, 2, 3), cmds):
        a = train.parse_args(cmd)
        assert a.defaults == "official", cmd
        for k in OFFICIAL_KEYS:
            assert getattr(a, k) == train.STAGES[stage][k], (stage, k, getattr(a, k))
        if stage == 1:
            assert a.compr_rate == 32 and a.doc_len == 256  # the command's --compr-rate, the official doc length
            # make out/s1/checkpoint, the next command's --init, from a real base (not a preset)
            train.main(["--stage", "1", "--model", str(tiny_base), "--out", "out/s1", *small[:-2], "--data", s1_data])
        else:
            assert (a.doc_len, a.compr_rate, a.lora_r) == (32, 8, 16)  # what the checkpoint was trained with
            if stage == 2:
                train.main(["--stage", "2", "--init", "out/s1/checkpoint", "--out", "out/s2", *small])
    # and the CPU default: the shipped tiny base gets TINY, and so does a stage from one of its checkpoints
    a = train.parse_args(["--stage", "1"])
    assert a.defaults == "tiny" and a.lr == train.TINY["lr"] and a.global_batch == train.TINY["global_batch"]

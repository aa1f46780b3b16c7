"""The bad-input table: every input below goes through the command line that reads it (data.py check,
eval.py, train.py --resume) and must get ONE line that names the file, line, key or argument, with a
non-zero exit status, never a traceback (any other exception fails the test).

`docs/bad_inputs.md` is this table as run: regenerate it with

    CLARA_WRITE_TABLE=1 python3 -m pytest -q tests/test_bad_inputs.py

(the test checks that the committed file lists every case, so a new case without the regenerated doc fails).
"""
import io
import json
import os
import pickle
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import eval as clara_eval
import train
from clara import Clara, ClaraConfig
from data import Tokenizer
from model import Transformer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad_inputs.md"
CFG = dict(doc_max_length=16, compr_rate=4, generation_top_k=2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
           max_len=256)
GOOD2 = {"question": "What is the capital of France?", "docs": ["Paris is the capital of France.",
         "Berlin is the capital of Germany."], "answer": "Paris"}
CASES = []  # (id, command, input, setup(env) -> (runner, argv), expected message regex, expected exit: "!=0"|0)


def case(cid, command, what, expect, ok=False):
    def register(fn):
        CASES.append((cid, command, what, fn, expect, ok))
        return fn
    return register


class Env(SimpleNamespace):
    def file(self, name, content):
        f = self.tmp / name
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        return f

    def checkpoint(self, name="ck"):
        dst = self.tmp / name
        shutil.copytree(self.good, dst)
        return dst


# ---- runners: the command's own entry point, its exit status and what it printed ------------------------

def run_data(argv):
    out = io.StringIO()
    with redirect_stdout(out):
        code = data.main(argv)
    return code, out.getvalue().strip()


def run_eval(argv):
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            clara_eval.main([*argv, "--no-progress", "--warmup", "0", "--max-new-tokens", "2"])
    except SystemExit as e:
        return (1 if isinstance(e.code, str) else e.code), str(e.code)
    return 0, "\n".join(x for x in err.getvalue().splitlines() if x.startswith("note:"))


def resume_args(env):
    """What train.save_all / load_resume read of a run's arguments: a stage-1 run writing into the test's folder."""
    return SimpleNamespace(out=env.tmp, stage=1, defaults="official", run_record={})


def save_resume(env, clara, opt):
    train.save_all(clara, opt, resume_args(env), 1, {"epoch": 0}, 0)


def run_resume(env, clara, opt):
    try:
        train.load_resume(clara, opt, resume_args(env))
    except SystemExit as e:
        return 1, str(e.code)
    return 0, ""


def eval_ck(ck, env, *extra):
    return run_eval, ["--checkpoint", str(ck), "--data", str(env.good_data), "--out", str(env.tmp / "eval"), *extra]


# ---- data.py check: the training readers ----------------------------------------------------------------

def check(env, name, text, stage=2):
    return run_data, ["check", "--stage", str(stage), str(env.file(name, text))]


@case("data-duplicate-key", "data.py check --stage 2", 'a record with "question" twice',
      r"dup.jsonl:1: duplicate key 'question'")
def _(env):
    return check(env, "dup.jsonl", '{"question": "a?", "docs": ["d"], "answer": "x", "question": "b?"}\n')


@case("data-not-json", "data.py check --stage 2", "a line cut short", r"cut.jsonl:2: not valid JSON")
def _(env):
    return check(env, "cut.jsonl", json.dumps(GOOD2) + '\n{"question": "a?", "docs": [\n')


@case("data-not-utf8", "data.py check --stage 2", "a byte that is not UTF-8", r"latin.jsonl:1: not valid UTF-8")
def _(env):
    return check(env, "latin.jsonl", b'{"question": "caf\xe9?", "docs": ["d"], "answer": "x"}\n')


@case("data-deep-nesting", "data.py check --stage 2", "100,000 nested lists", r"deep.jsonl:1: JSON nested too deeply")
def _(env):
    return check(env, "deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")


@case("data-lone-surrogate", "data.py check --stage 2", r'a question holding the escape "\ud800" alone',
      r"sur.jsonl:1: not valid text \(the escape \\ud800 is half of a UTF-16 surrogate pair\)")
def _(env):
    return check(env, "sur.jsonl", '{"question": "a\\ud800?", "docs": ["d"], "answer": "x"}\n')


@case("data-docs-string", "data.py check --stage 2", '"docs": "one string"',
      r"str.jsonl:1: field 'docs': expected a list of documents, found a string")
def _(env):
    return check(env, "str.jsonl", json.dumps({**GOOD2, "docs": "Paris is in France."}) + "\n")


@case("data-no-answer", "data.py check --stage 2", "no answer field", r"noans.jsonl:1: missing field 'answer'")
def _(env):
    return check(env, "noans.jsonl", json.dumps({k: v for k, v in GOOD2.items() if k != "answer"}) + "\n")


@case("data-pos-index-range", "data.py check --stage 3", '"pos_index": [5] with 2 documents',
      r"pos.jsonl:1: field 'pos_index\[0\]': index 5 is out of range for 2 documents")
def _(env):
    return check(env, "pos.jsonl", json.dumps({**GOOD2, "pos_index": [5]}) + "\n", stage=3)


# ---- eval.py: its data ----------------------------------------------------------------------------------

def eval_data(env, path):
    return run_eval, ["--checkpoint", str(env.good), "--data", str(path), "--out", str(env.tmp / "eval")]


@case("eval-duplicate-key", "eval.py --data", 'a record with "golden_answers" twice',
      r"dup.jsonl:1: duplicate key 'golden_answers'")
def _(env):
    return eval_data(env, env.file("dup.jsonl", '{"question": "a?", "docs": ["d", "e"], "golden_answers": ["x"], '
                                                '"golden_answers": ["y"]}\n'))


@case("eval-lone-surrogate", "eval.py --data", r'a document holding the escape "\udfff" alone',
      r"sur.jsonl:1: not valid text \(the escape \\udfff is half of a UTF-16 surrogate pair\)")
def _(env):
    return eval_data(env, env.file("sur.jsonl", '{"question": "a?", "docs": ["d\\udfff", "e"], "answer": "x"}\n'))


@case("eval-empty-file", "eval.py --data", "an empty file", r"empty.jsonl: no record to evaluate: the file is empty")
def _(env):
    return eval_data(env, env.file("empty.jsonl", "\n\n"))


@case("eval-data-directory", "eval.py --data", "a directory", r"a_dir: is a directory, not an evaluation data file")
def _(env):
    (env.tmp / "a_dir").mkdir()
    return eval_data(env, env.tmp / "a_dir")


@case("eval-data-missing", "eval.py --data", "a file that does not exist", r"nope.jsonl: evaluation data file not found")
def _(env):
    return eval_data(env, env.tmp / "nope.jsonl")


@case("eval-not-json", "eval.py --data", "a line that is not JSON", r"bad.jsonl:1: not valid JSON")
def _(env):
    return eval_data(env, env.file("bad.jsonl", "question: a?\n"))


# ---- eval.py: its checkpoint (our format) ---------------------------------------------------------------

@case("ckpt-missing", "eval.py --checkpoint", "a folder that does not exist",
      r"cannot load the checkpoint: .*nothing: CLaRa checkpoint directory does not exist")
def _(env):
    return eval_ck(env.tmp / "nothing", env)


@case("ckpt-not-a-checkpoint", "eval.py --checkpoint", "a folder of other files",
      r"cannot load the checkpoint: .*: neither clara_config.json \(this project\) nor adapters.pth")
def _(env):
    (env.tmp / "other").mkdir()
    return eval_ck(env.tmp / "other", env)


@case("ckpt-config-not-json", "eval.py --checkpoint", "clara_config.json cut short",
      r"cannot load the checkpoint: .*clara_config.json: not valid JSON")
def _(env):
    ck = env.checkpoint()
    (ck / "clara_config.json").write_text('{"clara": {')
    return eval_ck(ck, env)


@case("ckpt-config-bad-type", "eval.py --checkpoint", 'clara_config.json with "compr_rate": "4"',
      r"cannot load the checkpoint: .*clara_config.json: field 'clara.compr_rate' is '4', expected int")
def _(env):
    ck = env.checkpoint()
    meta = json.loads((ck / "clara_config.json").read_text())
    meta["clara"]["compr_rate"] = "4"
    (ck / "clara_config.json").write_text(json.dumps(meta))
    return eval_ck(ck, env)


@case("ckpt-truncated-weights", "eval.py --checkpoint", "clara.safetensors cut in half",
      r"cannot load the checkpoint: .*clara.safetensors: content differs from the one this checkpoint was saved with")
def _(env):
    return truncated(env, pinned=True)


def truncated(env, pinned: bool):
    ck = env.checkpoint()
    f = ck / "clara.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    if not pinned:
        unpin(ck)
    return eval_ck(ck, env)


@case("ckpt-truncated-unpinned", "eval.py --checkpoint", "clara.safetensors cut in half, no recorded hashes",
      r"cannot load the checkpoint: .*clara.safetensors: not a readable safetensors file")
def _(env):
    return truncated(env, pinned=False)


@case("ckpt-flipped-byte", "eval.py --checkpoint", "one bit flipped in a weight of clara.safetensors",
      r"cannot load the checkpoint: .*clara.safetensors: content differs")
def _(env):
    ck = env.checkpoint()
    f = ck / "clara.safetensors"
    b = bytearray(f.read_bytes())
    b[-7] ^= 0x10
    f.write_bytes(bytes(b))
    return eval_ck(ck, env)


@case("ckpt-no-added-embeddings", "eval.py --checkpoint", "clara.safetensors without added_embeddings (no hashes)",
      r"cannot load the checkpoint: .*clara.safetensors: no tensor 'added_embeddings'")
def _(env):
    return without_tensor(env, "added_embeddings")


def without_tensor(env, key):
    """A checkpoint whose clara.safetensors lacks `key`, with its hashes removed (so the tensor check fires)."""
    ck = env.checkpoint()
    sd = load_file(ck / "clara.safetensors")
    del sd[key]
    save_file(sd, ck / "clara.safetensors")
    unpin(ck)
    return eval_ck(ck, env)


@case("ckpt-no-lora-tensor", "eval.py --checkpoint", "one LoRA tensor of a listed adapter missing (no hashes)",
      r"cannot load the checkpoint: .*clara.safetensors: no tensor 'layers.0.attention.wq.lora_A.decoder'")
def _(env):
    return without_tensor(env, "layers.0.attention.wq.lora_A.decoder")


@case("ckpt-other-tokenizer", "eval.py --checkpoint", "another run's tokenizer.json of the same size",
      r"cannot load the checkpoint: .*tokenizer.json: content differs")
def _(env):
    ck = env.checkpoint()
    t = json.loads((ck / "tokenizer.json").read_text())
    t["normalizer"] = {"type": "Lowercase"}
    (ck / "tokenizer.json").write_text(json.dumps(t))
    return eval_ck(ck, env)


@case("ckpt-other-base", "eval.py --checkpoint --base-model", "--base-model: another base of the same shapes",
      r"cannot load the checkpoint: .*model.safetensors: content differs .* is not the base decoder this "
      r"checkpoint was trained on")
def _(env):
    other = env.tmp / "other_base"
    shutil.copytree(env.base, other)
    sd = load_file(other / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1
    save_file(sd, other / "model.safetensors")
    return eval_ck(env.good, env, "--base-model", str(other))


@case("ckpt-killed-swap", "eval.py --checkpoint", "a save killed between its renames: only checkpoint.old is left",
      r"note: .*checkpoint is missing \(a save was interrupted\); using the previous copy .*checkpoint.old", ok=True)
def _(env):
    env.checkpoint("checkpoint.old")
    return eval_ck(env.tmp / "checkpoint", env)


# ---- eval.py: an official release folder ----------------------------------------------------------------

def official(env, adapters: bytes | None):
    ck = env.tmp / "official"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"compr_rate": 4, "doc_max_length": 16, "training_stage": "stage1_2",
                                                "lora_r": 4}))
    if adapters is not None:
        (ck / "adapters.pth").write_bytes(adapters)
    return eval_ck(ck, env, "--base-model", str(env.base))


@case("official-garbage", "eval.py --checkpoint (official)", "adapters.pth of text bytes",
      r"cannot load the checkpoint: .*adapters.pth: cannot be read as a PyTorch weights file")
def _(env):
    return official(env, b"not a PyTorch file " * 16)


@case("official-pickled-object", "eval.py --checkpoint (official)", "adapters.pth: a pickled Python object",
      r"cannot load the checkpoint: .*adapters.pth: cannot be read as a PyTorch weights file \(not one, or it "
      r"pickles Python objects besides tensors")
def _(env):
    return official(env, pickle.dumps(SimpleNamespace(a=1), protocol=2))


@case("official-truncated-zip", "eval.py --checkpoint (official)", "adapters.pth cut in half (a broken zip)",
      r"cannot load the checkpoint: .*adapters.pth: cannot be read as a PyTorch weights file \(broken or truncated")
def _(env):
    buf = io.BytesIO()
    torch.save({"decoder_adapter": {"w": torch.zeros(64, 64)}}, buf)
    return official(env, buf.getvalue()[: len(buf.getvalue()) // 2])


@case("official-no-first-last", "eval.py --checkpoint (official)", "decoder_first_last_layers.pth missing",
      r"cannot load the checkpoint: .*decoder_first_last_layers.pth: missing")
def _(env):
    buf = io.BytesIO()
    torch.save({"decoder_adapter": {"w": torch.zeros(2)}}, buf)
    return official(env, buf.getvalue())


# ---- train.py --resume ----------------------------------------------------------------------------------

def resume_case(env, prepare, resume_stage=None):
    c = Clara(Transformer.from_pretrained(env.base, dtype=torch.float32), Tokenizer.from_pretrained(env.base),
              ClaraConfig(**CFG, training_stage=1), base_path=str(env.base))
    opt = torch.optim.AdamW(list(c.trainable_parameters(1).values()), lr=1e-3)
    prepare(c, opt)
    if resume_stage is not None:  # resumed with another stage's trainable set (stage 2: no <MEMi> rows)
        opt = torch.optim.AdamW(list(c.trainable_parameters(resume_stage).values()), lr=1e-3)
    return (lambda _: run_resume(env, c, opt)), None


@case("resume-nothing", "train.py --resume", "no OUT/resume", r"--resume: .*resume does not exist: nothing to resume")
def _(env):
    return resume_case(env, lambda c, o: None)


@case("resume-foreign-dcp", "train.py --resume", "a torch.distributed.checkpoint folder (.metadata) without manifest",
      r"--resume: .*resume holds neither state.json nor manifest.json: not a resume folder of this project")
def _(env):
    def prepare(c, o):
        (env.tmp / "resume").mkdir()
        (env.tmp / "resume" / ".metadata").write_bytes(pickle.dumps({"x": 1}))
    return resume_case(env, prepare)


@case("resume-altered", "train.py --resume", "state.safetensors altered after the save",
      r"--resume: .*state.safetensors: missing or altered since it was saved")
def _(env):
    def prepare(c, o):
        save_resume(env, c, o)
        f = env.tmp / "resume" / "state.safetensors"
        f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\1")
    return resume_case(env, prepare)


@case("resume-other-params", "train.py --resume", "saved by a run with other trainable parameters",
      r"--resume: .*state.safetensors holds the state of other trainable parameters")
def _(env):
    return resume_case(env, lambda c, o: save_resume(env, c, o), resume_stage=2)


# ---- the test and the table -------------------------------------------------------------------------------

def unpin(ck):
    meta = json.loads((ck / "clara_config.json").read_text())
    meta.pop("files_sha256")
    (ck / "clara_config.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def shared(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    c = Clara(Transformer.from_pretrained(tiny_base, dtype=torch.float32), Tokenizer.from_pretrained(tiny_base),
              ClaraConfig(**CFG, training_stage=2), base_path=str(tiny_base))
    c.save_pretrained(root / "good")
    good_data = root / "good.jsonl"
    good_data.write_text(json.dumps({"question": "a?", "docs": ["Paris.", "Berlin."], "golden_answers": ["x"]}) + "\n")
    return SimpleNamespace(base=tiny_base, good=root / "good", good_data=good_data)


RESULTS = {}


def write_table():
    lines = ["# What each bad input gets", "",
             "Generated by `tests/test_bad_inputs.py` (`CLARA_WRITE_TABLE=1 python3 -m pytest -q "
             "tests/test_bad_inputs.py`): every row is a test that feeds the input to the command and checks "
             "the exit status and the one-line message. Do not edit by hand. DIR is the test's folder, BASE "
             "the base model's; hash prefixes are shown as `…`.", "",
             "| case | command | input | exit | message |", "|---|---|---|---|---|"]
    cell = lambda t: t.replace("|", "\\|")
    for cid, command, what, _, _, _ in CASES:
        code, msg = RESULTS[cid]
        lines.append(f"| `{cid}` | `{command}` | {cell(what)} | {code} | `{cell(msg)}` |")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("cid", [c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(cid, shared, tmp_path):
    _, _, _, setup, expect, ok = next(c for c in CASES if c[0] == cid)
    env = Env(tmp=tmp_path, **vars(shared))
    runner, argv = setup(env)
    code, msg = runner(argv)  # any exception other than SystemExit (a traceback) fails here
    if ok:
        assert code == 0, msg
    else:
        assert code not in (0, None), msg
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    assert re.search(expect, msg), msg
    shown = msg.replace(str(tmp_path), "DIR").replace(str(shared.base), "BASE")
    RESULTS[cid] = (code, re.sub(r"[0-9a-f]{12}\.\.\.", "…", shown))


def test_the_table_in_docs_lists_every_case():
    """Runs after the cases above (pytest keeps file order): with CLARA_WRITE_TABLE=1, first writes the doc."""
    if os.environ.get("CLARA_WRITE_TABLE") == "1":
        assert len(RESULTS) == len(CASES), "run the whole file to write the table"
        write_table()
    text = DOC.read_text() if DOC.exists() else ""
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in text]
    assert not missing, f"{DOC} lacks {missing}: regenerate it with CLARA_WRITE_TABLE=1 (see this file's docstring)"


def test_one_error_line_and_one_load_error_tuple():
    """clara.error_line is what every command prints for an error (train.py and eval.py import it), and
    clara.LOAD_ERRORS / SAVE_ERRORS are the one pair of tuples they catch."""
    import clara
    from safetensors import SafetensorError
    assert train.error_line is clara_eval.error_line is clara.error_line
    assert train.LOAD_ERRORS is clara_eval.LOAD_ERRORS is clara.LOAD_ERRORS and train.SAVE_ERRORS is clara.SAVE_ERRORS
    assert SafetensorError in clara.LOAD_ERRORS and SafetensorError in clara.SAVE_ERRORS
    line = clara.error_line
    assert line(KeyError("f.safetensors: no tensor 'x'")) == "f.safetensors: no tensor 'x'"  # no repr quotes
    assert line(RuntimeError("bad  zip:\tcut\nException raised from C++ at x.cpp:1\nframe #0: ...")) == "bad zip: cut"
    assert line(ValueError("")) == "ValueError" and line(KeyError()) == "KeyError"
    assert line(OSError(28, "No space left on device")) == "[Errno 28] No space left on device"

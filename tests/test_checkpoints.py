"""Checkpoints that survive kills, moves and tampering: the directory swap killed between its renames (by
the CLARA_FAULT injection points, in a subprocess), self-contained folders that load after a move, content
hashes of the folder, the base and the tokenizer, every required tensor, and the pickle-free resume state."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from clara import Clara, ClaraConfig
from conftest import adamw_steps
from data import Tokenizer
from model import Transformer

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(doc_max_length=16, compr_rate=4, generation_top_k=2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
           max_len=256)
RECORDS = [{"question": "What is the capital of France?", "docs": ["Paris is the capital of France.",
            "Berlin is the capital of Germany."], "answer": "Paris"}]


def make(base, stage=2, seed=0):
    """A tiny Clara on `base` whose adapters are not the identity (random lora_B), so outputs tell them apart."""
    torch.manual_seed(seed)
    c = Clara(Transformer.from_pretrained(base, dtype=torch.float32), Tokenizer.from_pretrained(base),
              ClaraConfig(**CFG, training_stage=stage), base_path=str(base))
    for m in c.model.lora_layers():
        for p in m.lora_B.values():
            p.data.normal_(0, 0.05)
    return c


def loss(c):
    c.eval()
    with torch.no_grad():
        return c.total_loss(c.loss(c.collate(RECORDS, stage=2), 2))


# ---- the swap, killed between its renames -------------------------------------------------------------

KILLED_SAVE = """
import os, sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_checkpoints import make
from safetensors.torch import save_file
c = make({base!r})
c.save_pretrained({ck!r})
save_file(c.state_to_save(), {ref1!r})
with torch.no_grad():
    for m in c.model.lora_layers():
        for p in m.lora_B.values():
            p.mul_(2)
save_file(c.state_to_save(), {ref2!r})
os.environ["CLARA_FAULT"] = {point!r}
c.save_pretrained({ck!r})
print("not killed")
"""


@pytest.mark.parametrize("point,survivor", [("after_first_rename", "ref1"), ("after_second_rename", "ref2")])
def test_a_kill_inside_the_swap_leaves_a_complete_checkpoint(tiny_base, tmp_path, point, survivor):
    ck = tmp_path / "checkpoint"
    script = KILLED_SAVE.format(root=str(ROOT), tests=str(ROOT / "tests"), base=str(tiny_base), ck=str(ck),
                                ref1=str(tmp_path / "ref1"), ref2=str(tmp_path / "ref2"), point=point)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 137 and "not killed" not in r.stdout, r.stderr[-2000:]
    if point == "after_first_rename":  # the worst instant: only checkpoint.old is complete
        assert not ck.exists() and (tmp_path / "checkpoint.old").is_dir()
    d = Clara.from_pretrained(ck)  # old or new, never none
    want = load_file(tmp_path / survivor)
    got = d.state_to_save()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # the next save never deletes the only complete copy, and leaves exactly one checkpoint behind
    d.save_pretrained(ck)
    assert ck.is_dir() and not (tmp_path / "checkpoint.old").exists() and not (tmp_path / "checkpoint.tmp").exists()
    got = Clara.from_pretrained(ck).state_to_save()
    assert all(torch.equal(want[k], got[k]) for k in want)


FAST = ["--global-batch", "4", "--micro-batch", "2", "--doc-len", "32", "--compr-rate", "8", "--max-len", "160",
        "--lora-dropout", "0", "--log-every", "1", "--max-steps", "2", "--save-every", "1"]


def test_resume_after_a_kill_inside_the_resume_swap(tmp_path):
    """train.py killed in step 2's resume swap (only resume.old is left): --resume continues from step 1."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--stage", "1", "--out", str(out), *FAST],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CLARA_FAULT": "after_first_rename@resume"})
    assert r.returncode == 137, r.stderr[-2000:]
    assert not (out / "resume").exists() and (out / "resume.old").is_dir()
    assert json.loads((out / "checkpoint" / "clara_config.json").read_text())["step"] == 2  # swapped before
    assert json.loads((out / "resume.old" / "state.json").read_text())["position"]["step"] == 1
    train.main(["--stage", "1", "--out", str(out), *FAST, "--resume"])
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2]
    assert json.loads((out / "resume" / "state.json").read_text())["position"]["step"] == 2
    assert not (out / "resume.old").exists()


def test_a_full_disk_leaves_the_last_checkpoint(tiny_base, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError
    c = make(tiny_base)
    c.save_pretrained(tmp_path / "ck")
    before = {k: v.clone() for k, v in c.state_to_save().items()}  # (state_to_save shares the storage)

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with torch.no_grad():
        next(iter(c.model.adapter_parameters("decoder").values())).add_(1)
    with pytest.raises(OSError, match=r"ck: cannot save the checkpoint \(.*No space left on device.*untouched"):
        c.save_pretrained(tmp_path / "ck")
    assert not (tmp_path / "ck.tmp").exists()
    got = Clara.from_pretrained(tmp_path / "ck").state_to_save()
    assert all(torch.equal(before[k], got[k]) for k in before)


# ---- self-contained folders ---------------------------------------------------------------------------

def test_moved_checkpoints_load_with_the_same_outputs(tiny_base, tmp_path):
    # (1) a stage-1 checkpoint that carries its base (as train.py's from the shipped data/tiny); (2) a stage-2
    # checkpoint loaded from it
    c = make(tiny_base, stage=1)
    c.base_carried = True
    with torch.no_grad():
        for p in c.model.adapter_parameters("encoder").values():
            p.add_(0.01)
    c.save_pretrained(tmp_path / "s1")
    assert (tmp_path / "s1" / "base" / "model.safetensors").read_bytes() == (tiny_base / "model.safetensors").read_bytes()
    s2 = Clara.from_pretrained(tmp_path / "s1", training_stage=2)
    with torch.no_grad():
        for p in s2.model.adapter_parameters("decoder").values():
            p.add_(0.01)
    s2.save_pretrained(tmp_path / "s2")
    meta = json.loads((tmp_path / "s2" / "clara_config.json").read_text())
    assert meta["base_model"] == "base" and (tmp_path / "s2" / "base" / "model.safetensors").is_file()
    before = loss(s2)
    shutil.rmtree(tmp_path / "s1")  # stage 1 rerun or deleted: stage 2 does not depend on it
    shutil.move(tmp_path / "s2", tmp_path / "elsewhere")
    assert torch.equal(loss(Clara.from_pretrained(tmp_path / "elsewhere")), before)
    # (3) an external base is named by absolute path: a moved folder still finds it
    e = make(tiny_base)
    e.save_pretrained(tmp_path / "ext")
    before = loss(e)
    shutil.copytree(tmp_path / "ext", tmp_path / "copy")
    shutil.move(tmp_path / "ext", tmp_path / "moved")
    for p in ("copy", "moved"):
        assert torch.equal(loss(Clara.from_pretrained(tmp_path / p)), before)


def test_a_changed_or_other_base_is_an_error(tiny_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    make(base).save_pretrained(tmp_path / "ck")
    other = tmp_path / "other"
    shutil.copytree(tiny_base, other)
    sd = load_file(other / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] * 1.5  # same shapes, other weights
    save_file(sd, other / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: content differs.*not the base decoder"):
        Clara.from_pretrained(tmp_path / "ck", base_model=other)
    shutil.copy(other / "model.safetensors", base / "model.safetensors")  # the base changed in place
    with pytest.raises(ValueError, match=r"not the base decoder this checkpoint was trained on"):
        Clara.from_pretrained(tmp_path / "ck")


# ---- what a checkpoint must hold ------------------------------------------------------------------------

def unpinned(ck):
    """Drop the recorded file hashes, to reach the checks behind them (a checkpoint of an older version)."""
    meta = json.loads((ck / "clara_config.json").read_text())
    meta.pop("files_sha256")
    (ck / "clara_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("drop", ["added_embeddings", "added_lm_head", "layers.1.mlp.down.lora_B.encoder"])
def test_every_required_tensor_is_checked(tiny_base, tmp_path, drop):
    c = make(tiny_base)
    assert not c.model.cfg.tie_embeddings  # so added_lm_head is required
    c.save_pretrained(tmp_path / "ck")
    sd = load_file(tmp_path / "ck" / "clara.safetensors")
    sd.pop(drop)
    save_file(sd, tmp_path / "ck" / "clara.safetensors")
    with pytest.raises(ValueError, match="clara.safetensors: content differs"):  # the hash sees it first
        Clara.from_pretrained(tmp_path / "ck")
    unpinned(tmp_path / "ck")
    with pytest.raises(KeyError, match=f"no tensor '{drop}'"):
        Clara.from_pretrained(tmp_path / "ck")


def test_flipped_bytes_and_other_tokenizers_are_errors(tiny_base, tmp_path):
    c = make(tiny_base)
    c.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "clara.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40  # one bit of one weight: the file still parses
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="clara.safetensors: content differs"):
        Clara.from_pretrained(tmp_path / "ck")
    # another run's tokenizer of the same size: CLaRa's tokens and the vocabulary size match, the text does not
    c.save_pretrained(tmp_path / "ck")
    tok_json = json.loads((tmp_path / "ck" / "tokenizer.json").read_text())
    tok_json["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "ck" / "tokenizer.json").write_text(json.dumps(tok_json))
    with pytest.raises(ValueError, match="tokenizer.json: content differs"):
        Clara.from_pretrained(tmp_path / "ck")


# ---- the resume state -----------------------------------------------------------------------------------

def trainer(base, tmp_path, seed=0):
    c = make(base, stage=1, seed=seed)
    _, opt = adamw_steps(c, c.collate([{"data_type": "paraphrase", "question": [], "answers": ["Paris it is."],
                                        "docs": ["Paris is the capital of France."]}], stage=1), 1, lr=1e-3)
    return c, opt, SimpleNamespace(out=tmp_path, stage=1, defaults="official", run_record={})


def test_resume_state_round_trips_without_pickle(tiny_base, tmp_path):
    c, opt, a = trainer(tiny_base, tmp_path)
    train.save_all(c, opt, a, 7, {"epoch": 0}, 0)
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["state.json", "state.safetensors"]
    d, opt2, _ = trainer(tiny_base, tmp_path, seed=1)  # other values everywhere
    assert train.load_resume(d, opt2, a) == {"step": 7, "epoch": 0}
    for (k, p), q in zip(c.named_parameters(), d.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"][0]["lr"] == s2["param_groups"][0]["lr"]
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            assert torch.equal(v, s2["state"][i][k]), (i, k)


class Payload:
    """What a crafted pickle runs when it is unpickled: here, it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_resume_never_unpickles_a_folder_it_did_not_write(tiny_base, tmp_path):
    c, opt, a = trainer(tiny_base, tmp_path)
    marker = tmp_path / "ran"
    with pytest.raises(SystemExit, match="nothing to resume"):
        train.load_resume(c, opt, a)
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(SystemExit, match="neither state.json nor manifest.json: not a resume folder of this project"):
        train.load_resume(c, opt, a)
    # a manifest whose hashes do not match the files is refused before anything is read
    (tmp_path / "resume" / "manifest.json").write_text(json.dumps({
        "format": train.RESUME_DCP_FORMAT, "world_size": 2, "position": {"step": 1}, "sha256": {".metadata": "0" * 64}}))
    with pytest.raises(SystemExit, match=r"\.metadata: missing or altered"):
        train.load_resume(c, opt, a)
    (tmp_path / "resume" / "__0_0.distcp").write_bytes(b"x")  # a file the manifest does not list
    with pytest.raises(SystemExit, match="not those its manifest.json lists"):
        train.load_resume(c, opt, a)
    assert not marker.exists()
    # our own format, altered after the save
    shutil.rmtree(tmp_path / "resume")
    train.save_all(c, opt, a, 1, {"epoch": 0}, 0)
    f = tmp_path / "resume" / "state.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="state.safetensors: missing or altered"):
        train.load_resume(c, opt, a)

"""The shipped tiny base, data/tiny: what it is, where it came from, and that the embedded default
(`python train.py --stage 1`) trains the method's adapters on it, frozen, into a checkpoint that carries it."""
import hashlib
import json
import shlex
import shutil

import torch
from safetensors.torch import load_file

import train
from clara import Clara
from conftest import ROOT
from data import Tokenizer
from model import PRESETS, Transformer

TINY = ROOT / "data" / "tiny"
FAST = ["--global-batch", "4", "--micro-batch", "2", "--doc-len", "32", "--compr-rate", "8", "--max-len", "160",
        "--lora-dropout", "0", "--log-every", "1", "--device", "cpu"]


def test_the_shipped_base_loads_tied_small_and_of_the_tiny_shape():
    model = Transformer.from_pretrained(TINY, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(TINY)
    c = model.cfg
    assert c.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    assert c.vocab_size == tok.vocab_size and 900 <= c.vocab_size <= 1200
    shape = {k: v for k, v in PRESETS["tiny"].items() if k not in ("vocab_size", "dtype")}
    assert {k: getattr(c, k) for k in shape} == shape
    assert sum(f.stat().st_size for f in TINY.iterdir()) < 1_000_000


def test_its_provenance_names_the_command_and_the_shipped_data():
    prov = json.loads((TINY / "provenance.json").read_text())
    words = shlex.split(prov["command"])
    assert words[:2] == ["python", "lab/pretrain.py"] and words[words.index("--out") + 1] == "data/tiny"
    data = words[words.index("--data") + 1:words.index("--data") + 3]
    assert data == ["data/sample/stage1.jsonl", "data/sample/stage2.jsonl"]
    assert [d["path"] for d in prov["data"]] == data
    for d in prov["data"]:  # the sample data is still the data the base was trained on
        assert hashlib.sha256((ROOT / d["path"]).read_bytes()).hexdigest() == d["sha256"], d["path"]
    assert prov["final_loss"] == prov["loss_curve"][-1][1] and prov["steps"] == prov["loss_curve"][-1][0]
    assert len(prov["commit"].split("-")[0]) == 40
    assert prov["vocab_size"] == Tokenizer.from_pretrained(TINY).vocab_size


def test_stage1_trains_adapters_only_and_the_checkpoint_carries_the_base(tmp_path):
    out = tmp_path / "s1"
    train.main(["--stage", "1", "--out", str(out), *FAST, "--max-steps", "2", "--lr", "3e-3"])
    run = json.loads((out / "run.json").read_text())
    assert run["flags"]["model"] == "tiny" and run["flags"]["defaults"] == "tiny"
    ck = out / "checkpoint"
    meta = json.loads((ck / "clara_config.json").read_text())
    assert meta["base_model"] == "base" and meta["defaults"] == "tiny"
    for name in ("config.json", "tokenizer.json", "model.safetensors"):  # the base, copied exactly
        assert (ck / "base" / name).read_bytes() == (TINY / name).read_bytes(), name
    # the base weights are bitwise those of data/tiny after the steps; the adapters moved
    base = Transformer.from_pretrained(TINY, dtype=torch.float32)
    c = Clara.from_pretrained(ck, dtype=torch.float32)
    V0 = base.cfg.vocab_size
    trained = dict(c.model.named_parameters())
    for k, v in base.named_parameters():
        got = trained[k][:V0] if k in ("tok_embeddings.weight", "output.weight") else trained[k]
        assert torch.equal(got, v), k
    assert any(v.abs().sum() > 0 for k, v in c.model.adapter_parameters("decoder").items() if ".lora_B." in k)
    # the checkpoint holds exactly the trained tensors (the resume state is the optimizer's own copy)
    state = load_file(out / "resume" / "state.safetensors")
    params = dict(c.named_parameters())
    trainable = {k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")}
    assert trainable and all(torch.equal(params[k], v) for k, v in trainable.items())
    assert not any(k.startswith("model.") and "lora_" not in k for k in trainable)  # no base weight trains

    # moved anywhere, it reloads with identical outputs, without data/tiny
    batch = [json.loads(x) for x in open(ROOT / "data/sample/stage1.jsonl").readlines()[:2]]

    def outputs(clara):  # the stage-1 loss of two records: every layer, adapter and memory row in it
        clara.eval()
        with torch.no_grad():
            return clara.total_loss(clara.loss(clara.collate(batch, 1), 1))

    before = outputs(c)
    shutil.move(ck, tmp_path / "elsewhere")
    d = Clara.from_pretrained(tmp_path / "elsewhere", dtype=torch.float32)
    assert d.base_path == str(tmp_path / "elsewhere" / "base")
    assert torch.equal(outputs(d), before)
    # and a stage 2 from it carries the base on
    train.main(["--stage", "2", "--init", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "s2"), *FAST,
                "--max-steps", "1", "--max-len", "400", "--top-k", "1"])
    assert (tmp_path / "s2" / "checkpoint" / "base" / "model.safetensors").read_bytes() == \
        (TINY / "model.safetensors").read_bytes()


def test_the_shipped_base_by_path_is_the_same_default_family(tmp_path):
    a = train.parse_args(["--stage", "1", "--model", str(TINY), "--out", str(tmp_path / "o")])
    assert a.defaults == "tiny" and a.lr == train.TINY["lr"]

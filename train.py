"""One training loop for CLaRa's three stages; the stage picks the defaults, a loss and the trainable set.

    python train.py --stage 1                                  # the shipped tiny base + sample data, CPU, minutes
    torchrun --nproc_per_node=8 train.py --stage 1 --model /models/Mistral-7B-Instruct-v0.2 --data pretrain.jsonl
    torchrun --nproc_per_node=8 train.py --stage 2 --init out/stage1/checkpoint --data instruct.jsonl
    torchrun --nproc_per_node=8 train.py --stage 3 --init out/stage2/checkpoint --data e2e.jsonl
    train.py --stage 3 --retrieval-warmup ...                  # optional: InfoNCE on pos_index, query alone

The base decoder is a pretrained HF directory and stays frozen (the method's setting). `--model tiny`, the
embedded default, is the tiny base shipped in data/tiny (made by lab/pretrain.py from the sample data, see
its provenance.json); a checkpoint trained from it carries it in `checkpoint/base/`, so it loads from anywhere.

Distributed is detected from the environment (torchrun sets WORLD_SIZE): then FSDP2 shards every block and
the root (`fully_shard`, MixedPrecisionPolicy: bf16 parameters, fp32 gradient reduction), NCCL on GPU and
gloo on CPU. One process runs the same code without sharding.

The loop, main() near the end of this file, reads top to bottom: setup() builds a Run (data,
model, optimizer, resumed state), train_step() is one optimizer step, Log writes its step_record(),
save_all() writes the checkpoint and the resume state. batch_flops() is the one FLOP count behind
every MFU figure (docs/training.md#mfu).

The loss of one optimizer step is normalised by the number of target tokens of the WHOLE step (all
micro-batches of all ranks), so gradient accumulation and the world size do not change what is optimised.
Everything the step needs is drawn from (seed, step): data order, paraphrase templates, LoRA dropout; so a
resumed run ends with exactly the parameters of an uninterrupted one.

Outputs in --out: `checkpoint/` (the CLaRa checkpoint: Clara.from_pretrained, eval.py), `resume/` (trainable
state + optimizer state + data position: safetensors + JSON from one process, torch.distributed.checkpoint's
sharded format + a manifest of sha256 from several ranks; see save_all), `metrics.jsonl`, `run.json` (the
flags the run computes with: --resume restores them and refuses a change). Every directory is replaced
atomically: a crash while saving leaves the previous one intact. metrics.jsonl is the curve of the checkpoint
beside it: a fresh run replaces it at its first save (a --resume keeps the lines up to its step). An --out
holding files this project did not write is refused unless --overwrite.

Expected errors (a bad flag, file, folder or record, non-finite weights, a full disk) end the command line
with one line `train.py: error: ...` and exit 2, before anything in --out is changed or with what was saved
before intact.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from clara import (LOAD_ERRORS, SAVE_ERRORS, Batch, Clara, ClaraConfig, checkpoint_dir,
                   complete_dir, error_line, replace_dir, weight_hashes)
from data import DataError, JsonlDataset, Tokenizer, batches
from model import LoRAConfig, ModelConfig, Transformer
from topk import recall_at_k

ROOT = Path(__file__).resolve().parent
# `--model tiny`: the tiny pretrained base shipped with the repository (lab/pretrain.py on data/sample).
TINY_BASE = ROOT / "data" / "tiny"

# Official hyper-parameters (docs/method.md#stages); every one can be overridden on the command line.
STAGES = {
    1: dict(lr=1e-4, min_lr=1e-5, schedule="cosine", warmup=0.03, global_batch=128, micro_batch=2, max_len=2048,
            doc_len=256, compr_rate=32, top_k=1, tau=0.02, epochs=1, mse_weight=0.1),
    2: dict(lr=1e-4, min_lr=1e-5, schedule="cosine", warmup=0.03, global_batch=128, micro_batch=2, max_len=2048,
            doc_len=256, compr_rate=32, top_k=5, tau=0.02, epochs=1, mse_weight=0.1),
    3: dict(lr=5e-6, min_lr=5e-6, schedule="constant", warmup=0.0, global_batch=32, micro_batch=2, max_len=1024,
            doc_len=256, compr_rate=32, top_k=5, tau=0.02, epochs=1, mse_weight=0.0),
}
# The embedded default: the shipped tiny base (data/tiny) on the shipped sample data, sized for a laptop CPU.
TINY = dict(lr=2e-3, min_lr=2e-4, warmup=0.05, global_batch=8, micro_batch=4, max_len=256, doc_len=64,
            compr_rate=8, top_k=2, epochs=10, lora_r=16, lora_alpha=32)


class UsageError(SystemExit):
    """An expected error (a bad flag, file, folder or record, a full disk): at the command line one line
    `train.py: error: <message>` and exit 2, no traceback. A SystemExit, so that no `except Exception` on the
    way swallows it and Python called from code still stops with the message; real bugs keep their tracebacks."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (a bad type, a missing --stage): one line, like ours
        raise UsageError(message)


LORA_DEFAULTS = dict(lora_r=16, lora_alpha=32.0, lora_dropout=0.1)  # every stage, official and tiny


def stage_defaults(name: str) -> str:
    """A hyper-parameter's real defaults for --help: per stage where they differ, and the tiny base's (TINY)."""
    official = [(s, {**STAGES[s], **LORA_DEFAULTS}.get(name)) for s in (1, 2, 3)]
    values = {v for _, v in official}
    text = f"{official[0][1]}" if len(values) == 1 else ", ".join(f"stage {s} {v}" for s, v in official)
    tiny = {**LORA_DEFAULTS, **TINY}.get(name)
    if tiny is not None and tiny not in values | {None}:
        text += f"; --model tiny: {tiny}"
    return text


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None (those flags say their defaults in their help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def make_parser() -> Parser:
    p = Parser(prog="train.py", description=__doc__.split("\n")[0], formatter_class=DefaultsFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--stage", type=int, choices=(0, 1, 2, 3), required=True,
                   help="1 compression pretraining, 2 instruction tuning, 3 end-to-end retrieval + generation "
                        "(0, pretraining a base from random weights, is not CLaRa: python lab/pretrain.py)")
    g.add_argument("--model", default="tiny", help="a fresh run's base: an HF model directory (Mistral/Llama/Qwen), or "
                   "tiny: the tiny pretrained base shipped in data/tiny (with --init the base is the checkpoint's)")
    g.add_argument("--data", nargs="+", default=None, help="JSONL file(s) in the official format of the stage "
                   "(default: data/sample/stage{N}.jsonl)")
    g.add_argument("--out", default=None, help="output directory (default: out/stage{N}); a folder holding files "
                   "this project did not write is refused (see --overwrite)")
    g.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files: they are "
                   "kept, only this project's names (checkpoint/, resume/, metrics.jsonl, run.json) are replaced")
    g.add_argument("--init", default=None, help="previous stage's checkpoint (stage 2 from 1, stage 3 from 2), or "
                   "the run folder holding it; its base, LoRA rank, document length and compression rate carry over")
    g.add_argument("--base-model", default=None, help="with --init: the base decoder directory, overriding the one "
                   "the checkpoint names (an official release names a hub model; this project never downloads)")
    g.add_argument("--chat-format", default=None, choices=("mistral", "chatml", "llama3"),
                   help="the base model's chat format (default: recognised from its tokenizer_config.json "
                        "chat_template; a checkpoint keeps the one it was trained with)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/resume exactly where it stopped, with "
                   "the flags recorded in OUT/run.json (a flag that would change the result is refused). Trust: "
                   "resume only from a folder your own runs wrote; a one-process resume folder holds no pickle, a "
                   "multi-rank one is torch.distributed.checkpoint's (its .metadata is a pickle) and is read only "
                   "after the sha256 of every file matches its manifest.json")
    g = p.add_argument_group("hyper-parameters (default: the official value of the stage, or TINY for --model "
                             "tiny and the checkpoints trained from it; with --init, LoRA and document shape "
                             "from the checkpoint)")
    for name, typ, hlp in [("lr", float, "peak learning rate"), ("min_lr", float, "final learning rate of the cosine"),
                           ("schedule", str, "cosine (warmup + cosine to min_lr) or constant"),
                           ("warmup", float, "warmup as a fraction of the total steps"),
                           ("global_batch", int, "examples per optimizer step, all ranks together"),
                           ("micro_batch", int, "examples per forward pass on one rank"),
                           ("max_len", int, "decoder tokens per example (cut on the right)"),
                           ("doc_len", int, "document tokens before compression (doc_max_length)"),
                           ("compr_rate", int, "compression rate: doc_len / compr_rate memory tokens per document"),
                           ("top_k", int, "documents per prompt (stage 3: selected among the candidates)"),
                           ("tau", float, "temperature of the differentiable top-k"),
                           ("epochs", int, "passes over the data"),
                           ("mse_weight", float, "weight of the compression alignment loss"),
                           ("lora_r", int, "LoRA rank"), ("lora_alpha", float, "LoRA alpha (scale alpha / r)"),
                           ("lora_dropout", float, "dropout on the LoRA input")]:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"{hlp} (default: {stage_defaults(name)})",
                       **({"choices": ("cosine", "constant")} if name == "schedule" else {}))
    g.add_argument("--candidates", type=int, default=None, help="stage 3: required number of candidates per question "
                   "(default: whatever the data holds, equal within a batch)")
    g.add_argument("--retrieval-warmup", action="store_true",
                   help="stage 3: the official optional warm-up (stage2_pretrain_retrieval) instead of end-to-end "
                   "training: only the query reasoner trains, with multi-positive InfoNCE at --tau over the cosine "
                   "scores, supervised by every record's pos_index; its checkpoint can --init a stage-3 run")
    g.add_argument("--topk-estimator", default="straight_through", choices=("straight_through", "gumbel", "soft"),
                   help="stage 3 top-k gradient estimator (topk.py)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    g = p.add_argument_group("run")
    g.add_argument("--max-steps", type=int, default=None, help="total optimizer steps (default: epochs over the data)")
    g.add_argument("--stop-after", type=int, default=None, help="stop this run after N steps, as if killed "
                   "(the schedule still spans --max-steps; continue with --resume)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="weights/compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, templates, dropout, adapter weights")
    g.add_argument("--save-every", type=int, default=0, help="save checkpoint + resume state every N steps (0: end only)")
    g.add_argument("--log-every", type=int, default=10, help="log (print and metrics.jsonl) every N steps")
    g.add_argument("--check-limit", type=int, default=200_000, help="validate every record before training "
                   "when the data has at most this many (larger data is validated as it is read)")
    return p


# Flags a --resume may change: they decide where and how often things are written or how the work is
# scheduled, never what is computed (restored when not given). Every other recorded flag must stay as the
# run started. NOT_RESTORED: this invocation's own (a --stop-after 3 run resumed without it runs to the end).
RESUME_MAY_CHANGE = {"resume", "stop_after", "save_every", "log_every", "device", "activation_checkpointing",
                     "check_limit", "out", "overwrite"}
NOT_RESTORED = {"resume", "stop_after", "out", "overwrite"}
# Numeric flags and what they must be; checked on the resolved values, so a default (TINY's too) passes too.
POSITIVE_INT = ("global_batch", "micro_batch", "max_len", "doc_len", "compr_rate", "top_k", "epochs", "lora_r",
                "max_steps", "stop_after", "log_every", "candidates")
NON_NEGATIVE_INT = ("save_every", "check_limit", "seed")
POSITIVE_FLOAT = ("lr", "tau", "lora_alpha", "grad_clip")
NON_NEGATIVE_FLOAT = ("min_lr", "mse_weight", "weight_decay")
UNIT_FLOAT = ("warmup", "lora_dropout")  # in [0, 1)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_numbers(a):
    """Every numeric flag in its range, one message naming the flag (never a traceback or a silent default)."""
    for k in POSITIVE_INT + NON_NEGATIVE_INT:
        v = getattr(a, k)
        if v is not None and (v < 1 if k in POSITIVE_INT else v < 0):
            raise UsageError(f"{flag(k)} {v}: must be {'> 0' if k in POSITIVE_INT else '>= 0'}")
    for k in POSITIVE_FLOAT + NON_NEGATIVE_FLOAT + UNIT_FLOAT:
        v = getattr(a, k)
        ok = math.isfinite(v) and (v > 0 if k in POSITIVE_FLOAT else 0 <= v < 1 if k in UNIT_FLOAT else v >= 0)
        if not ok:
            want = "> 0" if k in POSITIVE_FLOAT else "in [0, 1)" if k in UNIT_FLOAT else ">= 0"
            raise UsageError(f"{flag(k)} {v}: must be a finite number {want}")
    if a.global_batch % a.micro_batch:
        raise UsageError(f"--global-batch {a.global_batch} is not a multiple of --micro-batch {a.micro_batch}")
    if a.doc_len < a.compr_rate:
        raise UsageError(f"--doc-len {a.doc_len} / --compr-rate {a.compr_rate} leaves no memory token")


def read_checkpoint_info(path: str) -> tuple[Path, dict]:
    """What a run from --init inherits, read from the checkpoint's config without loading any tensor:
    {"lora_r", "lora_alpha", "lora_dropout", "doc_len", "compr_rate", "defaults"}; "defaults" is "tiny" for
    a checkpoint trained from the tiny base (its hyper-parameter family carries over), else "official"."""
    try:
        ck = checkpoint_dir(path)
    except FileNotFoundError as e:
        raise UsageError(f"--init {e}") from None
    if ck != Path(path):
        print0(f"--init {path}: a run folder; using its checkpoint {ck}")
    native = (ck / "clara_config.json").is_file()
    cfg_file = ck / ("clara_config.json" if native else "config.json")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
        if native:
            c = meta["clara"]
            # a checkpoint written before "defaults" was recorded: one that carries its own base was trained
            # from a tiny preset base (then the only base a checkpoint carried)
            family = meta.get("defaults") or ("tiny" if meta.get("base_model") == "base" else "official")
            info = dict(lora_r=c["lora_r"], lora_alpha=c["lora_alpha"], lora_dropout=c["lora_dropout"],
                        doc_len=c["doc_max_length"], compr_rate=c["compr_rate"], defaults=family)
        else:  # an official release folder (clara._load_official: alpha = 2r, dropout the config's default)
            r = meta.get("lora_r", 16)
            info = dict(lora_r=r, lora_alpha=2 * r, lora_dropout=ClaraConfig.lora_dropout,
                        doc_len=meta["doc_max_length"], compr_rate=meta["compr_rate"], defaults="official")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--init {cfg_file}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--init {cfg_file}: not valid JSON ({e})") from None
    except (KeyError, TypeError) as e:
        raise UsageError(f"--init {cfg_file}: missing or malformed entry {e}") from None
    return ck, info


def read_run(out: Path) -> dict:
    path = out / "run.json"
    if not path.is_file():
        what = "no saved state at all" if not (out / "resume").exists() else "resume state but no run.json"
        raise UsageError(f"--resume: {out} holds {what}; nothing to resume (start a fresh run without --resume)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        run["flags"].items(), run["explicit"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--resume: {path} is not a run record of this project ({e})") from None
    return run


def comparable(k: str, v):
    """A flag's value as recorded and compared: paths absolute (a resumed run may start from another cwd)."""
    if v is None or k not in ("data", "init", "base_model", "model"):
        return v
    if k == "model" and v == "tiny":
        return v
    if k == "init":  # a run folder and its checkpoint/ are the same --init
        try:
            v = checkpoint_dir(v)
        except FileNotFoundError:
            pass
    return [str(Path(x).resolve()) for x in v] if k == "data" else str(Path(v).resolve())


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    # Which flags were given: the same parse with every default suppressed.
    q = make_parser()
    for action in q._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(q.parse_args(argv)))
    if args.stage == 0:
        raise UsageError("--stage 0: pretraining a base from random weights is not CLaRa and is no longer part of "
                         "train.py: python lab/pretrain.py --data TEXT... --out DIR, then train.py --model DIR")
    args.out = Path(args.out or f"out/stage{args.stage}")
    if args.resume:
        restore_run(args, given)
    else:
        resolve_defaults(args, p, given)
    check_numbers(args)
    return args


def restore_run(args, given: set):
    """--resume: every flag as recorded in OUT/run.json; one given again with another value is refused."""
    run = read_run(args.out)
    if run.get("stage") != args.stage:
        raise UsageError(f"--stage {args.stage}: the run in {args.out} is stage {run.get('stage')} (run.json)")
    for k, v in run["flags"].items():
        if k in NOT_RESTORED or (k in RESUME_MAY_CHANGE and k in given):
            continue
        if k in given and comparable(k, getattr(args, k)) != v:
            raise UsageError(f"{flag(k)} {getattr(args, k)}: the run in {args.out} was started with {flag(k)} {v} "
                             f"(run.json); --resume continues it unchanged (drop the flag, or start a fresh run in "
                             f"another --out)")
        setattr(args, k, v)
    args.explicit = set(run["explicit"])


def resolve_defaults(args, p, given: set):
    """Fill every unset hyper-parameter. The family of defaults follows what is trained: the shipped tiny base
    (a laptop CPU) gets TINY, any other model the official values of the stage, and a run from --init the
    family of the checkpoint it starts from, whatever --model says by default. With --init, the LoRA shape
    and options and the document shape default to the checkpoint's."""
    if args.init and "model" in given:
        p.error("--model names the base of a fresh run; with --init the base is the checkpoint's "
                "(--base-model DIR reads it from another folder)")
    if args.base_model and not args.init:
        p.error("--base-model overrides the base of an --init checkpoint; a fresh run takes --model DIR")
    if args.base_model and not Path(args.base_model).is_dir():
        p.error(f"--base-model {args.base_model}: not a directory")
    if args.chat_format and args.init:
        p.error("--chat-format chooses a base model's format; a checkpoint (--init) keeps the one it was trained with")
    if args.retrieval_warmup and args.stage != 3:
        p.error(f"--retrieval-warmup trains stage 3's query reasoner; it cannot run with --stage {args.stage}")
    inherited = {}
    if args.init:
        ck, inherited = read_checkpoint_info(args.init)
        args.init = str(ck)
        family = inherited.pop("defaults")
        for k, v in inherited.items():  # what a checkpoint's adapters and memory slots cannot change
            if k in ("lora_r", "doc_len", "compr_rate") and k in given and getattr(args, k) != v:
                raise UsageError(f"{flag(k)} {getattr(args, k)}: {ck} was trained with {flag(k)} {v}, which a run "
                                 f"from it cannot change (drop the flag)")
    else:
        family = "tiny" if args.model == "tiny" or Path(args.model).resolve() == TINY_BASE else "official"
    args.defaults = family
    args.data = args.data or [str(ROOT / f"data/sample/stage{args.stage}.jsonl")]
    values = STAGES[args.stage] | (TINY if family == "tiny" else {})
    args.explicit = {k for k in given if getattr(args, k, None) is not None}
    for k, v in (values | LORA_DEFAULTS | inherited).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def run_record(a, argv) -> dict:
    """OUT/run.json: the flags this run computes with (resolved, defaults included) and those given."""
    flags = {k: comparable(k, v) for k, v in vars(a).items() if k not in ("explicit", "out")}
    return {"stage": a.stage, "argv": list(sys.argv[1:] if argv is None else argv), "flags": flags,
            "explicit": sorted(a.explicit)}


# ----------------------------------------------------------------------------------------------------

def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def lr_at(step: int, total: int, a) -> float:
    """Linear warmup then cosine to min_lr (stages 1, 2), or constant (stage 3)."""
    if a.schedule == "constant":
        return a.lr
    warm = max(1, int(a.warmup * total)) if a.warmup > 0 else 0
    if step < warm:
        return a.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_clara(a, dataset, device, dtype, rank) -> Clara:
    """Stage 1: fresh adapters on the base. Stage 2: from stage 1 with a fresh decoder (or from a stage-2
    checkpoint, its own decoder: e.g. k=1 then k=2). Stage 3: from stage 2, the query reasoner a copy of the
    encoder (or from a stage-3 checkpoint, its own query reasoner). A broken --model or --init folder is a
    UsageError naming it."""
    cfg = ClaraConfig(doc_max_length=a.doc_len, compr_rate=a.compr_rate, generation_top_k=a.top_k,
                      lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, tau=a.tau,
                      topk_estimator=a.topk_estimator, mse_weight=a.mse_weight, max_len=a.max_len,
                      training_stage=a.stage)
    if a.init:
        try:
            clara = Clara.from_pretrained(a.init, base_model=a.base_model, dtype=dtype, device=device,
                                          training_stage=a.stage, compr_rate=a.compr_rate)
        except LOAD_ERRORS as e:
            hint = " (train.py: --base-model DIR)" if "base_model=DIR" in str(e) else ""
            raise UsageError(f"--init {a.init}: cannot load the checkpoint: {error_line(e)}{hint}") from None
        trained = clara.cfg
        for k in ("generation_top_k", "tau", "topk_estimator", "mse_weight", "max_len"):
            setattr(trained, k, getattr(cfg, k))
        if a.stage == 2 and clara.loaded_stage == 2:  # a stage-2 checkpoint: continue with its decoder
            print0(f"stage 2: {a.init} is a stage-2 checkpoint; training continues with its decoder")
        elif a.stage == 2:
            torch.manual_seed(a.seed)  # the fresh adapter's A from --seed (torch's seed is random)
            clara.model.reset_adapter("decoder")  # stage 2 trains a FRESH decoder adapter
        if a.stage == 3 and "query" in clara.loaded_adapters:  # a stage-3 checkpoint: continue from its query
            print0(f"stage 3: {a.init} has a trained query reasoner; training continues from it")
        elif a.stage == 3:
            clara.model.copy_adapter("encoder", "query")
        set_lora(clara, a)
        return clara
    base = TINY_BASE if a.model == "tiny" else Path(a.model)
    if a.stage in (2, 3):
        print(f"warning: --stage {a.stage} without --init starts from the bare base {base} with fresh "
              f"adapters, not from a stage-{a.stage - 1} checkpoint (--init OUT/checkpoint)",
              file=sys.stderr, flush=True)
    torch.manual_seed(a.seed)  # adapter initialisation
    try:
        model = Transformer.from_pretrained(base, dtype=dtype, device=device)
        tok = Tokenizer.from_pretrained(base, chat_format=a.chat_format)
    except LOAD_ERRORS as e:
        raise UsageError(f"--model {a.model}: cannot load the base model: {error_line(e)}") from None
    clara = Clara(model, tok, cfg, base_path=str(base))
    # The shipped tiny base (under 1 MB) travels inside every checkpoint trained from it (`checkpoint/base/`):
    # the checkpoint then loads from any folder or machine, whatever becomes of this clone's data/tiny.
    clara.base_carried = base.resolve() == TINY_BASE
    if clara.base_carried:  # pinned now: a data/tiny rewritten during the run is refused at the save
        clara.base_sha256 = weight_hashes(base)
    return clara


def set_lora(clara: Clara, a):
    """The LoRA options of this run on every adapter, the loaded ones too: each LoRALinear reads its own
    per-adapter LoRAConfig, so the checkpoint's values would otherwise stay in force while the new checkpoint
    recorded ours. One config per model, as a checkpoint records one. The rank is the tensors' shape: fixed."""
    for name, old in list(clara.model.adapters.items()):
        if old.rank != a.lora_r:
            raise UsageError(f"--lora-r {a.lora_r}: the {name} adapter of {a.init} has rank {old.rank}, which "
                             "a run from it cannot change")
        new = LoRAConfig(rank=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout)
        clara.model.adapters[name] = new
        for m in clara.model.lora_layers():
            m.lora[name] = new
    clara.cfg.lora_r, clara.cfg.lora_alpha, clara.cfg.lora_dropout = a.lora_r, a.lora_alpha, a.lora_dropout


def shard(clara: Clara, dtype, device):
    """FSDP2: each block, then the root (embeddings, norm, lm_head, <MEMi> rows)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in clara.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(clara, mp_policy=mp)
    return clara


RESUME_FORMAT = "clara-resume-1"          # one process: state.safetensors + state.json, no pickle anywhere
RESUME_DCP_FORMAT = "clara-resume-dcp-1"  # several ranks: torch.distributed.checkpoint + manifest.json


def _resume_state(clara, opt):
    """{"model": trainable tensors, "optim": optimizer state}, keyed by parameter name (get_state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(clara, opt)
    trainable = {n for n, p in clara.named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in model_sd.items() if k in trainable}, "optim": optim_sd}


def _flatten_resume(sd: dict) -> tuple[dict, dict]:
    """The resume state as (tensors for safetensors, everything else for JSON). Keys: "model/NAME" and
    "optim/NAME/STATE" (parameter names hold dots, never slashes)."""
    tensors, scalars = {}, {}
    for k, v in sd["model"].items():
        tensors[f"model/{k}"] = v.detach().contiguous().cpu()
    for name, st in sd["optim"]["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{name}/{key}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = v
    return tensors, {"param_groups": sd["optim"]["param_groups"], "scalars": scalars}


def save_all(clara, opt, a, step, position, rank):
    """The CLaRa checkpoint (rank 0 writes, all ranks gather), the resumable state, then OUT/run.json.

    One process writes `resume/state.safetensors` (trainable tensors and optimizer state) and
    `resume/state.json` (data position, param groups, their sha256): nothing a reader unpickles. Several
    ranks write torch.distributed.checkpoint's sharded format (its `.metadata` is a pickle) and rank 0 adds
    `manifest.json` with the sha256 of every file, which load_resume checks before reading anything.
    A failure to write (a full disk) is a UsageError saying that what was saved before is intact (each
    directory is swapped in whole, clara.replace_dir); the half-written temporary copy is removed.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from clara import file_sha256
    extra = {"step": step, "stage": a.stage, "defaults": a.defaults}  # defaults: what a run from it inherits
    state = clara.state_to_save()  # a collective under FSDP: every rank
    resume, tmp = a.out / "resume", a.out / "resume.tmp"
    position = {"step": step, **position}
    try:
        if rank == 0:
            clara.save_pretrained(a.out / "checkpoint", extra=extra, state=state)
        sd = _resume_state(clara, opt)
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        if not dist.is_initialized():
            tmp.mkdir(parents=True)
            tensors, rest = _flatten_resume(sd)
            save_file(tensors, tmp / "state.safetensors")
            meta = {"format": RESUME_FORMAT, "world_size": 1, "position": position, **rest,
                    "sha256": {"state.safetensors": file_sha256(tmp / "state.safetensors")}}
            (tmp / "state.json").write_text(json.dumps(meta, indent=1))
            replace_dir(tmp, resume)
            write_json(a.out / "run.json", a.run_record)
            return
        dist.barrier()
        dcp.save(sd, checkpoint_id=str(tmp))
        dist.barrier()
        if rank == 0:
            files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
            manifest = {"format": RESUME_DCP_FORMAT, "world_size": dist.get_world_size(), "position": position,
                        "sha256": {f: file_sha256(tmp / f) for f in files}}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            replace_dir(tmp, resume)
            write_json(a.out / "run.json", a.run_record)
    except SAVE_ERRORS as e:
        if rank == 0:
            for t in (a.out / "checkpoint.tmp", tmp, a.out / "run.json.tmp"):
                shutil.rmtree(t, ignore_errors=True) if t.is_dir() else t.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else error_line(e)
        raise UsageError(f"step {step}: saving to {a.out} failed: {reason}; what was saved before this step is "
                         f"intact (free some space, then continue with --resume)") from None
    dist.barrier()


def write_json(path: Path, obj):
    """Written whole or not at all: a temporary sibling, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class Metrics:
    """metrics.jsonl, one JSON line per logged step, always the curve of the checkpoint in --out.

    A fresh run logs into metrics.jsonl.tmp until its first save, which renames it over metrics.jsonl: a run
    that fails before saving anything leaves the previous run's curve (and checkpoint) as they were, and a
    second run into the same --out never mixes its curve into the first's. A resumed run keeps the lines up
    to the step it resumes from and drops any logged after that save by the interrupted run, so the file
    reads as one uninterrupted run."""

    def __init__(self, out: Path, resumed_step: int | None):
        self.path = out / "metrics.jsonl"
        self.pending = resumed_step is None
        if self.pending:
            self.current = out / "metrics.jsonl.tmp"
            self.f = open(self.current, "w")
            return
        keep = []
        if self.path.exists():
            for line in self.path.read_text().splitlines(keepends=True):
                try:
                    if json.loads(line).get("step", 0) <= resumed_step:
                        keep.append(line)
                except (ValueError, AttributeError):  # a line cut by the kill, or not ours: dropped
                    pass
        tmp = out / "metrics.jsonl.tmp"
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)
        self.current = self.path
        self.f = open(self.path, "a")

    def write(self, rec: dict):
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def saved(self):
        """The run's state is now the one in --out: its curve becomes metrics.jsonl."""
        if self.pending:
            self.f.close()
            os.replace(self.current, self.path)
            self.current, self.pending = self.path, False
            self.f = open(self.path, "a")

    def close(self):
        self.f.close()


def open_metrics(out: Path, resumed_step: int | None) -> Metrics:
    return Metrics(out, resumed_step)


# What this project writes into --out (train.py, clara.save_pretrained, clara.replace_dir): an --out holding
# anything else is a user's folder, refused without --overwrite and never cleaned.
OURS = {"checkpoint", "checkpoint.tmp", "checkpoint.old", "resume", "resume.tmp", "resume.old",
        "metrics.jsonl", "metrics.jsonl.tmp", "run.json", "run.json.tmp"}
MARKERS = {"checkpoint": "clara_config.json", "checkpoint.old": "clara_config.json",
           "resume": ("state.json", "manifest.json"), "resume.old": ("state.json", "manifest.json")}


def marker_files(name: str) -> tuple[str, ...]:
    """The files one of which marks `name` in --out as written by this project."""
    m = MARKERS[name]
    return m if isinstance(m, tuple) else (m,)


def metrics_lines(path: Path) -> bool:
    """Whether a file reads as our metrics.jsonl: JSON objects with a "step", one a line."""
    try:
        with open(path, encoding="utf-8") as f:
            return all(isinstance(r := json.loads(line), dict) and "step" in r for line in f if line.strip())
    except (OSError, ValueError):
        return False


def check_out(a):
    """Refuse an --out that this project did not write (before anything is written into it)."""
    out = a.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if not out.exists() or a.overwrite:
        return
    names = sorted(q.name for q in out.iterdir())
    foreign = [n for n in names if n not in OURS]
    if not (out / "run.json").is_file():  # no record of a run: each of our names must look like ours
        foreign += [n for n in names if n in MARKERS and not any((out / n / f).is_file() for f in marker_files(n))]
        if "metrics.jsonl" in names and not metrics_lines(out / "metrics.jsonl"):
            foreign.append("metrics.jsonl")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(f"--out {out} holds files this project did not write ({shown}); nothing was changed: "
                         "choose a new or empty folder, or pass --overwrite to write into it (its other files are "
                         "kept; checkpoint/, resume/, metrics.jsonl and run.json are replaced)")


def check_warmup(records: list[dict], a) -> list[dict]:
    """--retrieval-warmup is supervised: every record must name its positive documents."""
    if a.retrieval_warmup:
        for r in records:
            if not r.get("pos_index"):
                raise UsageError(f"{r['_where']}: --retrieval-warmup needs a non-empty 'pos_index' (the positive "
                                 f"documents) in every record")
    return records


def _resume_meta(resume: Path, name: str, fmt: str) -> dict:
    """state.json / manifest.json: a JSON object of format `fmt` whose every listed file (and, for the
    sharded format, no other file) has its recorded sha256."""
    from clara import file_sha256
    file = resume / name
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SystemExit(f"--resume: {file}: cannot be read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or not isinstance(meta.get("sha256"), dict) \
            or not isinstance(meta.get("position"), dict) or not isinstance(meta["position"].get("step"), int):
        raise SystemExit(f"--resume: {file}: not a resume file of this project (expected format {fmt!r} with "
                         "sha256 and position)")
    present = {str(f.relative_to(resume)) for f in resume.rglob("*") if f.is_file()} - {name}
    listed = set(map(str, meta["sha256"]))
    if fmt == RESUME_DCP_FORMAT and present != listed:
        raise SystemExit(f"--resume: {resume}: files {sorted(present ^ listed)[:3]} are not those its manifest.json "
                         "lists; refusing to read a folder this project did not write")
    for f in sorted(listed):
        if not (resume / f).is_file() or file_sha256(resume / f) != meta["sha256"][f]:
            raise SystemExit(f"--resume: {resume / f}: missing or altered since it was saved (sha256 differs from "
                             f"{name}); refusing to resume from it")
    return meta


def load_resume(clara, opt, a) -> dict:
    """Restore the trainable tensors and the optimizer state written by save_all; returns the data position.

    Trust boundary: only a folder this project wrote is read. The one-process format holds no pickle
    (safetensors + JSON). The sharded format is read by torch.distributed.checkpoint, whose `.metadata`
    is a pickle: it is read only after manifest.json's hashes match every file, which proves the folder
    is complete and unaltered since that manifest was written, not who wrote it: resume only from your own
    runs' folders. Every problem is one line (SystemExit) naming the file.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict, StateDictOptions
    from clara import complete_dir
    resume = complete_dir(a.out / "resume")
    if not resume.is_dir():
        raise SystemExit(f"--resume: {resume} does not exist: nothing to resume (a run saves it every "
                         "--save-every steps and at its end; start without --resume)")
    sd = _resume_state(clara, opt)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if (resume / "state.json").exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        meta = _resume_meta(resume, "state.json", RESUME_FORMAT)
        if world != 1:
            raise SystemExit(f"--resume: {resume} was written by one process; resume it with one process "
                             f"(this run has {world} ranks)")
        try:
            tensors = load_file(resume / "state.safetensors")
        except (SafetensorError, OSError) as e:
            raise SystemExit(f"--resume: {resume / 'state.safetensors'}: cannot be read ({e})") from None
        want, _ = _flatten_resume(sd)
        missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        if missing or unexpected:
            raise SystemExit(f"--resume: {resume / 'state.safetensors'} holds the state of other trainable parameters "
                             f"(missing {missing[:2]}, unexpected {unexpected[:2]}): resume with the flags of the run "
                             "that wrote it (--stage, --init, --retrieval-warmup)")
        for k, v in want.items():
            if tensors[k].shape != v.shape or tensors[k].dtype != v.dtype:
                raise SystemExit(f"--resume: {resume / 'state.safetensors'}: tensor {k!r} is {tuple(tensors[k].shape)} "
                                 f"{tensors[k].dtype}, this run has {tuple(v.shape)} {v.dtype}: resume with the flags "
                                 "of the run that wrote it")
        groups = meta.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(sd["optim"]["param_groups"]) or any(
                not isinstance(g, dict) or g.get("params") != h["params"]
                for g, h in zip(groups, sd["optim"]["param_groups"])):
            raise SystemExit(f"--resume: {resume / 'state.json'}: its optimizer parameter groups are not this run's")
        state = {}
        for name in sd["optim"]["state"]:
            state[name] = dict(meta.get("scalars", {}).get(name, {}))
            for k in want:
                if k.startswith(f"optim/{name}/"):
                    state[name][k[len(f"optim/{name}/"):]] = tensors[k]
        sd = {"model": {k: tensors[f"model/{k}"] for k in sd["model"]},
              "optim": {"state": state, "param_groups": groups}}
    elif (resume / "manifest.json").exists():
        meta = _resume_meta(resume, "manifest.json", RESUME_DCP_FORMAT)  # every hash checked BEFORE dcp.load
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=str(resume))
    else:
        raise SystemExit(f"--resume: {resume} holds neither state.json nor manifest.json: not a resume folder of "
                         "this project; refusing to read it (torch.distributed.checkpoint's .metadata is a pickle)")
    set_state_dict(clara, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=StateDictOptions(strict=False))
    return meta["position"]


# ----------------------------------------------------------------------------------------------------
# FLOPs and MFU: one count for train.py's metrics, bench/bench_train.py and bench/gpu_check.py
# (docs/training.md#mfu)

PEAK_BF16 = 989e12  # FLOP/s of one H100/H200 SXM, dense bf16: the MFU denominator on a GPU


def block_linears(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of the seven projections of one block, in order q, k, v, o, gate, up, down."""
    H, inner = cfg.dim, cfg.intermediate_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return [(H, q), (H, kv), (H, kv), (q, H), (H, inner), (H, inner), (inner, H)]


def causal_pairs(n: torch.Tensor, window: int | None) -> int:
    """The (query, key) pairs causal attention computes for rows of n real tokens: token i sees
    min(i + 1, window) keys, so a row holds n(n+1)/2 pairs, or w(w+1)/2 + (n - w) w past the
    window w."""
    n = n.long()  # (rows,)
    if window is None:
        return int((n * (n + 1) // 2).sum())
    w = torch.clamp(n, max=window)  # (rows,)
    return int((w * (w + 1) // 2 + (n - w) * window).sum())


def pass_flops(cfg: ModelConfig, lora_rank: int, mask: torch.Tensor, trains: bool,
               input_grad: bool = True, targets: int = 0) -> int:
    """Matmul FLOPs of one pass of the decoder stack (one LoRA adapter active) over padded rows.

    mask (rows, T): 1 = a real token; padding is not useful work and is not counted. Summed over the
    layers, P = the projections' base weights (in * out each), R = one adapter's (r * (in + out)):

      per real token   forward                    2 (P + R)
                       backward (trains=True)     2 (P + R)  input gradients: a frozen weight still
                                                             passes the gradient down
                                                + 2 R        the adapter's A and B gradients
      per causal pair  forward                    4 D Hq     QK^T and PV, in every layer
      of real tokens   backward (trains=True)     8 D Hq     dQ, dK, dV and dP
      per target       forward                    2 V H      the output layer runs only there
                       backward (trains=True)     2 V H      (Clara.decoder_ce_sum)

    input_grad=False: the pass's input embeddings carry no gradient (query reasoner, stage 2's
    encoder): autograd skips the first layer's q, k, v input gradients, 2 (in*out + r*in) a token.

    Not counted: norms, RoPE, SwiGLU, softmax, biases, the cosine scores and the top-k (elementwise,
    or under 0.1%), and recomputation: activation checkpointing re-runs the forward, but MFU counts
    the model's FLOPs, not the hardware's (the PaLM paper's definition).
    """
    linears = block_linears(cfg)
    P = cfg.n_layers * sum(i * o for i, o in linears)
    R = cfg.n_layers * sum(lora_rank * (i + o) for i, o in linears)
    n = mask.sum(1)  # (rows,) real tokens per row
    tokens = int(n.sum())
    attn = 4 * cfg.head_dim * cfg.n_heads * cfg.n_layers * causal_pairs(n, cfg.sliding_window)
    head = 2 * cfg.vocab_size * cfg.dim * targets
    flops = 2 * (P + R) * tokens + attn + head
    if trains:
        flops += (2 * (P + R) + 2 * R) * tokens + 2 * attn + head  # the base weights get none
        if not input_grad:
            flops -= sum(2 * (i * o + lora_rank * i) for i, o in linears[:3]) * tokens
    return flops


def batch_flops(cfg: ModelConfig, lora_rank: int, batch: Batch, stage: int,
                objective: str = "answer") -> int:
    """FLOPs of one forward + backward of a collated batch (Clara.loss, then backward), by pass:

        stages 1, 2   the documents through the trained encoder (their input embeddings carry a
                      gradient in stage 1 only: the <MEMi> rows train), the prompts through the
                      trained decoder
        stage 3       the N candidates through the frozen encoder under no_grad (forward only), the
                      questions through the trained query reasoner, the prompts through the trained
                      decoder (the retrieval warm-up runs no decoder)

    The decoder's inputs always carry a gradient (the spliced memory); its targets are the labelled
    positions after the shift, exactly where Clara.decoder_ce_sum computes logits. A step's FLOPs
    are the sum over its micro-batches and ranks.
    """
    def count(mask, **kw):
        return pass_flops(cfg, lora_rank, mask, **kw)

    targets = int((batch.labels[:, 1:] != -100).sum())
    decoder = count(batch.dec_mask, trains=True, targets=targets)
    if stage in (1, 2):
        return count(batch.doc_mask, trains=True, input_grad=stage == 1) + decoder
    docs = count(batch.doc_mask, trains=False)
    query = count(batch.q_mask, trains=True, input_grad=False)
    return docs + query + (0 if objective == "retrieval_warmup" else decoder)


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: the FLOPs the model needed (batch_flops) / the time / the peak
    FLOP/s of the devices that ran them (PEAK_BF16 x ranks on H100/H200)."""
    return flops / seconds / peak


# ----------------------------------------------------------------------------------------------------

def check_data(a):
    """--data: files, not folders; said in one line before anything else is read or written."""
    for f in a.data:
        path = Path(f)
        if path.is_dir():
            raise UsageError(f"--data {f}: is a directory; pass the JSONL file(s) in it")
        if not path.is_file():
            raise UsageError(f"--data {f}: no such file")


def check_batch(micro: Batch, records: list[dict], clara: Clara, a):
    """What a step cannot run with, named by the record: too few candidates for --top-k (stage 3),
    or a prompt whose memory slots --max-len cuts off."""
    where = lambda i: records[i].get("_where", f"record {i}")
    E = micro.docs_per_question
    if a.stage == 3 and not a.retrieval_warmup and E < a.top_k:
        raise UsageError(f"{where(0)}: {E} candidate documents, fewer than --top-k {a.top_k}")
    if a.candidates and a.stage == 3 and E != a.candidates:
        raise UsageError(f"--candidates {a.candidates}: {where(0)} holds {E} per question")
    if a.retrieval_warmup:
        return
    slots = E if a.stage != 3 else a.top_k
    m0 = int(clara.mem_ids[0])
    ids = micro.dec_ids
    n_mem = ((ids >= m0) & (ids < m0 + clara.cfg.n_mem)).sum(1)  # (B,) memory tokens per prompt
    short = (n_mem != slots * clara.cfg.n_mem).nonzero().flatten().tolist()
    if short:
        raise UsageError(f"{where(short[0])}: the prompt is longer than --max-len {a.max_len} "
                         f"tokens (its memory slots are cut off); raise --max-len or shorten the "
                         f"question")


def params_finite(params, distributed: bool) -> bool:
    """Every parameter finite, on every rank (each checks its shards); one device sync per step."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p
    ok = torch.stack([torch.isfinite(local(p)).all() for p in params]).all().float()
    if distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


# ----------------------------------------------------------------------------------------------------
# The run: setup, one optimizer step, its log record; main() is the loop that strings them together

@dataclass
class Run:
    """Everything setup() builds and every step reads."""
    a: argparse.Namespace        # the resolved flags
    device: torch.device
    rank: int                    # this process among `world` (0 and 1 without torchrun)
    world: int
    accum: int                   # micro-batches per rank in one optimizer step
    dataset: JsonlDataset
    steps_per_epoch: int
    total: int                   # optimizer steps of the whole schedule (the lr schedule's span)
    clara: Clara
    trainable: list              # the parameters AdamW steps
    opt: torch.optim.Optimizer
    step: int = 0                # optimizer steps done: a resumed run starts at its saved step

    @property
    def objective(self) -> str:
        return "retrieval_warmup" if self.a.retrieval_warmup else "answer"


@dataclass
class StepStats:
    """One optimizer step's sums over its micro-batches, then over the ranks."""
    objective: float = 0.0   # summed over its terms (CE: target tokens; InfoNCE: questions)
    mse: float = 0.0         # the alignment loss: the mean over micro-batches and ranks
    hits: float = 0.0        # stage 3: recall@k summed over the questions that have positives
    with_pos: float = 0      # the number of those questions
    truncated: float = 0     # documents cut to --doc-len
    tokens: float = 0        # encoder + decoder tokens (tokens_per_s)
    flops: float = 0         # batch_flops of every micro-batch (mfu)
    n_terms: float = 1.0     # the objective's terms in the whole step: its sum is divided by them
    grad_norm: float = 0.0   # before clipping

    @property
    def loss(self) -> float:  # the objective's mean (CE per target token, InfoNCE per question)
        return self.objective / self.n_terms


class StepFailed(Exception):
    """A step whose loss, gradients or new weights are not finite: main() stops before saving it."""


def start_processes(a) -> tuple[torch.device, int, int]:
    """(device, rank, world size). torchrun sets WORLD_SIZE: then one process group, NCCL on GPU and
    gloo on CPU, and each GPU process on its LOCAL_RANK's device. Every rank must get whole
    micro-batches of the global batch."""
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    if a.global_batch % (a.micro_batch * world):
        raise UsageError(f"--global-batch {a.global_batch} is not a multiple of --micro-batch "
                         f"{a.micro_batch} x world size {world}")
    return device, rank, world


def open_data(a) -> tuple[JsonlDataset, int, int]:
    """(the training records, steps per epoch, total steps). Records few enough are all checked up
    front: a bad record fails the run before it starts rather than hours into it."""
    dataset = JsonlDataset(a.data, a.stage)
    if len(dataset) <= a.check_limit:
        errors = dataset.check(max_errors=10)
        if errors:
            raise UsageError("bad training data (nothing was written): " + "; ".join(errors))
    steps_per_epoch = len(dataset) // a.global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"--data {' '.join(a.data)}: {len(dataset)} records is less than one "
                         f"global batch ({a.global_batch})")
    return dataset, steps_per_epoch, a.max_steps or a.epochs * steps_per_epoch


def setup(a, device: torch.device, dtype: torch.dtype, rank: int, world: int) -> Run:
    """The data, the model with the stage's trainable set (sharded over the ranks), AdamW, and with
    --resume the saved state. Nothing in --out changes here, but a preset model's base/
    (build_clara)."""
    dataset, steps_per_epoch, total = open_data(a)
    if a.resume and not complete_dir(a.out / "resume").is_dir():  # or resume.old (a killed swap)
        raise UsageError(f"--resume: {a.out / 'resume'} does not exist; nothing to resume")
    # Under FSDP the weights load in fp32; MixedPrecisionPolicy casts them for compute (shard()).
    clara = build_clara(a, dataset, device, torch.float32 if world > 1 else dtype, rank)
    clara.model.activation_checkpointing = a.activation_checkpointing
    params = clara.trainable_parameters(a.stage)
    if a.retrieval_warmup:  # the query reasoner alone: the decoder is not run
        for k in [k for k in params if not k.endswith(".query")]:
            params.pop(k).requires_grad_(False)
    if world > 1:
        shard(clara, dtype, device)
    trainable = [p for p in clara.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=a.weight_decay)
    accum = a.global_batch // (a.micro_batch * world)
    run = Run(a, device, rank, world, accum, dataset, steps_per_epoch, total, clara, trainable, opt)
    if a.resume:
        try:
            run.step = load_resume(clara, opt, a)["step"]
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        print0(f"resumed from {a.out / 'resume'} at step {run.step}")
    n_train = sum(p.numel() for p in params.values())
    n_base = sum(p.numel() for n, p in clara.model.named_parameters() if "lora_" not in n)
    print0(f"stage {a.stage}: {len(dataset)} records, {total} steps of {a.global_batch} ({accum} "
           f"micro-batches of {a.micro_batch} x {world} ranks), {n_train:,} trainable / "
           f"{n_base:,} base parameters, {clara.cfg.n_mem} memory tokens per document, device "
           f"{device}, {dtype}")
    return run


def micro_batches(run: Run):
    """This rank's micro-batches of records from step run.step on, epoch after epoch. Each epoch's
    order is drawn from (seed, epoch) and read from the step's position on, so a resumed run reads
    exactly what an uninterrupted one would have."""
    first = run.step
    for epoch in itertools.count(first // run.steps_per_epoch):
        start = first - epoch * run.steps_per_epoch if epoch == first // run.steps_per_epoch else 0
        records = batches(run.dataset, run.a.micro_batch, epoch, run.a.seed, run.rank, run.world,
                          start_batch=start * run.accum)
        yield from itertools.islice(records, (run.steps_per_epoch - start) * run.accum)


def make_batch(run: Run, records: list[dict]) -> Batch:
    """Records -> a checked Batch; what a step cannot train on is a UsageError naming the record."""
    a = run.a
    records = check_warmup(records, a)
    try:
        batch = run.clara.collate(records, a.stage, seed=a.seed)
    except ValueError as e:  # e.g. records of one batch with different numbers of documents
        raise UsageError(f"{records[0].get('_where', 'a batch')}: {error_line(e)}") from None
    check_batch(batch, records, run.clara, a)
    return batch


def train_step(run: Run, micro: list[Batch]) -> StepStats:
    """One optimizer step over this rank's micro-batches. A non-finite loss, gradient or weight
    raises StepFailed before anything is saved (the weights may have moved: main() stops)."""
    a = run.a
    # The step's loss is normalised by ALL its terms (target tokens; questions in the warm-up), on
    # all ranks: count them first. A step whose targets were all cut by --max-len adds no CE.
    counts = [len(m.pos_index) if a.retrieval_warmup else m.n_targets for m in micro]
    n_terms = torch.tensor(float(sum(counts)), device=run.device)
    if run.world > 1:
        dist.all_reduce(n_terms)
    n_terms.clamp_(min=1)
    for g in run.opt.param_groups:
        g["lr"] = lr_at(run.step, run.total, a)
    # LoRA dropout: a function of the step (and rank), so a resumed run draws the same masks
    torch.manual_seed(a.seed * 100003 + run.step * run.world + run.rank)
    s = forward_backward(run, micro, n_terms)
    if not math.isfinite(s.loss) or not math.isfinite(s.mse):
        raise StepFailed(f"non-finite loss (ce {s.loss}, mse {s.mse})")
    s.grad_norm = optimizer_step(run)
    return s


def forward_backward(run: Run, micro: list[Batch], n_terms: torch.Tensor) -> StepStats:
    """Every micro-batch's loss, backward (gradients accumulate); the step's sums over all ranks."""
    a, clara, objective = run.a, run.clara, run.objective
    s = StepStats()
    for m in micro:
        out = clara(m, a.stage, objective)
        # FSDP averages gradients over ranks, hence ranks=world: the step's summed CE / its tokens.
        clara.total_loss(out, n_terms, ranks=run.world, micro_batches=run.accum).backward()
        s.objective += out.objective[0].item()
        s.mse += out.mse.item() / run.accum
        s.truncated += m.truncated
        s.tokens += int(m.doc_mask.sum()) + int(m.dec_mask.sum())
        s.flops += batch_flops(clara.model.cfg, clara.cfg.lora_r, m, a.stage, objective)
        if a.stage == 3:  # recall@k of the selected candidates where the record names its positives
            for row, pos in zip(out.topk.tolist(), m.pos_index):
                if pos:
                    s.hits += recall_at_k(row, pos, len(row))  # row: the top-k, best first
                    s.with_pos += 1
    sums = torch.tensor([s.objective, s.mse, s.hits, s.with_pos, s.truncated, s.tokens, s.flops],
                        device=run.device, dtype=torch.float64)
    if run.world > 1:
        dist.all_reduce(sums)
    s.objective, s.mse, s.hits, s.with_pos, s.truncated, s.tokens, s.flops = sums.tolist()
    s.mse /= run.world
    s.n_terms = n_terms.item()
    return s


def optimizer_step(run: Run) -> float:
    """Clip, step, clear the gradients; returns the gradient norm before clipping. Non-finite
    gradients stop before the update (neither the weights nor AdamW's state see them), non-finite
    weights after it."""
    opt = run.opt
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, run.a.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not math.isfinite(grad_norm):
        raise StepFailed(f"non-finite gradients (norm {grad_norm})")
    try:
        opt.step()
    except RuntimeError as e:  # AdamW's step lr / (1 - beta1^t) past the float range (huge --lr)
        if "overflow" not in str(e):
            raise
        raise StepFailed(f"the optimizer step overflowed ({error_line(e)})") from None
    opt.zero_grad(set_to_none=True)
    # A finite loss and gradient can still step to inf/nan weights (a huge --lr): never save those.
    if not params_finite(run.trainable, run.world > 1):
        lr = opt.param_groups[0]["lr"]
        raise StepFailed(f"non-finite parameters after the optimizer step (lr {lr:g})")
    return grad_norm


def step_record(run: Run, s: StepStats, seconds: float) -> dict:
    """The step's line in metrics.jsonl (and on the console)."""
    a = run.a
    rec = {"step": run.step, "loss": s.loss + a.mse_weight * s.mse,
           "infonce" if a.retrieval_warmup else "ce": s.loss, "mse": s.mse,
           "lr": run.opt.param_groups[0]["lr"], "grad_norm": s.grad_norm,
           "tokens_per_s": s.tokens / seconds, "samples_per_s": a.global_batch / seconds}
    if a.stage == 3 and s.with_pos > 0:
        rec[f"recall@{a.top_k}"] = s.hits / s.with_pos
    if run.device.type == "cuda":  # the peak is an H100/H200's; a CPU has no figure to divide by
        rec["mfu"] = mfu(s.flops, seconds, PEAK_BF16 * run.world)
    return rec


class Log:
    """What a run reports: the progress bar every step; a metrics.jsonl line and a console line
    every --log-every steps and at the last (rank 0 only); a note said once."""

    def __init__(self, run: Run, stop_at: int):
        from tqdm import tqdm
        a = run.a
        self.a, self.stop_at, self.truncation_noted = a, stop_at, False
        self.bar = tqdm(total=run.total, initial=run.step, disable=run.rank != 0,
                        desc=f"stage {a.stage}", dynamic_ncols=True)
        resumed = run.step if a.resume else None
        self.metrics = open_metrics(a.out, resumed) if run.rank == 0 else None

    def step(self, run: Run, s: StepStats, seconds: float):
        if s.truncated > 0 and not self.truncation_noted:  # once: every step of a corpus may cut
            print0(f"note: documents longer than doc_len={self.a.doc_len} tokens are cut on the "
                   f"right ({int(s.truncated)} in step {run.step}; reported once)")
            self.truncation_noted = True
        rec = step_record(run, s, seconds)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if self.metrics and (run.step % self.a.log_every == 0 or run.step == self.stop_at):
            self.metrics.write(rec)
            self.bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in rec.items()))

    def saved(self):  # the curve so far is now the checkpoint's (Metrics.saved)
        if self.metrics:
            self.metrics.saved()

    def close(self):  # the bar's line ends before any error message
        self.bar.close()
        if self.metrics:
            self.metrics.close()


def nothing_saved(a, step: int, saved_step: int | None, what: str) -> UsageError:
    """The one line for a failed step (StepFailed): which step, and where the last good state is."""
    if saved_step is not None:
        last = (f"the last finite checkpoint is where it was: {a.out / 'checkpoint'} "
                f"(step {saved_step})")
    elif (a.out / "checkpoint").exists():
        last = f"this run saved nothing; {a.out / 'checkpoint'} is as it was before this run"
    else:
        last = "nothing was saved"
    return UsageError(f"step {step + 1}: {what}; stopped before saving: {last}. Try a lower --lr.")


def main(argv=None):
    # Setup: every check that can refuse the run comes before --out is created or changed.
    a = parse_args(argv)
    a.run_record = run_record(a, argv)
    check_data(a)
    check_out(a)
    device, rank, world = start_processes(a)
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, a.dtype) if a.dtype else default
    run = setup(a, device, dtype, rank, world)
    stop_at = min(run.total, run.step + a.stop_after) if a.stop_after else run.total
    a.out.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot start leaves no folder
    log, stream = Log(run, stop_at), micro_batches(run)
    saved_step = run.step if a.resume else None  # the last finite state this run wrote to --out
    try:
        run.clara.train()
        while run.step < stop_at:
            t0 = time.perf_counter()
            micro = [make_batch(run, next(stream)) for _ in range(run.accum)]
            try:
                s = train_step(run, micro)
            except StepFailed as e:  # the weights may be broken: stop, say where the good ones are
                raise nothing_saved(a, run.step, saved_step, str(e)) from None
            run.step += 1
            log.step(run, s, time.perf_counter() - t0)
            # The checkpoint and the resume state, together: every --save-every steps, at the end.
            if (a.save_every and run.step % a.save_every == 0) or run.step == stop_at:
                position = {"epoch": run.step // run.steps_per_epoch}
                save_all(run.clara, run.opt, a, run.step, position, rank)
                saved_step = run.step
                log.saved()
    finally:
        log.close()
    print0(f"done: {run.step} steps; checkpoint in {a.out / 'checkpoint'}")
    if world > 1:
        dist.destroy_process_group()


def cli(argv=None) -> int:
    """The command line: an expected error is one line on stderr and exit 2, never a traceback."""
    try:
        main(argv)
    except UsageError as e:
        print(f"train.py: error: {e.message}", file=sys.stderr)
        return 2
    except DataError as e:  # a bad record found while training: its file, line and field
        print(f"train.py: error: bad training data: {error_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (permissions, a vanished file, a full disk outside a save)
        print(f"train.py: error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

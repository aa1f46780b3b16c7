"""One training loop for CLaRa's three stages; the stage picks a preset, a loss and the trainable set.

    python train.py --stage 1                                  # tiny preset + sample data, CPU, minutes
    torchrun --nproc_per_node=8 train.py --stage 1 --model /models/Mistral-7B-Instruct-v0.2 --data pretrain.jsonl
    torchrun --nproc_per_node=8 train.py --stage 2 --init out/stage1/checkpoint --data instruct.jsonl
    torchrun --nproc_per_node=8 train.py --stage 3 --init out/stage2/checkpoint --data e2e.jsonl
    train.py --stage 3 --retrieval-warmup ...                  # optional: InfoNCE on pos_index, query alone
    python train.py --stage 0 --data corpus.txt --out out/stage0   # CPU lab only: make a tiny base first

Stage 0 is not part of CLaRa: the paper starts from a pretrained instruction model, while a preset starts
from random weights. `--stage 0` trains the whole preset decoder as a plain language model on text and
writes OUT/base, an HF directory that stages 1-3 then take as `--model` like any pretrained checkpoint.

Distributed is detected from the environment (torchrun sets WORLD_SIZE): then FSDP2 shards every block and
the root (`fully_shard`, MixedPrecisionPolicy: bf16 parameters, fp32 gradient reduction), NCCL on GPU and
gloo on CPU. One process runs the same code without sharding.

The loss of one optimizer step is normalised by the number of target tokens of the WHOLE step (all
micro-batches of all ranks), so gradient accumulation and the world size do not change what is optimised.
Everything the step needs is drawn from (seed, step): data order, paraphrase templates, LoRA dropout; so a
resumed run ends with exactly the parameters of an uninterrupted one.

Outputs in --out: `checkpoint/` (the CLaRa checkpoint: Clara.from_pretrained, eval.py), `resume/` (sharded
optimizer + trainable state + data position, torch.distributed.checkpoint), `metrics.jsonl`, and for a
model built from a preset, `base/` (the base decoder and its tokenizer). Every directory is replaced
atomically: a crash while saving leaves the previous one intact. metrics.jsonl starts afresh with each run
(a --resume keeps the lines up to its step).
"""
from __future__ import annotations

import argparse
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

from clara import PROMPT_TEXTS, Clara, ClaraConfig, replace_dir, text_prompt
from data import DataError, JsonlDataset, Tokenizer, batches, left_pad, train_tokenizer, validate_record
from model import ModelConfig, PRESETS, Transformer

ROOT = Path(__file__).resolve().parent

# Official hyper-parameters (CLARA_SPEC.md §5); every one can be overridden on the command line.
STAGES = {
    # Stage 0 (plain LM pretraining of the base) has no official values: the paper starts from Mistral-7B.
    0: dict(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup=0.03, global_batch=32, micro_batch=8, max_len=512,
            doc_len=256, compr_rate=32, top_k=1, tau=0.02, epochs=1, mse_weight=0.0),
    1: dict(lr=1e-4, min_lr=1e-5, schedule="cosine", warmup=0.03, global_batch=128, micro_batch=2, max_len=2048,
            doc_len=256, compr_rate=32, top_k=1, tau=0.02, epochs=1, mse_weight=0.1),
    2: dict(lr=1e-4, min_lr=1e-5, schedule="cosine", warmup=0.03, global_batch=128, micro_batch=2, max_len=2048,
            doc_len=256, compr_rate=32, top_k=5, tau=0.02, epochs=1, mse_weight=0.1),
    3: dict(lr=5e-6, min_lr=5e-6, schedule="constant", warmup=0.0, global_batch=32, micro_batch=2, max_len=1024,
            doc_len=256, compr_rate=32, top_k=5, tau=0.02, epochs=1, mse_weight=0.0),
}
# The embedded default: a model preset (random weights) on the shipped sample data, sized for a laptop CPU.
TINY = dict(lr=2e-3, min_lr=2e-4, warmup=0.05, global_batch=8, micro_batch=4, max_len=256, doc_len=64,
            compr_rate=8, top_k=2, epochs=10, lora_r=16, lora_alpha=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--stage", type=int, choices=(0, 1, 2, 3), required=True,
                   help="1 compression pretraining, 2 instruction tuning, 3 end-to-end retrieval + generation; "
                        "0 (not CLaRa) plain language-model pretraining of the base decoder on text")
    g.add_argument("--model", default="tiny", help=f"HF model directory (Mistral/Llama) or a preset: {sorted(PRESETS)}")
    g.add_argument("--data", nargs="+", default=None, help="JSONL file(s) in the official format of the stage "
                   "(default: data/sample/stage{N}.jsonl); stage 0 (required): text files, one text per line, "
                   "or .jsonl files of {\"text\": ...} or of CLaRa records, read as raw-text QA (read_texts)")
    g.add_argument("--out", default=None, help="output directory (default: out/stage{N})")
    g.add_argument("--init", default=None, help="previous stage's checkpoint (stage 2 from 1, stage 3 from 2)")
    g.add_argument("--chat-format", default=None, choices=("mistral", "chatml", "llama3"),
                   help="the base model's chat format (default: recognised from its tokenizer_config.json "
                        "chat_template; a checkpoint keeps the one it was trained with)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/resume exactly where it stopped")
    g = p.add_argument_group("hyper-parameters (default: the official value of the stage; see TINY for presets)")
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
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=hlp)
    g.add_argument("--candidates", type=int, default=None, help="stage 3: required number of candidates per question "
                   "(default: whatever the data holds, equal within a batch)")
    g.add_argument("--retrieval-warmup", action="store_true",
                   help="stage 3: the official optional warm-up (stage2_pretrain_retrieval) instead of end-to-end "
                   "training: only the query reasoner trains, with multi-positive InfoNCE at --tau over the cosine "
                   "scores, supervised by every record's pos_index; its checkpoint can --init a stage-3 run")
    g.add_argument("--topk-estimator", default="straight_through", choices=("straight_through", "gumbel", "soft"),
                   help="stage 3 top-k gradient estimator (topk.py)")
    g.add_argument("--train-base", type=int, choices=(0, 1), default=None,
                   help="also train every base weight (default: 1 for a preset model from random weights, 0 for "
                        "a real checkpoint; the method itself keeps the base frozen)")
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
    g.add_argument("--seed", type=int, default=0, help="seed for data order, templates, dropout, preset weights")
    g.add_argument("--save-every", type=int, default=0, help="save checkpoint + resume state every N steps (0: end only)")
    g.add_argument("--log-every", type=int, default=10, help="log (print and metrics.jsonl) every N steps")
    g.add_argument("--check-limit", type=int, default=200_000, help="validate every record before training "
                   "when the data has at most this many (larger data is validated as it is read)")
    g.add_argument("--vocab-size", type=int, default=1000, help="preset models: size of the BPE trained on the data")
    g.add_argument("--tie-embeddings", type=int, choices=(0, 1), default=0, help="preset models: the output "
                   "layer shares the input embedding (a tiny model then learns to copy a word from its context "
                   "in a few hundred steps; untied, it had not after 300)")
    args = p.parse_args(argv)
    if args.stage == 0 and not args.data:
        p.error("--stage 0 needs --data (text to pretrain the base on; there is no sample)")
    if args.tie_embeddings and (args.model not in PRESETS or args.init):
        p.error("--tie-embeddings 1 shapes a new preset model; a checkpoint (--model DIR or --init) keeps its own")
    if args.chat_format and args.init:
        p.error("--chat-format chooses a base model's format; a checkpoint (--init) keeps the one it was trained with")
    if args.retrieval_warmup and args.stage != 3:
        p.error(f"--retrieval-warmup trains stage 3's query reasoner; it cannot run with --stage {args.stage}")
    args.data = args.data or [str(ROOT / f"data/sample/stage{args.stage}.jsonl")]
    args.out = Path(args.out or f"out/stage{args.stage}")
    preset = STAGES[args.stage] | (TINY if args.model in PRESETS and args.model != "mistral-7b" else {})
    args.explicit = {k for k, v in vars(args).items() if v is not None}
    defaults = dict(lora_r=16, lora_alpha=32.0, lora_dropout=0.1, train_base=int(args.model in PRESETS and not args.init))
    for k, v in (preset | defaults).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


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
    encoder (or from a stage-3 checkpoint, its own query reasoner)."""
    cfg = ClaraConfig(doc_max_length=a.doc_len, compr_rate=a.compr_rate, generation_top_k=a.top_k,
                      lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, tau=a.tau,
                      topk_estimator=a.topk_estimator, mse_weight=a.mse_weight, max_len=a.max_len,
                      training_stage=a.stage)
    if a.init:
        clara = Clara.from_pretrained(a.init, dtype=dtype, device=device, training_stage=a.stage,
                                      compr_rate=a.compr_rate if "compr_rate" in a.explicit else None)
        trained = clara.cfg
        for k in ("generation_top_k", "tau", "topk_estimator", "mse_weight", "max_len", "lora_dropout"):
            setattr(trained, k, getattr(cfg, k))
        if a.stage == 2 and clara.loaded_stage == 2:  # a stage-2 checkpoint: continue with its decoder
            print0(f"stage 2: {a.init} is a stage-2 checkpoint; training continues with its decoder")
        elif a.stage == 2:
            clara.model.reset_adapter("decoder")  # stage 2 trains a FRESH decoder adapter
        if a.stage == 3 and "query" in clara.loaded_adapters:  # a stage-3 checkpoint: continue from its query
            print0(f"stage 3: {a.init} has a trained query reasoner; training continues from it")
        elif a.stage == 3:
            clara.model.copy_adapter("encoder", "query")
        return clara
    base = Path(a.model)
    if a.model in PRESETS:
        base = a.out / "base"
        if rank == 0 and not (base / "config.json").exists():
            make_preset_base(a, dataset, base)
        if dist.is_initialized():
            dist.barrier()
    torch.manual_seed(a.seed)  # adapter initialisation
    model = Transformer.from_pretrained(base, dtype=dtype, device=device)
    return Clara(model, Tokenizer.from_pretrained(base, chat_format=a.chat_format), cfg, base_path=str(base))


def preset_tokenizer(texts: list[str], vocab_size: int, split_punctuation: bool = False):
    """A BPE for a preset model, trained on the data and on the fixed prompt strings (50 times, so their words
    become single pieces: the tiny decoder's answer prompt shrinks from about 150 tokens to about 80)."""
    return train_tokenizer(list(texts) + PROMPT_TEXTS * 50, vocab_size, split_punctuation=split_punctuation)


def preset_config(a, tok) -> ModelConfig:
    """The preset's shape, with the trained tokenizer's vocabulary and --tie-embeddings."""
    return ModelConfig.from_preset(a.model, vocab_size=tok.vocab_size, tie_embeddings=bool(a.tie_embeddings))


def make_preset_base(a, dataset: JsonlDataset, path: Path):
    """A preset decoder with random weights and a BPE tokenizer trained on the data, saved as an HF dir."""
    texts = []
    for i in range(len(dataset)):
        r = dataset[i]
        texts += r["docs"] + [r["question"]] if isinstance(r["question"], str) else r["docs"] + r["question"]
        texts += r["answers"] if "answers" in r else [r["answer"]]
    tok = preset_tokenizer(texts, a.vocab_size)
    model = Transformer(preset_config(a, tok)).init_weights(seed=a.seed)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save(tmp)
    os.replace(tmp, path)


def shard(clara: Clara, dtype, device):
    """FSDP2: each block, then the root (embeddings, norm, lm_head, <MEMi> rows)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in clara.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(clara, mp_policy=mp)
    return clara


def save_all(clara, opt, a, step, position, rank):
    """The CLaRa checkpoint (rank 0 writes, all ranks gather) and the resumable state (all ranks write)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    extra = {"step": step, "stage": a.stage}
    state = clara.state_to_save()  # a collective under FSDP: every rank
    if rank == 0:
        clara.save_pretrained(a.out / "checkpoint", extra=extra, state=state)
    model_sd, optim_sd = get_state_dict(clara, opt)
    trainable = {n for n, p in clara.named_parameters() if p.requires_grad}
    sd = {"model": {k: v for k, v in model_sd.items() if k in trainable}, "optim": optim_sd}
    resume, tmp = a.out / "resume", a.out / "resume.tmp"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    if dist.is_initialized():
        dist.barrier()
    with warnings.catch_warnings():  # one process: DCP warns that it assumes a single-process save
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(sd, checkpoint_id=str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (tmp / "position.json").write_text(json.dumps({"step": step, **position}))
        replace_dir(tmp, resume)
    if dist.is_initialized():
        dist.barrier()


def open_metrics(path: Path, resumed_step: int | None):
    """metrics.jsonl for appending: a fresh run starts it empty (a second run into the same --out does not
    mix its curve into the first's); a resumed run keeps the lines up to the step it resumes from and drops
    any logged after that save by the interrupted run, so the file reads as one uninterrupted run."""
    keep = []
    if resumed_step is not None and path.exists():
        keep = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
    path.write_text("".join(keep))
    return open(path, "a")


def check_warmup(records: list[dict], a) -> list[dict]:
    """--retrieval-warmup is supervised: every record must name its positive documents."""
    if a.retrieval_warmup:
        for r in records:
            if not r.get("pos_index"):
                raise SystemExit(f"{r['_where']}: --retrieval-warmup needs a non-empty 'pos_index' (the positive "
                                 f"documents) in every record")
    return records


def load_resume(clara, opt, a):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict, StateDictOptions
    resume = a.out / "resume"
    if not (resume / "position.json").exists():
        raise FileNotFoundError(f"--resume: {resume} holds no resumable state (position.json missing)")
    model_sd, optim_sd = get_state_dict(clara, opt)
    trainable = {n for n, p in clara.named_parameters() if p.requires_grad}
    sd = {"model": {k: v for k, v in model_sd.items() if k in trainable}, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(resume))
    set_state_dict(clara, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=StateDictOptions(strict=False))
    return json.loads((resume / "position.json").read_text())


# ----------------------------------------------------------------------------------------------------
# Stage 0: make a base model (not CLaRa)

def read_texts(paths) -> list[str]:
    """Stage-0 text. Any file but .jsonl holds one text per line. A .jsonl file holds per line either
    {"text": str} (texts with newlines, e.g. chat transcripts), or a CLaRa record that becomes raw-text QA, so
    that the tiny base learns to answer from documents as the instruction model the paper starts from can:
      stage 2/3 {"question", "docs", "answer"}      the raw-text answer prompt (eval.py's text mode) + answer
      stage 1 {"data_type": "qa", ...}              the same, one text per (question, answer) pair
      stage 1 {"data_type": "paraphrase", ...}      the paraphrase (answers[0]) as plain text
    Blank lines are skipped; a malformed line is an error naming file:line.

    (Tried for the CPU lab: the loss on the answer only for stage-2 records, as instruction tuning does. The
    tiny base then read WORSE after the same steps, 1% held-out exact against 9%: the prompt's own tokens,
    documents and question, are useful language-model text at this scale.)"""
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise SystemExit(f"{path}: stage-0 text file not found")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                texts.append(line)
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"{path}:{n}: not JSON") from None
            if isinstance(r, dict) and "text" not in r and "data_type" in r:
                try:
                    r = validate_record(r, 1, f"{path}:{n}")  # normalised: lists, one document
                except DataError as e:
                    raise SystemExit(str(e)) from None
                if r["data_type"] == "paraphrase":
                    texts.append(r["answers"][0])
                else:
                    texts += [f"{text_prompt(q, r['docs'])} {ans}</s>" for q, ans in zip(r["question"], r["answers"])]
                continue
            if isinstance(r, dict) and "text" not in r and {"question", "docs", "answer"} <= r.keys():
                try:
                    r = validate_record(r, 2, f"{path}:{n}")
                except DataError as e:
                    raise SystemExit(f"{path}:{n}: a stage-2 record needs a string question and answer and a list "
                                     f"of documents: {e}") from None
                texts.append(f"{text_prompt(r['question'], r['docs'])} {r['answer']}</s>")
                continue
            text = r.get("text") if isinstance(r, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise SystemExit(f"{path}:{n}: expected {{\"text\": non-empty string}} or a stage-2 record "
                                 "{\"question\", \"docs\", \"answer\"}")
            texts.append(text)
    return texts


def pretrain_base(a, device, dtype):
    """Stage 0: train every weight of the base decoder as a plain language model, then save it as OUT/base.

    A preset starts from random weights with a BPE tokenizer trained on the text; an HF directory continues
    from its weights. Each text is read as "<s>{text}</s>" (a text that already starts with <s>, such as a
    chat transcript, as it is), cut to max_len tokens, and the loss is next-token cross-entropy over every
    token, normalised by the target tokens of the whole step. One process, no resume: minutes on a CPU.
    """
    import numpy as np
    import torch.nn.functional as F
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 or a.resume:
        raise SystemExit("--stage 0 runs in one process and cannot --resume")
    texts = read_texts(a.data)
    if a.model in PRESETS:
        tok = preset_tokenizer(texts, a.vocab_size, split_punctuation=True)  # see train_tokenizer: copyable words
        model = Transformer(preset_config(a, tok)).init_weights(seed=a.seed)
        model = model.to(device=device, dtype=dtype)
    else:
        tok, model = Tokenizer.from_pretrained(a.model), Transformer.from_pretrained(a.model, dtype=dtype, device=device)
    rows = [r[:a.max_len] for r in tok.encode_batch([t if t.startswith("<s>") else f"<s>{t}</s>" for t in texts])]
    steps_per_epoch = len(rows) // a.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{a.data}: {len(rows)} texts is less than one global batch ({a.global_batch})")
    total = a.max_steps or a.epochs * steps_per_epoch
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=a.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"stage 0: {len(rows)} texts, {total} steps of {a.global_batch}, {n_params:,} parameters, "
           f"vocabulary {tok.vocab_size}, device {device}, {dtype}")
    log = open_metrics(a.out / "metrics.jsonl", None)
    for step in range(total):
        t0 = time.perf_counter()
        epoch, i = divmod(step, steps_per_epoch)
        order = np.random.default_rng([a.seed, epoch]).permutation(len(rows))  # data order from (seed, epoch)
        chosen = [rows[j] for j in order[i * a.global_batch:(i + 1) * a.global_batch]]
        n_tokens = sum(len(r) - 1 for r in chosen)  # every token but the first is a target
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, a)
        loss_sum = 0.0
        for k in range(0, len(chosen), a.micro_batch):
            ids, mask = left_pad(chosen[k:k + a.micro_batch], tok.pad_id)  # (b, T)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask)  # (b, T, V) fp32
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (b, T-1): no loss on left padding
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            (ce / n_tokens).backward()
            loss_sum += ce.item()
        loss = loss_sum / n_tokens
        if not math.isfinite(loss):
            raise SystemExit(f"step {step}: non-finite loss {loss}; nothing was saved. Try a lower --lr.")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, "loss": loss, "lr": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm),
               "tokens_per_s": n_tokens / (time.perf_counter() - t0)}
        if (step + 1) % a.log_every == 0 or step + 1 == total:
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print0(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
    log.close()
    tmp = a.out / "base.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save(tmp)
    replace_dir(tmp, a.out / "base")
    print0(f"done: {total} steps; base model in {a.out / 'base'} (use it as --model of stage 1)")


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    a = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if a.global_batch % (a.micro_batch * world):
        raise SystemExit(f"--global-batch {a.global_batch} is not a multiple of --micro-batch {a.micro_batch} "
                         f"x world size {world}")
    accum = a.global_batch // (a.micro_batch * world)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage == 0:
        return pretrain_base(a, device, dtype)

    dataset = JsonlDataset(a.data, a.stage)
    if len(dataset) <= a.check_limit:  # fail fast on a bad record rather than hours into the run
        errors = dataset.check(max_errors=10)
        if errors:
            raise SystemExit("bad training data (nothing was written):\n  " + "\n  ".join(errors))
    steps_per_epoch = len(dataset) // a.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{a.data}: {len(dataset)} records is less than one global batch ({a.global_batch})")
    total = a.max_steps or a.epochs * steps_per_epoch

    clara = build_clara(a, dataset, device, torch.float32 if distributed else dtype, rank)
    clara.model.activation_checkpointing = a.activation_checkpointing
    params = clara.trainable_parameters(a.stage, train_base=a.train_base)
    if a.retrieval_warmup:  # the query reasoner alone: the decoder is not run
        for k in [k for k in params if not k.endswith(".query")]:
            params.pop(k).requires_grad_(False)
    n_train = sum(p.numel() for p in params.values())
    n_base = sum(p.numel() for n, p in clara.model.named_parameters() if "lora_" not in n)
    if distributed:
        shard(clara, dtype, device)
    opt = torch.optim.AdamW([p for p in clara.parameters() if p.requires_grad], lr=a.lr, betas=(0.9, 0.95),
                            eps=1e-8, weight_decay=a.weight_decay)
    step = 0
    if a.resume:
        step = load_resume(clara, opt, a)["step"]
        print0(f"resumed from {a.out / 'resume'} at step {step}")
    print0(f"stage {a.stage}: {len(dataset)} records, {total} steps of {a.global_batch} "
           f"({accum} micro-batches of {a.micro_batch} x {world} ranks), {n_train:,} trainable / {n_base:,} base "
           f"parameters, {clara.cfg.n_mem} memory tokens per document, device {device}, {dtype}")

    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=f"stage {a.stage}", dynamic_ncols=True)
    log = open_metrics(a.out / "metrics.jsonl", step if a.resume else None) if rank == 0 else None
    truncated_reported = False
    clara.train()
    data_iter, iter_epoch = None, None
    stop_at = min(total, step + a.stop_after) if a.stop_after else total
    while step < stop_at:
        t0 = time.perf_counter()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if iter_epoch != epoch or data_iter is None:  # (re)open the stream at this step's position
            data_iter = batches(dataset, a.micro_batch, epoch, a.seed, rank, world, start_batch=in_epoch * accum)
            iter_epoch = epoch
        micro = [clara.collate(check_warmup(next(data_iter), a), a.stage, seed=a.seed) for _ in range(accum)]
        if a.candidates and a.stage == 3 and micro[0]["docs_per_row"] != a.candidates:
            raise SystemExit(f"--candidates {a.candidates}: the data holds {micro[0]['docs_per_row']} per question")
        # The step's loss is normalised by ALL its target tokens: count them first, across ranks.
        n_tokens = torch.tensor(float(sum(len(m["pos_index"]) if a.retrieval_warmup else
                                          int((m["dec"]["labels"] != -100).sum()) for m in micro)), device=device)
        if distributed:
            dist.all_reduce(n_tokens)
        n_tokens.clamp_(min=1)  # a step whose targets were all cut by --max-len contributes no CE
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, a)
        torch.manual_seed(a.seed * 100003 + step * world + rank)  # LoRA dropout: a function of the step
        ce_total, mse_total, hits, n_pos, truncated, tokens = 0.0, 0.0, 0.0, 0, 0, 0
        for m in micro:
            out = clara(m, a.stage, "retrieval_warmup" if a.retrieval_warmup else "answer")
            # FSDP averages gradients over ranks, hence * world: the sum of CE over the step / its tokens.
            loss = out["ce_sum"] * world / n_tokens + a.mse_weight * out["mse"] / accum
            loss.backward()
            ce_total += out["ce_sum"].item()
            mse_total += out["mse"].item() / accum
            truncated += m["truncated"]
            tokens += int(m["enc_mask"].sum()) + int(m["dec"]["mask"].sum())
            if a.stage == 3:
                for row, pos in zip(out["topk"].tolist(), m["pos_index"]):
                    if pos:
                        hits += len(set(row) & set(pos)) / len(pos)
                        n_pos += 1
        stats = torch.tensor([ce_total, mse_total, hits, n_pos, truncated, tokens], device=device, dtype=torch.float64)
        if distributed:
            dist.all_reduce(stats)
        ce = stats[0].item() / n_tokens.item()
        mse = stats[1].item() / world
        if not math.isfinite(ce) or not math.isfinite(mse):
            raise SystemExit(f"step {step}: non-finite loss (ce {ce}, mse {mse}); stopping without saving "
                             f"(the last good checkpoint in {a.out} is untouched). Try a lower --lr.")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in clara.parameters() if p.requires_grad], a.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if stats[4] > 0 and not truncated_reported:
            print0(f"note: documents longer than doc_len={a.doc_len} tokens are cut on the right "
                   f"({int(stats[4])} in step {step}; reported once)")
            truncated_reported = True
        dt = time.perf_counter() - t0
        rec = {"step": step, "loss": ce + a.mse_weight * mse, "infonce" if a.retrieval_warmup else "ce": ce, "mse": mse,
               "lr": opt.param_groups[0]["lr"],
               "grad_norm": float(grad_norm), "tokens_per_s": stats[5].item() / dt,
               "samples_per_s": a.global_batch / dt}
        if a.stage == 3 and stats[3] > 0:
            rec[f"recall@{a.top_k}"] = stats[2].item() / stats[3].item()
        if device.type == "cuda":
            # LoRA on a frozen base: forward 2N, backward 2N (activation grads only) FLOPs per token,
            # + 2N recompute with activation checkpointing; attention FLOPs left out. H100/H200 bf16 dense peak.
            flops = (4 + 2 * a.activation_checkpointing) * n_base * stats[5].item()
            rec["mfu"] = flops / dt / (989e12 * world)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if log and (step % a.log_every == 0 or step == stop_at):
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
        if (a.save_every and step % a.save_every == 0) or step == stop_at:
            save_all(clara, opt, a, step, {"epoch": step // steps_per_epoch}, rank)
    bar.close()
    print0(f"done: {step} steps; checkpoint in {a.out / 'checkpoint'}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # a bad record found while training: its file, line and field, no traceback
        raise SystemExit(f"bad training data: {e}") from None

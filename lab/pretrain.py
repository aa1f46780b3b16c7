"""Make a tiny pretrained base decoder: plain language-model pretraining from random weights (NOT CLaRa).

    python lab/pretrain.py --data corpus.txt --out out/base                       # one text per line
    python lab/pretrain.py --data data/sample/stage1.jsonl data/sample/stage2.jsonl --out data/tiny ...  # lab/README.md

The paper starts from a pretrained instruction model (Mistral-7B-Instruct); a model built from a preset
shape starts from random weights and must first learn the language of its data. This script trains every
weight of a preset-shaped decoder (--preset) as a plain language model on text, with a BPE tokenizer
trained on that text, and writes --out as an HF-layout directory: config.json, model.safetensors, the
tokenizer files (Transformer.from_pretrained / data.Tokenizer.from_pretrained read it; train.py takes it as
`--model DIR`, where the method keeps it frozen), and provenance.json: the command, the commit, every data
file with its sha256, the flags, the final loss and the logged loss curve.

Each text is read as "<s>{text}</s>" (a text that already starts with <s>, such as a chat transcript, as it
is), cut to --max-len tokens; the loss is next-token cross-entropy over every token, normalised by the
target tokens of the whole step. Data order is drawn from (seed, epoch). One process, minutes on a CPU.
The folder is written whole or not at all (a temporary sibling, then renames): a failed run leaves the
previous one as it was. Expected errors are one line `pretrain.py: error: ...` and exit 2.

The core files import nothing from here; this script uses the core's model, tokenizer and schedule.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clara import PROMPT_TEXTS, replace_dir, text_prompt  # noqa: E402
from data import DataError, left_pad, train_tokenizer, validate_record  # noqa: E402
from model import PRESETS, ModelConfig, Transformer  # noqa: E402
from train import Parser, UsageError, lr_at  # noqa: E402  (train.py's one-line errors and lr schedule)

# The shapes this script builds. "small": twice as wide, the lab probe's figures (docs/LOG.md, BENCHMARKS.md).
LAB_PRESETS = {
    "tiny": PRESETS["tiny"],
    "small": dict(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=32,
                  intermediate_size=384, norm_eps=1e-5, rope_theta=10000.0, dtype="float32"),
}


# The defaults are the CPU lab's settings (lab/lab.py passes them explicitly too): with them this script
# computes exactly what `train.py --stage 0` computed before it moved here (same seed, same bits).
def make_parser() -> Parser:
    p = Parser(prog="pretrain.py", description=__doc__.split("\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="text files, one text per line, or .jsonl files of "
                   "{\"text\": ...} or of CLaRa records, read as raw-text QA (see read_texts)")
    p.add_argument("--out", required=True, help="the base directory to write (replaced whole if this script "
                   "wrote it before; a folder holding other files is refused)")
    p.add_argument("--preset", default="tiny", choices=sorted(LAB_PRESETS), help="the decoder's shape")
    p.add_argument("--vocab-size", type=int, default=1000, help="size of the BPE trained on the data")
    p.add_argument("--tie-embeddings", type=int, choices=(0, 1), default=1, help="the output layer shares the "
                   "input embedding (a tiny model then learns to copy a word from its context in a few hundred "
                   "steps; untied, it had not after 300)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per text (cut on the right)")
    p.add_argument("--global-batch", type=int, default=32, help="texts per optimizer step")
    p.add_argument("--micro-batch", type=int, default=None, help="texts per forward pass (default: --global-batch)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the texts")
    p.add_argument("--max-steps", type=int, default=None, help="total optimizer steps (default: --epochs)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=2e-4, help="final learning rate of the cosine")
    p.add_argument("--warmup", type=float, default=0.05, help="linear warmup as a fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    p.add_argument("--log-every", type=int, default=10, help="print (and record in provenance.json) every N steps")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="weights/compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    return p


def parse_args(argv=None):
    a = make_parser().parse_args(argv)
    a.micro_batch = a.micro_batch or a.global_batch
    a.schedule = "cosine"  # what train.lr_at reads
    for k in ("vocab_size", "max_len", "global_batch", "micro_batch", "epochs", "max_steps", "log_every"):
        v = getattr(a, k)
        if v is not None and v < 1:
            raise UsageError(f"--{k.replace('_', '-')} {v}: must be > 0")
    for k in ("lr", "grad_clip"):
        if not (math.isfinite(getattr(a, k)) and getattr(a, k) > 0):
            raise UsageError(f"--{k.replace('_', '-')} {getattr(a, k)}: must be a finite number > 0")
    for k in ("min_lr", "weight_decay"):
        if not (math.isfinite(getattr(a, k)) and getattr(a, k) >= 0):
            raise UsageError(f"--{k.replace('_', '-')} {getattr(a, k)}: must be a finite number >= 0")
    if not 0 <= a.warmup < 1:
        raise UsageError(f"--warmup {a.warmup}: must be in [0, 1)")
    if a.seed < 0:
        raise UsageError(f"--seed {a.seed}: must be >= 0")
    if a.global_batch % a.micro_batch:
        raise UsageError(f"--global-batch {a.global_batch} is not a multiple of --micro-batch {a.micro_batch}")
    a.out = Path(a.out)
    return a


def read_texts(paths) -> list[str]:
    """The training text. Any file but .jsonl holds one text per line. A .jsonl file holds per line either
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
        if path.is_dir():
            raise UsageError(f"--data {path}: is a directory; pass the text file(s) in it")
        if not path.is_file():
            raise UsageError(f"--data {path}: no such file")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                texts.append(line)
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"{path}:{n}: not JSON") from None
            if isinstance(r, dict) and "text" not in r and "data_type" in r:
                try:
                    r = validate_record(r, 1, f"{path}:{n}")  # normalised: lists, one document
                except DataError as e:
                    raise UsageError(str(e)) from None
                if r["data_type"] == "paraphrase":
                    texts.append(r["answers"][0])
                else:
                    texts += [f"{text_prompt(q, r['docs'])} {ans}</s>" for q, ans in zip(r["question"], r["answers"])]
                continue
            if isinstance(r, dict) and "text" not in r and {"question", "docs", "answer"} <= r.keys():
                try:
                    r = validate_record(r, 2, f"{path}:{n}")
                except DataError as e:
                    raise UsageError(f"{path}:{n}: a stage-2 record needs a string question and answer and a list "
                                     f"of documents: {e}") from None
                texts.append(f"{text_prompt(r['question'], r['docs'])} {r['answer']}</s>")
                continue
            text = r.get("text") if isinstance(r, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UsageError(f"{path}:{n}: expected {{\"text\": non-empty string}} or a stage-2 record "
                                 "{\"question\", \"docs\", \"answer\"}")
            texts.append(text)
    return texts


def preset_tokenizer(texts: list[str], vocab_size: int, split_punctuation: bool = False):
    """A BPE trained on the data and on the fixed prompt strings (50 times, so their words become single
    pieces: the tiny decoder's answer prompt shrinks from about 150 tokens to about 80)."""
    return train_tokenizer(list(texts) + PROMPT_TEXTS * 50, vocab_size, split_punctuation=split_punctuation)


def sha256(file: Path) -> str:
    return hashlib.sha256(Path(file).read_bytes()).hexdigest()


def shown_path(path: Path) -> str:
    """A path as provenance.json records it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def git_commit() -> str | None:
    """The repository's commit (with "-dirty" when tracked files differ from it), or None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def check_out(out: Path):
    """--out: new, empty, or a base this script wrote (it has provenance.json); never a user's folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "provenance.json").is_file():
        raise UsageError(f"--out {out}: holds files this script did not write (no provenance.json); nothing was "
                         "changed: choose a new or empty folder")


def pretrain(a, argv: list[str]) -> dict:
    """Train the base and write --out; returns the provenance record."""
    check_out(a.out)
    commit = git_commit()  # the code that runs: read before training (a tree edited meanwhile is not it)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    texts = read_texts(a.data)
    tok = preset_tokenizer(texts, a.vocab_size, split_punctuation=True)  # see train_tokenizer: copyable words
    cfg = ModelConfig(**{**LAB_PRESETS[a.preset], "vocab_size": tok.vocab_size,
                         "tie_embeddings": bool(a.tie_embeddings)})
    model = Transformer(cfg).init_weights(seed=a.seed).to(device=device, dtype=dtype)
    rows = [r[:a.max_len] for r in tok.encode_batch([t if t.startswith("<s>") else f"<s>{t}</s>" for t in texts])]
    steps_per_epoch = len(rows) // a.global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"--data {' '.join(map(str, a.data))}: {len(rows)} texts is less than one global batch "
                         f"({a.global_batch})")
    total = a.max_steps or a.epochs * steps_per_epoch
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=a.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretrain: {len(rows)} texts, {total} steps of {a.global_batch}, {n_params:,} parameters, "
          f"vocabulary {tok.vocab_size}, device {device}, {dtype}", flush=True)
    curve, loss, t_start = [], float("nan"), time.perf_counter()
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
            raise UsageError(f"step {step + 1}: non-finite loss {loss}; nothing was saved. Try a lower --lr.")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        if not math.isfinite(float(grad_norm)):
            raise UsageError(f"step {step + 1}: non-finite gradients; nothing was saved. Try a lower --lr.")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UsageError(f"step {step + 1}: non-finite parameters after the optimizer step; nothing was saved. "
                             "Try a lower --lr.")
        if (step + 1) % a.log_every == 0 or step + 1 == total:
            curve.append([step + 1, round(loss, 5)])
            print(f"step {step + 1} loss {loss:.4g} lr {opt.param_groups[0]['lr']:.4g} grad_norm {float(grad_norm):.4g} "
                  f"tokens_per_s {n_tokens / (time.perf_counter() - t0):.4g}", flush=True)
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in ("data", "out")}
    record = {"what": "a base decoder pretrained as a plain language model by lab/pretrain.py (not CLaRa)",
              "command": "python lab/pretrain.py " + shlex.join(argv), "commit": commit,
              "data": [{"path": shown_path(f), "sha256": sha256(f)} for f in a.data],
              "flags": flags, "texts": len(rows), "steps": total, "parameters": n_params,
              "vocab_size": tok.vocab_size, "final_loss": round(loss, 5), "loss_curve": curve,
              "seconds": round(time.perf_counter() - t_start, 1), "torch": torch.__version__}
    tmp = a.out.with_name(a.out.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        tok.save(tmp)
        (tmp / "provenance.json").write_text(json.dumps(record, indent=1) + "\n")
        a.out.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, a.out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"saving {a.out} failed: {e.strerror or e}; the previous one (if any) is intact") from None
    print(f"done: {total} steps, final loss {loss:.4g}; base model in {a.out} (train.py --model {a.out})", flush=True)
    return record


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    return pretrain(parse_args(argv), argv)


def cli(argv=None) -> int:
    """The command line: an expected error is one line on stderr and exit 2, as with train.py."""
    try:
        main(argv)
        return 0
    except UsageError as e:
        print(f"pretrain.py: error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())

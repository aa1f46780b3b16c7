"""The real-model recipe: CLaRa's three stages on a pretrained checkpoint and real Wikipedia passages.

    CLARA_SMOLLM2=/path/SmolLM2-135M-Instruct python lab/real.py --size cpu   # 2 CPU cores: 46 min
    python lab/real.py --model DIR --size gpu                                # one GPU, minutes
    python lab/real.py --size cpu --dry-run                                  # print the commands only

The sibling of lab/lab.py (the synthetic CPU lab), on real things: a pretrained model (--model, default
$CLARA_SMOLLM2: SmolLM2-135M-Instruct; any Llama-family HF folder) and the official example data (--src:
the official repository's example/pretrain_data.jsonl, 1,000 Wikipedia passages with about 8 QA pairs each).
It prints every command before it runs it (the commands a reader would type) and gathers their results:

  1. data      lab/official_data.py: a held-out split BY DOCUMENT (--test-docs passages and all their
               questions never appear in a training file), the stage-1/2/3 training files and the held-out
               evaluation files (test_stage2: k documents per question; test_stage3: 20 candidates)
  2. stages 1 and 2 at each compression rate: LoRA adapters (encoder, decoder) and the <MEMi> rows on the
               FROZEN base (the method's own setting; train.py never trains it), then eval.py on the held-out questions:
               compressed (the decoder adapter reads the k documents' memories), and once, with the bare
               base model, raw text (the same k documents in the prompt) and closed book (no document)
  3. stage 3   from the stage-2 model of --stage3-rate (default: the smallest rate): retrieval among 20
               candidates with the untrained query reasoner (a copy of the encoder), then after the
               optional retrieval warm-up (InfoNCE on pos_index) and after the end-to-end stage (the answer
               loss through the differentiable top-k): recall@1/5 and the answers' accuracy

Answers are scored with cover-EM ("acc" in the paper's tables: every gold token is in the prediction), EM
and F1, the best over gold aliases; eval.py also reports the cost per query (compression, query + top-k,
time to first token, decode, context tokens vs raw text), which results.md copies.

Outputs in --out (default out/real/<size>): data/, rate{R}/stage{1,2}/, rate{R}/eval/, stage3*/,
results.json (every number and every command with its seconds) and results.md (the tables).

Sizes (SIZES below): "gpu" trains thousands of examples per stage at rates 4/16/32 with k=5 documents, as
the method does; "cpu" is sized so that 2 CPU cores finish in 46 minutes: one rate (4), shorter
documents (128 tokens), one document per stage-2 question (k=1), 160 stage-1 and 640 stage-2 examples, and
evaluation on 50 held-out questions (retrieval costs 20 document compressions per question: a handful). Every
setting can be overridden (--s1-steps, --limit, --rates, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "official_example_pretrain_data.jsonl"
# glibc keeps a step's freed temporaries in the heap, so a CPU process's peak RSS is about twice what is alive;
# with every block over 128 KiB mapped on its own (and returned when freed) the peak is what is alive: 0.48x
# for a stage-1 sample (BENCHMARKS.md, "Stage-1 memory per sample"). It must be set before the child starts.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}

SIZES = {
    # One GPU: the method's k=5 and 256-token documents, rates 4/16/32, every held-out question.
    "gpu": dict(test_docs=100, k=5, candidates=20, doc_len=256, rates=[4, 16, 32], questions_per_doc=None,
                s1_steps=600, s2_steps=600, s3_warmup_steps=200, s3_steps=200,
                global_batch=32, micro_batch=8, s3_global_batch=32, s3_micro_batch=2, max_len=1024,
                lora_r=16, lora_alpha=32, lr=1e-4, s3_lr=1e-5,
                limit=None, s3_limit=None, s3_top_k=5, max_new_tokens=64, batch_size=32, dtype=None),
    # 2 CPU cores, 46 min (BENCHMARKS.md): one rate, short documents, k=1, a few hundred examples, small
    # evaluations. Measured cost (SmolLM2-135M, fp32, 2 cores): a stage-1 step of 4 examples 17.7 s (128-token
    # documents, all their QA pairs as the target), a stage-2 step 10.1 s; retrieval compresses 20 documents
    # per question.
    "cpu": dict(test_docs=100, k=1, candidates=20, doc_len=128, rates=[4], questions_per_doc=2,
                s1_steps=40, s2_steps=160, s3_warmup_steps=0, s3_steps=2,
                global_batch=4, micro_batch=2, s3_global_batch=2, s3_micro_batch=1, max_len=320,
                lora_r=16, lora_alpha=32, lr=1e-3, s3_lr=1e-4,
                limit=50, s3_limit=4, s3_top_k=1, max_new_tokens=24, batch_size=10, dtype="float32"),
}
OVERRIDES = {  # flag -> (type, help); each replaces the size's value
    "test_docs": (int, "held-out documents"), "k": (int, "documents per stage-2 / reading question"),
    "candidates": (int, "stage-3 candidates per question"), "doc_len": (int, "document tokens kept"),
    "questions_per_doc": (int, "stage-2/3 training questions per document"),
    "s1_steps": (int, "stage-1 steps"), "s2_steps": (int, "stage-2 steps"),
    "s3_warmup_steps": (int, "stage-3 retrieval warm-up steps (0: none)"), "s3_steps": (int, "stage-3 steps"),
    "global_batch": (int, "examples per step, stages 1-2"), "micro_batch": (int, "examples per forward, stages 1-2"),
    "s3_global_batch": (int, "examples per step, stage 3"),
    "s3_micro_batch": (int, "examples per forward, stage 3"), "max_len": (int, "decoder tokens per example"),
    "lora_r": (int, "LoRA rank"), "lora_alpha": (float, "LoRA alpha"), "lr": (float, "stages 1-2 peak lr"),
    "s3_lr": (float, "stage-3 lr (warm-up and end to end)"), "limit": (int, "held-out reading questions"),
    "s3_limit": (int, "held-out retrieval questions"), "s3_top_k": (int, "stage-3 documents read (top-k)"),
    "max_new_tokens": (int, "generated tokens per answer"), "batch_size": (int, "eval questions per batch"),
}


def run(cmd: list, log: list, dry: bool) -> float:
    """Echo one command (paths as given), run it from the repository root; returns its seconds."""
    shown = " ".join(shlex.quote(str(c)) for c in cmd).replace(PY, "python")
    print(f"\n$ {shown}", flush=True)
    if dry:
        log.append({"command": shown, "seconds": None})
        return 0.0
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True, env=CHILD_ENV)
    seconds = time.perf_counter() - t0
    log.append({"command": shown, "seconds": round(seconds, 1)})
    return seconds


def evaluate(ckpt: Path, data: Path, out: Path, modes: list[str], cfg: dict, log: list, dry: bool, limit,
             extra=()) -> dict | None:
    cmd = [PY, "eval.py", "--checkpoint", ckpt, "--data", data, "--mode", *modes, "--out", out, "--no-progress",
           "--batch-size", cfg["batch_size"], "--max-new-tokens", cfg["max_new_tokens"], *extra]
    if cfg["dtype"]:
        cmd += ["--dtype", cfg["dtype"]]
    run(cmd + (["--limit", limit] if limit else []), log, dry)
    if dry:
        return None
    s = json.loads((out / "summary.json").read_text())
    return {m: s["results"][data.stem][m] | {"cost": s["cost"][data.stem][m]} for m in modes}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="gpu: one GPU, minutes; cpu: 2 cores, 46 min")
    p.add_argument("--model", default=os.environ.get("CLARA_SMOLLM2"), help="HF model folder (default: $CLARA_SMOLLM2)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="the official example/pretrain_data.jsonl")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: out/real/<size>)")
    p.add_argument("--rates", type=int, nargs="+", default=None, help="compression rates (default: the size's)")
    p.add_argument("--stage3-rate", type=int, default=None, help="the rate whose stage-2 model stage 3 starts from "
                   "(default: the smallest of --rates)")
    p.add_argument("--device", default=None, help="passed to train.py and eval.py (default: theirs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    for name, (typ, hlp) in OVERRIDES.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=hlp + " (default: the size's)")
    a = p.parse_args(argv)
    if not a.model:
        p.error("--model: no model folder given and CLARA_SMOLLM2 is not set (tests/test_real_model.py says how "
                "to make the SmolLM2-135M-Instruct folder offline)")
    if not a.dry_run and not (Path(a.model) / "config.json").is_file():
        p.error(f"--model {a.model}: no config.json there (expected a Hugging Face model folder)")
    if not a.dry_run and not a.src.is_file():
        p.error(f"--src {a.src}: file not found (the official repository's example/pretrain_data.jsonl)")
    cfg = dict(SIZES[a.size])
    cfg.update({name: getattr(a, name) for name in OVERRIDES if getattr(a, name) is not None})
    cfg["rates"] = a.rates or cfg["rates"]
    for r in cfg["rates"]:
        if r < 1 or cfg["doc_len"] % r:
            p.error(f"--rates: {r} does not divide --doc-len {cfg['doc_len']}")
    s3 = a.stage3_rate or min(cfg["rates"])
    if s3 not in cfg["rates"]:
        p.error(f"--stage3-rate {s3} is not one of --rates {cfg['rates']}")
    cfg["stage3_rate"] = s3
    return a, cfg


def main(argv=None) -> dict:
    a, cfg = parse_args(argv)
    out = (a.out or ROOT / "out" / "real" / a.size).resolve()
    data, dry = out / "data", a.dry_run
    old = [q for q in (data, *out.glob("rate[0-9]*")) if q.is_dir()]
    if old and not dry:  # no stale checkpoint, eval or data file of another setting can mix into the results
        print(f"removing the previous run's folders in {out}: {', '.join(q.name for q in old)}")
        for q in old:
            shutil.rmtree(q)
    log, t_start = [], time.perf_counter()
    res = {"settings": cfg | {"size": a.size, "model": str(a.model), "src": str(a.src), "seed": a.seed},
           "rates": {}}
    seed = ["--seed", a.seed]
    dev = ["--device", a.device] if a.device else []
    dtype = ["--dtype", cfg["dtype"]] if cfg["dtype"] else []
    lora = ["--lora-r", cfg["lora_r"], "--lora-alpha", cfg["lora_alpha"], "--lora-dropout", "0"]
    common = [*lora, "--max-len", cfg["max_len"], "--log-every", "2", *dev, *dtype, *seed]

    # 1. data: split by document, the training files and the held-out evaluation files
    cmd = [PY, "lab/official_data.py", "--src", a.src, "--out", data, "--test-docs", cfg["test_docs"], "--k", cfg["k"],
           "--candidates", cfg["candidates"], *seed]
    run(cmd + (["--questions-per-doc", cfg["questions_per_doc"]] if cfg["questions_per_doc"] else []), log, dry)
    test2, test3 = data / "test_stage2.jsonl", data / "test_stage3.jsonl"

    # 2. stages 1 and 2 per rate on the frozen base, then reading the held-out questions
    batch = ["--global-batch", cfg["global_batch"], "--micro-batch", cfg["micro_batch"]]
    for rate in cfg["rates"]:
        d = out / f"rate{rate}"
        run([PY, "train.py", "--stage", "1", "--model", a.model, "--data", data / "stage1.jsonl", "--out", d / "stage1",
             "--doc-len", cfg["doc_len"], "--compr-rate", rate, "--lr", cfg["lr"],
             "--min-lr", cfg["lr"] / 10, "--max-steps", cfg["s1_steps"], *batch, *common], log, dry)
        run([PY, "train.py", "--stage", "2", "--init", d / "stage1" / "checkpoint", "--data", data / "stage2.jsonl",
             "--out", d / "stage2", "--top-k", cfg["k"], "--lr", cfg["lr"], "--min-lr", cfg["lr"] / 10,
             "--max-steps", cfg["s2_steps"], *batch, *common], log, dry)
        first = rate == cfg["rates"][0]  # the base model's raw-text and closed-book baselines: once
        modes = ["compressed", "text", "closed_book"] if first else ["compressed"]
        r = evaluate(d / "stage2" / "checkpoint", test2, d / "eval", modes, cfg, log, dry, cfg["limit"],
                     ["--top-k", cfg["k"], *dev])
        if r:
            res["rates"][rate] = {"compressed": r["compressed"], "memory_tokens": cfg["doc_len"] // rate}
            if first:
                res["text"], res["closed_book"] = r["text"], r["closed_book"]

    # 3. stage 3 from one rate's stage-2 model: untrained query reasoner, (warm-up), end to end
    d = out / f"rate{cfg['stage3_rate']}"
    k3 = ["--top-k", cfg["s3_top_k"]]
    res["stage3_before"] = evaluate(d / "stage2" / "checkpoint", test3, d / "eval_stage3_before", ["retrieval"], cfg,
                                    log, dry, cfg["s3_limit"], ["--query-from-encoder", *k3, *dev])
    s3 = [PY, "train.py", "--stage", "3", "--data", data / "stage3.jsonl", *k3, "--global-batch", cfg["s3_global_batch"],
          "--micro-batch", cfg["s3_micro_batch"], "--lr", cfg["s3_lr"], *common]
    init = d / "stage2" / "checkpoint"
    if cfg["s3_warmup_steps"]:
        run(s3 + ["--retrieval-warmup", "--init", init, "--out", d / "stage3_warmup",
                  "--max-steps", cfg["s3_warmup_steps"]], log, dry)
        init = d / "stage3_warmup" / "checkpoint"
        res["stage3_warmup"] = evaluate(init, test3, d / "eval_stage3_warmup", ["retrieval"], cfg, log, dry,
                                        cfg["s3_limit"], [*k3, *dev])
    run(s3 + ["--init", init, "--out", d / "stage3", "--max-steps", cfg["s3_steps"]], log, dry)
    res["stage3_after"] = evaluate(d / "stage3" / "checkpoint", test3, d / "eval_stage3_after", ["retrieval"], cfg,
                                   log, dry, cfg["s3_limit"], [*k3, *dev])
    res["commands"], res["seconds"] = log, round(time.perf_counter() - t_start, 1)
    if dry:
        return res
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(tables(res))
    print("\n" + tables(res), flush=True)
    print(f"real-model recipe done in {res['seconds'] / 60:.1f} min; results in {out}")
    return res


# ---- report -------------------------------------------------------------------------------------------

def _cost_row(label: str, r: dict) -> str:
    c = r["cost"]
    raw = "–" if c["raw_text_tokens"] is None else f"{c['raw_text_tokens']:.0f}"
    return (f"| {label} | {c['compress_ms']:.0f} | {c['retrieve_ms']:.0f} | {c['ttft_ms']:.0f} | {c['decode_ms']:.0f} "
            f"| {c['generate_ms']:.0f} | {c['context_tokens']:.0f} | {raw} |")


def tables(res: dict) -> str:
    """Reading (held-out questions), stage-3 retrieval among N candidates, cost per query: markdown."""
    s = res["settings"]
    n = res["text"]["n"]
    rows = [f"| reading (held-out passages, {n} questions, k={s['k']}) | memory / doc tokens | cover-EM % | EM % | "
            "F1 % |", "|---|---|---|---|---|"]
    line = lambda label, tokens, r: f"| {label} | {tokens} | {r['acc']:.1f} | {r['em']:.1f} | {r['f1']:.1f} |"  # noqa: E731
    rows += [line("closed book (base model, no document)", 0, res["closed_book"]),
             line("raw text (base model reads the documents)", "all", res["text"])]
    rows += [line(f"compressed, rate {rate}", f"{v['memory_tokens']} / {s['doc_len']}", v["compressed"])
             for rate, v in res["rates"].items()]
    n3 = res["stage3_after"]["retrieval"]["n"]
    rows += ["", f"| stage 3 (rate {s['stage3_rate']}, {s['candidates']} candidates, top-{s['s3_top_k']}, {n3} "
             "questions) | recall@1 % | recall@5 % | answer cover-EM % |", "|---|---|---|---|",
             f"| random choice | {100 / s['candidates']:.1f} | {500 / s['candidates']:.1f} | – |"]
    phases = [("before", "untrained query reasoner (copy of the encoder)")]
    if "stage3_warmup" in res:
        phases.append(("warmup", f"after the retrieval warm-up ({s['s3_warmup_steps']} steps, InfoNCE)"))
    phases.append(("after", f"after end-to-end stage 3 (+{s['s3_steps']} steps)"))
    for key, label in phases:
        r = res[f"stage3_{key}"]["retrieval"]
        r5 = f"{r['recall@5']:.1f}" if "recall@5" in r else "–"
        rows.append(f"| {label} | {r['recall@1']:.1f} | {r5} | {r['acc']:.1f} |")
    rows += ["", "| cost per query (ms, eval batch size " + str(s["batch_size"]) + ") | compress | query + top-k | "
             "ttft (batch) | decode | generate | context tokens | raw-text tokens |", "|---|---|---|---|---|---|---|---|",
             _cost_row("closed book", res["closed_book"]), _cost_row("raw text", res["text"])]
    rows += [_cost_row(f"compressed, rate {rate}", v["compressed"]) for rate, v in res["rates"].items()]
    rows.append(_cost_row(f"retrieval among {s['candidates']}, rate {s['stage3_rate']}",
                          res["stage3_after"]["retrieval"]))
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()

"""Stage-1 memory and time per sample on a real-sized model shape: the lean LoRA backward against plain autograd.

    python bench/bench_memory.py                          # SmolLM2-135M shape, micro-batch 1, rates 4 and 32
    python bench/bench_memory.py --batch 1 2 --rates 4 --modes plain lean

The model has SmolLM2-135M's exact shape (30 layers, hidden 576, 9 query / 3 key-value heads of 64,
SwiGLU 1536, vocabulary 49,152, tied embeddings) with random weights, in fp32 on the CPU; the tokenizer is
a small BPE trained here (its vocabulary is smaller than the model's, which Clara accepts: the logits are
still 49,152 wide). One stage-1 QA example per sample: a document cut to --doc-len tokens, and a target of
--qa-pairs question/answer pairs (about 150 tokens at the default). Each measurement is one forward +
backward of `Clara.loss`, in its own process, since a peak RSS only ever grows:

  saved   bytes autograd keeps for backward, activations only (each storage once, weights not counted):
          exact and machine independent
  peak    growth of the process's peak RSS during the step: what the machine must have. It includes heap
          that the step freed but glibc's malloc kept (interleaved with live tensors, it cannot be handed
          back), so it sits above `saved` + transients
  time    wall seconds of the step per sample (noisy on a shared machine: compare rows of one run)

Modes: plain = LoRALinear.save_less = MLP.save_less = False (the behaviour before the lean backward);
lean = the default; +mmap = with MALLOC_MMAP_THRESHOLD_=131072 in the environment (glibc then maps every
block over 128 KiB on its own and returns it when freed: no retained heap); ckpt = lean with activation
checkpointing (train.py --activation-checkpointing). --count-only skips the backward and the
peak, for micro-batches too big for the machine (saved bytes need only the forward).
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clara import PROMPT_TEXTS, Clara, ClaraConfig  # noqa: E402
from data import train_tokenizer  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                    intermediate_size=1536, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True,
                    dtype="float32")
MODES = ("plain", "lean", "plain+mmap", "lean+mmap", "ckpt")


def child(a):
    """One measurement in this process; prints one JSON line."""
    torch.set_num_threads(a.threads)
    B = a.batch[0]
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))
    tok = train_tokenizer([text(50) for _ in range(200)] + PROMPT_TEXTS, 1000)
    model = Transformer(ModelConfig(**SMOLLM2_135M)).init_weights(seed=0)
    clara = Clara(model, tok, ClaraConfig(doc_max_length=a.doc_len, compr_rate=a.rate))
    clara.trainable_parameters(1)
    clara.train()
    lean = not a.mode.startswith("plain")
    for m in clara.modules():
        if hasattr(m, "save_less"):
            m.save_less = lean
    clara.model.activation_checkpointing = a.mode == "ckpt"
    recs = [{"data_type": "qa", "question": [text(6) for _ in range(a.qa_pairs)],
             "answers": [text(8) for _ in range(a.qa_pairs)], "docs": [text(2 * a.doc_len)]} for _ in range(B)]
    batch = clara.collate(recs, 1)
    weights = {p.untyped_storage().data_ptr() for p in clara.parameters()}
    seen, saved = {}, [0]  # storage address -> a weak reference to the tensor counted for it

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        # An address counts again only once the tensor counted for it is gone (count-only keeps nothing,
        # so a freed activation's memory is reused by later ones).
        if ptr not in weights and (ptr not in seen or seen[ptr]() is None):
            seen[ptr] = weakref.ref(t)
            saved[0] += t.untyped_storage().nbytes()
        return None if a.count_only else t  # count-only: keep nothing, there is no backward
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = clara.total_loss(clara.loss(batch, 1))
    if not a.count_only:
        loss.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    print(json.dumps({"mode": a.mode, "batch": B, "rate": a.rate, "enc": list(batch.doc_ids.shape),
                      "dec": list(batch.dec_ids.shape), "targets": batch.n_targets,
                      "saved": saved[0],
                      "peak": None if a.count_only else peak, "time": None if a.count_only else dt}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="micro-batch sizes")
    p.add_argument("--rates", type=int, nargs="+", default=[4, 32], help="compression rates")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--doc-len", type=int, default=256, help="document tokens (doc_max_length)")
    p.add_argument("--qa-pairs", type=int, default=4, help="question/answer pairs in the stage-1 target")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--count-only", action="store_true", help="saved bytes only: forward, no backward, no peak")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="lean", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--rate", type=int, default=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    print(f"stage-1 step, SmolLM2-135M shape, fp32 CPU, {a.threads} threads, doc_len {a.doc_len}, "
          f"{a.qa_pairs} QA pairs{', saved bytes only' if a.count_only else ''}")
    print("| mode | micro-batch | rate | encoder tokens | decoder tokens | targets | saved GiB/sample | "
          "peak GiB/sample | s/sample | saved vs plain | peak vs plain | time vs plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b in a.batch:
        for r in a.rates:
            base = None
            for mode in a.modes:
                env = dict(os.environ)
                if mode.endswith("+mmap"):
                    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
                cmd = [sys.executable, __file__, "--child", "--mode", mode, "--batch", str(b), "--rate", str(r),
                       "--doc-len", str(a.doc_len), "--qa-pairs", str(a.qa_pairs), "--threads", str(a.threads)]
                out = subprocess.run(cmd + (["--count-only"] * a.count_only), env=env, capture_output=True,
                                     text=True)
                if out.returncode:
                    sys.exit(f"bench_memory: the {mode} run failed:\n{out.stderr[-2000:]}")
                m = json.loads(out.stdout.strip().splitlines()[-1])
                base = base or m
                gib = 2 ** 30

                def per(v, scale=1.0):
                    return "-" if v is None else f"{v / scale / b:.2f}"

                def ratio(k):
                    return "-" if m[k] is None or base[k] is None else f"{m[k] / base[k]:.2f}"
                print(f"| {mode} | {b} | {r} | {m['enc'][1]} x {b} | {m['dec'][1]} x {b} | {m['targets']} | "
                      f"{per(m['saved'], gib)} | {per(m['peak'], gib)} | {per(m['time'])} | {ratio('saved')} | "
                      f"{ratio('peak')} | {ratio('time')} |", flush=True)


if __name__ == "__main__":
    main()

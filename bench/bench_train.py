"""Training-step throughput of CLaRa: samples/s and tokens/s of a stage-1 and a stage-3 step.

    python bench/bench_train.py                     # tiny preset on CPU
    python bench/bench_train.py --shape mistral-7b  # one GPU: a 7B-shaped model, random weights, LoRA, bf16

Synthetic batches with the official shapes (stage 1: one document of doc_len tokens + a QA target, micro
batch 2; stage 3: N candidates compressed without gradient + the query reasoner + top-k + the decoder).
MFU is train.py's: `train.batch_flops` (2·P a token forward; 4·P a token through a trained pass,
whose frozen base still passes input gradients down; the adapters' terms, causal attention and the
output layer at the targets; no recompute), divided by the time and 989 TFLOP/s (`train.PEAK_BF16`,
H100/H200 dense bf16). The rule in full: docs/training.md#mfu.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clara import Clara, ClaraConfig  # noqa: E402
from data import train_tokenizer  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from train import PEAK_BF16, batch_flops, mfu  # noqa: E402

WORDS = "the of and to in is was for on as with by at from his her an which first new time year city".split()


def fake_records(stage, n, n_cand, rng):
    def doc(words):
        return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."
    if stage == 1:
        return [{"data_type": "qa", "question": [doc(8)] * 3, "answers": [doc(6)] * 3, "docs": [doc(180)]} for _ in range(n)]
    return [{"question": doc(12), "docs": [doc(180) for _ in range(n_cand)], "answer": doc(4), "pos_index": [0]}
            for _ in range(n)]


def bench_optimizer(clara, stage, device):
    """The benchmarked run's trainable parameters (those of `stage`) on `device`, their AdamW, training mode."""
    params = clara.trainable_parameters(stage)
    clara.to(device)
    clara.train()
    return torch.optim.AdamW(params.values(), lr=1e-5)


def step_flops(clara: Clara, batch, stage: int) -> int:
    """The FLOPs of one timed step: train.py's count (the method's trainable set, the answer)."""
    return batch_flops(clara.model.cfg, clara.cfg.lora_r, batch, stage)


def timed_step(clara, opt, stage, records, sync=lambda: None):
    """One optimizer step of `stage` on `records` (the benchmarked loop; bench/gpu_check.py part c
    runs it too) -> (seconds of loss + backward + update, tokens read, FLOPs: `step_flops`).
    `sync` waits for the device before each clock reading (CUDA calls return before the work is done)."""
    batch = clara.collate(records, stage)
    sync()
    t = time.perf_counter()
    clara.total_loss(clara.loss(batch, stage)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    dt = time.perf_counter() - t
    tokens = int(batch.doc_mask.sum()) + int(batch.dec_mask.sum())
    tokens += int(batch.q_mask.sum()) if stage == 3 else 0
    return dt, tokens, step_flops(clara, batch, stage)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", choices=("tiny", "mistral-7b"))
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--compr-rate", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--activation-checkpointing", action="store_true")
    a = p.parse_args()
    import random
    rng = random.Random(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = train_tokenizer([" ".join(WORDS) * 3], 300)
    cfg = ModelConfig.from_preset(a.shape, vocab_size=32000 if a.shape == "mistral-7b" else tok.vocab_size)
    with torch.device("meta"):  # a 7B model is materialised once, directly on the device
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights().to(dtype)  # random weights (norms at 1: tiny activations would hit CPU denormals)
    model.requires_grad_(False)
    model.activation_checkpointing = a.activation_checkpointing
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    P = sum(prm.numel() for n, prm in model.named_parameters() if "tok_embeddings" not in n and "output" not in n)
    print(f"{a.shape} ({P / 1e9:.2f}B non-embedding parameters), {gpu}, {dtype}, micro-batch {a.micro_batch}, "
          f"rate {a.compr_rate}, torch {torch.__version__}")
    print("| stage | samples/s | tokens/s | MFU |")
    print("|---|---|---|---|")
    for stage in (1, 3):
        ccfg = ClaraConfig(compr_rate=a.compr_rate, training_stage=stage, max_len=2048 if stage == 1 else 1024)
        if stage == 1:
            clara = Clara(model, tok, ccfg)
        else:  # the same model continues into stage 3 with a query reasoner
            clara.cfg = ccfg
            clara.model.copy_adapter("encoder", "query")
        opt = bench_optimizer(clara, stage, device)
        times, toks, flops = [], 0, 0
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for step in range(a.steps + 1):
            records = fake_records(stage, a.micro_batch, a.candidates, rng)
            dt, n, fl = timed_step(clara, opt, stage, records, sync)
            if step == 0:
                continue  # warm-up
            times.append(dt)
            toks, flops = toks + n, flops + fl
        dt = sum(times)
        util = f"{mfu(flops, dt, PEAK_BF16):.1%}" if device.type == "cuda" else "n/a (CPU)"
        print(f"| {stage} | {a.micro_batch * a.steps / dt:.2f} | {toks / dt:,.0f} | {util} |")


if __name__ == "__main__":
    main()

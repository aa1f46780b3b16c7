"""model.py vs transformers on the same random Mistral config, on CPU: forward, forward+backward and greedy
generation, reported as ratios measured in one run (this machine is shared and noisy: compare only within
a run). Run by hand:  python bench/bench_model.py [--threads 2] [--clock cpu] [--compile]

Each measurement is the best of several repeats after a warm-up, the two models alternating; ratios > 1 mean ours is faster.
--clock cpu times with the process's CPU time instead of the wall clock: on a machine shared with other
jobs it does not count the time the scheduler gives to them (use it with --threads 1, where CPU time is
work; with more threads it also counts their spin-waits). --compile adds generate(compile=True), timed
after a first call that compiles the per-token step.

Generation runs a left-padded batch (three of its four prompts are 8 tokens after 56 of padding), then
splits it: its prefill alone (a 1-token generation), the same generation without padding, and the time
of one decoding step (the generation minus its prefill).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import Transformer, generate  # noqa: E402


CLOCK = time.perf_counter


def timeit_pair(fa, fb, repeats=7):
    """Best-of-`repeats` seconds of two functions, run alternately so that both see the same machine load
    (the minimum is the least noisy estimate on a shared machine)."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for f, ts in ((fa, ta), (fb, tb)):
            t = CLOCK()
            f()
            ts.append(CLOCK() - t)
    return min(ta), min(tb)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    a = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    import transformers
    cfg = transformers.MistralConfig(vocab_size=2000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2, sliding_window=None,
                                     max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg).float().eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(3, 2000, (a.batch, a.seq))
    mask = torch.ones_like(ids)
    mask[1:, : a.seq // 4] = 0  # left padding in all rows but the first
    rows = []

    with torch.no_grad():
        t_hf, t_us = timeit_pair(lambda: hf(ids, attention_mask=mask).logits, lambda: ours(ids, attention_mask=mask))
    rows.append(("forward", t_hf, t_us))

    # forward + backward: every weight trainable in both, the same scalar loss
    for m in (hf, ours):
        m.requires_grad_(True)
    t_hf, t_us = timeit_pair(lambda: hf(ids, attention_mask=mask).logits.logsumexp(-1).mean().backward(),
                             lambda: ours(ids, attention_mask=mask).logsumexp(-1).mean().backward(), 5)
    rows.append(("forward+backward", t_hf, t_us))

    short = ids[:, :64]
    smask = mask[:, :64].clone()
    smask[:, -8:] = 1  # rows 1-3: 8 real tokens after 56 of padding; row 0: 64 real tokens
    n = a.new_tokens

    def pair(ids_, mask_, new, compile=False):
        return timeit_pair(lambda: hf.generate(ids_, attention_mask=mask_, do_sample=False, eos_token_id=None,
                                               pad_token_id=1, min_new_tokens=new, max_new_tokens=new),
                           lambda: generate(ours, ids_, mask_, eos_id=-1, max_new_tokens=new, compile=compile), 5)
    rows.append((f"greedy generation ({n} tokens)", *pair(short, smask, n)))
    # The two parts of it: the prefill (a 1-token generation is the prompt's forward and one argmax) and
    # the decoding steps, and the same generation without padding (no prefill work to skip).
    rows.append(("  its prefill alone (1 token)", *pair(short, smask, 1)))
    rows.append((f"greedy generation ({n} tokens), no padding", *pair(short, torch.ones_like(smask), n)))
    if a.compile:
        rows.append((f"greedy generation ({n} tokens), ours compile=True", *pair(short, smask, n, compile=True)))

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads, batch {a.batch}, "
          f"seq {a.seq}, Mistral 4 layers x 256 hidden, GQA 8/2, fp32, CPU, {a.clock} clock")
    print("| measurement | transformers (s) | ours (s) | speed-up |")
    print("|---|---|---|---|")
    for name, h, u in rows:
        print(f"| {name} | {h:.4f} | {u:.4f} | {h / u:.2f}x |")
    (_, h_all, u_all), (_, h_pre, u_pre) = rows[2], rows[3]
    h_step, u_step = (h_all - h_pre) / (n - 1), (u_all - u_pre) / (n - 1)
    print(f"per decoding step (generation minus its prefill, / {n - 1}): transformers {h_step * 1e3:.2f} ms, "
          f"ours {u_step * 1e3:.2f} ms, {h_step / u_step:.2f}x")


if __name__ == "__main__":
    main()

"""model.py vs transformers on the same random Mistral config, on CPU: forward, forward+backward and greedy
generation, reported as ratios measured in one run (this machine is shared and noisy: compare only within
a run). Run by hand:  python bench/bench_model.py [--threads 2] [--clock cpu] [--compile]

Each measurement is the best of several repeats after a warm-up, the two models alternating; ratios > 1 mean ours is faster.
--clock cpu times with the process's CPU time instead of the wall clock: on a machine shared with other
jobs it does not count the time the scheduler gives to them (use it with --threads 1, where CPU time is
work; with more threads it also counts their spin-waits). --compile adds generate(compile=True), timed
after a first call that compiles the per-token step.
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
    smask[:, -8:] = 1
    kw = dict(max_new_tokens=a.new_tokens)
    t_hf, t_us = timeit_pair(lambda: hf.generate(short, attention_mask=smask, do_sample=False, eos_token_id=None,
                                                 pad_token_id=1, min_new_tokens=a.new_tokens, **kw),
                             lambda: generate(ours, short, smask, eos_id=-1, **kw), 5)
    rows.append((f"greedy generation ({a.new_tokens} tokens)", t_hf, t_us))
    if a.compile:
        t_hf, t_us = timeit_pair(lambda: hf.generate(short, attention_mask=smask, do_sample=False, eos_token_id=None,
                                                     pad_token_id=1, min_new_tokens=a.new_tokens, **kw),
                                 lambda: generate(ours, short, smask, eos_id=-1, compile=True, **kw), 5)
        rows.append((f"greedy generation ({a.new_tokens} tokens), ours compile=True", t_hf, t_us))

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads, batch {a.batch}, "
          f"seq {a.seq}, Mistral 4 layers x 256 hidden, GQA 8/2, fp32, CPU, {a.clock} clock")
    print("| measurement | transformers (s) | ours (s) | speed-up |")
    print("|---|---|---|---|")
    for name, h, u in rows:
        print(f"| {name} | {h:.4f} | {u:.4f} | {h / u:.2f}x |")


if __name__ == "__main__":
    main()

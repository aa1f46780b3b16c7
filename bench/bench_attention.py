"""Speed of the fused Triton attention (kernels/flash.py) against PyTorch's scaled_dot_product_attention.

Run by hand on a CUDA GPU (never from the tests):

    python bench/bench_attention.py                # bf16, D = 128, Hq = 32, Hkv = 8, 16k tokens per batch
    python bench/bench_attention.py --tokens 8192  # smaller batches

Two tables, in TFLOP/s (higher is better):
  1. Plain causal / non-causal attention at seq 512 .. 8k with batch * seq = --tokens, against SDPA's
     FlashAttention backend (`sdpa_kernel(SDPBackend.FLASH_ATTENTION)`).
  2. CLaRa's compressor shapes: a batch of documents of 259 text tokens + n_mem memory tokens, left padded
     to random real lengths, causal with a key padding mask, against `kernels.sdpa_attention` (what the
     model runs without the kernel: SDPA with a boolean mask, so a backend that accepts masks).

FLOPs: a forward is 4 * B * Hq * T * S * D (two matmuls of 2 * T * S * D each per head), half of it when
causal; the backward is 2.5x the forward (five matmuls instead of two), so forward + backward is 3.5x.
Padding is not discounted: padded tokens count as work, for both sides alike.

GQA: if SDPA's flash backend refuses `enable_gqa=True` on this PyTorch build, K and V are repeated to Hq
heads once, outside the timed region (the table says so); that slightly favours SDPA.

Without a GPU the script says so, runs a tiny correctness check under the Triton interpreter, and exits 0.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/bench_attention.py`

DOC_TOKENS = 259  # CLaRa's compressor input: document text tokens before the memory tokens


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def time_ms(fn, grads=()) -> float:
    """Mean milliseconds of fn() after a first call (which also triggers Triton's autotuning)."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads))


def fwd_and_fwd_bwd(attn, q, k, v):
    """(forward ms, forward + backward ms) of attn(q, k, v)."""
    do = torch.randn_like(q)
    with torch.no_grad():
        fwd = time_ms(lambda: attn(q, k, v))
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    both = time_ms(lambda: attn(q, k, v).backward(do), grads=(q, k, v))
    return fwd, both


def sdpa_flash(causal: bool, q, k, v):
    """An attention callable on SDPA's flash backend, and whether K/V had to be repeated for GQA."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v, gqa):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    try:
        run(q, k, v, True)
        return (lambda q, k, v: run(q, k, v, True)), k, v, False
    except RuntimeError:  # this build's flash backend has no GQA: give it Hq heads, untimed
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return (lambda q, k, v: run(q, k, v, False)), k, v, True


def bench_plain(args, dtype):
    from kernels.flash import flash_attention
    print(f"\n### Causal and non-causal attention, batch x seq = {args.tokens}, Hq = {args.hq}, "
          f"Hkv = {args.hkv}, D = {args.head_dim}, {args.dtype}\n")
    print("| seq | batch | causal | Triton fwd | SDPA flash fwd | Triton fwd+bwd | SDPA flash fwd+bwd |")
    print("|---:|---:|:---:|---:|---:|---:|---:|")
    repeated = False
    for seq in args.seqs:
        B = max(1, args.tokens // seq)
        q = torch.randn(B, args.hq, seq, args.head_dim, device="cuda", dtype=dtype)
        k = torch.randn(B, args.hkv, seq, args.head_dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        for causal in (True, False):
            flops = 4 * B * args.hq * seq * seq * args.head_dim * (0.5 if causal else 1.0)
            t_fwd, t_both = fwd_and_fwd_bwd(lambda q, k, v: flash_attention(q, k, v, causal=causal), q, k, v)
            ref, k_ref, v_ref, rep = sdpa_flash(causal, q, k, v)
            repeated |= rep
            s_fwd, s_both = fwd_and_fwd_bwd(ref, q, k_ref, v_ref)
            print(f"| {seq} | {B} | {'yes' if causal else 'no'} | {tflops(flops, t_fwd):.0f} | "
                  f"{tflops(flops, s_fwd):.0f} | {tflops(3.5 * flops, t_both):.0f} | "
                  f"{tflops(3.5 * flops, s_both):.0f} |", flush=True)
            del k_ref, v_ref
    if repeated:
        print("\nSDPA's flash backend refused enable_gqa here: its K/V were repeated to Hq heads, untimed.")


def bench_clara(args, dtype):
    import kernels
    from kernels.flash import flash_attention
    print(f"\n### CLaRa compressor shapes: {DOC_TOKENS} + n_mem tokens per document, left padded, causal, "
          f"batch x seq ~ {args.tokens}\n")
    print("| n_mem | seq | batch | Triton fwd | SDPA masked fwd | Triton fwd+bwd | SDPA masked fwd+bwd |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for n_mem in args.n_mem:
        T = DOC_TOKENS + n_mem
        B = max(1, args.tokens // T)
        # Real length: the memory tokens (always present, at the end) plus 1 .. 259 text tokens.
        lengths = n_mem + torch.randint(1, DOC_TOKENS + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] >= T - lengths[:, None]).cuda()  # (B, T), True = real token
        q = torch.randn(B, args.hq, T, args.head_dim, device="cuda", dtype=dtype)
        k = torch.randn(B, args.hkv, T, args.head_dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        flops = 4 * B * args.hq * T * T * args.head_dim * 0.5
        t_fwd, t_both = fwd_and_fwd_bwd(
            lambda q, k, v: flash_attention(q, k, v, causal=True, key_padding_mask=mask), q, k, v)
        s_fwd, s_both = fwd_and_fwd_bwd(
            lambda q, k, v: kernels.sdpa_attention(q, k, v, causal=True, key_padding_mask=mask), q, k, v)
        print(f"| {n_mem} | {T} | {B} | {tflops(flops, t_fwd):.0f} | {tflops(flops, s_fwd):.0f} | "
              f"{tflops(3.5 * flops, t_both):.0f} | {tflops(3.5 * flops, s_both):.0f} |", flush=True)


def cpu_smoke_check():
    """No GPU: check the kernel against the reference on a tiny shape under the Triton interpreter."""
    from kernels.flash import attention_reference, flash_attention
    q, k, v = torch.randn(1, 4, 40, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    mask = torch.arange(40)[None, :] >= 5  # 5 left-padded keys
    err = (flash_attention(q, k, v, key_padding_mask=mask) - attention_reference(q, k, v, key_padding_mask=mask))
    print(f"CPU smoke check (Triton interpreter, fp32, causal, GQA 2, left padding): "
          f"max |kernel - reference| = {err.abs().max().item():.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="input dtype")
    parser.add_argument("--head-dim", type=int, default=128, help="D (Mistral-7B: 128)")
    parser.add_argument("--hq", type=int, default=32, help="query heads (Mistral-7B: 32)")
    parser.add_argument("--hkv", type=int, default=8, help="key/value heads (Mistral-7B: 8)")
    parser.add_argument("--tokens", type=int, default=16384, help="batch x seq of every row")
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                        help="sequence lengths of the first table")
    parser.add_argument("--n-mem", type=int, nargs="+", default=[2, 8, 16],
                        help="memory tokens per document in the CLaRa table")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU to measure speed; none found.")
        cpu_smoke_check()
        return
    import triton
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"## Attention speed on {torch.cuda.get_device_name()} "
          f"(torch {torch.__version__}, triton {triton.__version__}), TFLOP/s")
    print("\nThe first call of each shape autotunes the Triton kernels (not timed).")
    bench_plain(args, dtype)
    bench_clara(args, dtype)


if __name__ == "__main__":
    main()

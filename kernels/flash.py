"""Fused attention in Triton, forward and backward (FlashAttention-2), for `kernels.attention`.

What is here, top to bottom:
  device helpers        _mm (a matmul), _load_tile/_store_tile (masked (rows, D) tiles), _key_ok and
                        _visible (the mask), _key_range/_query_range (which blocks can be visible)
  _fwd_kernel           O = softmax(Q K^T * scale) V one query block at a time, plus the log-sum-exp (LSE)
  _bwd_preprocess       delta = rowsum(dO * O)
  _bwd_dkdv_kernel      dK, dV for one key block, looping over the query heads of its GQA group
  _bwd_dq_kernel        dQ for one query block
  FlashAttention        the torch.autograd.Function that launches them
  flash_attention       the public entry point (validates inputs, then calls FlashAttention)
  attention_reference   the same contract in plain PyTorch with an explicit softmax (the tests' oracle)

The contract is the one in `kernels/__init__.py`: q (B, Hq, T, D), k and v (B, Hkv, S, D), Hq a multiple of
Hkv; bottom-right aligned causal mask (query i sees key j iff j <= i + S - T); key_padding_mask (B, S),
True = real key; Mistral sliding window (i + S - T - j < window); a query that sees no key gets zeros.

The algorithm (Dao 2023, FlashAttention-2, arXiv 2307.08691; Milakov & Gimelshein 2018, online softmax,
arXiv 1805.02867). The T x S score matrix never exists in memory. A program owns BLOCK_M query rows and
walks over the key blocks, keeping for every row a running maximum m, a running sum of exponentials l and
an unnormalised output acc. When a new block of scores s arrives:

    m_new = max(m, rowmax(s))
    p     = exp(s - m_new)                       (this block's weights, relative to the new maximum)
    l     = l * exp(m - m_new) + rowsum(p)       (old terms rescaled to the new maximum)
    acc   = acc * exp(m - m_new) + p @ V
    at the end: O = acc / l,  LSE = m + log(l)

The backward pass recomputes P = exp(S - LSE) block by block instead of storing it. With
delta_i = sum_d dO_id O_id (= sum_j P_ij dP_ij), the softmax gradient is dS = P * (dP - delta), dP = dO V^T,
and dQ = scale * dS K, dK = scale * dS^T Q, dV = P^T dO. Two kernels avoid atomics, so results are
deterministic: one owns a key block and accumulates dK, dV over every query block and every query head of
its GQA group (that sum is the GQA gradient), the other owns a query block and accumulates dQ.

Exponentials use exp2: scores are multiplied once by scale * log2(e), so exp(x) = exp2(x * log2(e)); the
stored LSE is in those base-2 units. Masked scores are -inf; a row with nothing visible yet keeps m = -inf,
and the kernel subtracts 0 instead of m there so that (-inf) - (-inf) never makes a NaN. Key blocks that are
entirely masked by causality or by the window are not visited at all (the loop bounds exclude them); the
visited blocks all apply the full mask (simpler than special-casing the diagonal, a little slower), and
blocks that are all padding are visited like any other.

On CUDA the tile sizes are autotuned (FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS below); fp32 inputs use true fp32 dots.

Layout follows triton-lang/triton `python/tutorials/06-fused-attention.py` (forward, delta preprocess,
dK/dV kernel, dQ kernel, autograd.Function, reference); the code is written for this contract, not copied.
Unlike the tutorial: any T and S (tails are masked), any head dim 16..128 (padded to a power of two with a
mask), GQA without repeating K/V, key padding, sliding window, and plain pointer arithmetic (no block
pointers, which the interpreter lacks).

CPU: there is no Triton compiler for CPU, so the kernels run under Triton's interpreter (numpy, slow, for
tests only). The interpreter stores bf16 as raw 16-bit integers and its arithmetic on them is wrong, so
under the interpreter bf16 tiles are converted to fp32 right after loading (the COMPUTE_FP32 flag); on a
GPU bf16 tiles go straight into tensor-core dots.

Shape legend: B batch, Hq query heads, Hkv key/value heads, T queries, S keys, D head dim.
"""
import math
import os

import torch

# The interpreter must be chosen before the first @triton.jit below runs: `triton.jit` reads
# TRITON_INTERPRET when it decorates a function and returns either a compiled-kernel launcher or an
# interpreted one. This module is imported lazily (only when the triton backend is asked for), so on a
# machine without CUDA we opt in here; an explicit TRITON_INTERPRET set by the user always wins. Note that
# the variable is process-wide: Triton kernels defined after this import are interpreted too.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

import triton  # noqa: E402  (must follow the TRITON_INTERPRET decision above)
import triton.language as tl  # noqa: E402

if INTERPRET:
    from triton.runtime.interpreter import InterpretedFunction
    # Triton's own jit helpers (tl.zeros, tl.max, tl.sum, ...) take their mode when triton.language is
    # first imported. If something imported it before the variable was set (torch._dynamo does, and HF
    # models import that), they are compiled-mode functions and the interpreter cannot call them.
    if not isinstance(tl.zeros, InterpretedFunction):
        raise ImportError("kernels.flash: triton was imported before TRITON_INTERPRET=1 was set, so the Triton "
                          "interpreter cannot run on this CPU-only machine; set TRITON_INTERPRET=1 in the "
                          "environment (or import kernels.flash before anything imports triton), or use "
                          "backend='sdpa'")

from kernels import (KERNEL_DTYPES as SUPPORTED_DTYPES, MAX_GRID_Y, MAX_HEAD_DIM, MIN_HEAD_DIM,  # noqa: E402
                     check_inputs, visibility_mask)

LOG2E = 1.4426950408889634  # log2(e) = 1/ln(2): exp(x) == exp2(x * LOG2E)


# ----------------------------------------------------------------------------------------------------
# Launch configurations

def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# What the autotuner tries on CUDA: BLOCK_M query rows x BLOCK_N key columns, warps, pipeline stages.
# A few points each, not a full grid: every config costs a compile per kernel and per mask kind (seconds
# each, one after another inside the autotuner), paid on the first call of each shape; 11 in all.
# Chosen by compiling ahead of time for sm_90 and sm_80 without a GPU (bench/aot_compile.py, Triton 3.7.1,
# bf16, D = 128, causal + key padding mask at the CLaRa document shape, the most register-hungry variant)
# and keeping only tiles that neither spill registers on either architecture nor overflow an A100's shared
# memory (BENCHMARKS.md has the table; the one exception: dQ 128 x 64 spills 4 B on sm_80 for unpadded
# non-causal attention); not yet ranked by measurement on a GPU. 32 x 32 comes first in
# every list: the fallback that fits fp32 inputs at D = 128, and the one tile short sequences keep (_prune).
# Forward: one (BLOCK_M, D) query tile and its fp32 accumulator stay resident while key tiles stream by
# (dropped: 128 x 128 / 8 warps, 84 B spilled on sm_90 with a padding mask).
FWD_CONFIGS = [_config(32, 32, 4, 2), _config(64, 64, 4, 3), _config(128, 64, 8, 3)]
# dK/dV: a program keeps two fp32 (BLOCK_N, D) accumulators plus its K and V tiles: small tiles, 8 warps;
# 64 x 64 with one pipeline stage (two stages spilled 52 B on sm_90; 32 x 128 spilled on both).
DKDV_CONFIGS = [_config(32, 32, 4, 2), _config(32, 64, 8, 2), _config(64, 32, 8, 2), _config(64, 64, 8, 1)]
# dQ: a program keeps dQ plus its Q and dO tiles, lighter than dK/dV, so taller query tiles fit.
DQ_CONFIGS = [_config(32, 32, 4, 2), _config(64, 32, 8, 2), _config(64, 64, 8, 2), _config(128, 64, 8, 2)]


# The interpreter cannot autotune over several configs, and small tiles run fastest there (numpy per-op
# overhead); 32 also makes the tests' lengths (up to ~70) span several blocks with ragged tails.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}
# Autotuning is keyed on power-of-two buckets of T and S (not exact lengths, which vary from batch to batch
# in training and would re-tune every time), the head dim and the mask kind.
TUNING_KEY = ["T_BUCKET", "S_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_WINDOW"]


def _prune(configs, named_args, **kwargs):
    """The configs worth compiling for one call (the autotuner compiles and times each, one after another).

    A tile longer than the whole (power-of-two bucket of the) sequence only computes padding: a BLOCK_M
    beyond T_BUCKET or a BLOCK_N beyond S_BUCKET is skipped, so short sequences compile fewer configs.
    fp32 inputs keep the first config (32 x 32) alone: bigger fp32 tiles spill or overflow shared memory,
    and the dispatcher sends fp32 to SDPA unless the kernel is forced. The first config always stays."""
    q = named_args.get("Q")
    if q is not None and q.dtype == torch.float32:
        return configs[:1]
    T, S = kwargs.get("T_BUCKET", named_args.get("T_BUCKET")), kwargs.get("S_BUCKET", named_args.get("S_BUCKET"))
    if T is None or S is None:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, T) and c.kwargs["BLOCK_N"] <= max(32, S)]
    return kept or configs[:1]


def _tuned(configs):
    """Autotune a kernel over configs on CUDA; under the interpreter leave it alone (INTERPRETER_BLOCKS).

    Every tuned kernel writes each output element exactly once and never accumulates into its output, so
    the autotuner's repeated benchmark launches leave the results correct."""
    def decorate(kernel):
        if INTERPRET:
            return kernel
        return triton.autotune(configs=configs, key=TUNING_KEY, prune_configs_by={"early_config_prune": _prune})(kernel)
    return decorate


def _blocks():
    """Extra launch arguments: the fixed blocks under the interpreter, nothing when the autotuner picks."""
    return INTERPRETER_BLOCKS if INTERPRET else {}


# ----------------------------------------------------------------------------------------------------
# Device helpers

@triton.jit
def _mm(a, b):
    # fp32 inputs: exact fp32 products ("ieee"); the default would round them to tf32 on tensor cores.
    # fp16/bf16 inputs ignore the flag: tensor cores with fp32 accumulation.
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load_tile(base, rows, n_rows, stride_row, stride_d,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, TO_FP32: tl.constexpr):
    """(len(rows), D_PAD) tile of the (n_rows, HEAD_DIM) matrix at base; rows past n_rows and the padding
    lanes past HEAD_DIM read 0, so they add nothing to any dot product."""
    offs_d = tl.arange(0, D_PAD)
    x = tl.load(base + rows[:, None] * stride_row + offs_d[None, :] * stride_d,
                mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if TO_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(base, rows, n_rows, stride_row, stride_d, x, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Write x (len(rows), D_PAD) into the (n_rows, HEAD_DIM) matrix at base, in its dtype, tails masked.
    (Pointers are rebuilt here rather than kept from before a loop: a (BLOCK, D) tile of 64-bit pointers
    kept alive across the loop costs registers that the loop needs.)"""
    offs_d = tl.arange(0, D_PAD)
    tl.store(base + rows[:, None] * stride_row + offs_d[None, :] * stride_d, x.to(base.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _key_ok(KPM, off_b, stride_kpm_b, offs_n, S, HAS_KPM: tl.constexpr):
    """(BLOCK_N,) bool: key offs_n exists (< S) and is not padding."""
    ok = offs_n < S
    if HAS_KPM:
        ok = ok & (tl.load(KPM + off_b * stride_kpm_b + offs_n, mask=offs_n < S, other=0) != 0)
    return ok


@triton.jit
def _visible(offs_m, offs_n, key_ok, T, S, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: query row offs_m may attend key offs_n.

    key_ok (BLOCK_N,) already holds "inside S and not padding". Query i sits at absolute position
    i + S - T (bottom-right alignment), so with a KV cache the last query sees every key."""
    i_abs = offs_m[:, None] + (S - T)  # (BLOCK_M, 1)
    j = offs_n[None, :]                # (1, BLOCK_N)
    ok = (offs_m[:, None] < T) & key_ok[None, :]
    if CAUSAL:
        ok = ok & (j <= i_abs)
    if HAS_WINDOW:
        ok = ok & (i_abs - j < WINDOW)  # distance 0 .. WINDOW-1
    return ok


@triton.jit
def _key_range(m0, T, S, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the keys that can be visible to query rows m0 .. m0+BLOCK_M-1; blocks outside are skipped.

    causal: key j <= i + S - T, so nothing at or past m0 + BLOCK_M + S - T;
    window: key j > i + S - T - WINDOW, so nothing before m0 + S - T - WINDOW + 1 (rounded down to a
    block edge so that the loads stay aligned)."""
    hi = S
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M + S - T)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, m0 + S - T - WINDOW + 1) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(n0, T, S, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the queries that can see keys n0 .. n0+BLOCK_N-1 (the mirror image of _key_range).

    causal: query i needs i + S - T >= j, so nothing before n0 - (S - T) (rounded down to a block edge);
    window: query i needs i + S - T - j < WINDOW, so nothing at or past n0 + BLOCK_N - 1 + WINDOW - (S - T)."""
    lo = 0
    if CAUSAL:
        lo = tl.maximum(lo, n0 - (S - T)) // BLOCK_M * BLOCK_M
    hi = T
    if HAS_WINDOW:
        hi = tl.minimum(hi, n0 + BLOCK_N - 1 + WINDOW - (S - T))
    return lo, hi


# ----------------------------------------------------------------------------------------------------
# Forward

@_tuned(FWD_CONFIGS)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPM,
                stride_qb, stride_qh, stride_qt, stride_qd,
                stride_kb, stride_kh, stride_kt, stride_kd,
                stride_vb, stride_vh, stride_vt, stride_vd,
                stride_ob, stride_oh, stride_ot, stride_od,
                stride_kpm_b,
                T, S, H_Q, H_KV, GROUP, WINDOW,
                qk_scale, sm_scale,  # qk_scale = sm_scale * log2(e); sm_scale is used by the backward only
                T_BUCKET, S_BUCKET,  # autotuning key only
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                COMPUTE_FP32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, query head). Grid (cdiv(T, BLOCK_M), B * Hq)."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H_Q).to(tl.int64)  # int64: offsets of large batches overflow int32
    off_h = (off_bh % H_Q).to(tl.int64)
    off_hkv = off_h // GROUP  # GQA: query heads [g*GROUP, (g+1)*GROUP) share kv head g
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, T, stride_qt, stride_qd,
                   HEAD_DIM, D_PAD, COMPUTE_FP32)  # (BLOCK_M, D_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)         # running sum of exp2(score - m_i) * v

    lo, hi = _key_range(m0, T, S, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, S, stride_kt, stride_kd, HEAD_DIM, D_PAD, COMPUTE_FP32)  # (BLOCK_N, D_PAD)
        v = _load_tile(v_base, offs_n, S, stride_vt, stride_vd, HEAD_DIM, D_PAD, COMPUTE_FP32)
        key_ok = _key_ok(KPM, off_b, stride_kpm_b, offs_n, S, HAS_KPM)

        s = _mm(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) scores in log2 units
        s = tl.where(_visible(offs_m, offs_n, key_ok, T, S, WINDOW, CAUSAL, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: subtract 0, not -inf
        p = tl.exp2(s - m_ref[:, None])   # masked entries: exp2(-inf) = 0
        alpha = tl.exp2(m_i - m_ref)      # rescales the old sums to the new maximum (0 when m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v)  # p in the input dtype: tensor-core dot on GPU
        m_i = m_new

    has_key = l_i > 0.0  # the row's maximum contributes exp2(0) = 1, so l_i > 0 iff some key was visible
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]  # rows with no visible key: acc = 0, so o = 0
    _store_tile(O + off_b * stride_ob + off_h * stride_oh, offs_m, T, stride_ot, stride_od, o, HEAD_DIM, D_PAD)
    # LSE of a row with no key is +inf, so the backward's exp2(s - LSE) is 0 for it (zero gradient).
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)  # LSE is (B, Hq, T) contiguous


# ----------------------------------------------------------------------------------------------------
# Backward

@triton.jit
def _bwd_preprocess(O, DO, DELTA,
                    stride_ob, stride_oh, stride_ot, stride_od,
                    T, H_Q,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, (B, Hq, T). O and dO share one layout. Grid (cdiv(T, BLOCK_M), B*Hq)."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H_Q).to(tl.int64)
    off_h = (off_bh % H_Q).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row0 = off_b * stride_ob + off_h * stride_oh
    o = _load_tile(O + row0, offs_m, T, stride_ot, stride_od, HEAD_DIM, D_PAD, True)
    do = _load_tile(DO + row0, offs_m, T, stride_ot, stride_od, HEAD_DIM, D_PAD, True)
    tl.store(DELTA + off_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@_tuned(DKDV_CONFIGS)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     stride_ob, stride_oh, stride_ot, stride_od,      # dO (same layout as O)
                     stride_dkb, stride_dkh, stride_dkt, stride_dkd,  # dK and dV (one layout)
                     stride_kpm_b,
                     T, S, H_Q, H_KV, GROUP, WINDOW, qk_scale, sm_scale,
                     T_BUCKET, S_BUCKET,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                     COMPUTE_FP32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, kv head); sums over its GROUP query heads and all query
    blocks that can see them, so no two programs write the same dK/dV row. Grid (cdiv(S, BLOCK_N), B*Hkv)."""
    pid_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H_KV).to(tl.int64)
    off_hkv = (off_bh % H_KV).to(tl.int64)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_tile(K + off_b * stride_kb + off_hkv * stride_kh, offs_n, S, stride_kt, stride_kd,
                   HEAD_DIM, D_PAD, COMPUTE_FP32)  # (BLOCK_N, D_PAD)
    v = _load_tile(V + off_b * stride_vb + off_hkv * stride_vh, offs_n, S, stride_vt, stride_vd,
                   HEAD_DIM, D_PAD, COMPUTE_FP32)
    key_ok = _key_ok(KPM, off_b, stride_kpm_b, offs_n, S, HAS_KPM)

    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    lo, hi = _query_range(n0, T, S, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):
        off_h = off_hkv * GROUP + g  # one of the query heads that read this kv head
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_ob + off_h * stride_oh
        row_base = (off_b * H_Q + off_h) * T  # into LSE and DELTA, (B, Hq, T) contiguous
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(q_base, offs_m, T, stride_qt, stride_qd, HEAD_DIM, D_PAD, COMPUTE_FP32)
            do = _load_tile(do_base, offs_m, T, stride_ot, stride_od, HEAD_DIM, D_PAD, COMPUTE_FP32)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < T, other=0.0)

            s = _mm(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units like the forward
            p = tl.exp2(s - lse[:, None])      # the forward's softmax, recomputed
            p = tl.where(_visible(offs_m, offs_n, key_ok, T, S, WINDOW, CAUSAL, HAS_WINDOW), p, 0.0)
            dv += _mm(tl.trans(p.to(do.dtype)), do)   # dV = P^T dO
            dp = _mm(do, tl.trans(v))                  # dP = dO V^T
            ds = p * (dp - delta[:, None])             # dS = P * (dP - delta), without the scale
            dk += _mm(tl.trans(ds.to(q.dtype)), q)     # dK = dS^T Q

    dk = dk * sm_scale  # S = scale * Q K^T, so dK carries the softmax scale once
    out = off_b * stride_dkb + off_hkv * stride_dkh
    _store_tile(DK + out, offs_n, S, stride_dkt, stride_dkd, dk, HEAD_DIM, D_PAD)
    _store_tile(DV + out, offs_n, S, stride_dkt, stride_dkd, dv, HEAD_DIM, D_PAD)


@_tuned(DQ_CONFIGS)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM,
                   stride_qb, stride_qh, stride_qt, stride_qd,
                   stride_kb, stride_kh, stride_kt, stride_kd,
                   stride_vb, stride_vh, stride_vt, stride_vd,
                   stride_ob, stride_oh, stride_ot, stride_od,  # dO and dQ (same layout as O)
                   stride_kpm_b,
                   T, S, H_Q, H_KV, GROUP, WINDOW, qk_scale, sm_scale,
                   T_BUCKET, S_BUCKET,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                   COMPUTE_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dQ for BLOCK_M queries of one (batch, query head). Grid (cdiv(T, BLOCK_M), B * Hq)."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H_Q).to(tl.int64)
    off_h = (off_bh % H_Q).to(tl.int64)
    off_hkv = off_h // GROUP
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, T, stride_qt, stride_qd,
                   HEAD_DIM, D_PAD, COMPUTE_FP32)
    do = _load_tile(DO + off_b * stride_ob + off_h * stride_oh, offs_m, T, stride_ot, stride_od,
                    HEAD_DIM, D_PAD, COMPUTE_FP32)
    lse = tl.load(LSE + off_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)

    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    lo, hi = _key_range(m0, T, S, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)  # as in the forward
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, S, stride_kt, stride_kd, HEAD_DIM, D_PAD, COMPUTE_FP32)
        v = _load_tile(v_base, offs_n, S, stride_vt, stride_vd, HEAD_DIM, D_PAD, COMPUTE_FP32)
        key_ok = _key_ok(KPM, off_b, stride_kpm_b, offs_n, S, HAS_KPM)

        s = _mm(q, tl.trans(k)) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(_visible(offs_m, offs_n, key_ok, T, S, WINDOW, CAUSAL, HAS_WINDOW), p, 0.0)
        dp = _mm(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k)  # dQ = dS K

    dq = dq * sm_scale
    _store_tile(DQ + off_b * stride_ob + off_h * stride_oh, offs_m, T, stride_ot, stride_od, dq, HEAD_DIM, D_PAD)


# ----------------------------------------------------------------------------------------------------
# Host side


PREPROCESS_BLOCK_M = 64  # rows per program of the delta kernel: a plain row reduction, any size works


def _launch_args(q, k, causal, key_padding_mask, window, scale):
    """The mask as int8 (or a stand-in) and the scalar/constexpr arguments every main kernel takes."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    # A window of S or more hides nothing (distances are at most S - 1): drop it and its masking.
    has_window = window is not None and window < S
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(D)
    # The mask travels as int8 (1 = real key); without one, q stands in for the pointer that is never read.
    kpm = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else q
    args = dict(
        stride_kpm_b=kpm.stride(0) if key_padding_mask is not None else 0,
        T=T, S=S, H_Q=Hq, H_KV=Hkv, GROUP=Hq // Hkv, WINDOW=window if has_window else 0,
        qk_scale=sm_scale * LOG2E, sm_scale=sm_scale,
        T_BUCKET=triton.next_power_of_2(T), S_BUCKET=triton.next_power_of_2(S),
        HEAD_DIM=D, D_PAD=triton.next_power_of_2(D),
        CAUSAL=bool(causal), HAS_WINDOW=has_window, HAS_KPM=key_padding_mask is not None,
        # bf16 arithmetic is wrong in the interpreter (see the module docstring): compute in fp32 there.
        COMPUTE_FP32=INTERPRET and q.dtype == torch.bfloat16,
        **_blocks(),
    )
    return kpm, args


class FlashAttention(torch.autograd.Function):
    """Autograd wrapper: forward saves q, k, v, O and the LSE; backward recomputes the softmax blockwise."""

    @staticmethod
    def forward(ctx, q, k, v, causal, key_padding_mask, window, scale):
        B, Hq, T, D = q.shape
        kpm, args = _launch_args(q, k, causal, key_padding_mask, window, scale)
        o = torch.empty((B, Hq, T, D), device=q.device, dtype=q.dtype)    # contiguous, whatever q's strides
        lse = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)  # log2 units, +inf = no key
        if o.numel() > 0:
            grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)  # noqa: E731
            _fwd_kernel[grid](q, k, v, o, lse, kpm, *q.stride(), *k.stride(), *v.stride(), *o.stride(), **args)
        ctx.save_for_backward(q, k, v, o, lse, kpm)
        ctx.args = args
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm = ctx.saved_tensors
        args = ctx.args
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        do = do.contiguous()  # now shares O's layout, so one set of strides serves O, dO and dQ
        dq = torch.empty_like(o)
        dk = torch.empty((B, Hkv, S, D), device=k.device, dtype=k.dtype)
        dv = torch.empty_like(dk)  # dK and dV share one layout
        if o.numel() == 0:
            return dq.zero_(), dk.zero_(), dv.zero_(), None, None, None, None

        delta = torch.empty_like(lse)
        _bwd_preprocess[(triton.cdiv(T, PREPROCESS_BLOCK_M), B * Hq)](
            o, do, delta, *o.stride(), T, Hq, HEAD_DIM=D, D_PAD=args["D_PAD"], BLOCK_M=PREPROCESS_BLOCK_M)
        grid_kv = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
        _bwd_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, kpm,
                                  *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), **args)
        grid_q = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)  # noqa: E731
        _bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, dq, kpm,
                               *q.stride(), *k.stride(), *v.stride(), *do.stride(), **args)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, causal=True, key_padding_mask=None, window=None, scale=None):
    """Fused attention with the `kernels.attention` contract; differentiable in q, k and v.

    q (B, Hq, T, D), k and v (B, Hkv, S, D) -> (B, Hq, T, D) in q's dtype. Any strides are accepted (the
    kernels take them as arguments); the output and the gradients are contiguous."""
    check_inputs(q, k, v, key_padding_mask, window)
    B, Hq, T, D = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"flash_attention: dtype {q.dtype} is not supported (expected one of {SUPPORTED_DTYPES})")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {D} is outside the supported range "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]; use backend='sdpa'")
    devices = {t.device for t in (q, k, v, key_padding_mask) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"flash_attention: q, k, v and key_padding_mask must share one device, got {devices}")
    if key_padding_mask is not None and key_padding_mask.is_floating_point():
        raise TypeError(f"flash_attention: key_padding_mask must be bool (True = real key) or 0/1 integers, "
                        f"got {key_padding_mask.dtype}")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"flash_attention: tensors on {q.device} need the Triton interpreter, but "
                           f"kernels.flash was imported with TRITON_INTERPRET unset while CUDA was available; "
                           f"set TRITON_INTERPRET=1 before importing it, or use backend='sdpa'")
    if B * Hq > MAX_GRID_Y:
        raise ValueError(f"flash_attention: batch x query heads = {B * Hq} exceeds the grid limit {MAX_GRID_Y}")
    return FlashAttention.apply(q, k, v, causal, key_padding_mask, window, scale)


def attention_reference(q, k, v, causal=True, key_padding_mask=None, window=None, scale=None, upcast=True):
    """The contract in plain PyTorch: explicit scores, masked softmax, zeros for queries that see no key.

    upcast=True computes in fp32 and returns fp32 (the oracle); upcast=False computes in the inputs' dtype,
    the "plain PyTorch attention in the same precision" baseline of the FlashAttention test convention."""
    dtype = torch.float32 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, Hq, T, D = q.shape
    S, group = k.shape[2], Hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, S, D): query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, T, S)
    mask = visibility_mask(T, S, q.device, causal, window, key_padding_mask)  # (B|1, 1, T, S) or None
    if mask is None:
        return torch.softmax(s, dim=-1) @ v
    # Rows with no visible key: let them see everything (no 0/0), then zero them, as sdpa_attention does.
    empty = ~mask.any(dim=-1, keepdim=True)  # (B|1, 1, T, 1)
    p = torch.softmax(s.masked_fill(~(mask | empty), float("-inf")), dim=-1).masked_fill(empty, 0.0)
    return p @ v

"""Attention for the whole project goes through `attention(...)` in this file.

One function, one contract (the same as the fused Triton kernel in `kernels/flash.py` will honour):

    q (B, Hq, T, D), k and v (B, Hkv, S, D), Hq a multiple of Hkv (grouped-query attention)
    causal            bottom-right aligned when T < S: query i sees key j iff j <= i + (S - T),
                      so one call serves a full forward (T == S) and decoding with a KV cache (T < S)
    key_padding_mask  (B, S) bool, True = a real key (HF attention_mask convention, 1 = token)
    window            Mistral sliding window: a query sees keys at distance 0 .. window-1
    scale             softmax scale, default 1/sqrt(D)
    -> (B, Hq, T, D); a query that sees no key at all (left padding under a causal mask) gets zeros

Backends: "sdpa" (torch.nn.functional.scaled_dot_product_attention, everywhere) and "triton" (the
fused kernel; CUDA, or the Triton interpreter on CPU for tests). `backend=None` picks triton on CUDA
when the kernel is available and sdpa otherwise; the environment variable CLARA_ATTENTION=sdpa|triton
forces a path for every call that does not pass `backend` explicitly.
"""
import os

import torch
import torch.nn.functional as F


def visibility_mask(T: int, S: int, device, causal: bool = True, window: int | None = None,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask of visible keys, (1 or B, 1, T, S), True = may attend; None when nothing is masked."""
    if not causal and window is None and key_padding_mask is None:
        return None
    i = torch.arange(T, device=device)[:, None] + (S - T)  # (T, 1) absolute position of each query
    j = torch.arange(S, device=device)[None, :]            # (1, S) absolute position of each key
    mask = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        mask = mask & (j <= i)
    if window is not None:
        mask = mask & (i - j < window)  # distance 0 .. window-1 (a key in the future is handled by causal)
    mask = mask[None, None]  # (1, 1, T, S)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()  # (B, 1, T, S)
    return mask


def check_inputs(q, k, v, key_padding_mask=None, window=None):
    """Shape and dtype checks shared by every backend: a clear message instead of a kernel error."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, T, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: batch/head_dim mismatch: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"attention: {Hq} query heads is not a multiple of {k.shape[1]} key/value heads")
    if k.shape[2] < T and T > 0:
        raise ValueError(f"attention: fewer keys ({k.shape[2]}) than queries ({T}) is not supported")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, k.shape[2]):
        raise ValueError(f"attention: key_padding_mask must be (B, S) = {(B, k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1, got {window}")


def sdpa_attention(q, k, v, causal=True, key_padding_mask=None, window=None, scale=None):
    """The portable path: PyTorch's scaled_dot_product_attention with an explicit boolean mask."""
    T, S = q.shape[2], k.shape[2]
    if T == 1 and key_padding_mask is not None and (window is None or window >= S):
        # Decoding one token: it is the last position, so causality hides nothing and the padding mask is
        # the whole mask (the fast path of generation; a fully padded row is still caught below).
        mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        if bool(mask[:, 0, 0, -1].all()):  # the query itself is a real key: every row sees something
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    mask = visibility_mask(T, S, q.device, causal, window, key_padding_mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    if causal and T == S and window is None and key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    # A query with no visible key would make softmax divide 0 by 0 (NaN). Let such rows see every key,
    # then zero their output: the result is exact zeros and no gradient reaches q, k or v from them.
    empty = ~mask.any(dim=-1, keepdim=True)  # (B|1, 1, T, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, scale=scale, enable_gqa=True)
    return out.masked_fill(empty, 0.0)


def attention(q, k, v, causal=True, key_padding_mask=None, window=None, scale=None, backend=None):
    """Dispatch to the fused Triton kernel or to SDPA (see the module docstring for the contract)."""
    check_inputs(q, k, v, key_padding_mask, window)
    backend = backend or os.environ.get("CLARA_ATTENTION") or ("triton" if q.is_cuda else "sdpa")
    if backend == "triton":
        try:
            from kernels.flash import flash_attention
        except ImportError:
            if q.is_cuda and "CLARA_ATTENTION" not in os.environ:
                return sdpa_attention(q, k, v, causal, key_padding_mask, window, scale)
            raise
        return flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                               window=window, scale=scale)
    if backend != "sdpa":
        raise ValueError(f"attention: unknown backend {backend!r} (expected 'sdpa' or 'triton')")
    return sdpa_attention(q, k, v, causal, key_padding_mask, window, scale)

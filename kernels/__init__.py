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
fused kernel in kernels/flash.py; compiled on CUDA, or run by the Triton interpreter on CPU for tests).
Which one runs is decided by `choose_backend`, a pure function of the call's device, dtype and shape;
this table is the one place where the rules are written down:

    case (first match wins)                       backend=None (default)   backend="triton"
    --------------------------------------------  -----------------------  ----------------------------
    kernels.flash cannot be imported (no triton)  sdpa                     error
    device neither CUDA nor CPU (mps, xpu, ...)   sdpa                     error
    CPU tensors, Triton interpreter off           sdpa                     error
    dtype not fp16 / bf16 / fp32 (fp64, ...)      sdpa                     error
    head dim outside 16..128                      sdpa                     error
    batch x query heads > 65535 (grid y limit)    sdpa                     error
    CPU tensors (interpreter on)                  sdpa (interpreter slow)  triton (tests)
    CUDA tensors under the interpreter            sdpa (interpreter slow)  triton
    CUDA fp32                                     sdpa (FMA-only dots,     triton (correct, slow)
                                                  register spills: slow)
    inside torch.compile                          sdpa (the compiler       triton
                                                  traces SDPA natively)
    CUDA fp16 / bf16                              triton                   triton

"error" is a ValueError of one line naming the reason. `backend="sdpa"` always runs SDPA. The
environment variable CLARA_ATTENTION=sdpa|triton stands for `backend` in every call that passes none
(outside torch.compile, where it is not read: a compiled region takes the default column).

Decoding one token against a KV cache does not come through `attention`: `decode_attention` takes the
cache's additive mask (causality, padding and the window folded in by model.KVCache) and always runs
SDPA, one plain call per KV head with the group's query heads as its rows (the kernel would fill one of
its 32+ tile rows per head there).
"""
import os

import torch
import torch.nn.functional as F


def decode_attention(q, k, v, bias, scale=None):
    """One query per row against a KV cache, the decoding step of generation (always SDPA).

    q (B, Hq, 1, D), k and v (B, Hkv, S, D), bias (B, S) additive mask in q's dtype: 0 = a key the query
    sees, -inf = one it does not (padding, slots not yet written, outside the window: the caller folds
    causality and the window into it); every row must see at least one key (decoding: its own token).
    The Hq / Hkv query heads of a group become the query rows of their key/value head, so the call is
    one plain SDPA per KV head, with no GQA expansion and no boolean-mask conversion."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if T != 1 or k.shape != v.shape or Hq % Hkv or tuple(bias.shape) != (B, k.shape[2]):
        raise ValueError(f"decode_attention: expected q (B, Hq, 1, D), k = v (B, Hkv, S, D), bias (B, S); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(bias.shape)}")
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv, D), k, v, attn_mask=bias[:, None, None, :],
                                         scale=scale)  # (B, Hkv, group, D)
    return out.view(B, Hq, 1, D)


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
        if torch.compiler.is_compiling():  # no host sync in a compiled graph: rows that see nothing -> 0
            empty = ~mask.any(dim=-1, keepdim=True)  # (B, 1, 1, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, scale=scale, enable_gqa=True)
            return out.masked_fill(empty, 0.0)
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


# What the fused kernel accepts (kernels/flash.py reads these; the table above is their documentation).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128  # tl.dot needs inner dimensions >= 16; 128 bounds registers and SRAM
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension, which holds batch x heads
BACKENDS = ("sdpa", "triton")


def kernel_limits(device_type: str, dtype, head_dim: int, batch: int, heads: int,
                  interpreter: bool, importable: bool = True) -> str | None:
    """Why the fused kernel cannot run this call at all (a short phrase), or None when it can."""
    if not importable:
        return "kernels.flash cannot be imported (is triton installed?)"
    if device_type not in ("cuda", "cpu"):
        return f"the kernel runs on CUDA (or under the Triton interpreter on CPU), not on {device_type}"
    if device_type == "cpu" and not interpreter:
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before kernels.flash is imported)"
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not supported (the kernel takes float16, bfloat16, float32)"
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} is outside the supported range [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if batch * heads > MAX_GRID_Y:
        return f"batch x query heads = {batch * heads} exceeds the grid limit {MAX_GRID_Y}"
    return None


def choose_backend(device_type: str, dtype, head_dim: int, batch: int, heads: int, requested: str | None = None,
                   interpreter: bool = False, importable: bool = True,
                   compiling: bool = False) -> tuple[str, str]:
    """The dispatch decision of the module docstring's table, as ("sdpa" | "triton", reason).

    A pure function of its arguments (no device needed, so every row of the table is testable on CPU).
    requested: None (choose), "sdpa" or "triton" (forced; raises ValueError when the kernel cannot run)."""
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"attention: unknown backend {requested!r} (expected 'sdpa' or 'triton')")
    if requested == "sdpa":
        return "sdpa", "requested"
    if requested is None and device_type != "cuda":
        return "sdpa", f"{device_type} tensors: the Triton kernel runs compiled on CUDA only"
    cannot = kernel_limits(device_type, dtype, head_dim, batch, heads, interpreter, importable)
    if requested == "triton":
        if cannot:
            raise ValueError(f"attention: backend='triton' cannot run this call: {cannot}; use backend='sdpa'")
        return "triton", "requested"
    if cannot:
        return "sdpa", cannot
    if interpreter:
        return "sdpa", "CUDA tensors under the Triton interpreter (slow)"
    if dtype == torch.float32:
        return "sdpa", "fp32 on CUDA: the kernel's fp32 dots are FMA-only and spill registers (slow)"
    if compiling:
        return "sdpa", "inside torch.compile: SDPA is traced into the compiled graph"
    return "triton", "CUDA, 16-bit, supported shape"


_FLASH = {}  # the imported kernel, or the import error's message


def _flash():
    """(flash_attention, interpreter on?) or (None, why not); the import happens once, on first need."""
    if "fn" not in _FLASH:
        try:
            import kernels.flash as flash
            _FLASH.update(fn=flash.flash_attention, interpreter=flash.INTERPRET)
        except ImportError as e:
            _FLASH.update(fn=None, error=str(e))
    return _FLASH["fn"], _FLASH.get("interpreter", False)


def attention(q, k, v, causal=True, key_padding_mask=None, window=None, scale=None, backend=None):
    """Dispatch to the fused Triton kernel or to SDPA (see the module docstring for the contract and the rules)."""
    check_inputs(q, k, v, key_padding_mask, window)
    compiling = torch.compiler.is_compiling()
    if backend is None and not compiling:
        backend = os.environ.get("CLARA_ATTENTION") or None
    if backend == "sdpa" or (backend is None and (compiling or q.device.type != "cuda")):
        # the table's SDPA rows that need no look at the kernel, taken first: the hot path on CPU and in
        # compiled decoding
        return sdpa_attention(q, k, v, causal, key_padding_mask, window, scale)
    fn, interpreter = _flash()
    B, Hq, T, D = q.shape
    choice, _ = choose_backend(q.device.type, q.dtype, D, B, Hq, backend, interpreter=interpreter,
                               importable=fn is not None, compiling=compiling)
    if choice == "triton":
        import kernels.flash as flash  # looked up at call time (tests may replace flash_attention)
        return flash.flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                     window=window, scale=scale)
    return sdpa_attention(q, k, v, causal, key_padding_mask, window, scale)

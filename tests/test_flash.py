"""Tests of the fused Triton attention (kernels/flash.py) against the plain-PyTorch reference.

On CPU the kernels run under Triton's interpreter (kernels/flash.py turns it on when CUDA is absent), so
shapes are small: lengths up to 70 with 32 x 32 tiles cover several blocks, ragged tails and skipped blocks.
On a GPU the same tests run the compiled kernels, plus the GPU-only tests at the end.

Tolerances (stated once, used everywhere):
  fp32         |kernel - fp32 reference| <= 1e-5 + 1e-5 * |reference| elementwise, for the output and for
               dQ, dK, dV (observed errors are ~1e-6: the only difference is summation order).
  fp16, bf16   the FlashAttention test convention: the kernel's max error against the fp32 reference is
               at most 2x the max error of plain PyTorch attention computed in the same dtype, plus an
               absolute slack of 2 units in the last place of the largest reference value.
               (Under the interpreter bf16 tiles are computed in fp32, see kernels/flash.py, so on CPU the
               bf16 case checks the conversions; the bf16 tensor-core path is checked on a GPU.)
"""
import os

import pytest
import torch

import kernels
import kernels.flash as flash
from kernels.flash import attention_reference, flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_qkv(B, Hq, Hkv, T, S, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    do = torch.randn(B, Hq, T, D, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def padding_mask(B, S, side, seed=0):
    """(B, S) bool, True = real key; row b has a random real length, the padding on `side`.
    Row 0 always has 10 padded keys, so under left padding + causal its first 10 queries see nothing."""
    if side is None:
        return None
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(S // 2, S, (B,), generator=g)
    lengths[0] = S - 10
    pos = torch.arange(S)[None, :]  # (1, S)
    mask = pos >= S - lengths[:, None] if side == "left" else pos < lengths[:, None]
    return mask.to(DEVICE)


def forward_backward(fn, q, k, v, do, **kw):
    """Output and (dQ, dK, dV) of fn on fresh leaf copies of q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return out, grads


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


# name: (B, Hq, Hkv, T, S, D, causal, padding side, window)
CASES = {
    "causal": (1, 2, 2, 70, 70, 32, True, None, None),
    "full-gqa2": (2, 2, 1, 45, 45, 16, False, None, None),
    "causal-cache-gqa4": (1, 4, 1, 20, 70, 64, True, None, None),           # T < S: bottom-right causal
    "full-cache-right-pad": (2, 4, 2, 33, 70, 32, False, "right", None),
    "causal-left-pad-gqa2": (2, 4, 2, 70, 70, 32, True, "left", None),      # some queries see no key
    "window": (1, 4, 2, 70, 70, 16, True, None, 16),                        # skips blocks left of the window
    "window-cache-left-pad-d24": (2, 2, 1, 40, 67, 24, True, "left", 9),    # D = 24 padded to 32 inside
    "window-bidirectional": (1, 2, 2, 50, 50, 16, False, None, 8),
    "decode": (2, 4, 1, 1, 37, 32, True, "left", None),                     # one query against a cache
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name):
    B, Hq, Hkv, T, S, D, causal, side, window = CASES[name]
    q, k, v, do = make_qkv(B, Hq, Hkv, T, S, D)
    kw = dict(causal=causal, key_padding_mask=padding_mask(B, S, side), window=window)
    out, grads = forward_backward(flash_attention, q, k, v, do, **kw)
    ref, ref_grads = forward_backward(attention_reference, q, k, v, do, **kw)
    assert not out.isnan().any()
    for got, want, what in zip((out, *grads), (ref, *ref_grads), ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} {what}: {m}")


# (causal, T, S, window) placed on the edges of the block-skipping bounds for the interpreter's 32-wide
# tiles: S - T = 1, 31, 32 (causal bound one past a tile edge), window - (S - T) = 2 (the dK/dV kernel's
# window bound on a tile edge), windows of 1 and around 32, a single query and key.
BOUNDARY_CASES = [(True, 40, 41, None), (True, 33, 64, None), (True, 40, 72, None), (True, 64, 64, 2),
                  (True, 50, 81, 33), (True, 64, 64, 1), (True, 64, 64, 32), (True, 64, 64, 33),
                  (False, 64, 64, 34), (False, 17, 50, 5), (True, 1, 1, None), (True, 5, 70, 3)]


def test_mask_boundaries_sweep():
    for i, (causal, T, S, window) in enumerate(BOUNDARY_CASES):
        q, k, v, do = make_qkv(1, 2, 1, T, S, 16, seed=i)
        kw = dict(causal=causal, window=window)
        out, grads = forward_backward(flash_attention, q, k, v, do, **kw)
        ref, ref_grads = forward_backward(attention_reference, q, k, v, do, **kw)
        for got, want, what in zip((out, *grads), (ref, *ref_grads), ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"causal={causal} T={T} S={S} window={window} {what}: {m}")


def test_strided_inputs_and_custom_scale():
    """q, k, v as transposed views of (B, T, H, D) projections (as model.py passes them), scale != 1/sqrt(D)."""
    B, Hq, Hkv, T, D = 2, 4, 2, 37, 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, Hq, D, generator=g).to(DEVICE).transpose(1, 2)  # (B, Hq, T, D), not contiguous
    k = torch.randn(B, T, Hkv, D, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, generator=g).to(DEVICE).transpose(1, 2)
    do = torch.randn(B, Hq, T, D, generator=g).to(DEVICE)
    kw = dict(causal=True, key_padding_mask=padding_mask(B, T, "left"), scale=0.3)
    out, grads = forward_backward(flash_attention, q, k, v, do, **kw)
    ref, ref_grads = forward_backward(attention_reference, q, k, v, do, **kw)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal-left-pad-gqa2", "window-cache-left-pad-d24"])
def test_low_precision_error_budget(name, dtype):
    B, Hq, Hkv, T, S, D, causal, side, window = CASES[name]
    q, k, v, do = make_qkv(B, Hq, Hkv, T, S, D, dtype=dtype)
    kw = dict(causal=causal, key_padding_mask=padding_mask(B, S, side), window=window)
    out, grads = forward_backward(flash_attention, q, k, v, do, **kw)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    ref, ref_grads = forward_backward(attention_reference, q.float(), k.float(), v.float(), do.float(), **kw)
    pt, pt_grads = forward_backward(lambda *a, **kw: attention_reference(*a, **kw, upcast=False), q, k, v, do, **kw)
    for got, base, want, what in zip((out, *grads), (pt, *pt_grads), (ref, *ref_grads), ("out", "dq", "dk", "dv")):
        slack = 2 * torch.finfo(dtype).eps * want.abs().max().item()
        assert max_err(got, want) <= 2 * max_err(base, want) + slack, \
            f"{name} {dtype} {what}: kernel error {max_err(got, want):.3g}, PyTorch {max_err(base, want):.3g}"


def test_queries_without_keys_give_zeros_and_zero_gradient():
    """Left padding under a causal mask: batch 0's first 10 queries see only padding; batch 1 is all padding."""
    B, Hq, Hkv, S, D = 2, 2, 1, 40, 16
    q, k, v, do = make_qkv(B, Hq, Hkv, S, S, D)
    mask = padding_mask(B, S, "left")
    mask[1] = False
    out, (dq, dk, dv) = forward_backward(flash_attention, q, k, v, do, causal=True, key_padding_mask=mask)
    assert not any(t.isnan().any() for t in (out, dq, dk, dv))
    assert (out[0, :, :10] == 0).all() and (out[1] == 0).all()
    assert (dq[0, :, :10] == 0).all() and (dq[1] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dk[0, :, :10] == 0).all() and (dv[0, :, :10] == 0).all()  # padded keys get no gradient either
    assert out[0, :, 10:].abs().sum() > 0  # the real queries are not zeroed


def test_dispatcher_triton_matches_sdpa():
    B, Hq, Hkv, T, D = 2, 4, 2, 50, 32
    q, k, v, do = make_qkv(B, Hq, Hkv, T, T, D, seed=2)
    mask = padding_mask(B, T, "left")
    outs = {}
    for backend in ("triton", "sdpa"):
        outs[backend] = forward_backward(kernels.attention, q, k, v, do, causal=True, key_padding_mask=mask,
                                         backend=backend)
    (out_t, grads_t), (out_s, grads_s) = outs["triton"], outs["sdpa"]
    for got, want in zip((out_t, *grads_t), (out_s, *grads_s)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_environment_variable_forces_triton(monkeypatch):
    calls = []
    real = flash.flash_attention

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(flash, "flash_attention", spy)  # the dispatcher imports it at call time
    q, k, v, _ = make_qkv(1, 2, 1, 20, 20, 16)
    monkeypatch.setenv("CLARA_ATTENTION", "triton")
    out = kernels.attention(q, k, v)
    assert calls == [1]
    torch.testing.assert_close(out, kernels.attention(q, k, v, backend="sdpa"), atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("CLARA_ATTENTION", "sdpa")
    kernels.attention(q, k, v)
    assert calls == [1]


@pytest.mark.parametrize("shapes, kw, error, match", [
    (((1, 2, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8)), {}, ValueError, "head dim 8"),
    (((1, 2, 8, 256), (1, 2, 8, 256), (1, 2, 8, 256)), {}, ValueError, "head dim 256"),
    (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, ValueError, "not a multiple"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), {}, ValueError, "same shape"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"key_padding_mask": torch.ones(1, 9, dtype=torch.bool)},
     ValueError, "key_padding_mask must be"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"key_padding_mask": torch.ones(1, 8)}, TypeError, "bool"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"window": 0}, ValueError, "window"),
    (((1, 2, 8, 16), (1, 2, 4, 16), (1, 2, 4, 16)), {}, ValueError, "fewer keys"),
])
def test_bad_inputs_raise_clear_errors(shapes, kw, error, match):
    q, k, v = (torch.randn(s, device=DEVICE) for s in shapes)
    kw = {key: val.to(DEVICE) if torch.is_tensor(val) else val for key, val in kw.items()}
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, **kw)


def test_unsupported_dtype_raises():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="dtype torch.float64"):
        flash_attention(q, q, q)


# ----------------------------------------------------------------------------------------------------
# GPU only: compiled kernels at model-like sizes

@needs_gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_bf16_model_shapes(causal):
    B, Hq, Hkv, T, D = 2, 8, 2, 1000, 128
    q, k, v, do = make_qkv(B, Hq, Hkv, T, T, D, dtype=torch.bfloat16)
    kw = dict(causal=causal, key_padding_mask=padding_mask(B, T, "left"), window=None)
    out, grads = forward_backward(flash_attention, q, k, v, do, **kw)
    ref, ref_grads = forward_backward(attention_reference, q.float(), k.float(), v.float(), do.float(), **kw)
    pt, pt_grads = forward_backward(lambda *a, **kw: attention_reference(*a, **kw, upcast=False), q, k, v, do, **kw)
    for got, base, want in zip((out, *grads), (pt, *pt_grads), (ref, *ref_grads)):
        slack = 2 * torch.finfo(torch.bfloat16).eps * want.abs().max().item()
        assert max_err(got, want) <= 2 * max_err(base, want) + slack


@needs_gpu
def test_gpu_backward_is_deterministic():
    q, k, v, do = make_qkv(2, 8, 2, 300, 300, 64, dtype=torch.bfloat16)
    runs = [forward_backward(flash_attention, q, k, v, do, causal=True)[1] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_whole_model_forward_backward_triton_equals_sdpa():
    """A tiny Mistral (GQA, sliding window, left padding, a LoRA adapter) through both attention paths."""
    from model import LoRAConfig, ModelConfig, Transformer
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny", sliding_window=6)).init_weights(seed=1, std=0.1)
    m.requires_grad_(False).add_adapter("a", LoRAConfig(rank=4, dropout=0.0))
    for layer in m.lora_layers():
        layer.lora_B["a"].data.normal_(0, 0.05)
    m.to(DEVICE, torch.float32)  # fp32 on purpose (the 1e-5 tolerance); compiled kernel on CUDA, interpreter on CPU
    ids = torch.randint(0, 512, (2, 19)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    results = []
    for backend in ("sdpa", "triton"):
        os.environ["CLARA_ATTENTION"] = backend
        try:
            m.zero_grad()
            emb = m.tok_embeddings(ids).requires_grad_(True)
            logits = m(inputs_embeds=emb, attention_mask=mask, adapter="a")
            logits[mask.bool()].logsumexp(-1).sum().backward()
            grads = [p.grad.clone() for p in m.parameters() if p.requires_grad]
            results.append((logits[mask.bool()], emb.grad[mask.bool()], grads))
        finally:
            del os.environ["CLARA_ATTENTION"]
    (l0, e0, g0), (l1, e1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_autotune_pruning_keeps_only_tiles_that_fit_the_call():
    """flash._prune (what the autotuner compiles on CUDA), checked as a pure function."""
    bf16 = dict(Q=torch.empty(0, dtype=torch.bfloat16))
    tiles = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in cs]  # noqa: E731
    assert flash._prune(flash.FWD_CONFIGS, bf16, T_BUCKET=4096, S_BUCKET=4096) == flash.FWD_CONFIGS
    assert tiles(flash._prune(flash.FWD_CONFIGS, bf16, T_BUCKET=1, S_BUCKET=512)) == [(32, 32)]
    assert tiles(flash._prune(flash.FWD_CONFIGS, bf16, T_BUCKET=64, S_BUCKET=64)) == [(32, 32), (64, 64)]
    assert tiles(flash._prune(flash.DKDV_CONFIGS, bf16, T_BUCKET=32, S_BUCKET=64)) == [(32, 32), (32, 64)]
    fp32 = dict(Q=torch.empty(0, dtype=torch.float32))
    assert flash._prune(flash.DQ_CONFIGS, fp32, T_BUCKET=4096, S_BUCKET=4096) == flash.DQ_CONFIGS[:1]
    assert flash._prune(flash.FWD_CONFIGS, {}) == flash.FWD_CONFIGS  # no bucket arguments: nothing pruned

"""The attention dispatcher (kernels.attention, kernels.choose_backend) and the one-token decode path.

choose_backend is a pure function of (device type, dtype, head dim, batch, heads, ...), so every row of
the rule table in kernels/__init__.py is checked here without a GPU, CUDA-like inputs included.
Numerical tolerance (fp32 on CPU): 1e-6 absolute between two SDPA formulations of the same attention.
"""
import pytest
import torch

import kernels
import kernels.flash as flash

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the decode tests below use CPU tensors on purpose
CUDA_OK = dict(device_type="cuda", dtype=BF16, head_dim=128, batch=8, heads=32)  # Mistral-7B in bf16


def choose(**kw):
    return kernels.choose_backend(**{**CUDA_OK, **kw})


def test_default_is_triton_only_for_16_bit_cuda_of_a_supported_shape():
    assert choose()[0] == "triton"
    assert choose(dtype=F16)[0] == "triton"
    assert choose(head_dim=16)[0] == "triton" and choose(head_dim=24)[0] == "triton"
    assert choose(batch=2047, heads=32)[0] == "triton"  # 65504 programs along grid y: fits


@pytest.mark.parametrize("kw, why", [
    (dict(dtype=F32), "fp32 on CUDA"),
    (dict(dtype=F64), "dtype torch.float64"),
    (dict(dtype=torch.int8), "dtype torch.int8"),
    (dict(head_dim=8), "head dim 8"),
    (dict(head_dim=256), "head dim 256"),
    (dict(batch=2049, heads=32), "65568 exceeds the grid limit 65535"),
    (dict(device_type="cpu"), "cpu tensors"),
    (dict(device_type="cpu", interpreter=True), "cpu tensors"),
    (dict(device_type="mps"), "mps tensors"),
    (dict(importable=False), "cannot be imported"),
    (dict(interpreter=True), "interpreter"),
    (dict(compiling=True), "torch.compile"),
])
def test_default_routes_to_sdpa(kw, why):
    backend, reason = choose(**kw)
    assert backend == "sdpa" and why in reason, reason


@pytest.mark.parametrize("kw, why", [
    (dict(dtype=F64), "dtype torch.float64"),
    (dict(head_dim=8), "head dim 8"),
    (dict(head_dim=256), "head dim 256"),
    (dict(batch=65536, heads=1), "grid limit"),
    (dict(device_type="cpu"), "need the Triton interpreter"),
    (dict(device_type="mps"), "not on mps"),
    (dict(importable=False), "cannot be imported"),
])
def test_forcing_triton_on_an_unsupported_case_is_a_one_line_error(kw, why):
    with pytest.raises(ValueError, match="backend='triton' cannot run this call") as e:
        choose(requested="triton", **kw)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_forcing_triton_where_it_is_only_slow_runs_it():
    for kw in (dict(dtype=F32), dict(compiling=True), dict(interpreter=True),
               dict(device_type="cpu", interpreter=True, dtype=F32)):
        assert choose(requested="triton", **kw)[0] == "triton"
    assert choose(requested="sdpa")[0] == "sdpa"
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        choose(requested="flash")


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = flash.flash_attention

    def fake(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(flash, "flash_attention", fake)
    monkeypatch.delenv("CLARA_ATTENTION", raising=False)
    return calls


def test_attention_follows_the_decision_on_real_tensors(spy, monkeypatch):
    """fp32 on this machine's device: SDPA by default (CPU, or fp32 on CUDA), the kernel when forced (the
    interpreter on CPU, compiled on CUDA); unsupported shapes and dtypes: SDPA, or an error when forced."""
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    kernels.attention(q, q, q)
    assert spy == []
    kernels.attention(q, q, q, backend="triton")
    assert spy == [1]
    for shape, dtype, why in [((1, 2, 8, 8), F32, "head dim 8"), ((1, 2, 8, 256), F32, "head dim 256"),
                              ((1, 2, 8, 16), F64, "float64"), ((65536, 1, 1, 16), F32, "grid limit")]:
        x = torch.randn(shape, dtype=dtype, device=DEVICE)
        kernels.attention(x, x, x)  # the default always has a path
        with pytest.raises(ValueError, match=why):
            kernels.attention(x, x, x, backend="triton")
        monkeypatch.setenv("CLARA_ATTENTION", "triton")  # the environment variable forces it the same way
        with pytest.raises(ValueError, match=why):
            kernels.attention(x, x, x)
        monkeypatch.delenv("CLARA_ATTENTION")
    assert spy == [1]


def _decode_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, S, D = 3, 8, 2, 21, 16
    q = torch.randn(B, 1, Hq, D, generator=g).transpose(1, 2)  # (B, Hq, 1, D) as the model's view
    k, v = torch.randn(2, B, Hkv, S, D, generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    mask[2, ::3] = False
    mask[:, -1] = True  # the token itself
    return q, k, v, mask


def test_decode_attention_equals_masked_attention():
    q, k, v, mask = _decode_case()
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    got = kernels.decode_attention(q, k, v, bias)
    want = kernels.attention(q, k, v, causal=True, key_padding_mask=mask)
    ref = flash.attention_reference(q, k, v, causal=True, key_padding_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="decode_attention: expected"):
        kernels.decode_attention(torch.randn(3, 8, 2, 16), k, v, bias)


def test_sdpa_decode_path_under_torch_compile_has_no_host_sync(monkeypatch):
    """What a compiled graph runs (no bool() of a tensor): the same values, zeros for a row that sees nothing."""
    q, k, v, mask = _decode_case(1)
    mask[0] = False
    eager = kernels.sdpa_attention(q, k, v, causal=True, key_padding_mask=mask)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("host sync while compiling"))
    compiled_path = kernels.sdpa_attention(q, k, v, causal=True, key_padding_mask=mask)
    monkeypatch.undo()
    torch.testing.assert_close(compiled_path, eager, atol=1e-6, rtol=0)
    assert (compiled_path[0] == 0).all() and compiled_path[1:].abs().sum() > 0

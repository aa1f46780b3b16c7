"""Tests for topk.py: the forward pass against torch.topk, the gradient against a naive float64 version.

The reference below is written independently of topk.py: one question at a time, Python lists for the
availability mask, a hand-written softmax. It follows docs/method.md#differentiable-top-k line by line.
Gradients are compared in float64 with rtol 1e-9 / atol 1e-10 (the two differ only by summation order,
~1e-15 relative); forward values are compared exactly.
"""
import math

import pytest
import torch

from topk import ESTIMATORS, differentiable_topk, gumbel_topk, soft_topk, topk_select

RTOL, ATOL = 1e-9, 1e-10


def naive_row(s, k, tau, straight_through=True):
    """Spec section 5 for one question. s: (N,) float64 -> W (K, N), indices as a Python list."""
    n = s.shape[0]
    z = s / max(tau, 1e-6)
    # Rank by descending score, ties to the lower index.
    order = sorted(range(n), key=lambda i: (-s[i].item(), i))[:k]
    taken = [0.0] * n
    rows = []
    for j in range(k):
        mask = torch.tensor([math.log(1.0 - t + 1e-8) for t in taken], dtype=torch.float64)
        x = z + mask
        e = torch.exp(x - x.max().detach())
        p = e / e.sum()
        h = torch.zeros(n, dtype=torch.float64)
        h[order[j]] = 1.0
        rows.append(h + p - p.detach() if straight_through else p)
        taken[order[j]] = min(taken[order[j]] + 1.0, 1.0)
    return torch.stack(rows), order


def naive(scores, k, tau, straight_through=True):
    ws, idx = zip(*(naive_row(scores[b], k, tau, straight_through) for b in range(scores.shape[0])))
    return torch.stack(ws), torch.tensor(idx)


def random_scores(b, n, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, n, generator=g, dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)


# ---- forward ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_indices_match_torch_topk(dtype, k):
    s = random_scores(6, 7, seed=k, dtype=dtype)
    assert all(row.unique().numel() == row.numel() for row in s)  # tie-free, so topk is unambiguous
    w, idx = differentiable_topk(s, k, tau=0.02)
    assert torch.equal(idx, torch.topk(s, k).indices)
    assert w.dtype == dtype and w.shape == (6, k, 7) and idx.shape == (6, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.02, 1.0, 0.0])
def test_forward_is_exactly_one_hot_in_rank_order(dtype, tau):
    s = random_scores(5, 9, seed=1, dtype=dtype).requires_grad_()
    w, idx = differentiable_topk(s, 4, tau)
    # Exactly 0/1 (not merely close), one 1 per row, at the rank-ordered index.
    assert torch.equal(w.detach(), torch.nn.functional.one_hot(idx, 9).to(dtype))
    # Rank order: the selected scores are non-increasing along K.
    picked = s.detach().gather(1, idx)
    assert (picked[:, :-1] >= picked[:, 1:]).all()


def test_selected_documents_are_the_exact_rows():
    # The stage-3 use: slot j of einsum(W, D) is the j-th ranked document, bit for bit.
    s = random_scores(3, 8, seed=2, dtype=torch.float32)
    d = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(3))
    w, idx = differentiable_topk(s, 3, 0.02)
    selected = torch.einsum("bkn,bnd->bkd", w, d)                     # (B, K, D)
    assert torch.equal(selected, d[torch.arange(3)[:, None], idx])


def test_ties_go_to_the_lower_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0],
                      [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    _, idx = differentiable_topk(s, 3, 0.1)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2]]
    _, idx2 = differentiable_topk(s, 2, 0.1)
    assert idx2.tolist() == [[1, 2], [0, 1]]
    # The naive reference uses the same convention, and its gradient agrees on tied inputs too.
    s.requires_grad_()
    c = torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad((differentiable_topk(s, 3, 0.1)[0] * c).sum(), s)
    (g_ref,) = torch.autograd.grad((naive(s, 3, 0.1)[0] * c).sum(), s)
    torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL)


def test_division_by_tau_does_not_invent_ties():
    # Two float32 scores one ulp apart that s / 0.02 rounds onto the same value (checked below).
    a = torch.tensor(0.658186674118042, dtype=torch.float32)
    b = torch.nextafter(a, torch.tensor(1.0))
    assert a / 0.02 == b / 0.02 and a < b
    s = torch.stack([a, b, torch.tensor(-1.0)])[None]                 # (1, 3), index 1 is the largest
    _, idx = differentiable_topk(s, 1, tau=0.02)
    assert idx.tolist() == [[1]] == torch.topk(s, 1).indices.tolist()


# ---- gradient ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau, scale", [(0.02, 0.05), (0.02, 1.0), (0.5, 1.0), (1.0, 3.0)])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_gradient_of_linear_functional_matches_naive(tau, scale, k):
    s = random_scores(4, 6, seed=10 + k, scale=scale).requires_grad_()
    c = torch.randn(4, k, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    w, idx = differentiable_topk(s, k, tau)
    w_ref, idx_ref = naive(s, k, tau)
    assert torch.equal(idx, idx_ref)
    (g,) = torch.autograd.grad((w * c).sum(), s)
    (g_ref,) = torch.autograd.grad((w_ref * c).sum(), s)
    torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL)
    assert g.abs().sum() > 0  # the test is not vacuous


@pytest.mark.parametrize("tau", [0.02, 0.3])
def test_gradient_through_document_mixing_matches_naive(tau):
    # selected = einsum("bkn,bnd->bkd", W, D), then a random linear read-out: gradients wrt s and D.
    gen = torch.Generator().manual_seed(4)
    s = random_scores(3, 8, seed=5, scale=0.1).requires_grad_()
    d = torch.randn(3, 8, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    r = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen)
    w, _ = differentiable_topk(s, 5, tau)
    gs, gd = torch.autograd.grad((torch.einsum("bkn,bnd->bkd", w, d) * r).sum(), (s, d))
    w_ref, _ = naive(s, 5, tau)
    gs_ref, gd_ref = torch.autograd.grad((torch.einsum("bkn,bnd->bkd", w_ref, d) * r).sum(), (s, d))
    torch.testing.assert_close(gs, gs_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gd, gd_ref, rtol=RTOL, atol=ATOL)


def test_batch_equals_per_row_calls():
    s = random_scores(5, 7, seed=6, scale=0.1).requires_grad_()
    c = torch.randn(5, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    w, idx = differentiable_topk(s, 3, 0.05)
    (g,) = torch.autograd.grad((w * c).sum(), s)
    for b in range(5):
        sb = s.detach()[b:b + 1].clone().requires_grad_()
        wb, idxb = differentiable_topk(sb, 3, 0.05)
        (gb,) = torch.autograd.grad((wb * c[b:b + 1]).sum(), sb)
        assert torch.equal(wb.detach(), w.detach()[b:b + 1]) and torch.equal(idxb, idx[b:b + 1])
        torch.testing.assert_close(gb, g[b:b + 1], rtol=RTOL, atol=ATOL)


def test_low_precision_input_gets_a_float32_gradient_path():
    s64 = random_scores(2, 6, seed=7, scale=0.1)
    s16 = s64.to(torch.bfloat16).requires_grad_()
    w, _ = differentiable_topk(s16, 2, 0.02)
    assert w.dtype == torch.bfloat16
    (g,) = torch.autograd.grad(w.float().sum(dim=(1, 2)).mul(torch.tensor([1.0, -2.0])).sum(), s16)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_tau_zero_is_clamped_not_rejected():
    s = random_scores(2, 5, seed=8).requires_grad_()
    w, _ = differentiable_topk(s, 2, 0.0)
    (g,) = torch.autograd.grad((w * torch.randn_like(w)).sum(), s)
    assert torch.isfinite(g).all()


# ---- alternative estimators -------------------------------------------------------------------------

def test_gumbel_forward_is_one_hot_and_seeded():
    s = random_scores(8, 10, seed=9, scale=1.0)
    w1, idx1 = gumbel_topk(s, 4, 1.0, generator=torch.Generator().manual_seed(123))
    w2, idx2 = gumbel_topk(s, 4, 1.0, generator=torch.Generator().manual_seed(123))
    assert torch.equal(w1, w2) and torch.equal(idx1, idx2)
    assert torch.equal(w1, torch.nn.functional.one_hot(idx1, 10).to(w1.dtype))
    assert all(row.unique().numel() == 4 for row in idx1)  # k distinct documents
    # With noise of the same size as the logits, the sample differs from the deterministic top-k.
    _, idx_st = differentiable_topk(s, 4, 1.0)
    assert not torch.equal(idx1, idx_st)
    _, idx3 = gumbel_topk(s, 4, 1.0, generator=torch.Generator().manual_seed(124))
    assert not torch.equal(idx1, idx3)


def test_gumbel_gradient_is_straight_through_on_perturbed_logits():
    # z + g = (s + tau g) / tau, so the naive estimator on s + tau g must give the same W and gradient.
    tau = 0.5
    s = random_scores(3, 6, seed=11).requires_grad_()
    c = torch.randn(3, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    w, idx = gumbel_topk(s, 3, tau, generator=torch.Generator().manual_seed(7))
    u = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    g_noise = -torch.log(-torch.log(u))
    w_ref, idx_ref = naive(s + tau * g_noise, 3, tau)
    assert torch.equal(idx, idx_ref)
    (g,) = torch.autograd.grad((w * c).sum(), s)
    (g_ref,) = torch.autograd.grad((w_ref * c).sum(), s)
    torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL)


def test_soft_rows_are_distributions_with_an_exact_gradient():
    s = random_scores(4, 7, seed=12, scale=0.1).requires_grad_()
    w, idx = soft_topk(s, 3, 0.05)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (w > 0).all() and not torch.equal(w, torch.nn.functional.one_hot(idx, 7).double())
    assert torch.equal(idx, torch.topk(s, 3).indices)
    w_ref, _ = naive(s, 3, 0.05, straight_through=False)
    torch.testing.assert_close(w, w_ref, rtol=RTOL, atol=ATOL)  # forward = backward = P
    c = torch.randn(4, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    (g,) = torch.autograd.grad((w * c).sum(), s)
    (g_ref,) = torch.autograd.grad((w_ref * c).sum(), s)
    torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL)


def test_topk_select_dispatch_and_eval_mode():
    s = random_scores(3, 6, seed=13)
    assert set(ESTIMATORS) == {"straight_through", "gumbel", "soft"}
    w_st, idx_st = differentiable_topk(s, 2, 0.5)
    for name in ESTIMATORS:
        # Eval mode: every estimator is the deterministic hard top-k.
        w, idx = topk_select(s, 2, 0.5, estimator=name, training=False,
                             generator=torch.Generator().manual_seed(0))
        assert torch.equal(w, w_st) and torch.equal(idx, idx_st)
    w, _ = topk_select(s, 2, 0.5, estimator="soft")
    assert torch.equal(w, soft_topk(s, 2, 0.5)[0])
    w, idx = topk_select(s, 2, 0.5, estimator="gumbel", generator=torch.Generator().manual_seed(5))
    w_ref, idx_ref = gumbel_topk(s, 2, 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(w, w_ref) and torch.equal(idx, idx_ref)


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, exc, message", [
    ((torch.zeros(2, 4), 5, 0.02), ValueError, "1 <= k <= N = 4"),
    ((torch.zeros(2, 4), 0, 0.02), ValueError, "got k = 0"),
    ((torch.zeros(4), 2, 0.02), ValueError, "must be 2-D"),
    ((torch.zeros(2, 3, 4), 2, 0.02), ValueError, "got shape (2, 3, 4)"),
    ((torch.zeros(2, 4), 2, -0.1), ValueError, "tau must be >= 0"),
    ((torch.zeros(2, 4), 2, float("nan")), ValueError, "tau must be >= 0"),
    ((torch.zeros(2, 4, dtype=torch.long), 2, 0.02), TypeError, "floating-point"),
    ((torch.zeros(2, 4), 2.0, 0.02), TypeError, "k must be an int"),
])
def test_bad_inputs_raise_clear_errors(args, exc, message):
    for fn in (differentiable_topk, gumbel_topk, soft_topk):
        with pytest.raises(exc, match="topk.py") as info:
            fn(*args)
        assert message in str(info.value)


def test_unknown_estimator():
    with pytest.raises(ValueError, match=r"unknown estimator 'gumble'.*'gumbel'"):
        topk_select(torch.zeros(1, 3), 1, 0.1, estimator="gumble")

"""Differentiable top-k selection of documents: the retrieval step of CLaRa's end-to-end stage.

What is here:
  differentiable_topk  the estimator CLaRa trains with (docs/method.md#differentiable-top-k, the paper's stage 3):
                       a hard top-k in the forward pass, the gradient of a sequential softmax backward
  gumbel_topk          the same with Gumbel noise on the logits (an ablation: sampled top-k)
  soft_topk            the sequential softmax itself, no straight-through (an ablation: soft mixtures)
  ESTIMATORS           name -> function, so that training picks one with a flag
  topk_select          the one entry point training calls: (scores, k, tau, estimator, training)
  recall_at_k, precision_at_k   of a ranked selection against the positives: the one definition that
                       training logs (stage 3) and eval.py reports

What is not here: the scores (cosine of query and document memories, clara.py) and the mixing of the
selected documents (`einsum("bkn,bnd->bkd", W, D)`, also clara.py).

It mirrors the top-k helper of the official modeling file (`openrlhf/models/modeling_clara.py`) in
behaviour only; the code is our own and the gradient is checked against an independent naive version in
tests/test_topk.py.

Shape legend: B questions, N candidate documents, K selected documents (k in the signatures).

The straight-through estimator
------------------------------
Let z = s / max(tau, 1e-6) be the scores at temperature tau. The forward pass is the plain top-k of z,
written as K one-hot rows in rank order:

    H[:, j] = one_hot(j-th largest index of z)                           (B, K, N)

The backward pass pretends each of those K picks was a softmax over the documents not yet picked (the
Plackett-Luce choice probabilities, conditioned on the hard earlier picks):

    taken_0 = 0
    P[:, j] = softmax(z + log(1 - taken_j + 1e-8))                       (B, K, N)
    taken_{j+1} = min(taken_j + H[:, j], 1)

    W = H + (P - stopgrad(P))        forward: exactly H;  dW/dz = dP/dz

`taken` is built from H only, so it carries no gradient (the official stopgrad is automatic here).

Why it is biased. The loss L(W) we train is evaluated at the hard W = H, but its gradient is taken as if W
had been the soft P: dL/ds = (dL/dW)|_{W=H} . dP/ds. That is neither the gradient of L(H) (zero almost
everywhere: H is piecewise constant in s) nor the gradient of the expected loss E[L] under any selection
distribution; it is a first-order surrogate that is wrong whenever L is not linear between H and P.
Lowering tau makes P approach H, so the mismatch between the point where L is evaluated and the function
being differentiated shrinks; but the softmax Jacobian dP/ds = (diag(p) - p p^T) / tau carries a 1/tau:
as tau -> 0 the gradient vanishes (exponentially) away from near-ties and grows like 1/tau at them, so the
signal becomes sparse and spiky, with a variance across batches that blows up. tau = 0.02 (the official
value) on cosine scores in [-1, 1] is a compromise: logits span up to 100.

A trap worth knowing: the mask is soft. log(1e-8) = -18.42, so an already-taken document is pushed down
by only 18.42 in logit units, i.e. 18.42 * tau = 0.37 in cosine at tau 0.02. When the top document beats
the rest by more than that, it still wins most of the mass of the later soft choices P[:, j > 0]. We
keep the constant because it is what the released E2E checkpoint was trained with.

The name. The official code describes its top-k as Gumbel(-Softmax), but it adds no Gumbel noise: the
selection is deterministic and the estimator is the plain straight-through one above. The real Gumbel
variant is `gumbel_topk` below, for ablations.

Ties. Indices come from a stable descending sort of the scores, so equal scores go to the lower index;
on tie-free inputs this is exactly `torch.topk(scores, k).indices`. The sort runs on the scores upcast
to the compute dtype (exact), not on z: dividing by a small tau can round two distinct scores onto the
same z and invent a tie.

Precision. Everything is computed in float32 (float64 when the scores are float64) and W is returned in
the scores' dtype. W is formed as H + (P - P.detach()) rather than H + P - P.detach(): the bracket is
exactly 0 in the forward pass, so W is exactly 0/1 in any dtype, whereas (1 + p) - p need not round back
to 1.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import torch

# Smallest temperature: the official code divides by max(tau, 1e-6), so tau = 0 means "as hard as we can".
MIN_TAU = 1e-6
# Added inside the log of the availability mask: log(1 - taken + 1e-8), i.e. -18.42 for a taken document.
MASK_EPS = 1e-8


def _check(scores: torch.Tensor, k: int, tau: float) -> None:
    """Reject inputs the estimators cannot handle, saying what was expected and what was found."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"topk.py: scores must be a torch.Tensor of shape (B, N), got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"topk.py: scores must be 2-D (B questions, N candidates), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"topk.py: scores must be a floating-point tensor, got {scores.dtype}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"topk.py: k must be an int, got {type(k).__name__}")
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"topk.py: k must satisfy 1 <= k <= N = {n} (the number of candidates), got k = {k}")
    if not tau >= 0:  # also catches NaN
        raise ValueError(f"topk.py: tau must be >= 0 (0 is clamped to {MIN_TAU}), got tau = {tau}")


def _compute_dtype(scores: torch.Tensor) -> torch.dtype:
    # Half-precision softmax over logits of size ~1/tau loses too much; float64 stays float64 for tests.
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def _hard_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, K) of the k largest entries of z, ties to the lower index, and their one-hots (B, K, N)."""
    # A stable sort keeps equal values in index order, so ties resolve deterministically on every device.
    idx = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]  # (B, K)
    hard = torch.nn.functional.one_hot(idx, z.shape[-1]).to(z.dtype)          # (B, K, N)
    return hard, idx


def _sequential_softmax(z: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """P[:, j] = softmax(z + log(1 - taken_j + 1e-8)) with taken_j the hard picks before j.  -> (B, K, N)"""
    taken = torch.zeros_like(z)                                     # (B, N), no gradient: built from hard
    probs = []
    for j in range(hard.shape[1]):
        mask = torch.log(1 - taken.detach() + MASK_EPS)             # 0 if free, -18.42 if taken
        probs.append(torch.softmax(z + mask, dim=-1))               # (B, N)
        # min(., 1) only matters if an index repeated; top-k indices are distinct, so it is a no-op here.
        taken = torch.clamp(taken + hard[:, j], max=1)
    return torch.stack(probs, dim=1)                                # (B, K, N)


def _logits(scores: torch.Tensor, tau: float) -> torch.Tensor:
    return scores.to(_compute_dtype(scores)) / max(float(tau), MIN_TAU)  # (B, N)


def differentiable_topk(scores: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through top-k: W (B, K, N) exactly one-hot in rank order forward, dP/dz backward.

    scores (B, N) any float dtype; k in [1, N]; tau >= 0 (clamped at 1e-6). Returns W in the scores'
    dtype and idx (B, K) int64 with W[b, j, idx[b, j]] = 1. See the module docstring for the math.
    """
    _check(scores, k, tau)
    z = _logits(scores, tau)                                        # (B, N)
    # Sort the exact upcast scores, not z: s / tau can round distinct scores onto the same value.
    hard, idx = _hard_topk(scores.detach().to(z.dtype), k)         # (B, K, N), (B, K)
    soft = _sequential_softmax(z, hard)                             # (B, K, N)
    w = hard + (soft - soft.detach())                               # forward exactly hard
    return w.to(scores.dtype), idx


def gumbel_topk(scores: torch.Tensor, k: int, tau: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-perturbed straight-through top-k: a sampled selection, same gradient form.

    Adding i.i.d. Gumbel(0, 1) noise g to the logits z and taking the top-k of z + g draws k documents
    without replacement from the Plackett-Luce distribution of softmax(z) (the Gumbel-top-k trick), so the
    forward pass explores beyond the current best k, with tau as the exploration temperature. The
    backward pass is the straight-through one evaluated on the perturbed logits. Noise is drawn from
    `generator` (on the scores' device) for reproducibility. idx are the indices of the *sampled*
    selection, so in general they differ from torch.topk(scores, k).
    """
    _check(scores, k, tau)
    z = _logits(scores, tau)                                        # (B, N)
    u = torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    # torch.rand is in [0, 1); lifting 0 to the smallest normal keeps -log(-log(u)) finite.
    u = u.clamp(min=torch.finfo(z.dtype).tiny)
    z = z + (-torch.log(-torch.log(u)))                             # (B, N), noise carries no gradient
    hard, idx = _hard_topk(z.detach(), k)                           # (B, K, N), (B, K)
    soft = _sequential_softmax(z, hard)                             # (B, K, N)
    w = hard + (soft - soft.detach())
    return w.to(scores.dtype), idx


def soft_topk(scores: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft top-k, no straight-through: W = P, each row a distribution over the N candidates.

    The forward pass feeds the decoder a convex mixture of documents per slot instead of one document,
    so forward and backward agree (an unbiased gradient of a different, relaxed model). The masks still
    follow the hard picks, so slot j is "the j-th choice given the hard first j-1". Use it to ablate
    the straight-through trick; at inference topk_select returns the hard selection, which is the
    train/test mismatch the ablation measures. idx is the hard top-k, for logging recall.
    """
    _check(scores, k, tau)
    z = _logits(scores, tau)
    hard, idx = _hard_topk(scores.detach().to(z.dtype), k)
    return _sequential_softmax(z, hard).to(scores.dtype), idx


ESTIMATORS = {
    "straight_through": differentiable_topk,
    "gumbel": gumbel_topk,
    "soft": soft_topk,
}


def topk_select(scores: torch.Tensor, k: int, tau: float, estimator: str = "straight_through",
                training: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Select k of N documents per question with the named estimator.  -> W (B, K, N), idx (B, K)

    training=False returns the deterministic hard top-k whatever the estimator (no noise, no soft
    mixture): at inference the gradient does not matter and the selection is what CLaRa evaluates.
    `generator` is used only by the "gumbel" estimator.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"topk.py: unknown estimator {estimator!r}; expected one of {sorted(ESTIMATORS)}")
    if not training:
        return differentiable_topk(scores, k, tau)
    if estimator == "gumbel":
        return gumbel_topk(scores, k, tau, generator=generator)
    return ESTIMATORS[estimator](scores, k, tau)


# ---- retrieval metrics of a selection (training logs them, eval.py reports them) ----------------------

def _retrieval_hits(retrieved: Sequence[Hashable], positives: Iterable[Hashable], k: int,
                    metric: str) -> tuple[int, set]:
    """(|set(retrieved[:k]) ∩ positives|, the positives as a set); an empty positive set is an error."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"topk.py: k must be an int >= 1, got {k!r}")
    # Tensors and arrays of ids arrive here too; .tolist() turns them into hashable Python ints.
    retrieved = retrieved.tolist() if hasattr(retrieved, "tolist") else list(retrieved)
    positives = set(positives.tolist() if hasattr(positives, "tolist") else positives)
    if not positives:
        raise ValueError(f"topk.py {metric}: positives is empty, so {metric} is undefined; "
                         "skip questions without a positive document")
    # A document retrieved twice within the top k counts once.
    return len(set(retrieved[:k]) & positives), positives


def recall_at_k(retrieved: Sequence[Hashable], positives: Iterable[Hashable], k: int) -> float:
    """|set(retrieved[:k]) ∩ positives| / |positives|; retrieved is ranked best first.

    Raises on an empty positive set (recall is undefined): the caller decides whether such questions are
    skipped or counted, and says so.
    """
    hits, positives = _retrieval_hits(retrieved, positives, k, "recall_at_k")
    return hits / len(positives)


def precision_at_k(retrieved: Sequence[Hashable], positives: Iterable[Hashable], k: int) -> float:
    """hits / k with hits = |set(retrieved[:k]) ∩ positives|.

    The denominator is k even when fewer than k documents were retrieved (a missing slot is a miss).
    Raises on an empty positive set, like recall_at_k, so that both are averaged over the same questions.
    """
    hits, _ = _retrieval_hits(retrieved, positives, k, "precision_at_k")
    return hits / k

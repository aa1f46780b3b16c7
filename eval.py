"""Evaluation entry point for CLaRa. For now only the metrics; the evaluation modes come later, below them.

Metrics (CLARA_SPEC.md section 7, the official definitions):
  normalize_answer   SQuAD-style answer normalisation, with "True"/"False" read as "yes"/"no"
  exact_match        normalised strings equal
  f1_score           SQuAD token F1, with the yes/no/noanswer rule
  cover_em           "acc" in the official README tables: every gold token appears in the prediction
  recall_at_k        |top-k retrieved ∩ positives| / |positives|
  precision_at_k     |top-k retrieved ∩ positives| / k

Answer metrics take one prediction and one or more gold answers. The usual convention, and our default,
is the best score over the gold aliases; `first_only=True` reproduces the official scoring, which looks
at the first gold answer only (CLARA_SPEC.md section 9). Tables must say which one they use.

Empty answers (a string that normalises to nothing, such as "" or "The."): every metric scores 1 when
both sides are empty and 0 when only one is. This is SQuAD v2's rule for F1; SQuAD v1 scores two empty
strings 0 for F1 but 1 for EM, and a literal reading of cover-EM ("every gold token is covered") would
give an empty gold 1 against any prediction, a free point for garbage. The three metrics agree here.

All functions are pure (no I/O, no global state) and return Python floats in [0, 1].
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Hashable, Iterable, Sequence

# ---- metrics ----------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Answers that are categories rather than spans: partial token overlap with them means nothing.
_SPECIAL_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace.

    Exactly "True" / "False" (a boolean answer printed by Python) become "yes" / "no" first. The order
    matters: punctuation goes before articles, so "the-end" becomes "theend" and keeps its "the".
    """
    if not isinstance(text, str):
        raise TypeError(f"eval.py normalize_answer: expected a str, got {type(text).__name__}")
    if text == "True":
        text = "yes"
    elif text == "False":
        text = "no"
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _gold_list(golds: str | Sequence[str], first_only: bool) -> list[str]:
    """A str is one gold answer; a list is aliases. first_only keeps the first, as the official code."""
    if isinstance(golds, str):
        golds = [golds]
    golds = list(golds)
    if not golds:
        raise ValueError("eval.py: no gold answer given (golds is an empty list)")
    for g in golds:
        if not isinstance(g, str):
            raise TypeError(f"eval.py: gold answers must be str, got {type(g).__name__}: {g!r}")
    return golds[:1] if first_only else golds


def _best(metric, prediction: str, golds: str | Sequence[str], first_only: bool) -> float:
    if not isinstance(prediction, str):
        raise TypeError(f"eval.py: prediction must be a str, got {type(prediction).__name__}")
    return max(metric(prediction, g) for g in _gold_list(golds, first_only))


def _em_one(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1_one(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    # A yes/no/noanswer on either side must match exactly: "no" vs "no idea" is not half right.
    if (pred in _SPECIAL_ANSWERS or ref in _SPECIAL_ANSWERS) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)  # see the module docstring: empty answers
    # Multiset overlap: a token counts as often as it appears on both sides.
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _cover_one(prediction: str, gold: str) -> float:
    pred_tokens, ref_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not ref_tokens:
        return float(not pred_tokens)  # see the module docstring: empty answers
    # Set membership, not a contiguous span and not a multiset: "york new" covers "new york".
    available = set(pred_tokens)
    return float(all(tok in available for tok in ref_tokens))


def exact_match(prediction: str, golds: str | Sequence[str], first_only: bool = False) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer (the first only if first_only)."""
    return _best(_em_one, prediction, golds, first_only)


def f1_score(prediction: str, golds: str | Sequence[str], first_only: bool = False) -> float:
    """SQuAD token F1, best over golds: 2PR/(P+R) with P = overlap/|pred|, R = overlap/|gold| in tokens.

    0 when either side normalises to yes/no/noanswer and the two differ.
    """
    return _best(_f1_one, prediction, golds, first_only)


def cover_em(prediction: str, golds: str | Sequence[str], first_only: bool = False) -> float:
    """1.0 if every token of a normalised gold answer is among the normalised prediction's tokens."""
    return _best(_cover_one, prediction, golds, first_only)


def _retrieval_hits(retrieved: Sequence[Hashable], positives: Iterable[Hashable], k: int) -> tuple[int, set]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"eval.py: k must be an int >= 1, got {k!r}")
    # Tensors and arrays of ids arrive here too; .tolist() turns them into hashable Python ints.
    retrieved = retrieved.tolist() if hasattr(retrieved, "tolist") else list(retrieved)
    positives = set(positives.tolist() if hasattr(positives, "tolist") else positives)
    # A document retrieved twice within the top k counts once.
    return len(set(retrieved[:k]) & positives), positives


def recall_at_k(retrieved: Sequence[Hashable], positives: Iterable[Hashable], k: int) -> float:
    """|set(retrieved[:k]) ∩ positives| / |positives|; retrieved is ranked best first.

    Raises on an empty positive set (recall is undefined): the caller decides whether such questions are
    skipped or counted, and says so.
    """
    hits, positives = _retrieval_hits(retrieved, positives, k)
    if not positives:
        raise ValueError("eval.py recall_at_k: positives is empty, so recall is undefined; "
                         "skip questions without a positive document")
    return hits / len(positives)


def precision_at_k(retrieved: Sequence[Hashable], positives: Iterable[Hashable], k: int) -> float:
    """hits / k with hits = |set(retrieved[:k]) ∩ positives|.

    The denominator is k even when fewer than k documents were retrieved (a missing slot is a miss).
    Raises on an empty positive set, like recall_at_k, so that both are averaged over the same questions.
    """
    hits, positives = _retrieval_hits(retrieved, positives, k)
    if not positives:
        raise ValueError("eval.py precision_at_k: positives is empty; "
                         "skip questions without a positive document")
    return hits / k

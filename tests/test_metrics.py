"""Tests for the metrics of eval.py, against values computed by hand (the arithmetic is in the comments).

Floats are compared with pytest.approx at its default (relative 1e-6); 0/1 results are compared exactly.
"""
import pytest
import torch

from eval import cover_em, exact_match, f1_score, normalize_answer, precision_at_k, recall_at_k


# ---- normalisation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower", "eiffel tower"),              # lower-case, article dropped
    ("an apple a day", "apple day"),                   # "an" and "a" dropped as whole words only
    ("Theatre and banana", "theatre and banana"),      # "the" inside "theatre", "a" inside "banana" stay
    ("U.S.A.!", "usa"),                                # every punctuation char removed, not replaced
    ("rock-n-roll", "rocknroll"),
    ("the-end", "theend"),                             # punctuation goes first, so no article is left
    ("  Paris,\tFrance \n", "paris france"),           # whitespace collapsed and stripped
    ("True", "yes"), ("False", "no"),                  # exact Python booleans
    ("true", "true"), ("True.", "true"), (" True", "true"),  # only the exact strings are mapped
    ("", ""), ("The.", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_rejects_non_strings():
    with pytest.raises(TypeError, match="expected a str, got NoneType"):
        normalize_answer(None)


# ---- exact match ------------------------------------------------------------------------------------

def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "Eiffel Tower") == 0.0
    assert exact_match("True", "yes") == 1.0                   # "True" -> "yes"
    assert exact_match("", "Paris") == 0.0
    assert exact_match("", "") == 1.0


def test_multiple_golds_max_versus_first_only():
    golds = ["Barack Obama", "Obama"]
    # Max over aliases: "obama" == "obama" -> 1. First only: "obama" != "barack obama" -> 0.
    assert exact_match("Obama", golds) == 1.0
    assert exact_match("Obama", golds, first_only=True) == 0.0
    # F1 first only: pred {obama}, gold {barack, obama}: overlap 1, P = 1/1, R = 1/2,
    # F1 = 2 * 1 * 1/2 / (1 + 1/2) = 1 / (3/2) = 2/3. Max over aliases: 1.
    assert f1_score("Obama", golds) == 1.0
    assert f1_score("Obama", golds, first_only=True) == pytest.approx(2 / 3)
    # Cover-EM first only: "barack" is not among {obama} -> 0; the second alias is covered -> 1.
    assert cover_em("Obama", golds) == 1.0
    assert cover_em("Obama", golds, first_only=True) == 0.0
    # A str gold is the same as a one-element list.
    assert f1_score("Obama", "Barack Obama") == f1_score("Obama", ["Barack Obama"])


# ---- F1 ---------------------------------------------------------------------------------------------

def test_f1_partial_overlap():
    # pred "the red big car" -> [red, big, car] (3 tokens); gold "a big red truck today" ->
    # [big, red, truck, today] (4 tokens). Overlap {red, big} = 2.
    # P = 2/3, R = 2/4 = 1/2, F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7.
    assert f1_score("the red big car", "a big red truck today") == pytest.approx(4 / 7)


def test_f1_counts_repeated_tokens_as_a_multiset():
    # pred [new, new, york] (3), gold [new, york] (2): overlap min(2,1) new + 1 york = 2.
    # P = 2/3, R = 2/2 = 1, F1 = 2 * (2/3) / (5/3) = 4/5.
    assert f1_score("new new york", "New York") == pytest.approx(4 / 5)


def test_f1_no_overlap_and_empty_prediction():
    assert f1_score("Berlin", "Paris") == 0.0
    assert f1_score("", "Paris") == 0.0                        # no prediction tokens
    assert f1_score("The", "a") == 1.0                         # both normalise to "": agree
    assert f1_score("Paris", "the") == 0.0                     # empty gold, non-empty prediction


def test_f1_yes_no_rule():
    # Without the rule, "no idea" vs "no" would get P = 1/2, R = 1, F1 = 2/3; with it, 0.
    assert f1_score("no idea", "no") == 0.0
    assert f1_score("yes it is", "yes") == 0.0
    assert f1_score("noanswer", "no answer") == 0.0            # "noanswer" is special, "no answer" not
    assert f1_score("False", "no") == 1.0                      # "False" -> "no" == "no"
    assert f1_score("yes", "yes") == 1.0
    # The rule looks at the whole normalised string. A prediction "no" against "no way": the
    # prediction is special and differs -> 0 (plain F1 would give P = 1, R = 1/2, F1 = 2/3).
    assert f1_score("no", "no way") == 0.0
    # Neither side special: pred [no, way, out] (3), gold [no, way] (2), overlap 2,
    # P = 2/3, R = 1, F1 = 2 * (2/3) * 1 / (2/3 + 1) = (4/3) / (5/3) = 4/5.
    assert f1_score("no way out", "no way") == pytest.approx(4 / 5)


# ---- cover EM ---------------------------------------------------------------------------------------

def test_cover_em():
    # gold [eiffel, tower] both among [it, is, eiffel, tower, in, paris] -> 1.
    assert cover_em("It is the Eiffel Tower, in Paris.", "The Eiffel Tower") == 1.0
    assert cover_em("York, New", "New York") == 1.0            # order does not matter
    assert cover_em("New Jersey", "New York") == 0.0           # "york" missing
    assert cover_em("Eiffel Towers", "Eiffel Tower") == 0.0    # whole tokens only
    assert cover_em("", "Paris") == 0.0
    assert cover_em("True", "yes") == 1.0
    # Empty gold: 1 only for an empty prediction (not a free point for any prediction).
    assert cover_em("", "The") == 1.0
    assert cover_em("anything", "The") == 0.0


# ---- retrieval --------------------------------------------------------------------------------------

def test_recall_and_precision_at_k():
    retrieved = [7, 3, 9, 1, 4]
    positives = [3, 4, 8]
    # top1 {7}: 0 hits -> recall 0/3, precision 0/1.
    assert recall_at_k(retrieved, positives, 1) == 0.0
    assert precision_at_k(retrieved, positives, 1) == 0.0
    # top3 {7, 3, 9}: 1 hit (3) -> recall 1/3, precision 1/3.
    assert recall_at_k(retrieved, positives, 3) == pytest.approx(1 / 3)
    assert precision_at_k(retrieved, positives, 3) == pytest.approx(1 / 3)
    # top5 {7, 3, 9, 1, 4}: 2 hits (3, 4) -> recall 2/3, precision 2/5.
    assert recall_at_k(retrieved, positives, 5) == pytest.approx(2 / 3)
    assert precision_at_k(retrieved, positives, 5) == pytest.approx(2 / 5)


def test_retrieval_edge_cases():
    # k beyond the list: top-10 of 2 documents with 1 hit -> recall 1/1, precision 1/10.
    assert recall_at_k([5, 6], [6], 10) == 1.0
    assert precision_at_k([5, 6], [6], 10) == pytest.approx(0.1)
    # A duplicated document counts once: top3 {2} with positives {2, 3} -> recall 1/2, precision 1/3.
    assert recall_at_k([2, 2, 2], [2, 3], 3) == pytest.approx(0.5)
    assert precision_at_k([2, 2, 2], [2, 3], 3) == pytest.approx(1 / 3)
    # Tensors of ids (the idx returned by topk.py) work as well: top2 {1, 0}, positives {0} -> 1/1.
    assert recall_at_k(torch.tensor([1, 0, 2]), torch.tensor([0]), 2) == 1.0


def test_one_recall_for_training_and_eval():
    """topk.recall_at_k is the only recall: eval.py reports it, train.py's stage-3 log averages it."""
    import eval
    import topk
    import train
    assert eval.recall_at_k is topk.recall_at_k is train.recall_at_k
    assert eval.precision_at_k is topk.precision_at_k
    # What train.py logs as recall@2: the hard top-2 of each row's scores (topk_select's idx), against
    # pos_index, averaged over the rows that have positives.
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # top-2 {0, 2}; positives {2, 3}: 1 hit -> 1/2
                           [0.2, 0.8, 0.1, 0.7]])   # top-2 {1, 3}; positives {1}: 1 hit -> 1/1
    _, idx = topk.topk_select(scores, 2, 0.02, training=False)
    assert idx.tolist() == [[0, 2], [1, 3]]
    recalls = [recall_at_k(row, pos, len(row)) for row, pos in zip(idx.tolist(), [[2, 3], [1]])]
    assert recalls == [0.5, 1.0]  # mean 0.75


@pytest.mark.parametrize("fn", [recall_at_k, precision_at_k])
def test_retrieval_errors(fn):
    with pytest.raises(ValueError, match="positives is empty"):
        fn([1, 2], [], 1)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        fn([1, 2], [1], 0)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        fn([1, 2], [1], 1.5)


def test_answer_metric_errors():
    with pytest.raises(ValueError, match="no gold answer"):
        exact_match("Paris", [])
    with pytest.raises(TypeError, match="prediction must be a str"):
        f1_score(None, "Paris")
    with pytest.raises(TypeError, match="gold answers must be str"):
        cover_em("Paris", ["Paris", None])

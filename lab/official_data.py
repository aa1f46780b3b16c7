"""Build the files of all three stages, and held-out evaluation files, from the official example data.

    python lab/official_data.py --out out/real/data                  # defaults: 100 held-out documents, seed 0
    python lab/official_data.py --src FILE --out DIR --test-docs 100 --k 5 --candidates 20 --seed 0

The source is the official CLaRa repository's `example/pretrain_data.jsonl` (1,000 Wikipedia passages, each a
stage-1 "qa" record with about 8 question/answer pairs; its licence is the repository's LICENSE, kept beside
the copy in ../shared/data as OFFICIAL_LICENSE.txt). By default it is read from
`../shared/data/official_example_pretrain_data.jsonl` relative to the repository; users point --src at their
own copy. Nothing is downloaded.

The split is BY DOCUMENT, drawn from --seed: --test-docs passages (and every question about them) are held
out, and no held-out passage appears anywhere in a training file, not even as a distractor. Written to --out:

    stage1.jsonl        the training documents' records as they are (the source's stage-1 format)
    stage2.jsonl        per training question: the question, its passage + k-1 other training passages
                        (shuffled), the answer (`answer`, and `gold_answer`)
    stage3.jsonl        per training question: the question, N candidates (its passage + N-1 other training
                        passages, shuffled), the answer, `pos_index` (where its passage is)
    test_stage2.jsonl   held-out questions in the evaluation format (question, docs, golden_answers, pos_index)
                        with k documents from the held-out passages, laid out like stage2.jsonl: what
                        eval.py's compressed / text / closed_book modes read (they take the first k docs)
    test_stage3.jsonl   held-out questions with N candidates from the held-out passages and pos_index: what
                        eval.py's retrieval mode reads
    split.json          the seed, the source's sha256, counts, and the source line of every held-out passage

Distractors (the other passages) never contain the question's answer as a substring (case-insensitive), so
`pos_index` is the only passage that states it verbatim; within a record every passage is distinct. Records
are shuffled (seeded), so `eval.py --limit N` samples across documents. Every file passes
`python data.py check --stage S FILE` (the test_* files: S = 2 and 3). Deterministic for a seed.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import DataError, parse_record  # noqa: E402

DEFAULT_SRC = ROOT.parent / "shared" / "data" / "official_example_pretrain_data.jsonl"


def read_documents(src: Path) -> list[dict]:
    """The source's stage-1 records -> one entry per distinct passage: {"line", "raw", "doc", "qa"}.

    Every line is validated as a stage-1 record (DataError names file:line). Records with the same passage
    text are one document (their QA pairs merged), so that a split by document cannot put one passage on
    both sides. Paraphrase records keep their line but add no question.
    """
    if not src.is_file():
        raise FileNotFoundError(f"{src}: source file not found (the official repository's "
                                f"example/pretrain_data.jsonl; pass --src)")
    docs, by_text = [], {}
    with open(src, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            r = parse_record(raw, 1, f"{src}:{n}")
            text = r["docs"][0]
            if text not in by_text:
                by_text[text] = len(docs)
                docs.append({"line": n, "raw": [], "doc": text, "words": _words(text), "qa": []})
            d = docs[by_text[text]]
            d["raw"].append(raw.decode("utf-8").rstrip("\n"))
            if r["data_type"] == "qa":
                d["qa"] += [(q, a) for q, a in zip(r["question"], r["answers"])]
    return docs


def _words(text: str) -> str:
    """Lower-cased words without punctuation, space-joined and padded: for whole-word containment tests."""
    return " " + " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split()) + " "


def _others(rng: random.Random, pool: list[int], own: int, answer: str, docs: list[dict], n: int,
            where: str, stats: dict) -> list[int]:
    """n distinct passages of `pool` other than `own`, at random, preferring those without the answer.

    A passage "has" the answer when the answer's words occur in it as a run of whole words (case and
    punctuation ignored). Short answers ("2012", "B") can be in too many passages: then passages that have
    it fill the remaining places, and stats["distractors_with_answer"] counts them.
    """
    needle = _words(answer)
    has = lambda i: needle.strip() != "" and needle in docs[i]["words"]  # noqa: E731
    chosen, dirty, seen = [], [], {own}
    # Random draws first (cheap: the pool is large and most passages qualify), then every passage in a
    # random order, so that a rare answer still gets clean distractors when there are enough.
    draws = (rng.choice(pool) for _ in range(20 * n))
    everyone = (i for _ in range(1) for i in rng.sample(pool, len(pool)))  # drawn only if it is reached
    for i in itertools.chain(draws, everyone):
        if len(chosen) == n:
            break
        if i in seen:
            continue
        seen.add(i)
        (dirty if has(i) else chosen).append(i)
    if len(chosen) + len(dirty) < n:
        raise ValueError(f"{where}: {n} other passages are needed and the pool has {len(pool) - 1}")
    if len(chosen) < n:
        stats["distractors_with_answer"] += n - len(chosen)
        chosen += dirty[:n - len(chosen)]
    return chosen


def _records(rng: random.Random, ids: list[int], docs: list[dict], k: int, n_cand: int, per_doc: int | None,
             held_out: bool, stats: dict) -> tuple[list[dict], list[dict]]:
    """(k-document records, N-candidate records) for the questions of the documents `ids`, from `ids` only."""
    with_k, with_n = [], []
    for i in ids:
        qa = docs[i]["qa"]
        if per_doc is not None:
            qa = rng.sample(qa, min(per_doc, len(qa)))
        where = f"source line {docs[i]['line']}"
        for q, a in qa:
            for n, out in ((k, with_k), (n_cand, with_n)):
                order = [i] + _others(rng, ids, i, a, docs, n - 1, where, stats)
                rng.shuffle(order)
                rec = {"question": q, "docs": [docs[j]["doc"] for j in order]}
                pos = [order.index(i)]
                if held_out:  # the evaluation format eval.py reads: every gold alias, and the positive
                    rec |= {"golden_answers": [a], "pos_index": pos}
                elif n == k:
                    rec |= {"answer": a, "gold_answer": a}
                else:
                    rec |= {"answer": a, "pos_index": pos}
                out.append(rec)
    rng.shuffle(with_k)
    rng.shuffle(with_n)
    return with_k, with_n


def build(src: Path, out: Path, test_docs: int = 100, k: int = 5, candidates: int = 20, seed: int = 0,
          questions_per_doc: int | None = None) -> dict:
    """Write the files described in the module docstring; returns split.json's content."""
    docs = read_documents(src)
    if k < 1 or candidates < 2:
        raise ValueError(f"need --k >= 1 and --candidates >= 2, got k={k}, candidates={candidates}")
    need = max(k, candidates)
    if not need <= test_docs <= len(docs) - need:
        raise ValueError(f"--test-docs {test_docs}: both sides of the split need at least max(k, candidates) = "
                         f"{need} documents, and {src} has {len(docs)}")
    if questions_per_doc is not None and questions_per_doc < 1:
        raise ValueError(f"--questions-per-doc must be >= 1, got {questions_per_doc}")
    rng = random.Random(seed)
    perm = rng.sample(range(len(docs)), len(docs))
    test_ids, train_ids = sorted(perm[:test_docs]), sorted(perm[test_docs:])
    train_stats, test_stats = {"distractors_with_answer": 0}, {"distractors_with_answer": 0}
    stage2, stage3 = _records(rng, train_ids, docs, k, candidates, questions_per_doc, False, train_stats)
    test2, test3 = _records(rng, test_ids, docs, k, candidates, None, True, test_stats)
    stage1 = [line for i in train_ids for line in docs[i]["raw"]]
    rng.shuffle(stage1)

    out.mkdir(parents=True, exist_ok=True)
    files = {"stage1.jsonl": stage1, "stage2.jsonl": stage2, "stage3.jsonl": stage3,
             "test_stage2.jsonl": test2, "test_stage3.jsonl": test3}
    for name, rows in files.items():
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    split = {"source": str(src), "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(), "seed": seed,
             "documents": len(docs), "train_documents": len(train_ids), "test_documents": len(test_ids),
             "k": k, "candidates": candidates, "questions_per_doc": questions_per_doc,
             "records": {name.removesuffix(".jsonl"): len(rows) for name, rows in files.items()},
             "distractors_with_answer": {"train": train_stats["distractors_with_answer"],
                                         "test": test_stats["distractors_with_answer"]},
             "test_source_lines": [docs[i]["line"] for i in test_ids]}
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    return split


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="the official example/pretrain_data.jsonl")
    p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument("--test-docs", type=int, default=100, help="held-out documents (all their questions)")
    p.add_argument("--k", type=int, default=5, help="documents per stage-2 / test_stage2 question (its own + k-1)")
    p.add_argument("--candidates", type=int, default=20, help="candidates per stage-3 / test_stage3 question")
    p.add_argument("--questions-per-doc", type=int, default=None, help="at most this many stage-2/3 training "
                   "questions per document (default: all); the held-out files keep every question")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the distractors and the order")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    try:
        split = build(a.src, a.out, a.test_docs, a.k, a.candidates, a.seed, a.questions_per_doc)
    except (FileNotFoundError, ValueError, DataError) as e:
        raise SystemExit(f"official_data.py: {e}") from None
    print(json.dumps({key: v for key, v in split.items() if key != "test_source_lines"}))
    return split


if __name__ == "__main__":
    main()

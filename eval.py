"""Evaluate a CLaRa checkpoint as the paper does: answer metrics, retrieval metrics and the cost per query.

    python eval.py --checkpoint out/stage2/checkpoint --data nq.jsonl hotpotqa.jsonl --mode compressed text closed_book
    python eval.py --checkpoint out/stage3/checkpoint --data nq_no_pos.jsonl --mode retrieval
    python eval.py --checkpoint CLaRa-7B-E2E/compression-16 --base-model /models/Mistral-7B-Instruct-v0.2 \
                   --data musique.jsonl --mode retrieval compressed --device cuda

What is here, top to bottom:
  metrics       normalize_answer, exact_match, f1_score, cover_em; recall_at_k, precision_at_k (topk.py's)
  reading       read_eval_file: official evaluation JSONL, every record checked, all gold aliases kept
  the modes     run_batch: one batch of questions in one mode, timed phase by phase
  reports       aggregate, the per-item JSONL, summary.json, markdown tables in the paper's layout
  main          the command line (also callable from tests: main(argv) returns the summary)

Modes (docs/method.md#evaluation). k is --top-k, by default the checkpoint's generation_top_k.
  compressed    stage 1/2 models: the FIRST k documents of each record are compressed (encoder adapter)
                and the decoder adapter answers from their memory vectors. 128 new tokens.
  retrieval     stage-3 models: the query reasoner scores the record's N candidates (cosine with their
                compressed vectors), the top k are answered from; recall@k and precision@k against
                pos_index for k in {1, 3, 5, top-k} with k <= N. 64 new tokens.
  text          the uncompressed baseline: the raw text of the SAME first k documents in the prompt, read
                by the bare base model (--text-adapter none: the paper's "Mistral-7B w/ retrieval" row) or
                by the checkpoint's decoder adapter. 128 new tokens.
  closed_book   the question alone, bare base model by default. 128 new tokens.
Decoding is greedy in batches of --batch-size questions (left padded, as in training).

Records. Fields as the official files have them: `question`; the documents in `docs` (else `context`,
else `content`); the gold answers in `golden_answers`, else `gold_answer`, else `answers`, else `answer`
(a string or a list of aliases; ALL aliases are kept for scoring); optional `pos_index` (indices of the
documents that hold the answer). The explicit gold fields come first because in the stage-2 format
`answer` is a teacher's answer and `gold_answer` the reference. Two kinds of problems:
  malformed     not JSON (or a key given twice, a lone surrogate escape), a missing field, documents that
                are not a list of non-empty strings, an empty candidate list, a pos_index that is not a list
                of distinct indices in range: an error naming file:line (and the field), before the model is
                loaded (--skip-malformed skips and reports them instead). These are the checks of the
                training files (data.loads_record, data.question_and_docs, data.positives).
  unscorable    well formed, but this mode cannot score it: no gold answer, or fewer than k documents.
                Skipped, and reported per data set and mode (count per reason and the first file:line
                of each). If no record of a data set is left for a mode, that is an error.
Records without a positive document are answered but left out of recall@k and precision@k (counted).

Cost per query (the paper's efficiency table). CUDA is synchronised at every clock reading.
  compress_ms    compressing the documents a query reads (k, or all N candidates in retrieval mode);
                 an offline cost when a corpus is compressed once (clara.MemoryBank)
  retrieve_ms    query encoding (query reasoner) + cosine scores + top-k
  ttft_ms        time to first token of a batch: prompt tokenisation, memory splicing and the prefill
                 pass (a latency, not divided by the batch size)
  prefill_ms, decode_ms   the prefill forward pass and the decode steps, per query (batch time / batch
                 size). They are timed by hooks on the decoder module around `model.generate`, whose first
                 forward call is the prefill and every later one a decode step; model.py is not touched.
  generate_ms    the whole generation call per query: the paper's "decoding time" column.
  context_tokens the prompt the decoder reads (memory slots included), vs raw_text_tokens: the same
                 prompt with the raw text of the same documents (what the text baseline reads).
With --batch-size 1, the per-query times are latencies, comparable to the paper's; larger batches give
throughput per query. Before timing, --warmup untimed passes run over the first batch (2 new tokens).

Outputs in --out: `{name}.{mode}.jsonl` (one line per scored question: its file:line, question, golds,
prediction, metrics, the indices of the documents read, retrieval ranking, token counts), `summary.json`
(scores in percent, retrieval metrics, cost, skipped records, settings), `results.md` (the tables printed
at the end: one row per model/setting, one column per data set plus the average).

Metrics (docs/method.md#metrics, the official definitions):
  normalize_answer   SQuAD-style answer normalisation, with "True"/"False" read as "yes"/"no"
  exact_match        normalised strings equal
  f1_score           SQuAD token F1, with the yes/no/noanswer rule
  cover_em           "acc" in the official README tables: every gold token appears in the prediction
  recall_at_k        |top-k retrieved ∩ positives| / |positives|
  precision_at_k     |top-k retrieved ∩ positives| / k

Answer metrics take one prediction and one or more gold answers. The usual convention, and our default,
is the best score over the gold aliases; `first_only=True` (--first-gold-only) reproduces the official
scoring, which looks at the first gold answer only (docs/method.md#known-defects). Tables say which one they use.

Empty answers (a string that normalises to nothing, such as "" or "The."): every metric scores 1 when
both sides are empty and 0 when only one is. This is SQuAD v2's rule for F1; SQuAD v1 scores two empty
strings 0 for F1 but 1 for EM, and a literal reading of cover-EM ("every gold token is covered") would
give an empty gold 1 against any prediction, a free point for garbage. The three metrics agree here.

The metric functions are pure (no I/O, no global state) and return Python floats in [0, 1].

Shape legend: B questions in a batch, N candidates, K documents read (top-k), M memory tokens per
document, H hidden size.
"""
from __future__ import annotations

import argparse
import json
import re
import string
import time
from collections import Counter
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from clara import LOAD_ERRORS, Clara, build_prompt, checkpoint_dir, error_line, text_prompt
from data import DataError, json_type, loads_record, positives, question_and_docs
from topk import precision_at_k, recall_at_k, topk_select

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


# ---- reading the evaluation files ---------------------------------------------------------------------

GOLD_KEYS = ("golden_answers", "gold_answer", "answers", "answer")   # explicit gold fields first (docstring)


def parse_eval_record(obj, where: str) -> dict:
    """One parsed JSON record -> {"where", "question", "docs", "golds", "gold_field", "pos_index"}.

    The question, the documents and pos_index are read and checked as in training (data.question_and_docs,
    data.positives); the gold answers are eval's own (GOLD_KEYS). Raises DataError for a malformed record.
    An empty gold list is NOT malformed (the record is then unscorable and skipped): golds are the non-blank
    aliases, numbers and booleans written as text.
    """
    question, docs = question_and_docs(obj, where)
    gold_key = next((k for k in GOLD_KEYS if k in obj), None)
    if gold_key is None:
        raise DataError(where, "missing gold answer field", f" (expected one of {list(GOLD_KEYS)}); the record "
                        f"has {sorted(obj)}")
    golds = obj[gold_key] if isinstance(obj[gold_key], list) else [obj[gold_key]]
    for g in golds:
        if not isinstance(g, (str, int, float)):  # bool is an int: "True" then normalises to "yes"
            raise DataError(where, "gold answer is not a string", f": field '{gold_key}' holds {json_type(g)}")
    golds = [str(g) for g in golds if str(g).strip()]
    return {"where": where, "question": question, "docs": docs, "golds": golds, "gold_field": gold_key,
            "pos_index": positives(obj, len(docs), where)}


def read_eval_file(path: str | Path, limit: int | None = None) -> tuple[list[dict], list[DataError]]:
    """Records of one JSONL file (the first `limit` non-blank lines) -> (good records, malformed ones).

    Each line is parsed by data.loads_record, the reader of the training files: valid UTF-8 and JSON, no key
    given twice, no lone surrogate escape."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path}: is a directory, not an evaluation data file (JSONL)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: evaluation data file not found")
    records, bad = [], []
    with open(path, "rb") as f:
        n = 0
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if limit is not None and n >= limit:
                break
            n += 1
            where = f"{path}:{lineno}"
            try:
                records.append(parse_eval_record(loads_record(raw, where), where))
            except DataError as e:
                bad.append(e)
    return records, bad


def unscorable(record: dict, mode: str, k: int) -> DataError | None:
    """Why a well-formed record cannot be scored in `mode` with k documents (None if it can)."""
    if not record["golds"]:
        return DataError(record["where"], "no gold answer", " (the gold list is empty or blank)")
    if mode != "closed_book" and len(record["docs"]) < k:
        return DataError(record["where"], f"fewer than k={k} documents", f" ({len(record['docs'])})")
    return None


def skip_report(errors: list[DataError], examples: int = 3) -> dict:
    """{reason: {"count", "examples": first few messages}} for summary.json and the printed note."""
    out = {}
    for e in errors:
        r = out.setdefault(e.reason, {"count": 0, "examples": []})
        r["count"] += 1
        if len(r["examples"]) < examples:
            r["examples"].append(str(e))
    return out


# ---- the modes ----------------------------------------------------------------------------------------

MODES = ("compressed", "retrieval", "text", "closed_book")
RECALL_KS = (1, 3, 5)                      # the paper's retrieval table; the run's top-k is added
MAX_NEW_TOKENS = {"compressed": 128, "retrieval": 64, "text": 128, "closed_book": 128}  # docs/method.md#evaluation


def make_clock(device: torch.device):
    """perf_counter, after waiting for the GPU: CUDA calls return before the work is done."""
    if device.type != "cuda":
        return time.perf_counter

    def clock():
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


@contextmanager
def forward_times(model: torch.nn.Module, clock):
    """Record the clock when each pass through the decoder starts and ends -> {"start": [...], "end": [...]}.

    Inside `model.generate`, the first pass is the prefill over the whole prompt and every later one a
    decode step (model.decode_step, which runs the blocks without Transformer.forward), so these two lists
    split a generation into prefill and decode without touching model.py. A pass starts in the first block
    and ends in the final norm, the two modules every pass runs (embedding and LM head are ~free here).
    """
    times = {"start": [], "end": []}
    pre = model.layers[0].register_forward_pre_hook(lambda *_: times["start"].append(clock()))
    post = model.norm.register_forward_hook(lambda *_: times["end"].append(clock()))
    try:
        yield times
    finally:
        pre.remove()
        post.remove()


def timed_generation(clara: Clara, clock, generate_fn) -> tuple[list[str], dict]:
    """Run one generation call -> (answers, {"ttft", "prefill", "decode", "generate", "steps"} in seconds)."""
    with forward_times(clara.model, clock) as t:
        t0 = clock()
        answers = generate_fn()
        t1 = clock()
    # No forward call (a stubbed generation in tests): everything counts as time to first token.
    first_start, first_end = (t["start"][0], t["end"][0]) if t["end"] else (t0, t1)
    return answers, {"ttft": first_end - t0, "prefill": first_end - first_start, "decode": t1 - first_end,
                     "generate": t1 - t0, "steps": max(len(t["end"]) - 1, 0)}


def memory_prompt(clara: Clara, question: str, k: int) -> str:
    """The prompt of the compressed and retrieval modes: k memory slots <MEM0..M-1><SEP> and the question."""
    return build_prompt("answer", clara.mem_slots * k, question=question, fmt=clara.fmt)[0]


def closed_book_prompt(clara: Clara, question: str) -> str:
    return build_prompt("closed_book", "", question=question, fmt=clara.fmt)[0]


def run_batch(clara: Clara, mode: str, batch: list[dict], k: int, max_new_tokens: int,
              opts) -> tuple[list[dict], dict]:
    """Answer one batch of records in `mode` -> (per-item fields, the batch's timings in seconds).

    Every mode goes through Clara's public inference calls except retrieval, which runs the pieces of
    Clara.generate_from_questions one by one (compress, query reasoner, cosine, top-k, answer) so that
    each can be timed; tests/test_eval.py checks that it selects the same documents.
    """
    B, clock = len(batch), opts.clock
    questions = [r["question"] for r in batch]
    timing = {"compress": 0.0, "retrieve": 0.0}
    if mode in ("compressed", "text"):
        used = [list(range(k)) for _ in batch]  # both modes read the first k documents of each record
    if mode == "compressed":
        t0 = clock()
        mem = clara.compress_texts([d for r in batch for d in r["docs"][:k]], opts.doc_batch_size)  # (B*K, M, H)
        timing["compress"] = clock() - t0
        mem = mem.view(B, k, *mem.shape[1:])  # (B, K, M, H): row b holds its k documents in order
        call = partial(clara.generate_from_compressed_documents_and_questions, questions, mem, max_new_tokens)
    elif mode == "text":
        docs = [r["docs"][:k] for r in batch]
        call = partial(clara.generate_from_raw_text, questions, docs, max_new_tokens, adapter=opts.text_adapter)
    elif mode == "closed_book":
        used = [[] for _ in batch]
        prompts = [closed_book_prompt(clara, q) for q in questions]
        call = partial(clara.generate_closed_book, questions, max_new_tokens, adapter=opts.closed_book_adapter)
    elif mode == "retrieval":
        N = len(batch[0]["docs"])  # batches are cut where N changes (see `batches_of`)
        t0 = clock()
        mem = clara.compress_texts([d for r in batch for d in r["docs"]], opts.doc_batch_size)  # (B*N, M, H)
        timing["compress"] = clock() - t0
        t0 = clock()
        D = mem.view(B, N, -1).float()  # (B, N, M*H): the candidates of question b
        q_ids, q_mask, _ = clara.tokenize_for_encoder(questions)  # laid out like a document
        q, _ = clara.encode(q_ids, q_mask, adapter="query")  # (B, M, H)
        scores = F.cosine_similarity(q.reshape(B, 1, -1).float(), D, dim=-1)  # (B, N), fp32 as in training
        # Rank deeper than k when recall@5 needs it; the hard top-R is a stable sort, so its first k are
        # exactly the top-k that Clara.retrieve selects.
        R = min(N, max(k, *RECALL_KS))
        _, ranked = topk_select(scores, R, clara.cfg.tau, training=False)  # (B, R), best first
        timing["retrieve"] = clock() - t0
        selected = D[torch.arange(B, device=D.device)[:, None], ranked[:, :k]]  # (B, K, M*H): slot j = rank j
        selected = selected.view(B, k, clara.cfg.n_mem, -1)  # (B, K, M, H)
        call = partial(clara.generate_from_compressed_documents_and_questions, questions, selected, max_new_tokens)
        ranked = ranked.tolist()
        used = [row[:k] for row in ranked]
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    answers, gen = timed_generation(clara, clock, call)
    timing.update(gen)

    # Context sizes: what the decoder reads, and the same prompt with the raw text of the same documents.
    enc = clara.tok.encode_batch
    raw_prompts = [text_prompt(r["question"], [r["docs"][i] for i in u], clara.fmt) for r, u in zip(batch, used)]
    raw_tokens = [len(x) for x in enc(raw_prompts)] if mode != "closed_book" else [None] * B
    if mode in ("compressed", "retrieval"):
        context_tokens = [len(x) for x in enc([memory_prompt(clara, q, k) for q in questions])]
        # The compressor keeps doc_max_length tokens of "<ENC><s>doc</s>" (+3): the text baseline sees more.
        n_text = clara.cfg.doc_max_length + 3
        lengths = [len(x) for x in enc([clara.tok.document(r["docs"][i]) for r, u in zip(batch, used) for i in u])]
        truncated = [sum(n > n_text for n in lengths[b * k:(b + 1) * k]) for b in range(B)]
    elif mode == "text":
        context_tokens, truncated = raw_tokens, [None] * B
    else:
        context_tokens, truncated = [len(x) for x in enc(prompts)], [None] * B

    items = []
    for b, (r, pred) in enumerate(zip(batch, answers)):
        item = {"where": r["where"], "question": r["question"], "golds": r["golds"], "prediction": pred,
                "acc": cover_em(pred, r["golds"], opts.first_gold_only),
                "em": exact_match(pred, r["golds"], opts.first_gold_only),
                "f1": f1_score(pred, r["golds"], opts.first_gold_only),
                "doc_indices": used[b], "context_tokens": context_tokens[b], "raw_text_tokens": raw_tokens[b],
                "docs_truncated": truncated[b]}
        if mode == "retrieval":
            N, pos = len(r["docs"]), r["pos_index"]
            item.update(retrieved=ranked[b], pos_index=pos)
            for kk in sorted({*RECALL_KS, k}):
                if kk <= N and pos:  # no positive: recall is undefined, the question is left out of it
                    item[f"recall@{kk}"] = recall_at_k(ranked[b], pos, kk)
                    item[f"precision@{kk}"] = precision_at_k(ranked[b], pos, kk)
        items.append(item)
    return items, timing


def batches_of(records: list[dict], size: int, mode: str):
    """Consecutive batches of `size` records; in retrieval mode a batch also ends where N changes."""
    batch = []
    for r in records:
        if batch and (len(batch) == size or (mode == "retrieval" and len(r["docs"]) != len(batch[0]["docs"]))):
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


# ---- reports ------------------------------------------------------------------------------------------

def aggregate(items: list[dict]) -> dict:
    """Means over the scored questions, in percent: acc, em, f1, and recall@k / precision@k over the
    questions that have them (with their count, n_retrieval@k)."""
    out = {"n": len(items)}
    for m in ("acc", "em", "f1"):
        out[m] = 100 * sum(it[m] for it in items) / len(items)
    keys = sorted({k for it in items for k in it if k.startswith(("recall@", "precision@"))},
                  key=lambda s: (s.split("@")[0], int(s.split("@")[1])))
    for key in keys:
        vals = [it[key] for it in items if key in it]
        out[key] = 100 * sum(vals) / len(vals)
        if key.startswith("recall@"):
            out[f"n_retrieval@{key.split('@')[1]}"] = len(vals)
    return out


def cost_summary(timings: list[dict], items: list[dict]) -> dict:
    """Per-query milliseconds over all batches, and the mean context sizes."""
    n = len(items)
    per_query = lambda key: 1000 * sum(t[key] for t in timings) / n
    out = {f"{key}_ms": per_query(key) for key in ("compress", "retrieve", "prefill", "decode", "generate")}
    out["ttft_ms"] = 1000 * sum(t["ttft"] for t in timings) / len(timings)  # a latency: mean over batches
    out["total_ms"] = out["compress_ms"] + out["retrieve_ms"] + out["generate_ms"]
    out["decode_steps"] = sum(t["steps"] for t in timings) / len(timings)
    out["context_tokens"] = sum(it["context_tokens"] for it in items) / n
    raw = [it["raw_text_tokens"] for it in items if it["raw_text_tokens"] is not None]
    out["raw_text_tokens"] = sum(raw) / len(raw) if raw else None
    out["queries"], out["batches"] = n, len(timings)
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def report_tables(summary: dict) -> str:
    """The paper's layout: one row per model/setting, one column per data set, then the average."""
    names, modes, res = summary["datasets"], summary["modes"], summary["results"]
    label = summary["settings"]
    header = ["model / setting", *names, "Average"]
    parts = []
    for metric, title in (("acc", "cover-EM (acc)"), ("em", "EM"), ("f1", "F1")):
        rows = []
        for mode in modes:
            vals = [res[d][mode][metric] for d in names]
            rows.append([label[mode], *vals, _mean(vals)])
        parts.append(f"{title}, %, {summary['scoring']}\n\n" + markdown_table(header, rows))
    if "retrieval" in modes:
        ks = sorted({int(key.split("@")[1]) for d in names for key in res[d]["retrieval"]
                     if key.startswith("recall@")})
        rows = [[f"{label['retrieval']}: {m}@{kk}", *(res[d]["retrieval"].get(f"{m}@{kk}") for d in names),
                 _mean([res[d]["retrieval"].get(f"{m}@{kk}") for d in names])]
                for m in ("recall", "precision") for kk in ks]
        parts.append("Retrieval among the candidates, %, questions with a positive document\n\n"
                     + markdown_table(header, rows))
    cost = summary["cost_overall"]
    rows = [[label[m], cost[m]["compress_ms"], cost[m]["retrieve_ms"], cost[m]["ttft_ms"], cost[m]["prefill_ms"],
             cost[m]["decode_ms"], cost[m]["generate_ms"], cost[m]["context_tokens"], cost[m]["raw_text_tokens"],
             None if cost[m]["raw_text_tokens"] is None else cost[m]["raw_text_tokens"] / cost[m]["context_tokens"]]
            for m in modes]
    parts.append(f"Cost per query (ms; batch size {summary['batch_size']}, {summary['device']}; ttft per batch); "
                 "decoder context in tokens\n\n" + markdown_table(
                     ["model / setting", "compress", "query + top-k", "ttft", "prefill", "decode", "generate",
                      "context tok", "raw-text tok", "raw / context"], rows))
    return "\n\n".join(parts) + "\n"


def setting_labels(clara: Clara, name: str, k: int, opts) -> dict:
    """Row names of the tables: which model reads what."""
    reader = lambda adapter: "base model" if adapter is None else f"{name} decoder"
    return {"compressed": f"{name}: compressed first {k} docs (rate {clara.cfg.compr_rate})",
            "retrieval": f"{name}: retrieval top-{k} (rate {clara.cfg.compr_rate})"
                         + (", untrained query reasoner" if getattr(opts, "query_from_encoder", False) else ""),
            "text": f"{reader(opts.text_adapter)}: raw text first {k} docs",
            "closed_book": f"{reader(opts.closed_book_adapter)}: closed book"}


# ---- command line -------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="CLaRa checkpoint directory: ours (train.py writes "
                   "OUT/checkpoint) or an official compression-XX folder")
    g.add_argument("--base-model", default=None, help="base decoder directory, overriding the one the checkpoint names")
    g.add_argument("--compr-rate", type=int, default=None, help="expected compression rate; an error if the "
                   "checkpoint's differs (never silently ignored)")
    g.add_argument("--model-name", default=None, help="row name in the tables (default: the checkpoint directory's "
                   "name, or its parent's when it is called 'checkpoint')")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, help="evaluation JSONL file(s) in the official format")
    g.add_argument("--names", nargs="+", default=None, help="data set names for the tables, one per --data file "
                   "(default: the file stems)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N records of each file")
    g.add_argument("--skip-malformed", action="store_true", help="skip and report malformed records instead of "
                   "stopping at the first one")
    g = p.add_argument_group("what to run")
    g.add_argument("--mode", nargs="+", choices=MODES, default=None, help="one or more modes (default: retrieval "
                   "for a stage-3 checkpoint, compressed otherwise)")
    g.add_argument("--top-k", type=int, default=None, help="documents read per question: the first k "
                   "(compressed, text) or the top k of the candidates (retrieval); default: the checkpoint's "
                   "generation_top_k")
    g.add_argument("--text-adapter", choices=("none", "decoder"), default="none", help="who reads the raw text in "
                   "text mode: the bare base model (none, the paper's baseline) or the decoder adapter")
    g.add_argument("--closed-book-adapter", choices=("none", "decoder"), default="none",
                   help="who answers in closed_book mode: the bare base model or the decoder adapter")
    g.add_argument("--query-from-encoder", action="store_true", help="retrieval with a stage-1/2 checkpoint: the "
                   "query reasoner is a copy of the encoder adapter, i.e. the UNTRAINED query reasoner stage 3 "
                   "starts from (the baseline stage 3 must beat)")
    g.add_argument("--first-gold-only", action="store_true", help="score against the first gold answer only, as "
                   "the official code does (default: the best over all gold aliases)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="generated tokens per answer (default: 64 in "
                   "retrieval mode, 128 in the others, docs/method.md#evaluation)")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=8, help="questions per generation batch")
    g.add_argument("--doc-batch-size", type=int, default=64, help="documents per compression forward pass")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="weights/compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--warmup", type=int, default=1, help="untimed passes (2 new tokens) over the first batch of "
                   "each data set and mode before timing (GPU start-up costs)")
    g.add_argument("--out", default="out/eval", help="output directory: per-item JSONL, summary.json, results.md")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    for flag in ("limit", "top_k", "max_new_tokens", "batch_size", "doc_batch_size"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if a.names is not None and len(a.names) != len(a.data):
        p.error(f"--names gives {len(a.names)} names for {len(a.data)} --data files")
    a.text_adapter = None if a.text_adapter == "none" else a.text_adapter
    a.closed_book_adapter = None if a.closed_book_adapter == "none" else a.closed_book_adapter
    return a


def read_data(a, names: list[str]) -> dict:
    """Every --data file read and checked: {name: (records, malformed)}; a bad file or record is one line."""
    data = {}
    for name, path in zip(names, a.data):
        try:
            records, malformed = read_eval_file(path, a.limit)
        except OSError as e:  # not found, a directory, unreadable
            raise SystemExit(str(e) if isinstance(e, FileNotFoundError) else f"{path}: cannot be read ({e})") from None
        if not records and not malformed:
            raise SystemExit(f"{path}: no record to evaluate: the file is empty or holds only blank lines "
                             "(one JSON object per line expected)")
        if malformed and not a.skip_malformed:
            more = f" (and {len(malformed) - 1} more malformed records)" if len(malformed) > 1 else ""
            raise SystemExit(f"bad evaluation data: {malformed[0]}{more}; fix the file, or pass --skip-malformed "
                             "to skip and report such records")
        data[name] = (records, malformed)
    return data


def run_mode(clara, dname: str, mode: str, records: list, malformed: list, k: int, a, out: Path):
    """One data set in one mode: the records it can score, in batches, each item written to
    OUT/{dname}.{mode}.jsonl as it is answered. Returns (skip report, items, per-batch timings)."""
    from tqdm import tqdm
    problems = [unscorable(r, mode, k) for r in records]
    usable = [r for r, e in zip(records, problems) if e is None]
    report = skip_report(malformed + [e for e in problems if e is not None])
    if not usable:
        raise SystemExit(f"{dname}, mode {mode}: no record can be scored; "
                         + "; ".join(f"{r}: {v['count']} (first: {v['examples'][0]})" for r, v in report.items()))
    if report:
        print(f"{dname} {mode}: skipped " + "; ".join(f"{r}: {v['count']} ({v['examples'][0]})"
                                                     for r, v in report.items()), flush=True)
    max_new = a.max_new_tokens or MAX_NEW_TOKENS[mode]
    first = next(batches_of(usable, a.batch_size, mode))
    for _ in range(a.warmup):  # untimed batches first: allocator, kernels and caches warm
        run_batch(clara, mode, first, k, 2, a)
    items, timings = [], []
    bar = tqdm(total=len(usable), desc=f"{dname} {mode}", unit="q", dynamic_ncols=True, disable=a.no_progress)
    with open(out / f"{dname}.{mode}.jsonl", "w", encoding="utf-8") as f:
        for batch in batches_of(usable, a.batch_size, mode):
            batch_items, timing = run_batch(clara, mode, batch, k, max_new, a)
            f.writelines(json.dumps(it, ensure_ascii=False) + "\n" for it in batch_items)
            items += batch_items
            timings.append(timing)
            bar.update(len(batch))
    bar.close()
    return report, items, timings


def main(argv=None) -> dict:
    a = parse_args(argv)
    names = a.names or [Path(f).stem for f in a.data]
    if len(set(names)) != len(names):
        raise SystemExit(f"data set names must differ, got {names}; pass --names")

    data = read_data(a, names)  # 1. every file read and checked before the model loads: fails in seconds

    # 2. The model, and what it can do.
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        a.checkpoint = str(checkpoint_dir(a.checkpoint))  # a train.py run folder means its checkpoint/
        clara = Clara.from_pretrained(a.checkpoint, base_model=a.base_model, dtype=dtype, device=device,
                                      compr_rate=a.compr_rate)
    except LOAD_ERRORS as e:  # a bad folder, a corrupted or foreign file: one line naming it, no traceback
        raise SystemExit(f"cannot load the checkpoint: {error_line(e)}") from None
    clara.eval()
    stage = clara.cfg.training_stage
    modes = list(dict.fromkeys(a.mode or (["retrieval"] if stage == 3 else ["compressed"])))
    if a.query_from_encoder:
        if "query" in clara.model.adapters:
            raise SystemExit(f"--query-from-encoder: {a.checkpoint} already has a trained query reasoner (stage "
                             f"{stage}); drop the flag to evaluate it")
        clara.model.copy_adapter("encoder", "query")  # what train.py --stage 3 starts from
    if "retrieval" in modes and "query" not in clara.model.adapters:
        raise SystemExit(f"--mode retrieval needs an end-to-end (stage-3) checkpoint with a query-reasoner adapter; "
                         f"{a.checkpoint} is a stage-{stage} checkpoint with adapters {sorted(clara.model.adapters)}. "
                         "Use --mode compressed (the first k documents), or --query-from-encoder for the "
                         "untrained query reasoner stage 3 starts from.")
    k = a.top_k or clara.cfg.generation_top_k
    checkpoint = Path(a.checkpoint).resolve()
    name = a.model_name or (checkpoint.parent.name if checkpoint.name == "checkpoint" else checkpoint.name)
    labels = setting_labels(clara, name, k, a)
    a.clock = make_clock(device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scoring = "first gold answer only (official)" if a.first_gold_only else "best over gold aliases"
    print(f"{checkpoint}: stage {stage}, compression rate {clara.cfg.compr_rate} ({clara.cfg.n_mem} memory tokens "
          f"per document), top-k {k}, {device} {dtype}; scoring: {scoring}", flush=True)

    # 3. Every data set in every mode.
    results, cost, skipped, per_mode_items, per_mode_timings = {}, {}, {}, {}, {}
    with torch.no_grad():
        for dname, (records, malformed) in data.items():
            results[dname], cost[dname], skipped[dname] = {}, {}, {}
            for mode in modes:
                report, items, timings = run_mode(clara, dname, mode, records, malformed, k, a, out)
                skipped[dname][mode] = report
                results[dname][mode] = aggregate(items)
                cost[dname][mode] = cost_summary(timings, items)
                per_mode_items.setdefault(mode, []).extend(items)
                per_mode_timings.setdefault(mode, []).extend(timings)

    # 4. Summary and tables.
    summary = {"checkpoint": str(checkpoint), "model_name": name, "training_stage": stage,
               "compr_rate": clara.cfg.compr_rate, "n_mem": clara.cfg.n_mem, "top_k": k,
               "scoring": scoring, "units": "percent (metrics), milliseconds (cost)",
               "datasets": names, "files": dict(zip(names, a.data)), "modes": modes, "settings": labels,
               "max_new_tokens": {m: a.max_new_tokens or MAX_NEW_TOKENS[m] for m in modes},
               "text_adapter": a.text_adapter, "closed_book_adapter": a.closed_book_adapter,
               "batch_size": a.batch_size, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "results": results, "cost": cost,
               "cost_overall": {m: cost_summary(per_mode_timings[m], per_mode_items[m]) for m in modes},
               "skipped": skipped}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    tables = report_tables(summary)
    (out / "results.md").write_text(tables)
    print("\n" + tables, flush=True)
    return summary


if __name__ == "__main__":
    main()

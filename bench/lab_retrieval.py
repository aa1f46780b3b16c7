"""The CPU lab's stage-3 diagnosis: can ANY query reasoner pick the right document from the memories?

Stage 3 (clara.py `Clara.retrieve`) learns retrieval only from the answer loss, through the straight-through
top-k. When it does not learn, this probe asks narrower questions of a stage-2 checkpoint on the lab's
stage-3 files (question, N candidates, pos_index). It is how sessions 4-6 found that the lab's memories keep
the facts their training questions ask about and never the person's name (BENCHMARKS.md), which is why the
lab's stage-3 questions now describe the person's job (data.py --describe):

  0. lexical   is the answer in the text? Word overlap (bag of token ids) between question and candidates.
  1. oracle    is the signal there? The decoder's answer loss with each candidate alone in the memory slot:
               how often a positive gives the lowest loss (chance: about 1/N).
  2. gradient  does the end-to-end gradient point at it? How often dL/ds (s: the cosine scores, through the
               top-k of the current choice, exactly as in training) is most negative at a positive.
  3. contrast  can the memories be told apart at all? The query reasoner (a copy of the encoder, as stage 3
               starts) trained for --steps with SUPERVISED multi-positive InfoNCE on pos_index
               (clara.retrieval_infonce, the official optional warm-up): an upper bound on what the answer loss
               could teach it. --train-encoder also trains the document encoder (not the method: its encoder is
               frozen in stage 3); --docs name keeps only each document's person name, which isolates name
               matching from reading the name out of a whole biography; --query-init fresh starts the query
               reasoner as a fresh adapter instead of the encoder's copy.
  4. memories  what the checkpoint's document memories hold: the mean cosine between two documents'
               memories (~1: collapsed, every document the same vector; the alignment loss does that to the
               lab's tiny encoder), and whether the person's first name and surname, job and home town can be
               read from them by a linear probe (trained on training documents, scored on held-out people's).
  5. names     (--supervise-names STEPS, instead of 0-4) can the encoder write the name into its memory when
               a linear head on the memory is trained to classify it? From the stage-2 encoder: no (chance);
               from a fresh encoder adapter on the same frozen base (--fresh-encoder): yes. Stages 1-2 train the
               encoder toward what the decoder reads, and the decoder never learned to read names.

    python bench/lab_retrieval.py --checkpoint out/lab/rate16/stage2/checkpoint --data out/lab/data
    python bench/lab_retrieval.py ... --train-encoder --docs name          # names alone: learnable
    python bench/lab_retrieval.py ... --supervise-names 200 [--fresh-encoder]

It prints held-out and training hit@1 (the top-scored candidate is a positive) before and after, and writes
nothing. Measured figures and their commands: BENCHMARKS.md, the stage-3 sections of sessions 4-6.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clara import Clara, retrieval_infonce  # noqa: E402
from data import _COMPANY, _JOBS, validate_record  # noqa: E402

NAME = re.compile(r"[A-Z][a-z]+ [A-Z][a-z]+")  # a synthetic person's "First Surname" (or a company's start)
JOB = re.compile(rf"\b({'|'.join(_JOBS)})\b")  # a document's job word
HOME = re.compile(r"(?:lives in|makes a home in) (\w+)")  # its home town (data._SENTENCES["home"])


def person(doc: str) -> str:
    """The document's person: its first "First Surname" that does not start a company name (mentors come
    after the person in every template)."""
    return next(m.group(0) for m in NAME.finditer(doc) if m.group(0).split()[0] not in _COMPANY[0])


def load(path: Path, docs: str, limit: int | None) -> list[dict]:
    rows = []
    for i, line in enumerate(open(path, encoding="utf-8"), 1):
        r = validate_record(json.loads(line), 3, f"{path}:{i}")
        if docs == "name":
            r["docs"] = [person(d) for d in r["docs"]]
        rows.append(r)
        if limit and len(rows) == limit:
            break
    return rows


def lexical(clara: Clara, recs: list[dict]) -> float:
    """hit@1 of plain word overlap: cosine between the question's and each candidate's bag of token ids.
    Shows the text itself tells the candidates apart (the shared name tokens)."""
    V = clara.tok.vocab_size

    def bag(text: str) -> torch.Tensor:
        v = torch.zeros(V)
        v[clara.tok.encode(text)] = 1.0
        return v
    h = 0
    for r in recs:
        s = F.cosine_similarity(bag(r["question"])[None], torch.stack([bag(d) for d in r["docs"]]), dim=-1)  # (N,)
        h += int(s.argmax()) in r["pos_index"]
    return h / len(recs)


def hits(scores: torch.Tensor, recs: list[dict]) -> int:
    """How many rows have a positive as their top-scored candidate."""
    return sum(int(t) in r["pos_index"] for t, r in zip(scores.argmax(1).tolist(), recs))


@torch.no_grad()
def hit_rate(clara: Clara, recs: list[dict], n: int, bs: int = 32) -> float:
    was = clara.training
    clara.eval()
    h = sum(hits(clara.score_candidates(clara.collate(recs[i:i + bs], 3), n)[0], recs[i:i + bs])
            for i in range(0, len(recs), bs))
    clara.train(was)
    return h / len(recs)


def signal(clara: Clara, recs: list[dict], n: int) -> dict:
    """1. oracle and 2. gradient, on one batch of training records (the top-1 slot of stage 3)."""
    clara.eval()
    batch = clara.collate(recs, 3)
    B = len(recs)
    with torch.no_grad():
        _, D = clara.score_candidates(batch, n)  # (B, N, M*H)
        ce = torch.stack([per_row_ce(clara, batch["dec"], D[:, j].view(B, 1, clara.cfg.n_mem, -1))
                          for j in range(n)], 1)  # (B, N): the answer loss with candidate j alone
    oracle = sum(int(j) in r["pos_index"] for j, r in zip(ce.argmin(1).tolist(), recs)) / B
    # the end-to-end gradient: the stage-3 loss of the current (hard) choice, back to the scores
    clara.requires_grad_(False)
    for p in clara.model.adapter_parameters("query").values():
        p.requires_grad_(True)
    clara.train()  # the training path of the top-k (dropout is 0 in the lab)
    selected, _, scores = clara.retrieve(batch, n, top_k=1)  # (B, 1, M, H), _, (B, N)
    scores.retain_grad()
    ce, n_tok = clara.decoder_loss(batch["dec"], selected)
    (ce / n_tok).backward()
    grad = scores.grad  # (B, N): dL/ds; most negative = raising that score lowers the loss most
    toward = sum(int(j) in r["pos_index"] for j, r in zip((-grad).argmax(1).tolist(), recs)) / B
    return {"oracle": oracle, "gradient": toward, "chance": sum(len(r["pos_index"]) for r in recs) / (B * n)}


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 steps: int = 400) -> tuple[float, float]:
    """(train, held-out) accuracy of a softmax regression from features (n, F) to class ids (n,): can the
    class be read LINEARLY from the features? Features are standardised with the training statistics."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd  # (n, F)
    n_cls = int(max(y_train.max(), y_test.max())) + 1
    W = torch.zeros(xtr.shape[1], n_cls, requires_grad=True)
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(xtr @ W + b, y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = lambda x, y: ((x @ W + b).argmax(1) == y).float().mean().item()
        return acc(xtr, y_train), acc(xte, y_test)


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over the pairs of different rows of x (n, F), n >= 2."""
    n = len(x)
    if n < 2:
        raise ValueError(f"mean_pairwise_cosine: need at least 2 rows, got {n}")
    unit = F.normalize(x.float(), dim=-1)  # (n, F)
    return ((unit @ unit.T).sum() - unit.pow(2).sum()).div(n * (n - 1)).item()  # drop the n self-pairs


def positives(recs: list[dict], n: int) -> list[tuple[str, list[str]]]:
    """The first n distinct positive documents of the records, each with its person's [first, surname]."""
    out = {}
    for r in recs:
        for j in r["pos_index"]:
            out.setdefault(r["docs"][j], person(r["docs"][j]).split())
    return list(out.items())[:n]


@torch.no_grad()
def memory_report(clara: Clara, train: list[dict], test: list[dict], n_docs: int = 1000) -> dict:
    """4. What do the documents' memories hold? On the positives' distinct documents:
    - "cosine": mean cosine between two documents' memories (flattened, M*H). Near 1 means collapse: every
      document has (almost) the same memory, which is what the alignment loss does to a tiny encoder;
    - linear probes for the person's first name and surname (classes seen in training; held-out documents
      of new people): the name must be in the memory for a query to find the person's document; and for
      two facts, the job and the home town, on the documents that have them.
    """
    tr, te = positives(train, n_docs), positives(test, n_docs // 4)
    was = clara.training
    clara.eval()
    m_tr = clara.compress_texts([d for d, _ in tr]).flatten(1).float()  # (n, M*H)
    m_te = clara.compress_texts([d for d, _ in te]).flatten(1).float()
    clara.train(was)
    res = {"cosine": mean_pairwise_cosine(m_tr[:200])}
    found = lambda rx, doc: (m := rx.search(doc)) and m.group(1)  # noqa: E731  (None when absent)
    labels = {"first": lambda d, p: p[0], "surname": lambda d, p: p[1],
              "job": lambda d, p: found(JOB, d), "home": lambda d, p: found(HOME, d)}
    for name, label in labels.items():
        y_tr, y_te = [label(d, p) for d, p in tr], [label(d, p) for d, p in te]
        classes = sorted({y for y in y_tr if y is not None})
        a = [i for i, y in enumerate(y_tr) if y is not None]
        b = [i for i, y in enumerate(y_te) if y in classes]  # held-out values seen in training (names: known words)
        if not a or not b:
            res[name] = None  # e.g. syllable surnames: a held-out family's name never occurs in training
            continue
        ids = {c: i for i, c in enumerate(classes)}
        t_tr = torch.tensor([ids[y_tr[i]] for i in a])
        acc_tr, acc_te = linear_probe(m_tr[a], t_tr, m_te[b], torch.tensor([ids[y_te[i]] for i in b]))
        res[name] = {"train": acc_tr, "heldout": acc_te, "chance": max(t_tr.bincount().tolist()) / len(t_tr)}
    return res


def supervise_names(clara: Clara, train: list[dict], test: list[dict], steps: int, lr: float = 3e-3,
                    batch: int = 32, seed: int = 0) -> list[dict]:
    """5. Can the encoder write the name into its memory when told to directly? Trains the encoder adapter and
    a linear head on its (layer-normed, flattened) memory to classify the person's first name and surname
    (cross-entropy on both; training documents), and scores held-out people's documents (new pairs of known
    words). Not the method: the question is whether the encoder CAN keep names, given a direct signal, or
    whether something (the frozen base, what stages 1-2 trained the encoder toward) prevents it.

    Returns the curve [{"step", "first", "surname", "loss"}]: held-out accuracies every 50 steps and at the
    last, with the mean training loss since the previous point (None at step 0).
    """
    tr, te = positives(train, 4000), positives(test, 400)
    classes = [sorted({p[part] for _, p in tr}) for part in (0, 1)]
    te = [(d, p) for d, p in te if p[0] in classes[0] and p[1] in classes[1]]
    ids = [{c: i for i, c in enumerate(cs)} for cs in classes]
    label = lambda rows: [torch.tensor([ids[part][p[part]] for _, p in rows]) for part in (0, 1)]  # noqa: E731
    M, H = clara.cfg.n_mem, clara.model.cfg.dim
    head = torch.nn.Linear(M * H, len(classes[0]) + len(classes[1]))
    clara.requires_grad_(False)
    params = list(clara.model.adapter_parameters("encoder").values()) + list(head.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)

    def logits(docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc_ids, enc_mask, _ = clara.tokenize_documents(docs)
        mem = clara.compress(enc_ids, enc_mask)[0].flatten(1).float()  # (B, M*H)
        out = head(F.layer_norm(mem, mem.shape[1:]))  # (B, n_first + n_surname)
        return out[:, :len(classes[0])], out[:, len(classes[0]):]

    def held_out(step: int, loss: float | None = None) -> dict:
        clara.eval()
        with torch.no_grad():
            outs = [logits([d for d, _ in te[i:i + 100]]) for i in range(0, len(te), 100)]
        clara.train()
        acc = [(torch.cat([o[part] for o in outs]).argmax(1) == y).float().mean().item()
               for part, y in enumerate(label(te))]
        print(f"5. names, supervised: step {step} held-out first name {acc[0]:.2f}, surname {acc[1]:.2f} "
              f"(chance {1 / len(classes[0]):.2f}, {1 / len(classes[1]):.2f}; {len(te)} documents)", flush=True)
        return {"step": step, "first": acc[0], "surname": acc[1], "loss": loss}

    rng, curve, losses = random.Random(seed), [held_out(0)], []
    clara.train()
    for step in range(1, steps + 1):
        rows = rng.sample(tr, batch)
        y_first, y_surname = label(rows)
        lf, ls = logits([d for d, _ in rows])
        loss = F.cross_entropy(lf, y_first) + F.cross_entropy(ls, y_surname)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps:
            curve.append(held_out(step, sum(losses) / len(losses)))
            losses = []
    return curve


def per_row_ce(clara: Clara, dec: dict, memory: torch.Tensor) -> torch.Tensor:
    """Mean answer-token cross-entropy per row (B,), memory (B, 1, M, H) in the one slot."""
    emb = clara.splice(dec["ids"], memory)  # (B, T, H)
    h = clara.model(inputs_embeds=emb, attention_mask=dec["mask"], adapter="decoder", output="hidden")
    labels = dec["labels"][:, 1:]  # (B, T-1)
    logits = clara.model.output(h[:, :-1]).float()  # (B, T-1, V)
    ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * (labels != -100)
    return ce.sum(1) / (labels != -100).sum(1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a stage-2 CLaRa checkpoint (its encoder becomes the query)")
    p.add_argument("--data", required=True, help="folder with stage3.jsonl and test_stage3.jsonl (data.py synth)")
    p.add_argument("--docs", choices=["full", "name"], default="full", help="name: each document's person name only")
    p.add_argument("--train-encoder", action="store_true", help="train the document encoder too (not the method)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tau", type=float, default=0.05, help="InfoNCE temperature")
    p.add_argument("--heldout", type=int, default=160, help="held-out questions to score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-init", choices=["encoder", "fresh"], default="encoder", help="the query reasoner "
                   "starts as a copy of the encoder (the method) or as a fresh adapter on the frozen base")
    p.add_argument("--supervise-names", type=int, default=0, metavar="STEPS", help="instead of 0-4: train the "
                   "encoder for STEPS steps to put the person's name in its memory, with a linear head (5.)")
    p.add_argument("--fresh-encoder", action="store_true", help="with --supervise-names: reset the encoder adapter "
                   "first (the frozen base as stage 1 starts; the <MEMi> rows stay the checkpoint's)")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    data = Path(a.data)
    train = load(data / "stage3.jsonl", a.docs, None)
    test = load(data / "test_stage3.jsonl", a.docs, a.heldout)
    n = len(train[0]["docs"])
    clara = Clara.from_pretrained(a.checkpoint, training_stage=3)
    clara.cfg.generation_top_k = 1
    if a.supervise_names:
        if a.fresh_encoder:
            clara.model.reset_adapter("encoder")
        return {"settings": vars(a), "names": supervise_names(clara, train, test, a.supervise_names, a.lr,
                                                              a.batch, a.seed)}
    clara.model.copy_adapter("encoder", "query")  # what train.py --stage 3 starts from
    if a.query_init == "fresh":
        clara.model.reset_adapter("query")
    res = {"settings": vars(a), "chance": sum(len(r["pos_index"]) for r in test) / (len(test) * n),
           "lexical": lexical(clara, test)}
    print(f"0. word overlap (bag of token ids) picks a positive for {res['lexical']:.3f} of held-out questions "
          f"(chance {res['chance']:.3f})", flush=True)
    if a.docs == "full":  # the decoder cannot answer from a name alone: 1. and 2. only on real documents
        res["signal"] = signal(clara, train[:64], n)
        print(f"1. oracle: a positive gives the lowest answer loss in {res['signal']['oracle']:.2f} of 64 training "
              f"rows; 2. gradient: dL/ds points at a positive in {res['signal']['gradient']:.2f} "
              f"(chance {res['signal']['chance']:.2f})", flush=True)
    if a.docs == "full":  # of the checkpoint as loaded (3. may train the encoder), printed last
        res["memory"] = memory_report(clara, train, test)
    adapters = ["query"] + (["encoder"] if a.train_encoder else [])
    clara.requires_grad_(False)
    params = [p for ad in adapters for p in clara.model.adapter_parameters(ad).values()]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    res["before"] = {"heldout": hit_rate(clara, test, n), "train": hit_rate(clara, train[:a.heldout], n)}
    print(f"3. contrast ({', '.join(adapters)} trained, docs {a.docs}): hit@1 before: held-out "
          f"{res['before']['heldout']:.3f}, train {res['before']['train']:.3f} (chance {res['chance']:.3f})", flush=True)
    rng, t0, curve = random.Random(a.seed), time.perf_counter(), []
    clara.train()
    for step in range(1, a.steps + 1):
        recs = rng.sample(train, a.batch)
        scores, _ = clara.score_candidates(clara.collate(recs, 3), n, train_encoder=a.train_encoder)
        loss = retrieval_infonce(scores, [r["pos_index"] for r in recs], a.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if step % 50 == 0 or step == a.steps:
            print(f"  step {step} InfoNCE {sum(curve[-50:]) / len(curve[-50:]):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    res["after"] = {"heldout": hit_rate(clara, test, n), "train": hit_rate(clara, train[:a.heldout], n)}
    res["loss"] = curve
    print(f"   after {a.steps} steps: held-out {res['after']['heldout']:.3f}, train {res['after']['train']:.3f}")
    if "memory" in res:
        m = res["memory"]
        probes = "; ".join(f"{k} {m[k]['train']:.2f} train / {m[k]['heldout']:.2f} held-out (majority class "
                           f"{m[k]['chance']:.2f})" for k in ("first", "surname", "job", "home") if m[k])
        print(f"4. memories: mean cosine between two documents' {m['cosine']:.4f} (near 1 = collapsed); read "
              f"linearly from them: {probes or 'nothing with held-out values seen in training'}", flush=True)
    return res


if __name__ == "__main__":
    main()

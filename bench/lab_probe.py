"""The smallest CLaRa learning experiment: can a tiny model answer ONE kind of question from ONE document?

This is the probe behind the CPU lab (bench/lab.py) of issue 7. Each held-out question ("What does <person> work
as?") comes with exactly the document that answers it, so the answer is one word to find in one document;
the question's person never appears in training, so memorising people does not help. Three ways to read the
document, all trained with the same decoder, prompt, loss and optimizer, from random weights or, with --base, on
a pretrained base (train.py --stage 0; with --train-base 0 it stays frozen, as in the method):

  text         the document's text in the prompt (eval.py's raw-text baseline)
  compressed   the method: the encoder turns the document into doc_len / rate memory vectors (clara.py)
  embeddings   a control: the "memory" is the document's own last M token embeddings, rescaled to unit RMS,
               bypassing the encoder (with --answer-only-docs the document is just the answer word, so the
               answer is among them). It shows the decoder side can read memory slots.

    python bench/lab_probe.py --mode text --tie 1                        # learns: ~75% held-out at 300 steps
    python bench/lab_probe.py --mode compressed --tie 1                  # shared trained base: stays at chance
    python bench/lab_probe.py --mode embeddings --tie 1 --answer-only-docs   # 100% by step 150
    python bench/lab_probe.py --base out/lab/stage0/base --train-base 0 --lora-r 32 --rate 4   # the method on a
                                                         # frozen stage-0 base: 100% by step 100 (test_lab.py)

Every --eval-every steps it prints, on held-out and on training questions: mean cross-entropy of the answer
tokens (answer + </s>) and teacher-forced exact match (every answer token is the argmax). Numbers are from
one process with one CPU thread; see BENCHMARKS.md for measured runs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clara import Clara, ClaraConfig, build_prompt  # noqa: E402
from data import _QUESTIONS, Tokenizer, make_synthetic, question_fact  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from train import preset_tokenizer  # noqa: E402

FACTS = {**{f: {f} for f in _QUESTIONS}, "one-word": {"job", "home", "place"}, "all": set(_QUESTIONS)}


def load(data: Path, fact: str, answer_only: bool):
    """k=1 records (question, [its document], answer) of one fact type, train and held-out."""
    def rows(name):
        out = []
        for line in open(data / name, encoding="utf-8"):
            r = json.loads(line)
            if question_fact(r["question"]) in FACTS[fact]:
                doc = r["answer"] if answer_only else r["docs"][r["pos_index"][0]]
                out.append({"question": r["question"], "docs": [doc], "answer": r["answer"]})
        return out
    return rows("stage3.jsonl"), rows("test_stage3.jsonl")


class Probe:
    def __init__(self, clara: Clara, mode: str):
        self.c, self.mode = clara, mode

    def batch(self, recs: list[dict]):
        """-> (decoder input embeddings (B, T, H), attention mask (B, T), labels (B, T)), same for all modes."""
        c, B = self.c, len(recs)
        if self.mode == "text":
            d = c.tokenize_prompts([build_prompt("answer", r["docs"][0], question=r["question"])[0] for r in recs],
                                   [r["answer"] for r in recs])
            return c.embed(d["ids"]), d["mask"], d["labels"]
        b = c.collate(recs, stage=2)
        d = b["dec"]
        if self.mode == "compressed":
            mem, _ = c.compress(b["enc_ids"], b["enc_mask"])  # (B, M, H)
        else:  # embeddings: the M tokens just before the memory tokens (the end of "<ENC><s>doc</s>")
            M = c.cfg.n_mem
            e = c.embed(b["enc_ids"])[:, -2 * M:-M]  # (B, M, H)
            mem = e / e.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # unit RMS, like the encoder's output
        return c.splice(d["ids"], mem.view(B, 1, *mem.shape[1:])), d["mask"], d["labels"]

    def logits(self, recs):
        emb, mask, labels = self.batch(recs)
        h = self.c.model(inputs_embeds=emb, attention_mask=mask, adapter="decoder", output="hidden")  # (B, T, H)
        return self.c.model.output(h[:, :-1]).float(), labels[:, 1:]  # (B, T-1, V): position t predicts t+1

    def loss(self, recs):
        logits, labels = self.logits(recs)
        keep = labels != -100
        return F.cross_entropy(logits[keep], labels[keep])

    @torch.no_grad()
    def evaluate(self, recs, bs: int = 50) -> tuple[float, float]:
        """(mean answer-token cross-entropy, teacher-forced exact match)."""
        self.c.eval()
        ce, n, exact = 0.0, 0, 0
        for i in range(0, len(recs), bs):
            logits, labels = self.logits(recs[i:i + bs])
            keep = labels != -100
            ce += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            n += int(keep.sum())
            exact += int(((logits.argmax(-1) == labels) | ~keep).all(1).sum())
        self.c.train()
        return ce / n, exact / len(recs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("text", "compressed", "embeddings"), default="compressed")
    p.add_argument("--fact", choices=sorted(FACTS), default="job")
    p.add_argument("--answer-only-docs", action="store_true", help="each document is just the answer word")
    p.add_argument("--people", type=int, default=2000, help="training people (make_synthetic)")
    p.add_argument("--base", default=None, help="a base model directory (e.g. OUT/base of train.py --stage 0) "
                   "instead of a random preset; its tokenizer too")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tie", type=int, choices=(0, 1), default=1, help="tie the output layer to the embedding")
    p.add_argument("--rate", type=int, default=8, help="compression rate (64 document tokens / rate memory vectors)")
    p.add_argument("--train-base", type=int, choices=(0, 1), default=1, help="1: every weight trains, the encoder "
                   "and decoder sharing the base; 0: the method (frozen base, LoRA adapters + <MEMi> rows train)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order-seed", type=int, default=None, help="seed of the training batches' order alone "
                   "(default: --seed); with everything else fixed it decides whether reading breaks through")
    p.add_argument("--out", default="out/lab_probe", help="data and the curve (curve.json)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    data = out / f"data_{a.people}"
    if not (data / "test_stage3.jsonl").exists():
        make_synthetic(data, seed=a.seed, n_train_entities=a.people, n_test_entities=200, k=3, n_candidates=8,
                       questions_per_entity=4)
    train, test = load(data, a.fact, a.answer_only_docs)
    test = test[:200]
    if a.base:
        tok, base = Tokenizer.from_pretrained(a.base), Transformer.from_pretrained(a.base)
    else:
        texts = (data / "corpus.txt").read_text(encoding="utf-8").splitlines()
        texts += [r["question"] for r in train] + [r["answer"] for r in train]
        tok = preset_tokenizer(texts, 1000, split_punctuation=True)
        heads = max(1, a.dim // 32)
        cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, dim=a.dim, n_layers=a.layers,
                                      n_heads=heads, n_kv_heads=heads, head_dim=a.dim // heads,
                                      intermediate_size=3 * a.dim, tie_embeddings=bool(a.tie))
        base = Transformer(cfg).init_weights(seed=a.seed)
    torch.manual_seed(a.seed)
    clara = Clara(base, tok,
                  ClaraConfig(doc_max_length=64, compr_rate=a.rate, lora_dropout=0.0, training_stage=2,
                              lora_r=a.lora_r, lora_alpha=2.0 * a.lora_r))
    # adapters + <MEMi> rows (the stage-1 set), and with --train-base 1 every base weight too
    params = list(clara.trainable_parameters(1, train_base=bool(a.train_base)).values())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    probe, rng = Probe(clara, a.mode), random.Random(a.seed if a.order_seed is None else a.order_seed)
    print(f"{a.mode}: {len(train)} training / {len(test)} held-out '{a.fact}' questions, "
          f"{sum(q.numel() for q in params):,} parameters", flush=True)
    curve, t0 = [], time.perf_counter()
    for step in range(a.steps + 1):
        if step % a.eval_every == 0 or step == a.steps:
            (hce, hacc), (tce, tacc) = probe.evaluate(test), probe.evaluate(train[:200])
            curve.append({"step": step, "heldout_ce": hce, "heldout_exact": hacc, "train_ce": tce, "train_exact": tacc,
                          "seconds": time.perf_counter() - t0})
            print(f"step {step:5d}  held-out ce {hce:.3f} exact {hacc:.2f}  train ce {tce:.3f} exact {tacc:.2f}  "
                  f"{curve[-1]['seconds']:.0f}s", flush=True)
        if step == a.steps:
            break
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 20)  # 20 warmup steps, then constant
        loss = probe.loss(rng.sample(train, a.batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    (out / f"curve_{a.mode}.json").write_text(json.dumps({"args": vars(a), "curve": curve}, indent=1))
    return curve


if __name__ == "__main__":
    main()

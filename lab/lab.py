"""The CPU lab: CLaRa's three stages on a synthetic corpus with a tiny model, start to finish in minutes.

    python lab/lab.py                  # the full lab (14 minutes on 2 CPU cores), writes out/lab/
    python lab/lab.py --fast           # the small version the test suite runs (tests/test_lab.py), 8-9 min

It runs the same commands a reader would type (each is printed before it runs) and gathers their results:

  1. data     python lab/synth.py: 2,000 made-up people with a short biography each (a first name and a
              surname from two word lists, one token each); questions about three one-word facts (job, home
              town, birthplace) of held-out people who never appear in training (unseen name pairs). Every
              person has a job; a question about a town also describes that job in other words, "Where does
              Edda Dunn (who makes bread) live?", and none of the 7 distractors (people with a similar name)
              has that job (--describe, below). Job questions are plain and stage-2 only
  2. stage 0  NOT CLaRa: the paper starts from Mistral-7B-Instruct, we start from random weights, so a tiny
              tied-embedding decoder first learns the corpus and raw-text QA as a plain language model
              (python lab/pretrain.py). This base is the raw-text and closed-book baseline, and stays FROZEN
              from here on.
  3. stages 1 and 2 at each compression rate: LoRA adapters (encoder, decoder) and the <MEMi> rows on the
              frozen base, WITHOUT the alignment loss (--mse-weight 0, below), then eval.py compressed / text
              / closed_book on the held-out questions
  4. stage 3  from the best stage-2 reader of the run (or --stage3-rate): retrieval among N=8 candidates (the
              person's document and 7 similar people's), with the answer accuracy, measured three times: untrained
              (the query reasoner = a copy of the encoder), after the retrieval warm-up (--retrieval-warmup:
              the query reasoner alone, InfoNCE on pos_index, the official optional step,
              docs/method.md#losses) and after the end-to-end stage 3 (answer loss through the
              differentiable top-k, query + decoder adapters)

Outputs in --out: every stage's directory, `results.json` (every number below), `results.md` (the tables
the README shows) and two pictures, `rate_curve.svg` and `stage3_curve.svg` (hand-written SVG, no plotting
dependency).

Why these choices (the measurements, and the finished diagnoses behind them, are in docs/LOG.md):
  - no alignment loss in stages 1-2: with the method's 0.1 * mse (memory mean pulled to the mean of the
    document's hidden states) the tiny encoder writes one huge constant vector at every memory position
    (residual norm ~470 vs ~2.6 of document-dependent variation after 200 stage-1 steps): all memories
    become the same direction (cosine 0.99999 between documents) and stage 2 reads only when it happens to
    escape that plateau. With --mse-weight 0 the memories stay distinct (cosine 0.3-0.7) and reading is
    learned on every seed tried;
  - word names and "Who ...?" questions in stage 1 (--names words --ask-names): with them the stage-0 base
    learns to copy from a text (raw-text reading 40.7% vs 8.7% without them, fast lab, one run each);
  - the base is frozen in stages 1-3 (the method's own setting): when the encoder and decoder share base
    weights that both train (train.py's former `--train-base 1`), the encoder's memory stayed at chance;
  - tied input/output embeddings: an untied tiny model did not learn to copy a word from its context;
  - questions that describe the person's job (--describe): the tiny encoder's memories keep the facts its
    training questions ask about, not the person's name (linear probes at chance, docs/LOG.md), so with
    the name alone nothing in the memories tells the right document from similar people's and stage 3
    stayed at chance (recall@1 9.3 -> 10.8 % without --describe). The description shares no word with the
    job, so the untrained query reasoner cannot match it by its surface: stage 3 has to learn what it means. Job questions
    stay in stage 2 because a memory drops a fact that no training question asks (job probe at chance when
    they were left out);
  - stage 3 from the best reader: every rate reads the job questions at 95-100%, the town questions (stage 3's)
    at 0-75%, by rate and by run (reading starts by chance; docs/LOG.md);
  - the warm-up before the end-to-end stage 3: the answer loss alone does not move the untrained
    query reasoner (recall@1 12.9 -> 11.9 % in 300 steps); after the warm-up (-> 85.9 %) the query reasoner
    finds the document, so the end-to-end answer loss can teach the decoder;
  - one-word facts and one document per question in stage 2: a 2-layer, 64-wide model learns to read them in
    a few hundred steps; with years, company and teacher names mixed in it reached 22% after 600 steps;
    picking the right document among similar people's is stage 3's job.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

FULL = dict(train=2000, test=200, questions=3, s0_epochs=5, s1_steps=100, s2_steps=800, s3_warmup_steps=200,
            s3_steps=300, rates=[4, 8, 16], limit=None)
FAST = dict(train=2000, test=100, questions=3, s0_epochs=5, s1_steps=50, s2_steps=600, s3_warmup_steps=100,
            s3_steps=100, rates=[4], limit=150)
# Shared by stages 1-3: LoRA rank 32 (half the width: near full rank at this size), no dropout, batch 32.
COMMON = ["--lora-r", "32", "--lora-alpha", "64", "--lora-dropout", "0", "--global-batch", "32", "--micro-batch",
          "32", "--max-len", "256", "--log-every", "10"]
# Stages 1 and 2 without the alignment loss (the method's 0.1 * mse): at this scale it collapses every
# document's memory onto one vector (see the module docstring), and reading then starts only by chance.
NO_MSE = ["--mse-weight", "0"]
# The end-to-end stage 3 after the warm-up, at a lower learning rate than the warm-up's 1e-3: where the decoder
# reads the towns poorly its answer loss carries little retrieval signal, and at 1e-3 it undid the warm-up
# (recall@1 85.9 -> 22.0 %; at 1e-4: 84.4 %); with a decoder that reads them, 1e-3 and 3e-4 both kept it
# (85.4 -> 82.7 %) and raised the answers (37.1 -> 48.5 / 45.0 %). docs/LOG.md, 2026-11-25.
S3_LR = "3e-4"


def run(cmd: list[str], log: list) -> float:
    """Run one command from the repository root, echoing it; returns its seconds."""
    shown = " ".join(shlex.quote(str(c)) for c in cmd).replace(PY, "python")
    print(f"\n$ {shown}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)
    seconds = time.perf_counter() - t0
    log.append({"command": shown, "seconds": round(seconds, 1)})
    return seconds


def evaluate(ckpt: Path, data: Path, out: Path, modes: list[str], log: list, limit, extra=()) -> dict:
    cmd = [PY, "eval.py", "--checkpoint", ckpt, "--data", data, "--mode", *modes, "--out", out, "--no-progress",
           "--batch-size", "50", "--max-new-tokens", "8", *extra]
    run(cmd + (["--limit", str(limit)] if limit else []), log)
    return json.loads((out / "summary.json").read_text())["results"][data.stem]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fast", action="store_true", help="the small version (test suite): fewer people and steps")
    p.add_argument("--out", default=None, help="output directory (default: out/lab, or out/lab_fast)")
    p.add_argument("--rates", type=int, nargs="+", default=None, help="compression rates (64-token documents)")
    p.add_argument("--stage3-rate", type=int, default=None, help="the rate whose stage-2 model stage 3 starts "
                   "from (default: the best compressed reader among --rates in this run)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = dict(FAST if a.fast else FULL)
    cfg["rates"] = a.rates or cfg["rates"]
    if a.stage3_rate is not None and a.stage3_rate not in cfg["rates"]:
        p.error(f"--stage3-rate {a.stage3_rate} is not one of --rates {cfg['rates']}")
    out = Path(a.out or ("out/lab_fast" if a.fast else "out/lab")).resolve()
    data = out / "data"
    old = [q for q in (data, out / "stage0", *out.glob("rate[0-9]*")) if q.is_dir()]
    if old:  # no stale checkpoint, eval or data file of another setting can mix into this run's results
        print(f"removing the previous lab run's folders in {out}: {', '.join(q.name for q in old)}")
        for q in old:
            shutil.rmtree(q)
    log, res, t_start = [], {"settings": cfg | {"seed": a.seed}, "rates": {}}, time.perf_counter()
    seed = ["--seed", str(a.seed)]

    # 1. data: one document per stage-2 question (k=1), N=8 candidates per stage-3 question
    run([PY, "lab/synth.py", "--out", data, "--train", cfg["train"], "--test", cfg["test"], "--k", "1",
         "--candidates", "8", "--questions", cfg["questions"], "--ask", "job", "home", "place", "--names", "words",
         "--ask-names", "--describe", *seed], log)
    # 2. stage 0 (not CLaRa): the base decoder, from random weights, on raw-text QA about every fact of the
    #    training people (stage-1 qa records, one text per question) + their paraphrases + the stage-2 QA
    base = out / "stage0"
    run([PY, "lab/pretrain.py", "--data", data / "stage1.jsonl", data / "stage2.jsonl", "--out", base,
         "--tie-embeddings", "1", "--max-len", "256", "--global-batch", "32", "--micro-batch", "32",
         "--epochs", cfg["s0_epochs"], "--lr", "3e-3", "--min-lr", "2e-4", "--warmup", "0.05", "--log-every", "100",
         "--vocab-size", "1200", *seed], log)
    # 3. stages 1 and 2 per compression rate, the frozen base underneath
    for rate in cfg["rates"]:
        d = out / f"rate{rate}"
        run([PY, "train.py", "--stage", "1", "--model", base, "--data", data / "stage1.jsonl", "--out", d / "stage1",
             "--doc-len", "64", "--compr-rate", rate, "--lr", "3e-3", "--min-lr", "3e-4",
             "--max-steps", cfg["s1_steps"], *COMMON, *NO_MSE, *seed], log)
        run([PY, "train.py", "--stage", "2", "--init", d / "stage1" / "checkpoint", "--data", data / "stage2.jsonl",
             "--out", d / "stage2", "--top-k", "1", "--lr", "3e-3", "--min-lr", "1e-3", "--warmup", "0.05",
             "--max-steps", cfg["s2_steps"], *COMMON, *NO_MSE, *seed], log)
        baselines = rate == cfg["rates"][0]  # the text and closed-book baselines read with the base: once
        r = evaluate(d / "stage2" / "checkpoint", data / "test_stage2.jsonl", d / "eval",
                     ["compressed", "text", "closed_book"] if baselines else ["compressed"], log, cfg["limit"])
        res["rates"][rate] = {"compressed": r["compressed"], "memory_tokens": 64 // rate}
        if baselines:
            res["text"], res["closed_book"] = r["text"], r["closed_book"]
    # 4. stage 3: retrieval among 8 candidates: untrained query reasoner, after the warm-up, after end to end
    # stage 3 starts from the best reader of this run: every rate reads the job questions (~95-100%), the town
    # questions are read at 0-75% depending on the rate and the run, and they are stage 3's questions
    r3 = a.stage3_rate or max(cfg["rates"], key=lambda r: res["rates"][r]["compressed"]["em"])
    res["settings"]["stage3_rate"] = r3
    d = out / f"rate{r3}"
    test3 = data / "test_stage3.jsonl"
    res["stage3_before"] = evaluate(d / "stage2" / "checkpoint", test3, d / "eval_stage3_before", ["retrieval"], log,
                                    cfg["limit"], ["--query-from-encoder", "--top-k", "1"])
    s3 = [PY, "train.py", "--stage", "3", "--data", data / "stage3.jsonl", "--top-k", "1", *COMMON, *seed]
    run(s3 + ["--retrieval-warmup", "--init", d / "stage2" / "checkpoint", "--out", d / "stage3_warmup",
              "--lr", "1e-3", "--max-steps", cfg["s3_warmup_steps"]], log)
    res["stage3_warmup"] = evaluate(d / "stage3_warmup" / "checkpoint", test3, d / "eval_stage3_warmup", ["retrieval"],
                                    log, cfg["limit"], ["--top-k", "1"])
    run(s3 + ["--init", d / "stage3_warmup" / "checkpoint", "--out", d / "stage3", "--lr", S3_LR,
              "--max-steps", cfg["s3_steps"]], log)
    res["stage3_after"] = evaluate(d / "stage3" / "checkpoint", test3, d / "eval_stage3_after", ["retrieval"], log,
                                   cfg["limit"], ["--top-k", "1"])
    warm = [json.loads(x) | {"phase": "warmup"} for x in open(d / "stage3_warmup" / "metrics.jsonl")]
    e2e = [json.loads(x) | {"phase": "end-to-end"} for x in open(d / "stage3" / "metrics.jsonl")]
    res["stage3_curve"] = warm + [c | {"step": c["step"] + cfg["s3_warmup_steps"]} for c in e2e]
    res["commands"], res["seconds"] = log, round(time.perf_counter() - t_start, 1)

    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(tables(res))
    plots(res, out)
    print("\n" + tables(res), flush=True)
    print(f"lab done in {res['seconds'] / 60:.1f} min; results in {out}")
    return res


# ---- reports ------------------------------------------------------------------------------------------

def tables(res: dict) -> str:
    """The two markdown tables of the README: answers by reading mode, and stage-3 retrieval."""
    n = res["text"]["n"]
    rows = [f"| reading (held-out people, {n} questions) | memory / doc tokens | exact match % |", "|---|---|---|",
            f"| closed book (base model, no document) | 0 | {res['closed_book']['em']:.1f} |",
            f"| raw text (base model reads the document) | all | {res['text']['em']:.1f} |"]
    rows += [f"| compressed, rate {rate} | {v['memory_tokens']} / 64 | {v['compressed']['em']:.1f} |"
             for rate, v in res["rates"].items()]
    rows += ["", f"| stage 3 (rate {res['settings']['stage3_rate']}, 8 candidates, top-1) | recall@1 | recall@3 | "
             "answer exact match % |", "|---|---|---|---|",
             "| random choice | 12.5 | 37.5 | – |"]
    s = res["settings"]
    for key, label in (("before", "untrained query reasoner (copy of the encoder)"),
                       ("warmup", f"after the retrieval warm-up ({s['s3_warmup_steps']} steps, InfoNCE)"),
                       ("after", f"after end-to-end stage 3 (+{s['s3_steps']} steps, answer loss)")):
        r = res[f"stage3_{key}"]["retrieval"]
        rows.append(f"| {label} | {r['recall@1']:.1f} | {r['recall@3']:.1f} | {r['em']:.1f} |")
    return "\n".join(rows) + "\n"


def svg_plot(series: list[tuple[str, list[tuple[float, float]], str]], title: str, xlabel: str, ylabel: str,
             path: Path, xticks=None, ymax: float = 100.0):
    """A line chart as SVG text: series = [(label, [(x, y), ...], colour)]; one point = a marker alone."""
    W, H, L, R, T, B = 560, 320, 56, 170, 34, 44  # size and margins (right: the legend)
    xs = [x for _, pts, _ in series for x, _ in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    sy = lambda y: H - B - y / ymax * (H - T - B)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2 - R / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<text x="{L + (W - L - R) / 2}" y="{H - 8}" text-anchor="middle">{xlabel}</text>',
           f'<text x="14" y="{T + (H - T - B) / 2}" text-anchor="middle" transform="rotate(-90 14 '
           f'{T + (H - T - B) / 2})">{ylabel}</text>']
    for y in range(0, int(ymax) + 1, 20):  # grid and y ticks
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y}</text>')
    for x, label in (xticks or [(x, f"{x:g}") for x in sorted(set(xs))]):
        out.append(f'<text x="{sx(x):.1f}" y="{H - B + 16}" text-anchor="middle">{label}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#888"/>')
    for i, (label, pts, colour) in enumerate(series):
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        ly = T + 14 + 18 * i
        out.append(f'<line x1="{W - R + 10}" x2="{W - R + 28}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" '
                   f'stroke-width="2"/><text x="{W - R + 32}" y="{ly}">{label}</text>')
    path.write_text("\n".join(out) + "\n</svg>\n")


def plots(res: dict, out: Path):
    """rate_curve.svg: exact match vs memory tokens per document; stage3_curve.svg: training recall@1."""
    import math
    rates = sorted(res["rates"], key=int)
    xs = [math.log2(int(r)) for r in rates]
    flat = lambda y: [(min(xs), y), (max(xs), y)] if len(xs) > 1 else [(xs[0], y)]
    svg_plot([("compressed", [(x, res["rates"][r]["compressed"]["em"]) for x, r in zip(xs, rates)], "#1f77b4"),
              ("raw text", flat(res["text"]["em"]), "#2ca02c"),
              ("closed book", flat(res["closed_book"]["em"]), "#d62728")],
             "Held-out exact match vs compression rate", "compression rate (64-token documents)", "exact match %",
             out / "rate_curve.svg", xticks=[(x, f"{r} ({64 // int(r)} vec)") for x, r in zip(xs, rates)])
    curve = {phase: [(c["step"], 100 * c["recall@1"]) for c in res["stage3_curve"]
                     if "recall@1" in c and c["phase"] == phase] for phase in ("warmup", "end-to-end")}
    steps = [s for pts in curve.values() for s, _ in pts]
    held_out = lambda key, step: [(step, res[f"stage3_{key}"]["retrieval"]["recall@1"])]  # noqa: E731
    svg_plot([("train, warm-up", curve["warmup"], "#1f77b4"),
              ("train, end to end", curve["end-to-end"], "#9467bd"),
              ("held-out, untrained", held_out("before", 0), "#ff7f0e"),
              ("held-out, warm-up", held_out("warmup", res["settings"]["s3_warmup_steps"]), "#17becf"),
              ("held-out, after", held_out("after", max(steps)), "#2ca02c"),
              ("random (1/8)", [(0, 12.5), (max(steps), 12.5)], "#999")],
             "Stage 3: recall@1 among 8 candidates", "training step", "recall@1 %", out / "stage3_curve.svg",
             xticks=[(x, str(x)) for x in range(0, max(steps) + 1, max(1, max(steps) // 6))])


if __name__ == "__main__":
    main()

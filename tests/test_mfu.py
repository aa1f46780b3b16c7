"""The one FLOP count behind every MFU figure (train.batch_flops): by hand on a tiny config, against
torch's own FLOP counter on real training steps, and the same number from train.py and the
benchmarks."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import train
from clara import Clara, ClaraConfig
from data import train_tokenizer
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_train  # noqa: E402

# Projections (in, out): q (4, 4), k (4, 2), v (4, 2), o (4, 4), gate (4, 6), up (4, 6), down (6, 4)
# P = 16 + 8 + 8 + 16 + 24 + 24 + 24 = 120; at rank 1, R = 8 + 6 + 6 + 8 + 10 + 10 + 10 = 58.
HAND = ModelConfig(vocab_size=10, dim=4, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2,
                   intermediate_size=6)
# left padded: 3 + 2 = 5 real tokens, 6 + 3 = 9 causal pairs
MASK = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])


def test_pass_flops_by_hand():
    assert train.block_linears(HAND) == [(4, 4), (4, 2), (4, 2), (4, 4), (4, 6), (4, 6), (6, 4)]
    # forward: 2 (P + R) = 356 a token, 1780 for 5; attention 4 D Hq = 16 a pair, 144 for 9
    assert train.pass_flops(HAND, 1, MASK, trains=False) == 1780 + 144
    # + the output layer at 2 targets: 2 V H = 80 each, forward 160
    # backward: (2 (P + R) + 2 R) = 472 a token, 2360; attention 2 x 144 = 288; output layer 160
    trained = train.pass_flops(HAND, 1, MASK, trains=True, targets=2)
    assert trained == 1780 + 144 + 160 + 2360 + 288 + 160
    # input_grad=False: no input gradient for the first layer's q, k, v:
    # 2 (16 + 4) + 2 (8 + 4) + 2 (8 + 4) = 88 a token, 440 for 5
    no_input = train.pass_flops(HAND, 1, MASK, trains=True, input_grad=False)
    assert no_input == 1780 + 144 + 2360 + 288 - 440
    # a sliding window of 2: token i sees min(i + 1, 2) keys, 1 + 2 + 2 and 1 + 2 = 8 pairs (128)
    windowed = ModelConfig(**{**HAND.__dict__, "sliding_window": 2})
    assert train.pass_flops(windowed, 1, MASK, trains=False) == 1780 + 128
    assert train.mfu(4e12, 2.0, 1e12) == 2.0


def doc(*words):
    return " ".join(words) + "."


RECORDS = {
    1: [{"data_type": "qa", "question": ["Who wrote it?"], "answers": ["Alice"],
         "docs": [doc("Alice wrote the book")]},
        {"data_type": "qa", "question": ["Where?"], "answers": ["Paris"],
         "docs": [doc("Paris is in France")]}],
    2: [{"question": "Who wrote it?", "answer": "Alice",
         "docs": [doc("Alice wrote the book"), doc("Paris is in France")]},
        {"question": "Where?", "answer": "Paris",
         "docs": [doc("Berlin is big"), doc("Paris is in France")]}],
    3: [{"question": "Who wrote it?", "answer": "Alice", "pos_index": [0],
         "docs": [doc("Alice wrote the book"), doc("Paris is in France"), doc("A dog"),
                  doc("Fox")]},
        {"question": "Where?", "answer": "Paris", "pos_index": [1],
         "docs": [doc("Berlin is big"), doc("Paris is in France"), doc("A cat"), doc("The sun")]}],
}


@pytest.fixture(scope="module")
def clara():
    from conftest import CORPUS
    tok = train_tokenizer(CORPUS, 300)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)
    model = Transformer(cfg).init_weights(seed=0, std=0.1)
    c = Clara(model, tok, ClaraConfig(doc_max_length=16, compr_rate=4, generation_top_k=2, lora_r=4,
                                      lora_alpha=8, lora_dropout=0.1, training_stage=3))
    c.model.copy_adapter("encoder", "query")
    return c


def unpadded(batch):
    """The batch with every mask 1: torch counts the padded matmuls, our count none of the pads."""
    batch.doc_mask = torch.ones_like(batch.doc_mask)
    batch.dec_mask = torch.ones_like(batch.dec_mask)
    if batch.q_mask is not None:
        batch.q_mask = torch.ones_like(batch.q_mask)
    return batch


def attention_flops(cfg, batch, stage, objective):
    """batch_flops' attention term by hand: 4 D Hq a causal pair and layer, 3x with backward."""
    def pairs(mask):
        n = mask.sum(1)
        return int((n * (n + 1) // 2).sum())
    per = 4 * cfg.head_dim * cfg.n_heads * cfg.n_layers
    docs = pairs(batch.doc_mask) * per * (3 if stage < 3 else 1)
    query = pairs(batch.q_mask) * per * 3 if stage == 3 else 0
    dec = pairs(batch.dec_mask) * per * 3 if objective == "answer" else 0
    return docs + query + dec


@pytest.mark.parametrize("stage, objective", [
    (1, "answer"), (2, "answer"), (3, "answer"), (3, "retrieval_warmup")])
def test_matmul_flops_equal_torchs_count_of_a_real_step(clara, stage, objective):
    """Every matmul of a training forward + backward, as torch counts them (FlopCounterMode), is in
    our count: the projections with their adapters, the input and weight gradients autograd really
    computes, the output layer at the targets. torch does not see inside the attention kernel (our
    term is checked by hand above), and we leave out the top-k's (B, K, N) x (B, N, M*H) product
    (batched matmuls, under 0.1% at the official shapes)."""
    params = clara.trainable_parameters(stage)
    if objective == "retrieval_warmup":
        for k in [k for k in params if not k.endswith(".query")]:
            params.pop(k).requires_grad_(False)
    clara.train()
    batch = unpadded(clara.collate(RECORDS[stage], stage))
    with FlopCounterMode(display=False) as counter:
        clara.total_loss(clara.loss(batch, stage, objective)).backward()
    clara.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()["Global"]
    torch_mm = sum(v for op, v in counts.items() if "bmm" not in str(op))
    cfg = clara.model.cfg
    ours = train.batch_flops(cfg, clara.cfg.lora_r, batch, stage, objective)
    assert ours - attention_flops(cfg, batch, stage, objective) == torch_mm


def test_train_and_the_benchmarks_count_a_stage3_step_alike(tmp_path):
    """The two formulas this replaced disagreed on a stage-3 batch (train.py counted every encoder
    token at 4 P, bench_train.py the no-grad candidates at 2 P: 1.95x apart at the official shapes).
    Now a real train.py step (setup, train_step) and bench_train.py's count of the same
    micro-batches agree, and both are the sum of the three passes."""
    a = train.parse_args(["--stage", "3", "--out", str(tmp_path), "--device", "cpu",
                          "--global-batch", "4", "--micro-batch", "2", "--doc-len", "32",
                          "--compr-rate", "8", "--max-len", "400", "--top-k", "2"])
    run = train.setup(a, torch.device("cpu"), torch.float32, rank=0, world=1)
    stream = train.micro_batches(run)
    micro = [train.make_batch(run, next(stream)) for _ in range(run.accum)]
    stats = train.train_step(run, micro)
    clara = run.clara
    assert stats.flops == sum(bench_train.step_flops(clara, m, 3) for m in micro) > 0
    cfg, r = clara.model.cfg, clara.cfg.lora_r
    for m in micro:
        targets = int((m.labels[:, 1:] != -100).sum())
        assert bench_train.step_flops(clara, m, 3) == (
            train.pass_flops(cfg, r, m.doc_mask, trains=False)  # the N candidates, no gradient
            + train.pass_flops(cfg, r, m.q_mask, trains=True, input_grad=False)  # query reasoner
            + train.pass_flops(cfg, r, m.dec_mask, trains=True, targets=targets))  # the decoder

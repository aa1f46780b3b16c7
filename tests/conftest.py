"""Shared test fixtures: tiny random Hugging Face checkpoints and a tiny BPE tokenizer, built offline.

transformers is used here only as a reference and a checkpoint writer; no library file imports it.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

# The Triton kernel runs under Triton's interpreter on a machine without CUDA. The switch is read when
# kernels are defined, and transformers may import triton (through torch._dynamo) before kernels/flash.py
# is imported: set it before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Question: who wrote the book? Answer: Alice wrote it in 1999.",
    "Documents are compressed into memory tokens by the encoder adapter.",
    "This is a small corpus used to train a byte pair encoding tokenizer offline.",
] * 20


def build_tokenizer(vocab_size: int = 300):
    """A small BPE tokenizer shaped like Mistral's: <unk>=0, <s>=1, </s>=2, Metaspace with a leading ▁
    only at the very start of the text (prepend_scheme='first', the non-legacy conversion)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="session")
def hf_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny random base model + tokenizer saved as an HF-style directory (our own writer)."""
    from data import train_tokenizer
    from model import ModelConfig, Transformer
    path = tmp_path_factory.mktemp("tiny_base")
    tok = train_tokenizer(CORPUS, 300)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).init_weights(seed=0, std=0.1)
    model.save_pretrained(path)
    tok.save(path)
    return path


def adamw_steps(clara, batch: dict, stage: int, steps: int = 1, lr: float = 3e-3, opt=None):
    """The tests' training loop: `steps` AdamW steps of Clara.total_loss on one collated batch, in training
    mode, every loss finite. -> (the loss before each step, the optimizer: a new one on the trainable
    parameters of `stage` unless `opt` is given)."""
    if opt is None:
        opt = torch.optim.AdamW(list(clara.trainable_parameters(stage).values()), lr=lr)
    clara.train()
    losses = []
    for _ in range(steps):
        loss = clara.total_loss(clara.loss(batch, stage))
        assert torch.isfinite(loss), (losses, loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


# Llama-3.x RoPE scaling with a pretraining context of 64 positions, so that the 8 frequencies of a
# 16-wide head fall in all three regimes: wavelength below 64/4 kept, above 64/1 divided, between smoothed.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def write_hf_model(path: Path, arch: str = "mistral", seed: int = 0, shard: bool = False, **overrides):
    """Save a tiny random HF model to `path`; returns the HF model (fp32). arch: mistral (sliding window 8),
    llama (tied, head_dim 24), llama3 (its RoPE scaling, attention biases), qwen2 (q/k/v biases, tied),
    qwen3 (q/k norms, head_dim 24, untied)."""
    import transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=1)
    if arch == "mistral":
        cfg = transformers.MistralConfig(**{**common, "sliding_window": 8, "rope_theta": 10000.0, **overrides})
        model = transformers.MistralForCausalLM(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(**{**common, "tie_word_embeddings": True, "head_dim": 24, **overrides})
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "llama3":
        cfg = transformers.LlamaConfig(**{**common, "rope_parameters": dict(LLAMA3_ROPE), "attention_bias": True,
                                          **overrides})
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, "rope_theta": 1e6, **overrides})
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**{**common, "head_dim": 24, "tie_word_embeddings": False, **overrides})
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(f"write_hf_model: unknown arch {arch!r}")
    model = model.float().eval()
    # HF initialises with std 0.02; widen it so that random logits are far from ties (a fairer test).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.1)
            elif arch not in ("mistral", "llama"):  # norms away from 1 too, so a swapped q/k norm shows
                p.normal_(1, 0.1)
    model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB", safe_serialization=True)
    return model

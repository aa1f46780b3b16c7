"""A Llama-family decoder-only transformer in plain PyTorch, with named LoRA adapters and generation.

What is here, top to bottom:
  ModelConfig     the shape of the network, read from a Hugging Face `config.json` (Mistral, Llama incl.
                  Llama-3's `llama3` RoPE scaling, Qwen2/Qwen2.5, Qwen3) or taken from a named preset
  LoRALinear      a frozen nn.Linear (+ bias) with any number of named low-rank adapters; one is active
                  per call; its training backward keeps each input once (`_LoRAFunction`)
  Transformer     RMSNorm pre-norm blocks, rotary embeddings (HF rotate-half layout), grouped-query
                  attention through `kernels.attention`, SwiGLU MLP; `from_pretrained` loads HF safetensors
  KVCache         static preallocated keys/values (gpt-fast style: index_copy_ at a slot tensor)
  decode_step     the per-token step of generation, compilable (generate(..., compile=True))
  generate        batched greedy / temperature + top-p sampling from ids or from input embeddings

What is not here: anything CLaRa-specific (memory tokens, prompts, losses live in clara.py).

The four families differ only in small switches of one network: Qwen2 adds biases to the q/k/v
projections, Qwen3 RMS-normalises each query and key head before RoPE, Llama-3 rescales the RoPE
frequencies, Mistral may slide its attention window. Everything else (pre-norm RMSNorm blocks, SwiGLU,
rotate-half RoPE, grouped-query attention, tied or untied lm_head) is shared.

The parameter names are our own (short, gpt-fast style); `HF_KEYS` is the one table that maps them to
Hugging Face checkpoint keys, so loading is a pure rename: the rotate-half RoPE layout of HF is kept, and
no q/k permutation is needed.

Shape legend: B batch, T query tokens, S key tokens (cache included), H hidden size, Hq query heads,
Hkv key/value heads, D head dim, V vocabulary, R LoRA rank, N real (unpadded) tokens of a packed batch.
"""
from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels


# ----------------------------------------------------------------------------------------------------
# Configuration

@dataclass
class ModelConfig:
    vocab_size: int = 32000          # rows of the embedding and of lm_head
    dim: int = 4096                  # hidden size H
    n_layers: int = 32
    n_heads: int = 32                # query heads Hq
    n_kv_heads: int = 8              # key/value heads Hkv (grouped-query attention when < n_heads)
    head_dim: int = 128              # D; Llama-style configs may set it independently of dim / n_heads
    intermediate_size: int = 14336   # SwiGLU inner size
    norm_eps: float = 1e-5           # RMSNorm epsilon
    rope_theta: float = 1e6          # RoPE base
    sliding_window: int | None = None  # Mistral sliding-window attention (None = full causal)
    tie_embeddings: bool = False     # lm_head shares the input embedding matrix (small Llamas, Qwens)
    qkv_bias: bool = False           # q/k/v projections have a bias (Qwen2 always; Llama/Qwen3 attention_bias)
    o_bias: bool = False             # the output projection has one too (Llama/Qwen3 attention_bias only)
    qk_norm: bool = False            # Qwen3: RMSNorm over each query and key head (D wide) before RoPE
    rope_scaling: dict | None = None  # Llama-3 frequency scaling: factor, low_freq_factor, high_freq_factor,
                                      # original_max_position_embeddings (None = plain RoPE)
    bos_id: int = 1
    eos_id: int = 2
    dtype: str = "bfloat16"          # the checkpoint's dtype, used when from_pretrained gets dtype=None

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        """Read an HF `config.json` (Mistral, Llama, Qwen2, Qwen3; old or new key style)."""
        path = Path(path)
        try:
            c = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        arch = (c.get("architectures") or [None])[0]
        mtype = c.get("model_type")
        family = FAMILIES.get(arch) or (mtype if mtype in FAMILIES.values() else None)
        if family is None:
            raise ValueError(f"{path}: unsupported architecture {arch!r} (model_type {mtype!r}); "
                             f"expected one of {', '.join(FAMILIES)}")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{path}: hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
        if c.get("mlp_bias"):
            raise ValueError(f"{path}: mlp_bias=true is not supported (the MLP projections have no bias)")
        # Biases: Qwen2 hard-codes q/k/v biases and no o bias (its config has no switch); Llama and Qwen3
        # put a bias on all four projections when attention_bias is set; Mistral has none.
        if family == "mistral" and c.get("attention_bias"):
            raise ValueError(f"{path}: attention_bias=true is not supported for Mistral (it has no biases)")
        attention_bias = bool(c.get("attention_bias")) and family in ("llama", "qwen3")
        qkv_bias = family == "qwen2" or attention_bias
        # Sliding window: Mistral applies its window to every layer. Qwen applies one only when
        # use_sliding_window is set, and then only to the layers from max_window_layers on: not supported.
        window = c.get("sliding_window") if family == "mistral" else None
        if family != "mistral":
            if c.get("use_sliding_window"):
                raise ValueError(f"{path}: use_sliding_window=true is not supported (per-layer sliding "
                                 "windows); only full attention")
            kinds = set(c.get("layer_types") or ["full_attention"])
            if kinds != {"full_attention"}:
                raise ValueError(f"{path}: layer_types {sorted(kinds)} is not supported (only 'full_attention')")
        theta, scaling = _rope_from_hf(path, c)
        eos = c.get("eos_token_id", 2)
        n_heads = c["num_attention_heads"]
        dim = c["hidden_size"]
        return cls(
            vocab_size=c["vocab_size"], dim=dim, n_layers=c["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads,
            head_dim=c.get("head_dim") or dim // n_heads,
            intermediate_size=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), sliding_window=window,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=attention_bias, qk_norm=family == "qwen3", rope_scaling=scaling,
            bos_id=c.get("bos_token_id", 1) if c.get("bos_token_id") is not None else 1,
            eos_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
            dtype=str(c.get("dtype") or c.get("torch_dtype") or "float32"),
        )


# HF architecture -> model_type; the family decides the bias pattern and whether q/k are normalised.
FAMILIES = {"MistralForCausalLM": "mistral", "LlamaForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_from_hf(path: Path, c: dict) -> tuple[float, dict | None]:
    """(theta, llama3 scaling or None) from a config dict. Old style: top-level rope_theta plus an optional
    rope_scaling dict; new style (transformers >= 5): one rope_parameters dict holding both."""
    key = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{path}: {key} must be an object, got {rope!r}")
    if "full_attention" in rope:  # nested per layer type (models mixing attention kinds)
        raise ValueError(f"{path}: {key} nested per layer type is not supported")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{path}: partial_rotary_factor {partial} is not supported (RoPE on the whole head only)")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{path}: {key}.rope_type {rope_type!r} is not supported (only plain RoPE and 'llama3')")
    # HF falls back to max_position_embeddings when original_max_position_embeddings is absent.
    rope = {"original_max_position_embeddings": c.get("max_position_embeddings"), **rope}
    missing = [k for k in LLAMA3_KEYS if rope.get(k) is None]
    if missing:
        raise ValueError(f"{path}: {key} of rope_type 'llama3' lacks {missing[0]!r}")
    scaling = {k: float(rope[k]) for k in LLAMA3_KEYS}
    scaling["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    return theta, scaling


PRESETS = {
    # Trains on a laptop CPU in seconds; vocab_size is normally overridden by the tokenizer's size.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 intermediate_size=176, norm_eps=1e-5, rope_theta=10000.0, dtype="float32"),
    # Mistral-7B-Instruct-v0.2 (the CLaRa base model).
    "mistral-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                       intermediate_size=14336, norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                       dtype="bfloat16"),
}


# ----------------------------------------------------------------------------------------------------
# LoRA

@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen linear layer plus named low-rank adapters, one active per forward call.

        x ──► W (frozen, out x in) ───────────────────────────┐
        │                                                     + ──► y
        └──► dropout ──► A[name] (R x in) ──► B[name] (out x R) ──► * alpha/R

    A starts like nn.Linear (kaiming-uniform, a = sqrt(5)) and B at zero, so a new adapter changes nothing
    until it trains. The adapter branch runs in the adapters' own dtype (fp32 by default, so a bf16 base
    can carry fp32 trainable weights) and is cast back to the base's dtype. A bias (Qwen's q/k/v) is part
    of the frozen base W, not of the adapter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora: dict[str, LoRAConfig] = {}

    def add_adapter(self, name: str, cfg: LoRAConfig, dtype=None):
        device = self.weight.device
        dtype = dtype or torch.float32
        A = torch.empty(cfg.rank, self.in_features, device=device, dtype=dtype)
        if device.type != "meta":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=device, dtype=dtype))
        self.lora[name] = cfg

    save_less = True  # training: the lean backward below; False = plain autograd (same numbers, more memory)

    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        if adapter is None:
            return F.linear(x, self.weight, self.bias)
        if adapter not in self.lora:
            raise KeyError(f"no LoRA adapter named {adapter!r}; this model has {sorted(self.lora)}")
        cfg, A, B = self.lora[adapter], self.lora_A[adapter], self.lora_B[adapter]
        p = cfg.dropout if self.training else 0.0
        if self.save_less and torch.is_grad_enabled() and 0.0 <= p < 1.0:
            return _LoRAFunction.apply(x, self.weight, self.bias, A, B, cfg.scale, p)
        y = F.linear(x, self.weight, self.bias)
        h = F.dropout(x.to(A.dtype), p, self.training)
        return y + (cfg.scale * F.linear(F.linear(h, A), B)).to(y.dtype)


def _dropout_noise(keep: torch.Tensor, p: float, dtype) -> torch.Tensor:
    """The multiplier of inverted dropout, 1/(1-p) where kept and 0 elsewhere, as F.dropout computes it."""
    return keep.to(dtype).div_(1 - p)


class _LoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s * B A dropout(x), with the same forward numbers as the plain path, keeping less.

    Plain autograd keeps, for every projection, the dropout's fp32 multiplier and the dropped input (two
    full copies of x, 8 bytes an element in fp32) although W is frozen. Here one projection keeps x itself
    (shared by q, k and v, which read the same tensor; in the base's dtype, not upcast), the keep-mask as
    bool (1 byte an element) and the rank-R product A h; h is rebuilt from x and the mask in backward.
    The mask is drawn with the same random numbers as F.dropout (the CPU recipe: bernoulli noise / (1-p);
    on accelerators the fused native_dropout that F.dropout uses there), so the forward is bit-identical.
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, scale, p):
        y = F.linear(x, W, bias)
        xa = x.to(A.dtype)
        keep = None
        if p > 0:
            if xa.device.type == "cpu":
                keep = torch.empty_like(xa).bernoulli_(1 - p) != 0
                h = xa * _dropout_noise(keep, p, xa.dtype)
            else:
                h, keep = torch.native_dropout(xa, p, True)
        else:
            h = xa
        z = F.linear(h, A)  # (..., R)
        ctx.save_for_backward(x, W, A, B, z, keep)
        ctx.scale, ctx.p, ctx.has_bias = scale, p, bias is not None
        return y + (scale * F.linear(z, B)).to(y.dtype)

    @staticmethod
    def backward(ctx, g):
        x, W, A, B, z, keep = ctx.saved_tensors
        need = ctx.needs_input_grad
        gs = g.to(A.dtype) * ctx.scale  # (..., out): the gradient reaching s * B A h
        gz = gs @ B  # (..., R)
        gB = gs.flatten(0, -2).T @ z.flatten(0, -2) if need[4] else None  # (out, R)
        gx = gA = gW = gb = None
        if need[0] or need[3]:
            noise = _dropout_noise(keep, ctx.p, A.dtype) if keep is not None else None
            if need[3]:
                h = x.to(A.dtype) if noise is None else x.to(A.dtype) * noise  # (..., in), rebuilt
                gA = gz.flatten(0, -2).T @ h.flatten(0, -2)  # (R, in)
            if need[0]:
                gh = gz @ A  # (..., in)
                gx = g @ W + (gh if noise is None else gh * noise).to(x.dtype)
        if need[1]:  # a base weight that requires grad (CLaRa's base is frozen; the layer allows it)
            gW = g.flatten(0, -2).T @ x.flatten(0, -2)
        if need[2] and ctx.has_bias:
            gb = g.flatten(0, -2).sum(0)
        return gx, gW, gb, gA, gB, None, None


# ----------------------------------------------------------------------------------------------------
# Transformer

class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32 whatever the input dtype (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm without a weight is x * rsqrt(mean(x^2) + eps) in one call, the same fp32 operations
        # (bit-identical) at a fraction of the per-call cost of six. The weight multiplies after the cast
        # back, as HF does: F.rms_norm's own weight would multiply in fp32, which differs in bf16.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The D/2 rotary frequencies theta^(-2i/D), fp32; with Llama-3 scaling, slowed down at low frequency.

    Llama-3 scaling (its `llama3` rope type): a frequency whose wavelength is longer than the pretraining
    context / low_freq_factor is divided by `factor`; one shorter than context / high_freq_factor is kept;
    those in between are interpolated smoothly between the two. Same operations, in the same order, as
    transformers' version, so the fp32 angles agree bit for bit.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # (D/2,)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)  # 0 at the low-frequency edge, 1 at the high one
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype,
                 scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of the rotary angles, (B, 1, T, D), in HF's rotate-half layout: cos is
    [cos, cos] (the two halves repeat), the sine is [-sin, sin], the sign of rotate_half folded in (see
    apply_rope)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)  # (D/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]  # (B, 1, T, D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the position's angle: HF's x*cos + rotate_half(x)*sin, where
    rotate_half(x) = [-x2, x1]. With the sign in the sine ([-sin, sin], rope_cos_sin) it is
    x*cos + [x2, x1]*[-sin, sin], and [x2, x1] is a roll by D/2: one op where split, neg and cat were
    three, and the same bits ((-a)*b == a*(-b) exactly)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wq = LoRALinear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = LoRALinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = LoRALinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = LoRALinear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        # Qwen3 normalises every head of q and k on its own (one D-wide weight shared by the heads), which
        # bounds the attention logits; Identity elsewhere, so the other families have no extra parameters.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, key_mask, adapter, cache, layer, real=None):
        """x (B, T, H), or packed (N, H) with real (B, T) bool saying where its rows sit (Transformer.forward's
        skip_padding): the projections run on the real tokens only, attention on the padded layout."""
        D = self.cfg.head_dim
        q, k, v = self.wq(x, adapter), self.wk(x, adapter), self.wv(x, adapter)  # (B, T | N, Hq*D | Hkv*D)
        if real is not None:  # (N, .) -> (B, T, .), zeros at the padding: masked keys, discarded queries
            q, k, v = (_unpack(t, real) for t in (q, k, v))
        B, T, _ = q.shape
        q, k, v = q.view(B, T, -1, D), k.view(B, T, -1, D), v.view(B, T, -1, D)  # (B, T, Hq | Hkv, D)
        if self.cfg.qk_norm:  # not a call of the Identity otherwise: module calls cost per decoded token
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, Hq | Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D), S = cached + T (decoding: see KVCache)
        if cache is not None and cache.slot is not None:  # one token: key_mask is the cache's additive mask
            y = kernels.decode_attention(q, k, v, key_mask)
        else:  # GQA: the kernel maps query head h to kv head h // (Hq / Hkv); K/V are never repeated here.
            y = kernels.attention(q, k, v, causal=True, key_padding_mask=key_mask, window=self.cfg.sliding_window)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, Hq*D)
        return self.wo(y if real is None else y[real], adapter)  # (B, T, H) or packed (N, H)


def _unpack(t: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Packed rows (N, F) of the True places of real (B, T), row after row -> (B, T, F), zeros elsewhere."""
    return t.new_zeros(*real.shape, t.shape[-1]).index_put_((real,), t)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = LoRALinear(cfg.dim, cfg.intermediate_size)
        self.up = LoRALinear(cfg.dim, cfg.intermediate_size)
        self.down = LoRALinear(cfg.intermediate_size, cfg.dim)

    save_less = True  # training: keep gate and up outputs only, not silu(gate) too (same numbers)

    def forward(self, x, adapter):
        g, u = self.gate(x, adapter), self.up(x, adapter)
        if self.save_less and torch.is_grad_enabled():
            return self.down(_SwiGLUFunction.apply(g, u), adapter)
        return self.down(F.silu(g) * u, adapter)


class _SwiGLUFunction(torch.autograd.Function):
    """silu(g) * u keeping g and u (autograd would also keep silu(g): a third intermediate-wide tensor)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, key_mask, adapter=None, cache=None, layer=0, real=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, key_mask, adapter, cache, layer, real)
        return x + self.mlp(self.mlp_norm(x), adapter)  # norms and MLP act per token: packed or not


# The linear layers (each a LoRALinear: the ones that carry adapters): our module name -> HF's. The source
# of their HF_KEYS rows below and of the official adapter keys (clara.OFFICIAL_PROJ).
HF_PROJ = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
           "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
           "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}

# Our parameter name -> HF checkpoint key ("{}" is the layer index). Attention biases: q/k/v in Qwen2 (and
# with attention_bias), o only with attention_bias.
HF_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",  # Qwen3
    "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    **{f"layers.{{}}.{ours}.{p}": f"model.layers.{{}}.{hf}.{p}" for ours, hf in HF_PROJ.items()
       for p in (("weight", "bias") if ours.startswith("attention.") else ("weight",))},
}


def hf_key(name: str) -> str:
    """Map one of our parameter names to its HF checkpoint key (LoRA parameters have none)."""
    parts = name.split(".")
    if parts[0] == "layers":
        return HF_KEYS["layers.{}." + ".".join(parts[2:])].format(parts[1])
    return HF_KEYS[name]


def hf_family(c: ModelConfig) -> str:
    """The HF model_type that expresses a config (what save_pretrained writes). Without Qwen or Llama-3
    features it is Mistral, whose config covers plain Llamas too (the sliding window is just None)."""
    if c.qk_norm:
        family = "qwen3"
    elif c.qkv_bias and not c.o_bias:
        family = "qwen2"
    elif c.o_bias or c.rope_scaling:
        family = "llama"
    else:
        return "mistral"
    if c.qkv_bias != c.o_bias and family != "qwen2":
        raise ValueError(f"ModelConfig: qkv_bias={c.qkv_bias} with o_bias={c.o_bias} has no HF architecture")
    if c.sliding_window is not None:
        raise ValueError(f"ModelConfig: sliding_window together with {family} features has no HF architecture")
    return family


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.adapters: dict[str, LoRAConfig] = {}
        self.activation_checkpointing = False  # recompute each block in backward (train.py sets it)

    # -- construction -----------------------------------------------------------------------------

    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random initialisation for models trained from scratch (the `tiny` preset)."""
        g = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "lora_" in name:
                    continue
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=g)  # in place, on the parameter's device
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "Transformer":
        """Load an HF Mistral/Llama/Qwen2/Qwen3 directory: config.json + model.safetensors or shards.

        The model is built on the meta device (no memory), and each checkpoint tensor is converted and
        assigned in place of its meta parameter, so the weights exist once. Every checkpoint tensor must be
        used and every parameter filled: any missing, unexpected or mis-shaped key is an error.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model directory does not exist")
        cfg = ModelConfig.from_hf(path / "config.json")
        dtype = dtype or getattr(torch, cfg.dtype.replace("torch.", ""))
        with torch.device("meta"):
            model = cls(cfg)
        tensors = read_safetensors(path)
        expected = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
        state, used = [], set()
        for name, p in expected.items():
            key = hf_key(name)
            if key not in tensors:
                if name == "output.weight" and cfg.tie_embeddings:
                    continue  # tied: lm_head is the embedding
                raise KeyError(f"{path}: checkpoint has no tensor {key!r} (for parameter {name}, shape {tuple(p.shape)})")
            if tensors.shapes[key] != tuple(p.shape):
                raise ValueError(f"{path}: tensor {key!r} has shape {tensors.shapes[key]}, "
                                 f"the config implies {tuple(p.shape)}")
            used.add(key)
            if name == "output.weight" and cfg.tie_embeddings:
                continue  # a tied checkpoint may store lm_head too; the embedding is the one we keep
            state.append(name)
        unexpected = sorted(set(tensors) - used)
        if unexpected:
            raise KeyError(f"{path}: checkpoint tensors not used by the model: {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        for name in state:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            setattr(mod, attr, nn.Parameter(tensors.load(hf_key(name), dtype, device), requires_grad=False))
        if cfg.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        return model.requires_grad_(False)

    def save_pretrained(self, path: str | Path, state: dict | None = None, vocab_size: int | None = None):
        """Write the base weights as an HF directory (config.json + model.safetensors), LoRA excluded.

        Used for bases trained from a preset (lab/pretrain.py): CLaRa checkpoints point at a base directory.
        """
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        c = self.cfg
        family = hf_family(c)
        arch = next(a for a, f in FAMILIES.items() if f == family)
        config = {"architectures": [arch], "model_type": family, "vocab_size": vocab_size or c.vocab_size,
                  "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
                  "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
                  "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "sliding_window": c.sliding_window,
                  "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_id, "eos_token_id": c.eos_id,
                  "hidden_act": "silu", "torch_dtype": str(self.tok_embeddings.weight.dtype).replace("torch.", "")}
        if family != "mistral":  # the keys a plain Mistral config has never carried
            config.update(attention_bias=c.o_bias, use_sliding_window=False,
                          rope_scaling={"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else None)
        if state is None:  # `state`: our parameter names -> tensors, e.g. gathered from FSDP shards
            state = {n: p.detach() for n, p in self.named_parameters() if "lora_" not in n}
        state = {hf_key(n): t.contiguous().cpu() for n, t in state.items()
                 if not (n == "output.weight" and c.tie_embeddings)}
        save_file(state, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps(config, indent=2))

    def add_adapter(self, name: str, cfg: LoRAConfig | None = None, dtype=torch.float32, seed: int | None = None):
        """Add a LoRA adapter on all seven projections of every layer; only adapters are ever trainable."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        if not name.isidentifier():
            raise ValueError(f"adapter name {name!r} must be a Python identifier")
        cfg = cfg or LoRAConfig()
        if seed is not None:
            torch.manual_seed(seed)
        self.adapters[name] = cfg
        for m in self.lora_layers():
            m.add_adapter(name, cfg, dtype)
        return self

    def reset_adapter(self, name: str):
        """Start an adapter afresh: A like nn.Linear, B = 0 (stage 2's new decoder adapter)."""
        with torch.no_grad():
            for m in self.lora_layers():
                nn.init.kaiming_uniform_(m.lora_A[name], a=math.sqrt(5))
                m.lora_B[name].zero_()

    def copy_adapter(self, src: str, dst: str):
        """dst := a copy of src (CLaRa's stage 3 starts the query reasoner from the encoder)."""
        if dst not in self.adapters:
            self.add_adapter(dst, LoRAConfig(**vars(self.adapters[src])))
        with torch.no_grad():
            for m in self.lora_layers():
                m.lora_A[dst].copy_(m.lora_A[src])
                m.lora_B[dst].copy_(m.lora_B[src])

    def lora_layers(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def adapter_parameters(self, name: str):
        """{our parameter name: tensor} of one adapter, e.g. 'layers.0.attention.wq.lora_A.encoder'."""
        return {n: p for n, p in self.named_parameters() if n.endswith(f".lora_A.{name}") or n.endswith(f".lora_B.{name}")}

    def resize_vocab(self, new_size: int, seed: int = 0):
        """Append rows to the embedding and lm_head, initialised near the mean of the existing rows."""
        old = self.cfg.vocab_size
        if new_size < old:
            raise ValueError(f"resize_vocab: cannot shrink the vocabulary from {old} to {new_size}")
        g = torch.Generator(device="cpu").manual_seed(seed)

        def grow(w):
            wf = w.float()
            mean, std = wf.mean(0), wf.std(0)
            noise = torch.randn(new_size - old, w.shape[1], generator=g).to(w.device)
            extra = mean + 0.01 * std * noise  # near the mean, not identical, so the new rows differ
            return nn.Parameter(torch.cat([w.detach(), extra.to(w.dtype)]), requires_grad=False)

        self.tok_embeddings.weight = grow(self.tok_embeddings.weight)
        self.tok_embeddings.num_embeddings = new_size
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        else:
            self.output.weight = grow(self.output.weight)
        self.output.out_features = new_size
        self.cfg.vocab_size = new_size
        return self

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, adapter: str | None = None,
                positions=None, cache: "KVCache | None" = None, output: str = "logits", skip_padding: bool = False):
        """Run the decoder.

        input_ids (B, T) or inputs_embeds (B, T, H); attention_mask (B, T), 1 = token, 0 = (left) padding.
        positions (B, T) defaults to 0..T-1 after what the cache holds (RoPE is relative, so counting
        from the padded row's start or from its first real token gives the same attention scores).
        adapter: the one LoRA adapter active in this call, or None for the bare base model.
        output: "logits" -> (B, T, V) float; "hidden" -> final states after the last RMSNorm, (B, T, H).
        skip_padding: run the projections and MLPs on the real tokens only (packed, N of them), not on the
        padding too: the same numbers at the real positions, zeros at the padded ones (generate's prefill:
        a left-padded batch of prompts of mixed lengths is mostly padding in its short rows).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        key_mask = None
        if cache is not None:
            key_mask = cache.extend_mask(attention_mask, T)  # (B, S) over cache + new tokens
        elif attention_mask is not None:
            key_mask = attention_mask.bool()
            if bool(key_mask.all()):
                key_mask = None  # nothing padded: let attention take its fast causal path
        if output not in ("logits", "hidden"):
            raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype, self.cfg.rope_scaling)
        real = None
        if skip_padding and attention_mask is not None and not bool(attention_mask.bool().all()):
            real = attention_mask.bool()  # (B, T)
            x = x[real]  # (N, H): the real tokens, row after row (Attention unpacks them around attention)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, key_mask, adapter, cache, i, real, use_reentrant=False)
            else:
                x = layer(x, cos, sin, key_mask, adapter, cache, i, real)
        if cache is not None:
            cache.length += T
        h = self.norm(x)  # (B, T, H) or packed (N, H)
        out = h if output == "hidden" else self.output(h).float()
        return out if real is None else _unpack(out, real)  # (B, T, H | V)


# ----------------------------------------------------------------------------------------------------
# Loading safetensors

class _Tensors:
    """Lazy view of one or more safetensors files: key -> shape without reading, load on demand."""

    def __init__(self, files: dict[str, Path]):
        from safetensors import safe_open
        self.files = files  # key -> file
        self.handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in set(files.values())}
        self.shapes = {k: tuple(self.handles[f].get_slice(k).get_shape()) for k, f in files.items()}

    def __contains__(self, key):
        return key in self.files

    def __iter__(self):
        return iter(self.files)

    def load(self, key, dtype, device):
        return self.handles[self.files[key]].get_tensor(key).to(device=device, dtype=dtype)


def read_safetensors(path: Path) -> _Tensors:
    """Index the tensors of `model.safetensors` or of the shards named in `model.safetensors.index.json`."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    from safetensors import safe_open
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = {k: path / f for k, f in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise FileNotFoundError(f"{index}: lists shard {f.name}, which does not exist in {path}")
        # A key in a shard but not in the index would be silently ignored: check the shards agree.
        for f in set(files.values()):
            with safe_open(str(f), framework="pt", device="cpu") as h:
                extra = set(h.keys()) - {k for k, ff in files.items() if ff == f}
                if extra:
                    raise KeyError(f"{f}: tensors not listed in {index.name}: {sorted(extra)[:5]}")
        return _Tensors(files)
    if single.exists():
        with safe_open(str(single), framework="pt", device="cpu") as h:
            return _Tensors({k: single for k in h.keys()})
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors checkpoints are supported)")


# ----------------------------------------------------------------------------------------------------
# KV cache and generation

class KVCache:
    """Preallocated keys and values of every layer, plus the key padding mask of what is cached.

    A static cache, as gpt-fast decodes: the buffers are allocated once for prompt + new tokens and never
    change shape. Two ways in:
      prefill (any call of Transformer.forward with a cache): T tokens are written at slots `length` ..
          `length + T - 1`, attention sees views of the slots up to the last of them, length grows by T;
      decoding (`begin_decoding`, then `decode_step`): one token per step is written with index_copy_ at
          the buffer slot `slot`, a (1,) tensor, so the step has no Python integer that changes from
          token to token; compiled, it attends to the whole buffer with a mask that hides the slots not
          yet written and those outside the sliding window, eager, to a view of the visible slots.
    Rows are left padded, so every row writes the same slot at every step.
    Each layer has its own buffers, not a slice of one (L, ...) tensor: torch.compile writes index_copy_
    into a whole graph input in place, but into a view of one it copies the whole buffer (slots and
    layers it does not touch included) at every step, which made compiled decoding slower than eager."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.mask = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.length = 0  # tokens cached so far (same for every row: padding is on the left)
        self.window = cfg.sliding_window
        # decoding (see begin_decoding): the additive mask (0 = real key, -inf = padding or not written)
        self.bias = torch.full((batch, max_len), float("-inf"), device=device, dtype=dtype)
        self.slot = None  # (1,) long tensor, the slot of the token being decoded
        self.whole_buffer = False  # attend to the whole buffer (compiled) or to a view of the visible slots
        self.slots = torch.arange(max_len, device=device)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reset(self):
        """Empty the cache for a new generation; the buffers are kept (their addresses too)."""
        self.mask.zero_()
        self.length, self.slot = 0, None

    def extend_mask(self, attention_mask, T):
        new = attention_mask.bool() if attention_mask is not None else True
        self.mask[:, self.length:self.length + T] = new
        return self.mask[:, :self.length + T]  # (B, S)

    def update(self, layer, k, v):
        """Store this layer's new keys/values (B, Hkv, T, D); returns the keys/values attention sees."""
        if self.slot is not None:  # decoding one token (gpt-fast's index_copy_ into the static buffer)
            kc, vc = self.k[layer], self.v[layer]  # (B, Hkv, max_len, D)
            kc.index_copy_(2, self.slot, k)
            vc.index_copy_(2, self.slot, v)
            if self.whole_buffer:
                return kc, vc
            start, stop = self._visible()
            return kc[:, :, start:stop], vc[:, :, start:stop]
        T = k.shape[2]
        if self.length + T > self.capacity:
            raise RuntimeError(f"KVCache: {self.length + T} tokens exceed its capacity {self.capacity}")
        kc, vc = self.k[layer], self.v[layer]  # (B, Hkv, max_len, D)
        kc[:, :, self.length:self.length + T] = k
        vc[:, :, self.length:self.length + T] = v
        return kc[:, :, :self.length + T], vc[:, :, :self.length + T]

    def begin_decoding(self, whole_buffer: bool):
        """Switch from prefill to one-token decoding at slot `length` (a tensor from now on)."""
        self.slot = torch.tensor([self.length], device=self.mask.device)
        self.whole_buffer = whole_buffer
        self.bias.fill_(float("-inf")).masked_fill_(self.mask, 0.0)  # in place: the buffer keeps its address

    def _visible(self) -> tuple[int, int]:
        """Eager decoding: the slots the token at `length` sees (its sliding window, itself included)."""
        stop = self.length + 1
        return (0 if self.window is None else max(0, stop - self.window)), stop

    def decode_mask(self) -> torch.Tensor:
        """Make the slot being decoded a real key; the additive mask (B, S) of the keys its token sees. It
        holds causality (slots not yet written are -inf), left padding and the sliding window."""
        self.bias.index_fill_(1, self.slot, 0.0)
        if self.whole_buffer:  # compiled: S = capacity, no Python integer that changes between tokens
            if self.window is not None and self.window < self.capacity:
                return self.bias.masked_fill(self.slots <= self.slot - self.window, float("-inf"))
            return self.bias
        start, stop = self._visible()
        return self.bias[:, start:stop]


def decode_step(model: "Transformer", tok, cos, sin, cache: KVCache, adapter=None) -> torch.Tensor:
    """One token per row through the model at cache.slot: tok (B,), cos/sin (B, 1, 1, D) of its positions
    -> (B, V) float logits. The per-token work of generate; free of host syncs and of Python integers that
    change between tokens when cache.whole_buffer is set, so torch.compile can capture it (CUDA graphs)."""
    x = model.tok_embeddings(tok[:, None])  # (B, 1, H)
    key_mask = cache.decode_mask()
    for i, layer in enumerate(model.layers):
        x = layer(x, cos, sin, key_mask, adapter, cache, i)
    return model.output(model.norm(x[:, -1])).float()


_COMPILED = {}  # torch.compile'd decode_step, one per mode
_STATIC_CACHES = weakref.WeakKeyDictionary()  # model -> {(batch, capacity, dtype, device): KVCache}


def _compiled_decode_step(device):
    mode = "default" if device.type == "cpu" else "reduce-overhead"  # reduce-overhead = CUDA graphs
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED[mode]


def _static_cache(model, batch, capacity, device, dtype) -> KVCache:
    """The cache of compiled generation, kept with the model for the next call of the same shape: the
    compiled step (and its CUDA graph) is specialised to these buffers, new ones would mean a new compile.
    Capacity is rounded up to a multiple of 256 so that prompts of different lengths share one compile."""
    capacity = -(-capacity // 256) * 256
    caches = _STATIC_CACHES.setdefault(model, {})
    key = (batch, capacity, dtype, str(device))
    if key not in caches:
        caches[key] = cache = KVCache(model.cfg, batch, capacity, device, dtype)
        for t in (*cache.k, *cache.v, cache.mask, cache.bias):
            torch._dynamo.mark_static_address(t)
    caches[key].reset()
    return caches[key]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)  # (B, V)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first stays).
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Transformer, input_ids=None, attention_mask=None, inputs_embeds=None,
             max_new_tokens: int = 64, adapter: str | None = None, temperature: float = 0.0,
             top_p: float = 1.0, eos_id=None, generator=None, compile: bool = False) -> list[list[int]]:
    """Batched generation with a KV cache; rows are LEFT padded. Returns each row's new tokens, EOS excluded.

    eos_id: one id or several (a chat model stops at its end-of-turn token and at eos); default cfg.eos_id;
    a negative id: no end token.

    Positions follow the attention mask (the first real token of each row is position 0), as Hugging
    Face's generate does, so results match it for left-padded batches. The prefill skips the padding
    (Transformer.forward's skip_padding): a short prompt in a batch with a long one costs its own tokens.
    compile=True runs the per-token step through torch.compile (CUDA graphs off the CPU) against a cache
    kept for the next call of the same shape: the first call pays the compile, later calls decode faster.
    """
    x = input_ids if inputs_embeds is None else inputs_embeds
    B, T = x.shape[:2]
    device = x.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    eos_id = model.cfg.eos_id if eos_id is None else eos_id
    stops = [i for i in ([eos_id] if isinstance(eos_id, int) else eos_id) if i >= 0]
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)
    eos_id = stops[0] if stops else -1  # what a finished row emits from then on
    dtype = next(model.parameters()).dtype if inputs_embeds is None else inputs_embeds.dtype
    if compile:
        cache, step = _static_cache(model, B, T + max_new_tokens, device, dtype), _compiled_decode_step(device)
    else:
        cache, step = KVCache(model.cfg, B, T + max_new_tokens, device, dtype), decode_step
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    h = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
              adapter=adapter, positions=positions, cache=cache, output="hidden", skip_padding=True)
    logits = model.output(h[:, -1]).float()  # (B, V): only the last position is needed
    # the rotary cos/sin of every decoding step, gathered once: (steps, B, 1, 1, D), one row per step
    steps = positions[:, -1:] + 1 + torch.arange(max(max_new_tokens - 1, 0), device=device)  # (B, steps)
    cos, sin = rope_cos_sin(steps, model.cfg.head_dim, model.cfg.rope_theta, model.tok_embeddings.weight.dtype,
                            model.cfg.rope_scaling)
    cos, sin = (t.permute(2, 0, 1, 3)[..., None, :].contiguous() for t in (cos, sin))  # (B, 1, steps, D) ->
    tokens = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.full((B,), eos_id, dtype=torch.long, device=device)
    cache.begin_decoding(whole_buffer=compile)
    try:
        for n in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_p, generator)  # (B,)
            if stops:
                tok = torch.where(done, eos, tok)
                done |= torch.isin(tok, stop_t)
            tokens.append(tok)
            if n == max_new_tokens - 1 or (stops and bool(done.all())):
                break
            logits = step(model, tok, cos[n], sin[n], cache, adapter)
            if compile:
                logits = logits.clone()  # a CUDA graph's output is overwritten by its next replay
            cache.length += 1
            cache.slot += 1
    finally:
        cache.slot = None
    if not tokens:
        return [[] for _ in range(B)]
    rows = torch.stack(tokens, 1).tolist()
    stop = set(stops)
    return [next((r[:i] for i, t in enumerate(r) if t in stop), r) for r in rows]

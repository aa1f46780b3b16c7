"""A Mistral-compatible decoder-only transformer in plain PyTorch, with named LoRA adapters and generation.

What is here, top to bottom:
  ModelConfig     the shape of the network, read from a Hugging Face `config.json` (Mistral or Llama) or
                  taken from a named preset (`tiny`, `mistral-7b`)
  LoRALinear      a frozen nn.Linear with any number of named low-rank adapters; one is active per call
  Transformer     RMSNorm pre-norm blocks, rotary embeddings (HF rotate-half layout), grouped-query
                  attention through `kernels.attention`, SwiGLU MLP; `from_pretrained` loads HF safetensors
  KVCache         preallocated keys/values for decoding
  generate        batched greedy / temperature + top-p sampling from ids or from input embeddings

What is not here: anything CLaRa-specific (memory tokens, prompts, losses live in clara.py).

The parameter names are our own (short, gpt-fast style); `HF_KEYS` is the one table that maps them to
Hugging Face checkpoint keys, so loading is a pure rename: the rotate-half RoPE layout of HF is kept, and
no q/k permutation is needed.

Shape legend: B batch, T query tokens, S key tokens (cache included), H hidden size, Hq query heads,
Hkv key/value heads, D head dim, V vocabulary, R LoRA rank.
"""
from __future__ import annotations

import json
import math
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
    tie_embeddings: bool = False     # lm_head shares the input embedding matrix (small Llamas)
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
        """Read an HF `config.json` (MistralForCausalLM or LlamaForCausalLM, old or new key style)."""
        path = Path(path)
        try:
            c = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        arch = (c.get("architectures") or [None])[0]
        mtype = c.get("model_type")
        if arch not in ("MistralForCausalLM", "LlamaForCausalLM") and mtype not in ("mistral", "llama"):
            raise ValueError(f"{path}: unsupported architecture {arch!r} (model_type {mtype!r}); "
                             "expected MistralForCausalLM or LlamaForCausalLM")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{path}: hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                raise ValueError(f"{path}: {flag}=true is not supported (Mistral/Llama have no biases)")
        # RoPE: old style has top-level rope_theta (+ rope_scaling), new style a rope_parameters dict.
        rope = c.get("rope_parameters") or {}
        scaling = c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"{path}: rope type {rope_type!r} is not supported (only plain RoPE)")
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        eos = c.get("eos_token_id", 2)
        n_heads = c["num_attention_heads"]
        dim = c["hidden_size"]
        window = c.get("sliding_window") if mtype == "mistral" or arch == "MistralForCausalLM" else None
        return cls(
            vocab_size=c["vocab_size"], dim=dim, n_layers=c["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads,
            head_dim=c.get("head_dim") or dim // n_heads,
            intermediate_size=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), sliding_window=window,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_id=c.get("bos_token_id", 1) if c.get("bos_token_id") is not None else 1,
            eos_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
            dtype=str(c.get("dtype") or c.get("torch_dtype") or "float32"),
        )


PRESETS = {
    # Trains on a laptop CPU in seconds; vocab_size is normally overridden by the tokenizer's size.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 intermediate_size=176, norm_eps=1e-5, rope_theta=10000.0, dtype="float32"),
    # Twice as wide; in the lab probe's figures (BENCHMARKS.md), not used by the lab itself.
    "small": dict(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=32,
                  intermediate_size=384, norm_eps=1e-5, rope_theta=10000.0, dtype="float32"),
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
    can carry fp32 trainable weights) and is cast back to the base's dtype.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
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

    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if adapter is None:
            return y
        if adapter not in self.lora:
            raise KeyError(f"no LoRA adapter named {adapter!r}; this model has {sorted(self.lora)}")
        cfg, A, B = self.lora[adapter], self.lora_A[adapter], self.lora_B[adapter]
        h = F.dropout(x.to(A.dtype), cfg.dropout, self.training)
        return y + (cfg.scale * F.linear(F.linear(h, A), B)).to(y.dtype)


# ----------------------------------------------------------------------------------------------------
# Transformer

class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32 whatever the input dtype (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (B, 1, T, D), in HF's rotate-half layout (the two halves repeat)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the position's angle: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wq = LoRALinear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.wk = LoRALinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wv = LoRALinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wo = LoRALinear(cfg.n_heads * cfg.head_dim, cfg.dim)

    def forward(self, x, cos, sin, key_mask, adapter, cache, layer):
        B, T, _ = x.shape
        D = self.cfg.head_dim
        q = self.wq(x, adapter).view(B, T, -1, D).transpose(1, 2)  # (B, Hq, T, D)
        k = self.wk(x, adapter).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x, adapter).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D), S = cached + T
        # GQA: the kernel maps query head h to kv head h // (Hq / Hkv); K/V are never repeated here.
        y = kernels.attention(q, k, v, causal=True, key_padding_mask=key_mask, window=self.cfg.sliding_window)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1), adapter)  # (B, T, H)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = LoRALinear(cfg.dim, cfg.intermediate_size)
        self.up = LoRALinear(cfg.dim, cfg.intermediate_size)
        self.down = LoRALinear(cfg.intermediate_size, cfg.dim)

    def forward(self, x, adapter):
        return self.down(F.silu(self.gate(x, adapter)) * self.up(x, adapter), adapter)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, key_mask, adapter=None, cache=None, layer=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, key_mask, adapter, cache, layer)
        return x + self.mlp(self.mlp_norm(x), adapter)


# Our parameter name -> HF checkpoint key ("{}" is the layer index).
HF_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.mlp.gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def hf_key(name: str) -> str:
    """Map one of our parameter names to its HF checkpoint key (LoRA parameters have none)."""
    parts = name.split(".")
    if parts[0] == "layers":
        return HF_KEYS["layers.{}." + ".".join(parts[2:])].format(parts[1])
    return HF_KEYS[name]


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
        """Load an HF Mistral/Llama directory: config.json + model.safetensors or sharded safetensors.

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

        Used for models trained from a preset (the CPU lab): CLaRa checkpoints point at a base directory.
        """
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        c = self.cfg
        config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": vocab_size or c.vocab_size,
                  "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
                  "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
                  "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "sliding_window": c.sliding_window,
                  "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_id, "eos_token_id": c.eos_id,
                  "hidden_act": "silu", "torch_dtype": str(self.tok_embeddings.weight.dtype).replace("torch.", "")}
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
                positions=None, cache: "KVCache | None" = None, output: str = "logits"):
        """Run the decoder.

        input_ids (B, T) or inputs_embeds (B, T, H); attention_mask (B, T), 1 = token, 0 = (left) padding.
        positions (B, T) defaults to 0..T-1 after what the cache holds (RoPE is relative, so counting
        from the padded row's start or from its first real token gives the same attention scores).
        adapter: the one LoRA adapter active in this call, or None for the bare base model.
        output: "logits" -> (B, T, V) float; "hidden" -> final states after the last RMSNorm, (B, T, H).
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
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, key_mask, adapter, cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, key_mask, adapter, cache, i)
        if cache is not None:
            cache.length += T
        h = self.norm(x)
        if output == "hidden":
            return h
        if output != "logits":
            raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
        return self.output(h).float()


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
    """Preallocated keys and values of every layer, plus the key padding mask of what is cached."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.mask = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.length = 0  # tokens cached so far (same for every row: padding is on the left)

    def extend_mask(self, attention_mask, T):
        new = attention_mask.bool() if attention_mask is not None else True
        self.mask[:, self.length:self.length + T] = new
        return self.mask[:, :self.length + T]  # (B, S)

    def update(self, layer, k, v):
        T = k.shape[2]
        if self.length + T > self.k.shape[3]:
            raise RuntimeError(f"KVCache: {self.length + T} tokens exceed its capacity {self.k.shape[3]}")
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        return self.k[layer, :, :, :self.length + T], self.v[layer, :, :, :self.length + T]


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
             top_p: float = 1.0, eos_id=None, generator=None) -> list[list[int]]:
    """Batched generation with a KV cache; rows are LEFT padded. Returns each row's new tokens, EOS excluded.

    eos_id: one id or several (a chat model stops at its end-of-turn token and at eos); default cfg.eos_id.

    Positions follow the attention mask (the first real token of each row is position 0), as Hugging
    Face's generate does, so results match it for left-padded batches.
    """
    x = input_ids if inputs_embeds is None else inputs_embeds
    B, T = x.shape[:2]
    device = x.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    eos_id = model.cfg.eos_id if eos_id is None else eos_id
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)
    eos_id = int(stops[0])  # what a finished row emits from then on
    dtype = next(model.parameters()).dtype if inputs_embeds is None else inputs_embeds.dtype
    cache = KVCache(model.cfg, B, T + max_new_tokens, device, dtype)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    h = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
              adapter=adapter, positions=positions, cache=cache, output="hidden")
    logits = model.output(h[:, -1]).float()  # (B, V): only the last position is needed
    pos = positions[:, -1:] + 1  # (B, 1)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    one = torch.ones(B, 1, dtype=torch.long, device=device)
    n = 0
    for n in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, generator)  # (B,)
        tok = torch.where(done, torch.full_like(tok, eos_id), tok)
        out[:, n] = tok
        done |= torch.isin(tok, stops)
        if bool(done.all()) or n == max_new_tokens - 1:
            break
        logits = model(input_ids=tok[:, None], attention_mask=one, adapter=adapter, positions=pos, cache=cache)[:, -1]
        pos = pos + 1
    rows = out[:, :n + 1].tolist()
    stop = set(stops.tolist())
    return [next((r[:i] for i, t in enumerate(r) if t in stop), r) for r in rows]

"""model.py against Hugging Face transformers on tiny random checkpoints built offline.

Tolerance: fp32 logits within 1e-5 (absolute) of transformers' on the same weights.
"""
import json

import pytest
import torch

from conftest import write_hf_model
from model import KVCache, LoRAConfig, ModelConfig, Transformer, generate

ATOL = 1e-5


def left_pad(rows, pad_id=1):
    """List of id lists -> (ids, mask), left padded."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture(scope="module", params=["mistral", "llama"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = write_hf_model(path, arch=request.param)
    ours = Transformer.from_pretrained(path, dtype=torch.float32).eval()
    return hf, ours, path


def test_config_fields(pair):
    _, ours, _ = pair
    if ours.cfg.tie_embeddings:  # the Llama fixture: tied, explicit head_dim 24 != 64 / 4
        assert ours.cfg.head_dim == 24 and ours.output.weight is ours.tok_embeddings.weight
        assert ours.cfg.sliding_window is None
    else:  # the Mistral fixture: GQA 4/2 heads, sliding window 8 shorter than the test sequences
        assert ours.cfg.sliding_window == 8 and ours.cfg.n_kv_heads == 2


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(3, 300, (2, 21))  # longer than the sliding window (8)
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert out.shape == (2, 21, 300)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_left_padded_batch(pair):
    hf, ours, _ = pair
    rows = [torch.randint(3, 300, (n,)).tolist() for n in (17, 9, 13)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask).logits
        for b, r in enumerate(rows):
            alone = ours(torch.tensor([r]))[0]
            n = len(r)
            # the same row unpadded gives the same logits at its real positions
            torch.testing.assert_close(out[b, -n:], alone, atol=ATOL, rtol=0)
            torch.testing.assert_close(out[b, -n:], ref[b, -n:], atol=ATOL, rtol=0)
    assert torch.isfinite(out).all()


def test_inputs_embeds_and_hidden(pair):
    hf, ours, _ = pair
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        emb = ours.tok_embeddings(ids)
        torch.testing.assert_close(ours(inputs_embeds=emb), ours(ids), atol=0, rtol=0)
        h = ours(ids, output="hidden")
        ref = hf.model(ids).last_hidden_state  # after the final norm
        torch.testing.assert_close(h, ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="exactly one"):
        ours(ids, inputs_embeds=emb)


def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    rows = [torch.randint(3, 300, (n,)).tolist() for n in (7, 12)]
    ids, mask = left_pad(rows)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=2,
                      pad_token_id=1)[:, ids.shape[1]:].tolist()
    ref = [r[:r.index(2)] if 2 in r else r for r in ref]
    out = generate(ours, ids, mask, max_new_tokens=20, eos_id=2)
    assert out == ref
    assert sum(map(len, out)) >= 20  # the comparison covers real decoding steps, not an early EOS


def test_generation_from_embeddings_equals_ids(pair):
    _, ours, _ = pair
    ids, mask = left_pad([torch.randint(3, 300, (n,)).tolist() for n in (5, 11)])
    a = generate(ours, ids, mask, max_new_tokens=8)
    b = generate(ours, inputs_embeds=ours.tok_embeddings(ids), attention_mask=mask, max_new_tokens=8)
    assert a == b


def test_kv_cache_decoding_equals_full_forward(pair):
    _, ours, _ = pair
    ids, mask = left_pad([torch.randint(3, 300, (n,)).tolist() for n in (14, 10)])
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = KVCache(ours.cfg, 2, ids.shape[1], "cpu", torch.float32)
        parts = [ours(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
        for t in range(6, ids.shape[1]):  # then one token at a time
            parts.append(ours(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache))
    inc = torch.cat(parts, 1)
    real = mask.bool()
    torch.testing.assert_close(inc[real], full[real], atol=ATOL, rtol=0)


def test_sampling_is_seeded_and_respects_top_p(pair):
    _, ours, _ = pair
    ids = torch.randint(3, 300, (2, 6))
    g = lambda: torch.Generator().manual_seed(3)
    a = generate(ours, ids, max_new_tokens=6, temperature=1.0, top_p=0.9, generator=g())
    b = generate(ours, ids, max_new_tokens=6, temperature=1.0, top_p=0.9, generator=g())
    assert a == b
    # top_p -> 0 keeps only the most likely token: sampling becomes greedy
    assert generate(ours, ids, max_new_tokens=6, temperature=1.0, top_p=1e-9, generator=g()) == \
        generate(ours, ids, max_new_tokens=6)


def test_stops_at_eos_per_row(pair):
    _, ours, _ = pair
    ids = torch.randint(3, 300, (2, 6))
    free = generate(ours, ids, max_new_tokens=5)
    # declare row 0's third token to be EOS: row 0 stops at its first occurrence, row 1 goes on unless it meets it
    eos = free[0][2]
    out = generate(ours, ids, max_new_tokens=5, eos_id=eos)
    assert out[0] == free[0][:free[0].index(eos)]
    assert out[1] == (free[1][:free[1].index(eos)] if eos in free[1] else free[1])


def test_sharded_checkpoint(tmp_path):
    hf = write_hf_model(tmp_path, shard=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_dtype_and_meta_free(pair):
    _, _, path = pair
    m = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
    assert not any(p.requires_grad for p in m.parameters())


# -- LoRA -----------------------------------------------------------------------------------------

def test_lora_zero_b_is_identity_and_switching(pair):
    _, ours, _ = pair
    ours.add_adapter("enc", LoRAConfig(rank=4, alpha=8, dropout=0.0))
    ours.add_adapter("dec", LoRAConfig(rank=2, alpha=2, dropout=0.0))
    try:
        ids = torch.randint(3, 300, (2, 8))
        with torch.no_grad():
            base = ours(ids)
            torch.testing.assert_close(ours(ids, adapter="enc"), base, atol=0, rtol=0)  # B = 0
            for m in ours.lora_layers():
                m.lora_B["enc"].normal_()
            enc = ours(ids, adapter="enc")
            assert (enc - base).abs().max() > 1e-3
            torch.testing.assert_close(ours(ids, adapter="dec"), base, atol=0, rtol=0)  # other adapter untouched
            torch.testing.assert_close(ours(ids), base, atol=0, rtol=0)  # no adapter = base
            # the adapter computes y = W x + (alpha / r) B A x on one projection
            wq = ours.layers[0].attention.wq
            x = torch.randn(3, wq.in_features)
            ref = x @ wq.weight.T + 2.0 * (x @ wq.lora_A["enc"].T) @ wq.lora_B["enc"].T
            torch.testing.assert_close(wq(x, "enc"), ref, atol=1e-5, rtol=1e-5)
        # trainable parameters are exactly the adapters: 7 projections x 2 matrices x layers x adapters
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert len(trainable) == 7 * 2 * ours.cfg.n_layers * 2
        assert set(ours.adapter_parameters("enc")) == {n for n in trainable if n.endswith(".enc")}
        # gradients reach only the active adapter
        ours(ids, adapter="enc").sum().backward()
        for n, p in ours.named_parameters():
            if n.endswith(".enc"):
                assert p.grad is not None
            else:
                assert p.grad is None, n
        with pytest.raises(KeyError, match="no LoRA adapter named 'zzz'"):
            ours(ids, adapter="zzz")
    finally:  # the fixture is shared by other tests: leave it as it was
        for m in ours.lora_layers():
            for name in ("enc", "dec"):
                del m.lora_A[name], m.lora_B[name], m.lora[name]
        ours.adapters.clear()


def test_lora_init_and_copy():
    m = Transformer(ModelConfig.from_preset("tiny")).init_weights()
    m.requires_grad_(False)
    m.add_adapter("encoder", LoRAConfig(rank=8, alpha=16, dropout=0.1))
    wq = m.layers[0].attention.wq
    A, B = wq.lora_A["encoder"], wq.lora_B["encoder"]
    assert A.shape == (8, 64) and B.shape == (64, 8) and (B == 0).all()
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64 = nn.Linear's U(-1/sqrt(in), 1/sqrt(in))
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
    m.copy_adapter("encoder", "query")
    for layer in m.lora_layers():
        assert torch.equal(layer.lora_A["query"], layer.lora_A["encoder"])
        assert layer.lora_A["query"].data_ptr() != layer.lora_A["encoder"].data_ptr()
    # dropout is active only in training mode
    ids = torch.randint(0, 512, (1, 5))
    for layer in m.lora_layers():
        layer.lora_B["encoder"].data.normal_()
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(ids, adapter="encoder"), m(ids, adapter="encoder"))
        m.train()
        assert not torch.equal(m(ids, adapter="encoder"), m(ids, adapter="encoder"))


def test_lora_layers_are_the_hf_projection_table():
    """model.HF_PROJ names every LoRALinear of a block (and nothing else): it is the source of the HF keys of
    the projections and of the official adapter keys (clara.OFFICIAL_PROJ), so a layer missing from it would
    load nothing from an HF checkpoint or an official release."""
    import clara
    from model import HF_KEYS, HF_PROJ, LoRALinear
    m = Transformer(ModelConfig.from_preset("tiny"))
    lora = {n for n, mod in m.layers[0].named_modules() if isinstance(mod, LoRALinear)}
    assert lora == set(HF_PROJ) and len(lora) == 7
    assert HF_KEYS["layers.{}.mlp.gate.weight"] == "model.layers.{}.mlp.gate_proj.weight"
    assert HF_KEYS["layers.{}.attention.wo.bias"] == "model.layers.{}.self_attn.o_proj.bias"
    assert "layers.{}.mlp.up.bias" not in HF_KEYS  # the MLP has no biases in any supported family
    assert clara.official_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight", "encoder") \
        == "layers.3.attention.wq.lora_A.encoder"
    assert clara.official_key("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight", "query") \
        == "layers.0.mlp.down.lora_B.query"


def test_activation_checkpointing_same_gradients():
    m = Transformer(ModelConfig.from_preset("tiny")).init_weights()
    m.requires_grad_(False).add_adapter("a", LoRAConfig(dropout=0.0))
    for layer in m.lora_layers():
        layer.lora_B["a"].data.normal_(0, 0.02)
    ids = torch.randint(0, 512, (2, 12))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.activation_checkpointing = ckpt
        m.train()(ids, adapter="a").logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_resize_vocab():
    m = Transformer(ModelConfig.from_preset("tiny")).init_weights()
    old = m.tok_embeddings.weight.clone()
    m.resize_vocab(520)
    w = m.tok_embeddings.weight
    assert w.shape == (520, 64) and m.output.weight.shape == (520, 64) and m.cfg.vocab_size == 520
    assert torch.equal(w[:512], old)
    assert (w[512:] - old.mean(0)).abs().max() < 0.01  # near the mean of the old rows
    assert m(torch.tensor([[515]])).shape == (1, 1, 520)


# -- configs and bad input -------------------------------------------------------------------------

def test_old_style_config(tmp_path):
    """Real Mistral checkpoints carry top-level rope_theta / torch_dtype (older transformers)."""
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
           "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000,
           "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = ModelConfig.from_hf(tmp_path / "config.json")
    assert c == ModelConfig.from_preset("mistral-7b")


def test_presets():
    assert ModelConfig.from_preset("tiny", vocab_size=100).vocab_size == 100
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="no field"):
        ModelConfig.from_preset("tiny", hidden=3)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(tmp_path / "empty")
    d = tmp_path / "m"
    write_hf_model(d)
    cfg = json.loads((d / "config.json").read_text())
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        Transformer.from_pretrained(bad)
    # the weights disagree with the config: a mis-shaped tensor is named
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    (wrong / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="mlp.gate_proj.weight' has shape"):
        Transformer.from_pretrained(wrong)
    # a missing tensor and an unexpected tensor are named
    from safetensors.torch import load_file, save_file
    sd = load_file(d / "model.safetensors")
    (wrong / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, wrong / "model.safetensors")
    with pytest.raises(KeyError, match="no tensor 'model.norm.weight'"):
        Transformer.from_pretrained(wrong)
    save_file({**sd, "model.extra.weight": torch.zeros(2)}, wrong / "model.safetensors")
    with pytest.raises(KeyError, match="model.extra.weight"):
        Transformer.from_pretrained(wrong)
    (wrong / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(wrong)


def test_activation_checkpointing_really_saves_memory():
    """With checkpointing, only each block's input is kept for backward, not its intermediate activations."""
    m = Transformer(ModelConfig.from_preset("tiny", n_layers=4)).init_weights()
    m.requires_grad_(False).add_adapter("a", LoRAConfig(dropout=0.0))
    ids = torch.randint(0, 512, (2, 32))

    def saved_bytes(ckpt):
        m.activation_checkpointing = ckpt
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m.train()(ids, adapter="a").sum()
        return total[0]
    plain, ckpt = saved_bytes(False), saved_bytes(True)
    assert ckpt < 0.5 * plain, (ckpt, plain)


# -- more of the family: Llama-3 RoPE scaling, Qwen2 (q/k/v biases), Qwen3 (q/k norms) ------------------

@pytest.fixture(scope="module", params=["llama3", "qwen2", "qwen3"])
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = write_hf_model(path, arch=request.param)
    ours = Transformer.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, hf, ours, path


def test_family_config_and_parameters(family):
    arch, _, ours, _ = family
    c = ours.cfg
    attn = ours.layers[0].attention
    expect = {"llama3": dict(qkv_bias=True, o_bias=True, qk_norm=False, tie_embeddings=False, head_dim=16),
              "qwen2": dict(qkv_bias=True, o_bias=False, qk_norm=False, tie_embeddings=True, head_dim=16),
              "qwen3": dict(qkv_bias=False, o_bias=False, qk_norm=True, tie_embeddings=False, head_dim=24)}[arch]
    assert {k: getattr(c, k) for k in expect} == expect
    assert (attn.wq.bias is not None) == c.qkv_bias and (attn.wo.bias is not None) == c.o_bias
    assert isinstance(attn.q_norm, torch.nn.Identity) != c.qk_norm
    assert (ours.output.weight is ours.tok_embeddings.weight) == c.tie_embeddings
    assert c.sliding_window is None
    if arch == "llama3":
        assert c.rope_scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64} and c.rope_theta == 500000.0
    else:
        assert c.rope_scaling is None


def test_family_logits_match_transformers(family):
    _, hf, ours, _ = family
    ids = torch.randint(3, 300, (2, 30))
    rows = [torch.randint(3, 300, (n,)).tolist() for n in (17, 9, 13)]
    pids, mask = left_pad(rows)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)
        out, ref = ours(pids, attention_mask=mask), hf(pids, attention_mask=mask).logits
        for b, r in enumerate(rows):
            n = len(r)
            torch.testing.assert_close(out[b, -n:], ref[b, -n:], atol=ATOL, rtol=0)
            torch.testing.assert_close(out[b, -n:], ours(torch.tensor([r]))[0], atol=ATOL, rtol=0)


def test_family_greedy_generation_matches_transformers(family):
    _, hf, ours, _ = family
    test_greedy_generation_matches_transformers((hf, ours, None))


def test_family_lora_on_biased_and_normed_projections(family):
    """LoRA adds B A x on top of the frozen W x + b; biases and q/k norms are base weights, never trained."""
    arch, _, ours, _ = family
    m = Transformer(ours.cfg).init_weights(seed=1, std=0.1)  # a copy: the fixture stays adapter-free
    m.load_state_dict(ours.state_dict())
    m.requires_grad_(False).add_adapter("enc", LoRAConfig(rank=4, alpha=8, dropout=0.0))
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        base = m(ids)
        torch.testing.assert_close(m(ids, adapter="enc"), base, atol=0, rtol=0)  # B = 0
        for layer in m.lora_layers():
            layer.lora_B["enc"].normal_(0, 0.1)
        wq = m.layers[0].attention.wq
        x = torch.randn(3, wq.in_features)
        bias = wq.bias if wq.bias is not None else 0.0
        ref = x @ wq.weight.T + bias + 2.0 * (x @ wq.lora_A["enc"].T) @ wq.lora_B["enc"].T
        torch.testing.assert_close(wq(x, "enc"), ref, atol=1e-5, rtol=1e-5)
    m.train()(ids, adapter="enc").logsumexp(-1).mean().backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == n.endswith(".enc"), n
        if n.endswith("lora_A.enc"):
            assert p.grad.abs().sum() > 0, n
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert len(trainable) == 7 * 2 * m.cfg.n_layers
    base_names = {n for n, _ in m.named_parameters() if "lora_" not in n}
    assert any(n.endswith(".bias") for n in base_names) == m.cfg.qkv_bias
    assert any("q_norm" in n for n in base_names) == m.cfg.qk_norm


def test_family_save_pretrained_round_trip(family, tmp_path):
    """save_pretrained writes the family's own config: transformers and we read back the same network."""
    import transformers
    arch, hf, ours, _ = family
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == ("llama" if arch == "llama3" else arch)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(Transformer.from_pretrained(tmp_path, dtype=torch.float32)(ids), ours(ids),
                                   atol=0, rtol=0)


def test_llama3_rope_frequencies_equal_transformers(tmp_path):
    """Bit-identical inverse frequencies, and the fixture really exercises the three regimes of the scaling."""
    from model import rope_inv_freq
    hf = write_hf_model(tmp_path, arch="llama3")
    c = ModelConfig.from_hf(tmp_path / "config.json")
    scaled = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    assert torch.equal(scaled, hf.model.rotary_emb.inv_freq)
    plain = rope_inv_freq(c.head_dim, c.rope_theta)
    ratio = plain / scaled  # 1 = kept (high frequency), 8 = divided (low), in between = smoothed
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1.01) & (ratio < 7.99)).any()


# Real configs as published (old key style: top-level rope_theta, rope_scaling), abridged to what is read.
REAL_CONFIGS = {
    "Llama-3.2-1B": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                      "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
                      "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
                      "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 16,
                      "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                      "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                      "vocab_size": 128256},
                     dict(qkv_bias=False, qk_norm=False, tie_embeddings=True, head_dim=64, rope_theta=500000.0,
                          rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192})),
    "Qwen2.5-0.5B-Instruct": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 151643,
                               "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896,
                               "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
                               "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
                               "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768,
                               "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
                               "vocab_size": 151936},
                              dict(qkv_bias=True, o_bias=False, qk_norm=False, tie_embeddings=True, head_dim=64,
                                   sliding_window=None, rope_scaling=None, eos_id=151645)),
    "Qwen3-0.6B": ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
                    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
                    "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960,
                    "max_window_layers": 28, "num_attention_heads": 16, "num_hidden_layers": 28,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000,
                    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                    "use_sliding_window": False, "vocab_size": 151936},
                   dict(qkv_bias=False, o_bias=False, qk_norm=True, head_dim=128, rope_theta=1e6, rope_scaling=None)),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_family_configs(name, tmp_path):
    config, expect = REAL_CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    c = ModelConfig.from_hf(tmp_path / "config.json")
    assert {k: getattr(c, k) for k in expect} == expect


def test_unsupported_family_features(tmp_path):
    """Each unsupported architecture or setting is one error naming config.json and the key."""
    base = REAL_CONFIGS["Llama-3.2-1B"][0]
    qwen = REAL_CONFIGS["Qwen2.5-0.5B-Instruct"][0]
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cases = [
        ({**base, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"},
         r"config\.json: unsupported architecture 'Gemma2ForCausalLM' \(model_type 'gemma2'\)"),
        ({**base, "architectures": None, "model_type": "phi3"}, r"config\.json: unsupported architecture None"),
        ({**base, "rope_scaling": yarn}, r"config\.json: rope_scaling\.rope_type 'yarn' is not supported"),
        ({**base, "rope_scaling": {"type": "linear", "factor": 2.0}},
         r"config\.json: rope_scaling\.rope_type 'linear' is not supported"),
        ({**base, "rope_scaling": None, "rope_parameters": {**yarn, "rope_theta": 1e4}},
         r"config\.json: rope_parameters\.rope_type 'yarn' is not supported"),
        ({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
         r"config\.json: rope_scaling of rope_type 'llama3' lacks 'high_freq_factor'"),
        ({**base, "partial_rotary_factor": 0.5}, r"config\.json: partial_rotary_factor 0\.5 is not supported"),
        ({**base, "mlp_bias": True}, r"config\.json: mlp_bias=true is not supported"),
        ({**qwen, "use_sliding_window": True}, r"config\.json: use_sliding_window=true is not supported"),
        ({**qwen, "layer_types": ["sliding_attention"] * 24}, r"config\.json: layer_types \['sliding_attention'\]"),
    ]
    for config, message in cases:
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_hf(tmp_path / "config.json")


# -- the lean backward (LoRALinear.save_less, MLP.save_less) ---------------------------------------------

def _set_save_less(model, on: bool):
    for m in model.modules():
        if hasattr(m, "save_less"):
            m.save_less = on


@pytest.mark.parametrize("train_base", [False, True])
def test_save_less_same_numbers_fewer_bytes(train_base):
    """The lean LoRA / SwiGLU backward: the same forward bit for bit (dropout masks included), the same
    gradients within fp32 rounding, and fewer bytes kept for backward than plain autograd."""
    cfg = ModelConfig.from_preset("tiny", qkv_bias=True)  # biases on q/k/v: the frozen part of W x + b
    m = Transformer(cfg).init_weights(seed=0, std=0.1)
    m.requires_grad_(train_base).add_adapter("a", LoRAConfig(rank=4, alpha=8, dropout=0.1))
    for layer in m.lora_layers():
        layer.lora_B["a"].data.normal_(0, 0.1)
    ids = torch.randint(0, 512, (2, 12))
    runs = []
    for lean in (False, True):
        _set_save_less(m, lean)
        m.zero_grad()
        saved, seen = [0], {p.untyped_storage().data_ptr() for p in m.parameters()}

        def pack(t):  # activation bytes: each storage once, the weights themselves not counted
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                saved[0] += t.untyped_storage().nbytes()
            return t
        torch.manual_seed(5)  # the same dropout masks in both runs
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m.train()(ids, adapter="a")
        out.logsumexp(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        runs.append((out.detach(), grads, saved[0]))
    (out0, g0, b0), (out1, g1, b1) = runs
    torch.testing.assert_close(out1, out0, atol=0, rtol=0)
    assert set(g1) == set(g0) and len(g0) == (len(list(m.parameters())) if train_base else 7 * 2 * cfg.n_layers)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)
    assert b1 < 0.75 * b0, (b1, b0)
    _set_save_less(m, True)


def test_save_less_bf16_base_fp32_adapters():
    """A bf16 base with fp32 adapters: the same forward bits as plain autograd, and adapter gradients no
    further from an fp32 reference than plain autograd's (bf16 rounds the sums of the branches' gradients
    in whatever order they arrive, so the two bf16 runs differ in the last bits)."""
    ref = Transformer(ModelConfig.from_preset("tiny")).init_weights(seed=0, std=0.1)
    ref.requires_grad_(False).add_adapter("a", LoRAConfig(rank=4, alpha=8, dropout=0.1))
    for layer in ref.lora_layers():
        layer.lora_B["a"].data.normal_(0, 0.1)
    m = Transformer(ModelConfig.from_preset("tiny")).to(torch.bfloat16)
    m.requires_grad_(False).add_adapter("a", LoRAConfig(rank=4, alpha=8, dropout=0.1))
    m.load_state_dict(ref.state_dict())  # bf16 base (rounded), the same fp32 adapters
    ref.load_state_dict(m.state_dict())  # the reference: those rounded weights, computed in fp32
    ids = torch.randint(0, 512, (2, 10))

    def run(model, lean):
        _set_save_less(model, lean)
        model.zero_grad()
        torch.manual_seed(2)  # the same dropout masks everywhere
        out = model.train()(ids, adapter="a")
        out.float().logsumexp(-1).mean().backward()
        _set_save_less(model, True)
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    (o_plain, g_plain), (o_lean, g_lean), (_, g_ref) = run(m, False), run(m, True), run(ref, False)
    torch.testing.assert_close(o_lean, o_plain, atol=0, rtol=0)
    for p, l, r in zip(g_plain, g_lean, g_ref):
        assert l.dtype == torch.float32
        assert (l - r).abs().max() <= 2 * (p - r).abs().max() + 1e-6


def test_static_whole_buffer_decoding_equals_eager(pair, monkeypatch):
    """generate(compile=True)'s decoding (whole static buffer, slot tensor, additive mask with the sliding
    window folded in, a cache reused across calls) without the compiler: the same tokens as the default."""
    import model as M
    _, ours, _ = pair
    monkeypatch.setattr(M, "_compiled_decode_step", lambda device: M.decode_step)
    for lengths in [(7, 12), (3, 12)]:  # the second call reuses (and must reset) the first call's cache
        ids, mask = left_pad([torch.randint(3, 300, (n,)).tolist() for n in lengths])
        want = generate(ours, ids, mask, max_new_tokens=14, eos_id=-1)
        assert generate(ours, ids, mask, max_new_tokens=14, eos_id=-1, compile=True) == want
    assert len(M._STATIC_CACHES[ours]) == 1  # one shape (capacity rounded up), one cache


@pytest.mark.slow
def test_compiled_generation_is_token_identical(pair):
    """torch.compile of the per-token step (CPU: inductor; on a GPU it would also capture a CUDA graph)."""
    _, ours, _ = pair
    ids, mask = left_pad([torch.randint(3, 300, (n,)).tolist() for n in (5, 9)])
    want = generate(ours, ids, mask, max_new_tokens=10, eos_id=-1)
    assert generate(ours, ids, mask, max_new_tokens=10, eos_id=-1, compile=True) == want
    assert generate(ours, ids, mask, max_new_tokens=10, eos_id=-1, compile=True) == want  # cached compile


# -- the fast paths of inference against the plain formulas ----------------------------------------------

TIGHT = 1e-6  # fp32 rounding of the same operations in another order

@pytest.mark.parametrize("variant", [dict(), dict(qkv_bias=True, o_bias=True), dict(qk_norm=True),
                                     dict(sliding_window=4)])
@pytest.mark.parametrize("adapter", [None, "a"])
def test_skip_padding_equals_padded_forward(variant, adapter):
    """skip_padding (generate's prefill: projections and MLPs on the real tokens only) gives the padded
    forward's numbers at the real positions, zeros at the padding; with a cache, the same keys and values
    at every real slot and the same decoding after it. Within 1e-6, not bit for bit: a matmul over fewer
    rows may take another BLAS kernel, which rounds the same row differently (seen: 1 ulp of a logit)."""
    m = Transformer(ModelConfig.from_preset("tiny", **variant)).init_weights(seed=0, std=0.1).eval()
    m.add_adapter("a", LoRAConfig(rank=4, alpha=8))
    for layer in m.lora_layers():
        layer.lora_B["a"].data.normal_(0, 0.1)
    ids, mask = left_pad([torch.randint(3, 500, (n,)).tolist() for n in (9, 3, 6)])
    real = mask.bool()
    with torch.no_grad():
        for output in ("logits", "hidden"):
            plain = m(ids, attention_mask=mask, adapter=adapter, output=output)
            fast = m(ids, attention_mask=mask, adapter=adapter, output=output, skip_padding=True)
            torch.testing.assert_close(fast[real], plain[real], atol=TIGHT, rtol=0)
            assert (fast[~real] == 0).all()
        caches = [KVCache(m.cfg, 3, ids.shape[1] + 1, "cpu", torch.float32) for _ in range(2)]
        outs = [m(ids, attention_mask=mask, adapter=adapter, cache=c, skip_padding=s)
                for c, s in zip(caches, (False, True))]
        torch.testing.assert_close(outs[1][real], outs[0][real], atol=TIGHT, rtol=0)
        for kp, kf in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
            torch.testing.assert_close(kf[:, :, :ids.shape[1]].transpose(1, 2)[real],
                                       kp[:, :, :ids.shape[1]].transpose(1, 2)[real], atol=TIGHT, rtol=0)
        nxt = torch.randint(3, 500, (3, 1))
        steps = [m(nxt, attention_mask=torch.ones(3, 1), adapter=adapter, cache=c) for c in caches]
        torch.testing.assert_close(steps[1], steps[0], atol=TIGHT, rtol=0)  # padded slots stay unseen
        # nothing padded: skip_padding is a no-op
        torch.testing.assert_close(m(ids, adapter=adapter, skip_padding=True), m(ids, adapter=adapter),
                                   atol=TIGHT, rtol=0)


@pytest.mark.parametrize("adapter", [None, "a"])
def test_generate_equals_plain_recomputation(adapter):
    """generate (packed prefill, static cache, decode_step) against the plainest greedy loop: the whole
    sequence through Transformer.forward at every step, no cache. Identical tokens, and the first step's
    logits within fp32 rounding (the two attend over different key counts)."""
    m = Transformer(ModelConfig.from_preset("tiny", sliding_window=6, qkv_bias=True)).init_weights(seed=3, std=0.1)
    m.eval().add_adapter("a", LoRAConfig(rank=4, alpha=8))
    for layer in m.lora_layers():
        layer.lora_B["a"].data.normal_(0, 0.1)
    ids, mask = left_pad([torch.randint(3, 500, (n,)).tolist() for n in (11, 4, 7)])
    out = generate(m, ids, mask, max_new_tokens=12, adapter=adapter, eos_id=-1)
    seq, sm = ids, mask
    with torch.no_grad():
        for _ in range(12):
            pos = (sm.cumsum(-1) - 1).clamp(min=0)
            nxt = m(seq, attention_mask=sm, adapter=adapter, positions=pos)[:, -1].argmax(-1, keepdim=True)
            seq, sm = torch.cat([seq, nxt], 1), torch.cat([sm, torch.ones_like(nxt)], 1)
    assert out == seq[:, ids.shape[1]:].tolist()


def test_rope_and_rmsnorm_equal_their_formulas():
    """apply_rope (a roll with the signed sine) is HF's x*cos + rotate_half(x)*sin bit for bit, and
    RMSNorm (through F.rms_norm) is w * (x * rsqrt(mean(x^2) + eps)) bit for bit, gradients too, in
    fp32 and bf16."""
    from model import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
    pos = torch.tensor([[0, 3, 7, 100]])
    cos, sin = rope_cos_sin(pos, 16, 10000.0, torch.float32)
    angles = pos.float()[..., None] * rope_inv_freq(16, 10000.0)
    angles = torch.cat([angles, angles], -1)[:, None]  # (1, 1, T, D) as HF builds them
    x = torch.randn(1, 3, 4, 16)
    x1, x2 = x.chunk(2, -1)
    ref = x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()
    assert torch.equal(cos, angles.cos()) and torch.equal(apply_rope(x, cos, sin), ref)
    for dtype in (torch.float32, torch.bfloat16):
        norm = RMSNorm(32, 1e-5).to(dtype)
        norm.weight.data.normal_(1, 0.1)
        x = torch.randn(3, 5, 32, dtype=dtype, requires_grad=True)
        xf = x.float()
        ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        out = norm(x)
        assert torch.equal(out, ref)
        g = torch.randn_like(out)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (x, norm.weight), g),
                                                      torch.autograd.grad(ref, (x, norm.weight), g)))

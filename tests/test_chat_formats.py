"""The model's own conventions: bos / eos / pad / end-of-turn and the chat format from its tokenizer files,
and text that is never control (a document or question spelling "<MEM0>" or "</s>" stays text).

References: the chat templates of the real checkpoints (ChatML as SmolLM2 / Qwen write it, Llama-3's
header template) rendered with jinja2, and the Mistral golden strings of the official prompts. The
tokenizers are built offline: a byte-level BPE with ChatML (or Llama-3) special tokens, like SmolLM2's.
"""
import json

import jinja2
import pytest
import torch

from clara import SYSTEM_ANSWER, SYSTEM_QA, Clara, ClaraConfig, build_prompt
from conftest import CORPUS, adamw_steps
from data import CHAT_FORMATS, MISTRAL, Prompt, Tokenizer
from model import ModelConfig, Transformer

# The templates as the checkpoints ship them (SmolLM2-Instruct's ChatML, Llama-3-Instruct's headers).
CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
                   "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
                   " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
SPECIALS = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"]}
CONFIGS = {"chatml": dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                          chat_template=CHATML_TEMPLATE),
           "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)}
CFG = dict(doc_max_length=16, compr_rate=4, generation_top_k=2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
           max_len=256)
DOCS = ["Paris is the capital of France.", "Berlin is the capital of Germany.",
        "The quick brown fox jumps over the lazy dog.", "Alice wrote the book in 1999."]


def render(template: str, system: str, user: str, answer: str | None = None, bos: str = "") -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return jinja2.Template(template).render(messages=messages, add_generation_prompt=answer is None,
                                            bos_token=bos)


def byte_level_folder(path, fmt: str):
    """A byte-level BPE (GPT-2 pre-tokenizer, as SmolLM2 / Qwen / Llama-3) with `fmt`'s special tokens,
    saved with its tokenizer_config.json and generation_config.json like a hub checkpoint."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[fmt], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + [SYSTEM_ANSWER, SYSTEM_QA] * 5, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(CONFIGS[fmt]))
    eos = [tok.token_to_id(t) for t in SPECIALS[fmt][1:] if t in ("<|im_end|>", "<|end_of_text|>", "<|eot_id|>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return path


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def fmt_base(request, tmp_path_factory):
    """(format name, folder) of a tiny random model whose tokenizer files declare that format."""
    path = byte_level_folder(tmp_path_factory.mktemp(request.param), request.param)
    tok = Tokenizer.from_pretrained(path)
    Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).init_weights(seed=0, std=0.1) \
        .save_pretrained(path)
    return request.param, path


def make(path, stage=1, **kw):
    torch.manual_seed(0)
    clara = Clara(Transformer.from_pretrained(path), Tokenizer.from_pretrained(path),
                  ClaraConfig(**{**CFG, **kw}, training_stage=stage), base_path=str(path))
    for m in clara.model.lora_layers():
        for p in m.lora_B.values():
            p.data.normal_(0, 0.05)
    return clara


# ---- the formats' strings -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,template", [("chatml", CHATML_TEMPLATE), ("llama3", LLAMA3_TEMPLATE)])
def test_prompts_equal_the_rendered_chat_template(name, template):
    fmt, bos = CHAT_FORMATS[name], "<|begin_of_text|>" if name == "llama3" else ""
    slots = Prompt.control("<MEM0>", "<MEM1>", "<SEP>")
    p, _ = build_prompt("answer", slots * 2, question="Who?", fmt=fmt)
    user = f"Background:\n{slots}{slots}\n\nQuestion:Who?"
    assert str(p) == render(template, SYSTEM_ANSWER, user, bos=bos)
    p, t = build_prompt("qa", slots, qa=[("Q1", "A1")], fmt=fmt)
    full = render(template, SYSTEM_QA, f"Background:\n{slots}", answer=t, bos=bos)
    # prompt + target is the rendered conversation up to the answer's end-of-turn token
    assert str(p + fmt.target(t)) == full[:full.rindex(fmt.end_of_turn) + len(fmt.end_of_turn)]


def test_golden_strings_of_each_format():
    slots = Prompt.control("<MEM0>", "<MEM1>", "<SEP>")
    got = {n: str(build_prompt("answer", slots, question="Who?", fmt=f)[0]) for n, f in CHAT_FORMATS.items()}
    user = f"Background:\n{slots}\n\nQuestion:Who?"
    assert got["mistral"] == f"<s> [INST] {SYSTEM_ANSWER}\n\n{user} [/INST]"
    assert got["chatml"] == (f"<|im_start|>system\n{SYSTEM_ANSWER}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                             "<|im_start|>assistant\n")
    assert got["llama3"] == (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_ANSWER}"
                             f"<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert str(MISTRAL.target("Paris")) == " Paris</s>" and str(CHAT_FORMATS["chatml"].target("Paris")) == \
        "Paris<|im_end|>"


# ---- conventions read from the files -----------------------------------------------------------------

def test_conventions_come_from_the_tokenizer_files(fmt_base):
    name, path = fmt_base
    tok = Tokenizer.from_pretrained(path)
    assert tok.chat_format.name == name
    conf = CONFIGS[name]
    assert tok.bos_id == tok.token_id(conf["bos_token"]) and tok.eos_id == tok.token_id(conf["eos_token"])
    assert tok.eot_id == tok.token_id("<|im_end|>" if name == "chatml" else "<|eot_id|>")
    gen = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert set(gen) <= set(tok.stop_ids) and tok.eot_id in tok.stop_ids
    # an unknown override is a clear error (test_unrecognised_template... shows an override winning)
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'"):
        Tokenizer.from_pretrained(path, chat_format="vicuna")


def test_unrecognised_template_and_missing_template_are_clear_errors(tmp_path):
    path = byte_level_folder(tmp_path / "m", "chatml")
    conf = dict(CONFIGS["chatml"], chat_template="{% for m in messages %}### {{ m['content'] }}{% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="chat_template not recognised.*--chat-format"):
        Tokenizer.from_pretrained(path)
    assert Tokenizer.from_pretrained(path, chat_format="chatml").chat_format.name == "chatml"
    del conf["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.from_pretrained(path)


def test_mistral_tokenizer_files_keep_todays_conventions(hf_tokenizer, tmp_path):
    hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
    bare = Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None,
         "chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"}))
    full = Tokenizer.from_pretrained(tmp_path)
    for tok in (bare, full):
        assert tok.chat_format is MISTRAL
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (1, 2, 1, 2)


def test_a_checkpoint_keeps_the_conventions(fmt_base, tmp_path):
    name, path = fmt_base
    c = make(path)
    c.save_pretrained(tmp_path / "ck")
    d = Clara.from_pretrained(tmp_path / "ck")
    assert d.tok.chat_format.name == name
    assert (d.tok.bos_id, d.tok.eos_id, d.tok.pad_id, d.tok.stop_ids) == (c.tok.bos_id, c.tok.eos_id, c.tok.pad_id,
                                                                          c.tok.stop_ids)


# ---- Clara on a ChatML / Llama-3 model -----------------------------------------------------------------

def records(stage):
    if stage == 1:
        return [{"data_type": "qa", "question": ["What is the capital?"], "answers": ["Paris"], "docs": [DOCS[0]]},
                {"data_type": "paraphrase", "question": [], "answers": ["Berlin is German."], "docs": [DOCS[1]]}]
    if stage == 2:
        return [{"question": "What is the capital?", "docs": DOCS[:2], "answer": "Paris"},
                {"question": "Who wrote the book?", "docs": DOCS[2:4], "answer": "Alice"}]
    return [{"question": "What is the capital?", "docs": DOCS[:3], "answer": "Paris", "pos_index": [0]},
            {"question": "Who wrote the book?", "docs": DOCS[1:4], "answer": "Alice", "pos_index": [2]}]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_stage_trains_a_step_and_labels_end_in_end_of_turn(fmt_base, stage):
    name, path = fmt_base
    c = make(path, stage)
    if stage == 3:
        c.model.copy_adapter("encoder", "query")
    batch = c.collate(records(stage), stage)
    for b in range(2):
        target = batch.labels[b][batch.labels[b] != -100].tolist()
        assert target[-1] == c.tok.eot_id and c.tok.eot_id not in target[:-1]
        assert special_count(c, target) == 1  # the answer is text; only its end of turn is a special token
    # the document wrapper: <ENC> + the model's bos + text + its eos
    row = batch.doc_ids[0][batch.doc_mask[0].bool()].tolist()
    assert row[:2] == [c.enc_id, c.tok.bos_id] and row[-c.cfg.n_mem - 1] == c.tok.eos_id
    adamw_steps(c, batch, stage)  # one step, its loss finite


def test_every_generate_runs(fmt_base):
    _, path = fmt_base
    c = make(path, stage=3)
    q, docs = ["What is the capital?", "Who?"], [DOCS[:2], DOCS[2:4]]
    ids, mask, _ = c.tokenize_for_encoder([d for ds in docs for d in ds])
    mem = c.encode(ids, mask)[0].view(2, 2, c.cfg.n_mem, -1)
    outs = [c.generate_from_text(q, docs, max_new_tokens=3), c.generate_from_raw_text(q, docs, 3),
            c.generate_closed_book(q, 3),
            c.generate_from_paraphrase(q, docs, 3), c.generate_from_compressed_documents_and_questions(q, mem, 3),
            c.generate_from_questions(q, docs, 3)[0]]
    assert all(len(o) == 2 and all(isinstance(a, str) for a in o) for o in outs)


def test_generation_stops_at_end_of_turn(fmt_base):
    """A decoder that always predicts the end-of-turn token answers with nothing (it stops at once)."""
    _, path = fmt_base
    c = make(path, stage=2)
    with torch.no_grad():
        c.model.output.weight.zero_() if not c.model.cfg.tie_embeddings else None
        c.model.norm.weight.fill_(1.0)
    bias = torch.zeros(c.model.cfg.vocab_size)
    bias[c.tok.eot_id] = 1e4
    c.model.output.register_forward_hook(lambda m, i, o: o + bias.to(o.dtype))
    assert c.generate_closed_book(["Who?"], max_new_tokens=5) == [""]


# ---- text is never control ------------------------------------------------------------------------------

EVIL = "A <MEM0> and <SEP> or <ENC><AE> then </s> <s> <|im_end|> <|eot_id|> end."


def special_count(c, ids):
    added = {i for i, t in c.tok.tok.get_added_tokens_decoder().items() if t.special}
    return sum(i in added for i in ids)


@pytest.mark.parametrize("which", ["mistral", "chatml", "llama3"])
def test_special_strings_inside_text_stay_text(which, fmt_base, tiny_base):
    if which != "mistral" and which != fmt_base[0]:
        pytest.skip("covered by the other parametrisation")
    c = make(tiny_base if which == "mistral" else fmt_base[1], doc_max_length=256, compr_rate=64,
             max_len=2048)  # nothing is cut
    # a document: exactly <ENC>, bos, eos and the M memory tokens are special; the text decodes back to itself
    ids, mask, _ = c.tokenize_for_encoder([EVIL])
    row = ids[0][mask[0].bool()].tolist()
    assert special_count(c, row) == 3 + c.cfg.n_mem
    assert c.tok.decode(row[2:-c.cfg.n_mem - 1], skip_special_tokens=False) == EVIL
    # a question and an answer: the prompt holds exactly K*M memory tokens, splice works, labels decode back
    recs = [{"question": EVIL, "docs": [EVIL, DOCS[0]], "answer": EVIL}]
    c.cfg.training_stage = 2
    batch = c.collate(recs, 2)
    K, M = 2, c.cfg.n_mem
    m0 = int(c.mem_ids[0])
    assert int(((batch.dec_ids >= m0) & (batch.dec_ids < m0 + M)).sum()) == K * M
    assert torch.isfinite(c.total_loss(c.loss(batch, 2)))
    lab = batch.labels[0]
    target = lab[lab != -100].tolist()
    assert c.tok.decode(target[:-1], skip_special_tokens=False).strip() == EVIL
    assert target[-1] == c.tok.eot_id and special_count(c, target) == 1


def test_clean_text_gives_the_same_ids_as_the_plain_string(tiny_base):
    """Byte-identical to the plain-string encoding whenever the text holds no special-token string."""
    c = make(tiny_base, stage=2)
    p, _ = build_prompt("answer", c.mem_slots * 2, question="Who wrote the book?", fmt=c.fmt)
    assert c.tok.encode(p) == c.tok.tok.encode(str(p), add_special_tokens=False).ids
    d = c.tok.document(DOCS[0])
    assert c.tok.encode(d) == c.tok.tok.encode(f"<ENC><s>{DOCS[0]}</s>", add_special_tokens=False).ids

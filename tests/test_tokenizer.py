"""data.py's tokenizer part: special tokens, chat strings, left padding, on tokenizers trained offline."""
import pytest

from conftest import CORPUS
from data import Tokenizer, chat, left_pad, train_tokenizer


@pytest.fixture()
def tok(hf_tokenizer, tmp_path):
    hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
    return Tokenizer.from_pretrained(tmp_path)


def test_special_token_ids_follow_the_base_vocabulary(tok):
    V = tok.vocab_size
    n = 4
    ids = tok.add_special_tokens([f"<MEM{i}>" for i in range(n)] + ["<AE>", "<ENC>", "<SEP>"])
    assert ids == list(range(V, V + n + 3))  # <MEM0..3>=V..V+3, <AE>=V+4, <ENC>=V+5, <SEP>=V+6
    assert tok.vocab_size == V + n + 3
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 1)
    # adding them again keeps the ids (a checkpoint tokenizer that already carries them)
    assert tok.add_special_tokens(["<MEM0>", "<SEP>"]) == [V, V + n + 2]


def test_no_leading_space_after_a_special_token(tok):
    tok.add_special_tokens(["<ENC>"])
    pieces = [tok.tok.id_to_token(i) for i in tok.encode("<ENC><s>This is</s>")]
    assert pieces[:2] == ["<ENC>", "<s>"] and pieces[-1] == "</s>"
    assert not pieces[2].startswith("▁")  # "This", not "▁This" (non-legacy Mistral v0.2 behaviour)
    assert [tok.tok.id_to_token(i) for i in tok.encode("The dog")][0].startswith("▁")  # text start gets ▁


def test_chat_format():
    assert chat("Hi", "Sys") == "<s> [INST] Sys\n\nHi [/INST]"
    assert chat("Hi", "Sys", "Yes") == "<s> [INST] Sys\n\nHi [/INST] Yes</s>"
    assert chat("Hi") == "<s> [INST] Hi [/INST]"


def test_chat_tokenises_with_special_tokens(tok):
    tok.add_special_tokens(["<MEM0>", "<MEM1>", "<SEP>"])
    ids = tok.encode(chat("Background:\n<MEM0><MEM1><SEP>", "Sys", "Paris"))
    assert ids[0] == 1 and ids[-1] == 2  # literal <s> / </s> are the special tokens, no automatic BOS
    assert ids.count(1) == 1 and ids.count(2) == 1
    slot = [tok.token_id("<MEM0>"), tok.token_id("<MEM1>"), tok.token_id("<SEP>")]
    assert any(ids[i:i + 3] == slot for i in range(len(ids)))
    assert "Paris" in tok.decode(ids)


def test_trained_tokenizer_prompt_is_a_prefix():
    t = train_tokenizer(CORPUS, 300)
    p = chat("Question:Who wrote the book?", "Sys.")
    assert t.encode(p + " Alice wrote it.</s>")[:len(t.encode(p))] == t.encode(p)
    assert t.tok.token_to_id("<unk>") == 0 and t.bos_id == 1 and t.eos_id == 2
    assert t.decode(t.encode("Paris is big.")) == "Paris is big."


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, _ = left_pad([[5]], 1, length=3)
    assert ids.tolist() == [[1, 1, 5]]
    with pytest.raises(ValueError, match="does not fit"):
        left_pad([[1, 2, 3]], 1, length=2)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(KeyError, match="no token '<ENC>'"):
        Tokenizer(train_tokenizer(CORPUS, 200).tok).token_id("<ENC>")

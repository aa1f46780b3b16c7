"""Text in, token ids out: the tokenizer wrapper, the chat format, padding, and (below) the data readers.

Tokenizer: a thin wrapper over `tokenizers.Tokenizer` loaded from a checkpoint's `tokenizer.json`. CLaRa
appends special tokens after the base vocabulary (CLARA_SPEC.md §2: `<MEM0>..<MEM{n-1}>`, `<AE>`, `<ENC>`,
`<SEP>`), pads with `<s>` on the LEFT, and writes prompts in the Mistral-Instruct v0.2 chat format (§4):

    "<s> [INST] {system}\\n\\n{user} [/INST]"               prompt
    "<s> [INST] {system}\\n\\n{user} [/INST] {answer}</s>"  prompt + target

The literal `<s>` / `</s>` are matched as special tokens; text is always tokenised WITHOUT adding any
special token of the tokenizer's own (no automatic BOS).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """`tokenizers.Tokenizer` with the few operations CLaRa needs."""

    def __init__(self, tok: HFTokenizer, source: str = "<memory>"):
        self.tok = tok
        self.source = source
        self.bos_id = self.token_id("<s>")
        self.eos_id = self.token_id("</s>")
        self.pad_id = self.bos_id  # CLaRa pads with <s> (id 1), on the left

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` from a model directory (or the file itself)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: no tokenizer.json (the fast-tokenizer file of the checkpoint)")
        try:
            return cls(HFTokenizer.from_file(str(file)), str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
            raise ValueError(f"{file}: cannot be read as a tokenizers file ({e})") from None

    def save(self, path: str | Path):
        Path(path).mkdir(parents=True, exist_ok=True)
        self.tok.save(str(Path(path) / "tokenizer.json"))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{self.source}: tokenizer has no token {token!r}")
        return i

    def has_token(self, token: str) -> bool:
        return self.tok.token_to_id(token) is not None

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Append special tokens after the current vocabulary (tokens already present keep their ids)."""
        new = [t for t in tokens if not self.has_token(t)]
        self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        return [self.token_id(t) for t in tokens]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, rows: list[list[int]]) -> list[str]:
        return [self.decode(r).strip() for r in rows]


def chat(user: str, system: str | None = None, answer: str | None = None) -> str:
    """The Mistral-Instruct v0.2 chat string (CLARA_SPEC.md §4); with `answer`, prompt + target + </s>."""
    text = f"<s> [INST] {system}\n\n{user} [/INST]" if system else f"<s> [INST] {user} [/INST]"
    return text if answer is None else f"{text} {answer}</s>"


def left_pad(rows: list[list[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """List of id lists -> ids (B, T) and attention mask (B, T), padded on the LEFT to `length` (or the max)."""
    T = max(len(r) for r in rows) if length is None else length
    if any(len(r) > T for r in rows):
        raise ValueError(f"left_pad: a row of {max(len(r) for r in rows)} tokens does not fit in {T}")
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def train_tokenizer(texts, vocab_size: int = 1000) -> Tokenizer:
    """Train a small BPE tokenizer shaped like Mistral's, offline, for the tiny models of the CPU lab.

    `<unk>`=0, `<s>`=1, `</s>`=2 as in Mistral; Metaspace pre-tokenisation that prepends `▁` only at the
    very start of the text (the non-legacy conversion of Mistral v0.2), so text right after a special
    token gets no `▁`; pieces never cross a word boundary, so a prompt's tokens are a prefix of the
    prompt+answer tokens. The printable ASCII alphabet is always included, so nothing maps to <unk>.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok, "<trained>")

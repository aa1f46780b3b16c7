"""Text in, token ids out: the tokenizer, the chat format and padding; the data readers; a synthetic corpus.

Three sections, top to bottom:

    Prompt, ChatFormat, Tokenizer, left_pad      the model's conventions and chat format, text that stays text,
    train_tokenizer                              padding, a tiny BPE
    validate_record, JsonlDataset, batches       the official JSONL formats (CLARA_SPEC.md §6), checked
                                                 record by record and streamed in a resumable, sharded order
    make_synthetic                               invented people and facts in those formats, for the CPU lab

Command line: `python data.py synth --out DIR` writes a synthetic set; `python data.py check --stage S
FILE...` validates files. The shipped sample data/sample/stage{1,2,3}.jsonl is the training part of
`make_synthetic(DIR, seed=0, n_train_entities=100, n_test_entities=20, k=5, n_candidates=8)`.

Tokenizer: a thin wrapper over `tokenizers.Tokenizer` loaded from a checkpoint's `tokenizer.json`, with the
model's own conventions read from its `tokenizer_config.json` / `special_tokens_map.json` /
`generation_config.json`: bos, eos, pad, the end-of-turn token and the chat format (`ChatFormat`: Mistral
`[INST]`, ChatML, Llama-3 headers, written in code). CLaRa appends special tokens after the base vocabulary
(`<MEM0>..<MEM{n-1}>`, `<AE>`, `<ENC>`, `<SEP>`) and pads on the LEFT. For Mistral (and a bare
tokenizer.json, such as the tiny BPEs) the strings are the official ones:

    "<s> [INST] {system}\\n\\n{user} [/INST]"               prompt
    "<s> [INST] {system}\\n\\n{user} [/INST] {answer}</s>"  prompt + target

Prompts are `Prompt`s: strings that know which pieces are control tokens, so a document, question or answer
that spells "</s>" or "<MEM0>" is tokenised as text, never as the token. Text is always tokenised WITHOUT
adding any special token of the tokenizer's own (no automatic BOS).
"""
from __future__ import annotations

import itertools
import json
import re
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer


class Prompt(str):
    """A string that remembers which of its pieces are control tokens.

    `str(p)` is the plain text (so prompts compare and print as strings), and `p.parts` is a tuple of
    (text, is_control) pieces. Only the control pieces (the chat format's own tokens, CLaRa's <MEMi>/<SEP>/
    <ENC>) may become special tokens when tokenised; a document, question or answer that happens to contain
    "</s>" or "<MEM0>" stays text (`Tokenizer.encode_prompt`). `+` with a plain str adds it as TEXT; `*` repeats.
    """

    parts: tuple[tuple[str, bool], ...]

    def __new__(cls, parts=()):
        parts = tuple((s, bool(c)) for s, c in parts if s)
        p = super().__new__(cls, "".join(s for s, _ in parts))
        p.parts = parts
        return p

    @classmethod
    def text(cls, s: str) -> "Prompt":
        return s if isinstance(s, Prompt) else cls([(s, False)])

    @classmethod
    def control(cls, *tokens: str | None) -> "Prompt":
        return cls([(t, True) for t in tokens if t])

    def __add__(self, other):
        return Prompt(self.parts + Prompt.text(other).parts)

    def __radd__(self, other):
        return Prompt(Prompt.text(other).parts + self.parts)

    def __mul__(self, n: int):
        return Prompt(self.parts * n)

    def join(self, items):  # Prompt.text("\n").join(docs): the separator and the items keep their kinds
        out = Prompt()
        for i, x in enumerate(items):
            out = out + x if i == 0 else out + self + x
        return out


@dataclass(frozen=True)
class ChatFormat:
    """A chat template written in code (no template engine): where system, user and answer text go.

    prompt  = start + system_open + system + system_close + user_open + user + user_close
    target  = answer_join + answer + end-of-turn token
    `start` and the *_open / *_close strings may hold control tokens: they are listed in `controls` and split
    out exactly (every other character of the prompt is text).
    """

    name: str
    start: str           # the first token(s) of a prompt (Mistral, Llama-3: bos; ChatML: none)
    system_open: str
    system_close: str    # between system and user (Mistral: "\n\n" inside one [INST] turn)
    user_open: str       # used when there is a system text ...
    user_open_alone: str  # ... and when there is none
    user_close: str      # ends the prompt: the assistant's turn begins after it
    answer_join: str     # between the prompt and the answer text (Mistral: one space)
    end_of_turn: str     # the token that ends the answer (the label after the answer)
    controls: tuple[str, ...]

    def _segments(self, s: str) -> Prompt:
        """A template string -> Prompt, with every occurrence of a control token marked as control."""
        if not self.controls:
            return Prompt.text(s)
        pattern = "(" + "|".join(map(re.escape, self.controls)) + ")"
        return Prompt([(piece, i % 2 == 1) for i, piece in enumerate(re.split(pattern, s))])

    def prompt(self, user: str, system: str | None = None) -> Prompt:
        """The prompt text up to where the answer starts; user/system pieces keep their kinds (text by default)."""
        seg = self._segments
        if system:
            return (seg(self.start + self.system_open) + Prompt.text(system) + seg(self.system_close + self.user_open)
                    + Prompt.text(user) + seg(self.user_close))
        return seg(self.start + self.user_open_alone) + Prompt.text(user) + seg(self.user_close)

    def target(self, answer: str) -> Prompt:
        """What follows the prompt in a training example: the answer text and the end-of-turn token."""
        return Prompt.text(self.answer_join + answer) + Prompt.control(self.end_of_turn)


# The formats recognised from a tokenizer's chat_template (`detect_chat_format`). Mistral-Instruct v0.2:
# a system text shares the first [INST] turn; its strings are exactly the official CLaRa prompts.
CHAT_FORMATS = {
    "mistral": ChatFormat("mistral", "<s>", " [INST] ", "\n\n", "", " [INST] ", " [/INST]", " ", "</s>",
                          ("<s>", "</s>")),
    "chatml": ChatFormat("chatml", "", "<|im_start|>system\n", "<|im_end|>\n", "<|im_start|>user\n",
                         "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "", "<|im_end|>",
                         ("<|im_start|>", "<|im_end|>")),
    "llama3": ChatFormat("llama3", "<|begin_of_text|>", "<|start_header_id|>system<|end_header_id|>\n\n",
                         "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\n",
                         "<|start_header_id|>user<|end_header_id|>\n\n",
                         "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "", "<|eot_id|>",
                         ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}
MISTRAL = CHAT_FORMATS["mistral"]


def detect_chat_format(template: str | None, source: str) -> str:
    """The name of the format a Jinja chat_template writes, recognised by its marker strings."""
    if template is None:
        return "mistral"  # a bare tokenizer.json (the tiny BPEs, our own checkpoints before formats existed)
    markers = [("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"), ("[INST]", "mistral")]
    for marker, name in markers:
        if marker in template:
            return name
    raise ValueError(f"{source}: chat_template not recognised (known: {sorted(CHAT_FORMATS)}); pass "
                     "--chat-format NAME (chat_format=NAME) to choose one")


def _token_str(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """`tokenizers.Tokenizer` with the few operations CLaRa needs, and the model's own conventions.

    bos / eos / pad tokens come from the folder's tokenizer_config.json (or special_tokens_map.json); the chat
    format from its chat_template (or `chat_format=`); the tokens that stop generation are the format's
    end-of-turn, eos and generation_config.json's eos_token_id. A folder with only tokenizer.json (the tiny
    BPEs) is read as Mistral: bos <s>, eos </s>, pad <s>, the [INST] format.
    """

    def __init__(self, tok: HFTokenizer, source: str = "<memory>", bos: str | None = "<s>", eos: str = "</s>",
                 pad: str | None = None, chat_format: str = "mistral", stop_ids: tuple[int, ...] = ()):
        self.tok = tok
        self.source = source
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"{source}: unknown chat format {chat_format!r} (known: {sorted(CHAT_FORMATS)})")
        self.chat_format = CHAT_FORMATS[chat_format]
        self.bos = bos if bos is not None and self.has_token(bos) else None
        self.eos = eos
        self.eos_id = self.token_id(eos)
        self.bos_id = self.token_id(self.bos) if self.bos else None
        for t in self.chat_format.controls:
            self.token_id(t)  # the format's control tokens must exist (clear KeyError otherwise)
        # Mistral pads with <s> (the official code); others with their pad token, else eos. Padding is masked.
        self.pad_id = self.token_id(pad) if pad and self.has_token(pad) else (self.bos_id if chat_format == "mistral"
                                                                              else self.eos_id)
        self.eot_id = self.token_id(self.chat_format.end_of_turn)
        self.stop_ids = tuple(dict.fromkeys((self.eot_id, self.eos_id, *stop_ids)))

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_format: str | None = None) -> "Tokenizer":
        """Load `tokenizer.json` (+ tokenizer_config.json, special_tokens_map.json, generation_config.json when
        present) from a model directory (or the tokenizer.json file itself)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: no tokenizer.json (the fast-tokenizer file of the checkpoint)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
            raise ValueError(f"{file}: cannot be read as a tokenizers file ({e})") from None
        folder = file.parent

        def read(name):
            f = folder / name
            if not f.exists():
                return {}
            try:
                d = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{f}: not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{f}: expected a JSON object")
            return d

        conf = {**read("special_tokens_map.json"), **read("tokenizer_config.json")}
        if not conf and chat_format is None:  # a bare tokenizer.json: the Mistral conventions
            return cls(tok, str(file))
        template = conf.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").exists():  # where transformers 5 writes it
            template = (folder / "chat_template.jinja").read_text()
        name = chat_format or conf.get("clara_chat_format")
        if name is None and template is None and None in (tok.token_to_id("<s>"), tok.token_to_id("</s>")):
            raise ValueError(f"{folder}: no chat_template in tokenizer_config.json; pass --chat-format NAME "
                             f"(chat_format=NAME), one of {sorted(CHAT_FORMATS)}")
        name = name or detect_chat_format(template, str(folder / "tokenizer_config.json"))
        if name not in CHAT_FORMATS:
            raise ValueError(f"{folder}: unknown chat format {name!r} (known: {sorted(CHAT_FORMATS)})")
        fmt = CHAT_FORMATS[name]
        bos = _token_str(conf.get("bos_token")) if "bos_token" in conf else (fmt.start or None)
        eos = _token_str(conf.get("eos_token")) or fmt.end_of_turn
        gen = read("generation_config.json").get("eos_token_id")
        stop = tuple(gen if isinstance(gen, list) else [gen] if isinstance(gen, int) else [])
        vocab = tok.get_vocab_size(with_added_tokens=True)
        return cls(tok, str(file), bos=bos, eos=eos, pad=_token_str(conf.get("pad_token")), chat_format=name,
                   stop_ids=tuple(i for i in stop if 0 <= i < vocab))

    def save(self, path: str | Path):
        """tokenizer.json, and a tokenizer_config.json with the conventions, so the folder reloads the same."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path / "tokenizer.json"))
        if self.chat_format is MISTRAL and self.bos == "<s>" and self.eos == "</s>" and self.pad_id == self.bos_id:
            return  # the default conventions: a bare tokenizer.json says it all (as before formats existed)
        conf = {"bos_token": self.bos, "eos_token": self.eos, "pad_token": self.tok.id_to_token(self.pad_id),
                "clara_chat_format": self.chat_format.name}
        (path / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self.stop_ids)}, indent=2))

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

    def chat(self, user: str, system: str | None = None) -> Prompt:
        return self.chat_format.prompt(user, system)

    def document(self, text: str) -> Prompt:
        """The document as the encoder reads it: <ENC> + bos (if the model has one) + text + eos."""
        return Prompt.control("<ENC>", self.bos) + Prompt.text(text) + Prompt.control(self.eos)

    def encode(self, text: str) -> list[int]:
        """A plain str is tokenised with every special-token string matched (a template the caller wrote);
        a `Prompt` only matches its control pieces: its text pieces stay text (`encode_prompt`)."""
        if isinstance(text, Prompt):
            return self.encode_prompt(text)
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if any(isinstance(t, Prompt) for t in texts):
            return [self.encode(t) for t in texts]
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def _special_ids(self) -> set[int]:
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def template(self, s: str) -> Prompt:
        """A plain string the caller wrote as a template -> Prompt: every special-token string in it is control."""
        specials = sorted({t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}, key=len,
                          reverse=True)
        if not specials:
            return Prompt.text(s)
        pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", s)
        return Prompt([(piece, i % 2 == 1) for i, piece in enumerate(pieces)])

    def _metaspaces(self) -> list:
        """The Metaspace pre-tokenizers that prepend "▁" to the first piece of a text (prepend_scheme "first")."""
        pt = self.tok.pre_tokenizer
        found, stack = [], [pt] if pt is not None else []
        while stack:
            p = stack.pop()
            if isinstance(p, pre_tokenizers.Sequence):
                i = 0
                while True:
                    try:
                        stack.append(p[i])
                    except IndexError:
                        break
                    i += 1
            elif isinstance(p, pre_tokenizers.Metaspace) and p.prepend_scheme == "first":
                found.append(p)
        return found

    def encode_as_text(self, text: str, first: bool = True) -> list[int]:
        """Tokenise with no special-token matching at all: "<MEM0>" becomes the pieces "<", "MEM", ...

        first=False: the text continues a string (no "▁" prepended by a prepend_scheme="first" Metaspace, as
        inside a whole string), so the pieces decode back to exactly the text.
        """
        spaces = [] if first else self._metaspaces()
        self.tok.encode_special_tokens = True
        for p in spaces:
            p.prepend_scheme = "never"
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False
            for p in spaces:
                p.prepend_scheme = "first"

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a Prompt: control pieces become their special tokens; text never does.

        The whole string is tokenised at once (so the ids are exactly what the string gives whenever the text
        holds no special-token string: the golden Mistral prompts stay byte-identical); a special token whose
        characters lie inside a text piece is then replaced by the same characters tokenised as text.
        """
        enc = self.tok.encode(str(prompt), add_special_tokens=False)
        control, at = set(), 0
        for s, is_control in prompt.parts:
            if is_control:
                control.add((at, at + len(s)))
            at += len(s)
        special, out, s = self._special_ids(), [], str(prompt)
        for i, (a, b) in zip(enc.ids, enc.offsets):
            if i in special and (a, b) not in control:  # text that spells a special token
                out.extend(self.encode_as_text(s[a:b], first=a == 0))
            else:  # text, or a control piece (one that is no token of this tokenizer stays what the string gives)
                out.append(i)
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, rows: list[list[int]]) -> list[str]:
        return [self.decode(r).strip() for r in rows]


def chat(user: str, system: str | None = None, answer: str | None = None) -> str:
    """The Mistral-Instruct v0.2 chat string; with `answer`, prompt + target + </s>.

    A plain str, i.e. a template: tokenised with `Tokenizer.encode`, every special-token string in it (in the
    user text too) is the token. CLaRa's own prompts come from `clara.build_prompt`, whose text stays text.
    """
    text = MISTRAL.prompt(user, system)
    return str(text if answer is None else text + MISTRAL.target(answer))


def left_pad(rows: list[list[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """List of id lists -> ids (B, T) and attention mask (B, T), padded on the LEFT to `length` (or the max)."""
    T = max(len(r) for r in rows) if length is None else length
    if any(len(r) > T for r in rows):
        raise ValueError(f"left_pad: a row of {max(len(r) for r in rows)} tokens does not fit in {T}")
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def train_tokenizer(texts, vocab_size: int = 1000, split_punctuation: bool = False) -> Tokenizer:
    """Train a small BPE tokenizer shaped like Mistral's, offline, for the tiny models of the CPU lab.

    `<unk>`=0, `<s>`=1, `</s>`=2 as in Mistral; Metaspace pre-tokenisation that prepends `▁` only at the
    very start of the text (the non-legacy conversion of Mistral v0.2), so text right after a special
    token gets no `▁`; pieces never cross a word boundary, so a prompt's tokens are a prefix of the
    prompt+answer tokens. The printable ASCII alphabet is always included, so nothing maps to <unk>.
    split_punctuation=True also makes every punctuation mark its own piece, so that "Selford." in a
    document and the answer "Selford" share the token "▁Selford": a tiny model then learns to answer by
    copying a token instead of learning a token-to-token mapping (train.py --stage 0 uses it).
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    if split_punctuation:
        tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer, pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok, "<trained>")


# ---- readers: the official JSONL formats, validated, streamed --------------------------------------------
#
# One JSON object per line (CLARA_SPEC.md §6). Every record is checked and normalised to one fixed set of
# keys before the model sees it, so that a malformed line fails loudly with its file, line and field
# instead of training on garbage: the official loader, given "docs": "some text", iterates the string and
# trains on single characters as documents.

STAGE_KEYS = {1: ("data_type", "question", "answers", "docs"),
              2: ("question", "docs", "answer"),
              3: ("question", "docs", "answer", "pos_index")}
DOC_KEYS = ("docs", "context", "content")  # the official loader's fallbacks, in its order


class DataError(ValueError):
    """A record that does not follow the format of its stage; the message starts with `path:line`."""


def _found(x) -> str:
    """The JSON type of a value, for error messages ("found a string")."""
    if isinstance(x, bool):  # before int: bool is an int subclass
        return "a boolean"
    names = {str: "a string", list: "a list", dict: "an object", int: "a number", float: "a number"}
    return "null" if x is None else names.get(type(x), type(x).__name__)


def _str_list(obj: dict, key: str, where: str, what: str) -> list[str]:
    """obj[key] as a list of non-empty strings; a bare string is the classic mistake, named as such."""
    value = obj[key]
    if isinstance(value, str):
        raise DataError(f"{where}: field '{key}': expected a list of {what}s, found a string (the official "
                        f"loader would iterate it character by character); write [\"...\"]")
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{key}': expected a list of {what}s, found {_found(value)}")
    for i, x in enumerate(value):
        if not isinstance(x, str):
            raise DataError(f"{where}: field '{key}[{i}]': expected a {what} string, found {_found(x)}")
        if not x.strip():
            raise DataError(f"{where}: field '{key}[{i}]': empty {what} (the string is empty or only whitespace)")
    return value


def _nonempty_str(obj: dict, key: str, where: str, what: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}': expected a {what} string, found {_found(value)}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}': empty {what} (the string is empty or only whitespace)")
    return value


def _docs(obj: dict, stage: int, where: str) -> list[str]:
    key = next((k for k in DOC_KEYS if k in obj), None)
    if key is None:
        raise DataError(f"{where}: missing field 'docs' (also accepted: 'context', 'content'); "
                        f"the record has {sorted(obj)}")
    docs = _str_list(obj, key, where, "document")
    if not docs:
        raise DataError(f"{where}: field '{key}': empty list, expected at least one document")
    if stage == 1 and len(docs) != 1:
        raise DataError(f"{where}: field '{key}': stage 1 takes exactly one document per record, found {len(docs)}")
    return docs


def _answer(obj: dict, where: str) -> str:
    """The target of a stage-2/3 record, with the official fallbacks: answer, answers[0], golden_answers[0].

    `gold_answer` (str or list) comes last: the format documents it but the official loader rejects
    records that carry only it (CLARA_SPEC.md §9); we take it.
    """
    if "answer" in obj:
        return _nonempty_str(obj, "answer", where, "answer")
    for key in ("answers", "golden_answers"):
        if key in obj:
            answers = _str_list(obj, key, where, "answer")
            if not answers:
                raise DataError(f"{where}: field '{key}': empty list, expected at least one answer")
            return answers[0]
    if "gold_answer" in obj:
        if isinstance(obj["gold_answer"], list):
            answers = _str_list(obj, "gold_answer", where, "answer")
            if not answers:
                raise DataError(f"{where}: field 'gold_answer': empty list, expected at least one answer")
            return answers[0]
        return _nonempty_str(obj, "gold_answer", where, "answer")
    raise DataError(f"{where}: missing field 'answer' (also accepted: 'answers', 'golden_answers', "
                    f"'gold_answer'); the record has {sorted(obj)}")


def _pos_index(obj: dict, n_docs: int, where: str) -> list[int] | None:
    """Indices of the documents that hold the answer (stage 3; only used to log retrieval recall)."""
    value = obj.get("pos_index")
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'pos_index': expected a list of document indices, found {_found(value)}")
    for i, p in enumerate(value):
        if isinstance(p, bool) or not isinstance(p, int):
            raise DataError(f"{where}: field 'pos_index[{i}]': expected an integer index, found {_found(p)} {p!r}")
        if not 0 <= p < n_docs:
            raise DataError(f"{where}: field 'pos_index[{i}]': index {p} is out of range for {n_docs} documents "
                            f"(0-based, expected 0..{n_docs - 1})")
    if len(set(value)) != len(value):
        raise DataError(f"{where}: field 'pos_index': repeated index in {value}")
    return value


def validate_record(obj, stage: int, where: str) -> dict:
    """Check one parsed record of `stage` and normalise it to STAGE_KEYS[stage] plus "_where" ("path:line").

    Stage 1: data_type "qa" needs `question` and `answers`, lists of equal length >= 1; "paraphrase" needs
    `answers` (answers[0] is the target) and its `question` is ignored (normalised to []). Exactly one
    document. Stages 2 and 3: `question` a string, the answer through the official fallbacks, k (or N)
    documents; stage 3's `pos_index` is optional (None when absent). Fields not named here are ignored.
    Raises DataError naming `where` and the field.
    """
    if stage not in STAGE_KEYS:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per line, found {_found(obj)}")
    docs = _docs(obj, stage, where)
    if stage == 1:
        if "data_type" not in obj:
            raise DataError(f"{where}: missing field 'data_type' (\"qa\" or \"paraphrase\")")
        kind = obj["data_type"]
        if kind not in ("qa", "paraphrase"):
            raise DataError(f"{where}: field 'data_type': expected \"qa\" or \"paraphrase\", found {kind!r}")
        if "answers" not in obj:
            raise DataError(f"{where}: missing field 'answers' (a list of strings)")
        answers = _str_list(obj, "answers", where, "answer")
        if kind == "paraphrase":
            if not answers:
                raise DataError(f"{where}: field 'answers': empty list, a paraphrase record needs answers[0]")
            return {"data_type": kind, "question": [], "answers": answers, "docs": docs, "_where": where}
        if "question" not in obj:
            raise DataError(f"{where}: missing field 'question' (a list of strings, one per answer)")
        questions = _str_list(obj, "question", where, "question")
        if len(questions) != len(answers) or not questions:
            raise DataError(f"{where}: fields 'question' and 'answers': a qa record needs lists of the same "
                            f"length >= 1, found {len(questions)} questions and {len(answers)} answers")
        return {"data_type": kind, "question": questions, "answers": answers, "docs": docs, "_where": where}
    if "question" not in obj:
        raise DataError(f"{where}: missing field 'question' (a string)")
    record = {"question": _nonempty_str(obj, "question", where, "question"), "docs": docs,
              "answer": _answer(obj, where)}
    if stage == 3:
        record["pos_index"] = _pos_index(obj, len(docs), where)
    record["_where"] = where
    return record


def parse_record(line: bytes | str, stage: int, where: str) -> dict:
    """One JSONL line -> a validated record (see validate_record)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 ({e})") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    return validate_record(obj, stage, where)


class JsonlDataset:
    """Records of one stage from JSONL files, read one at a time by seeking (a file is never loaded whole).

    Construction makes ONE pass over the files and keeps the byte offset (int64) and line number of every
    non-empty line; blank lines are skipped. That is 20 bytes a record: ~40 MB for 2M records. Records are
    parsed and validated when they are read, so a bad line fails when its turn comes; `check()` validates
    everything up front (also `python data.py check`).
    """

    def __init__(self, paths, stage: int):
        if stage not in STAGE_KEYS:
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self.stage = stage
        offsets, lines, files = array("q"), array("q"), array("i")
        for fi, path in enumerate(self.paths):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: stage-{stage} data file not found")
            with open(path, "rb") as f:
                pos = 0
                for n, raw in enumerate(f, start=1):
                    if raw.strip():
                        offsets.append(pos)
                        lines.append(n)
                        files.append(fi)
                    pos += len(raw)
        self.offsets = np.frombuffer(offsets, dtype=np.int64)  # byte offset of each record in its file
        self.lines = np.frombuffer(lines, dtype=np.int64)      # 1-based line number, for error messages
        self.files = np.frombuffer(files, dtype=np.int32)      # index into self.paths

    def __len__(self) -> int:
        return len(self.offsets)

    def _read(self, i: int, handles: dict) -> dict:
        fi = int(self.files[i])
        if fi not in handles:
            handles[fi] = open(self.paths[fi], "rb")
        f = handles[fi]
        f.seek(int(self.offsets[i]))
        return parse_record(f.readline(), self.stage, f"{self.paths[fi]}:{int(self.lines[i])}")

    def __getitem__(self, i: int) -> dict:
        handles = {}
        try:
            return self._read(range(len(self))[i], handles)  # range: negative indices and bounds checks
        finally:
            for f in handles.values():
                f.close()

    def per_rank(self, world: int = 1) -> int:
        """Records each rank sees per epoch: len // world (the tail is dropped, see `order`)."""
        return len(self) // world

    def order(self, epoch: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """Indices of this rank's records for one epoch, in reading order.

        A permutation drawn from (seed, epoch), cut to a multiple of `world` (the last len % world records
        of the permutation are dropped, a different few each epoch) so that every rank gets the same count,
        then dealt out perm[rank::world]: the ranks' shares are disjoint and together cover the cut.
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1} (world size {world})")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
        perm = np.random.default_rng([seed, epoch]).permutation(len(self))
        return perm[: self.per_rank(world) * world][rank::world]

    def records(self, epoch: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        """Yield this rank's validated records for `epoch`, from position `start` of its sequence.

        `records(e, s, start=p)` yields exactly `list(records(e, s))[p:]`: resuming mid-epoch needs only
        the position. See `order` for the shuffle and the sharding (every rank gets len // world records).
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        handles = {}
        try:
            for i in self.order(epoch, seed, rank, world)[start:]:
                yield self._read(int(i), handles)
        finally:
            for f in handles.values():
                f.close()

    def check(self, max_errors: int = 100) -> list[str]:
        """Validate every record in file order; return the error messages (at most `max_errors`)."""
        errors, handles = [], {}
        try:
            for i in range(len(self)):
                try:
                    self._read(i, handles)
                except DataError as e:
                    errors.append(str(e))
                    if len(errors) >= max_errors:
                        break
        finally:
            for f in handles.values():
                f.close()
        return errors


def batches(dataset: JsonlDataset, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
            start_batch: int = 0):
    """Yield lists of `batch_size` validated records (this rank's share, see JsonlDataset.order).

    The incomplete last batch is dropped; every rank has the same record count, hence the same number of
    batches. `start_batch` resumes exactly. All records of a batch must have the same number of documents
    (the encoder compresses them as one (B*k) block): DataError otherwise, naming both records.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch = []
    for r in dataset.records(epoch, seed, rank, world, start=start_batch * batch_size):
        if batch and len(r["docs"]) != len(batch[0]["docs"]):
            raise DataError(f"{r['_where']}: field 'docs': {len(r['docs'])} documents, but {batch[0]['_where']} "
                            f"in the same batch has {len(batch[0]['docs'])}; every record of a batch needs the "
                            f"same number of documents (split the data by document count)")
        batch.append(r)
        if len(batch) == batch_size:
            yield batch
            batch = []


# ---- a synthetic corpus for the CPU lab -------------------------------------------------------------------
#
# Made-up people with 2-4 facts each, one short document per person. Everything is invented, so a model can
# only answer from the documents, never from what it already knows. Two ways to name people:
#   names="syllables"  first names and surnames built from syllables ("Kalon Branvortel", several tokens
#                      each); held-out people are other families whose surnames never occur in training;
#   names="words"      a first name and a surname from two fixed lists of short words ("Wren Fenwick"), each
#                      one token once the tokenizer has seen the corpus; held-out people are combinations
#                      never seen in training (the words themselves are known). Telling people apart then
#                      means keeping two known tokens; the CPU lab uses these (bench/lab.py).
# Families share a surname and first names repeat, so the distractors of a question are people with SIMILAR
# names and the same kind of facts: retrieval has to read the name, not just the topic (unless the question
# also describes the person's job: describe=True, see _JOB_DESCRIPTIONS).

_FIRST = ["ka", "lo", "mi", "re", "ta", "vo", "ni", "sa", "be", "do", "fe", "ga", "ju", "li", "ma", "no", "pe",
          "ri", "su", "te", "va", "zo"]
_FIRST_END = ["", "n", "r", "l", "s"]
_SURNAME = ["bran", "tel", "vor", "mek", "sil", "rok", "tam", "jun", "gast", "prel", "dov", "kesh", "lum", "nard",
            "oss", "quin", "rav", "sev", "tor", "yell"]
_FIRST_WORDS = ["Alda", "Bram", "Cora", "Dax", "Edda", "Finn", "Gret", "Hedy", "Ines", "Jory", "Kael", "Lise",
                "Mato", "Nell", "Orin", "Pia", "Rhea", "Sten", "Tova", "Ulf", "Vera", "Wren", "Yara", "Zeno",
                "Arlo", "Bess", "Cai", "Dora", "Emil", "Fay", "Gus", "Ivo", "Juno", "Kit", "Lark", "Milo", "Nia",
                "Otto", "Pell", "Rune", "Saba", "Una", "Wilm", "Ada", "Bo", "Eli", "Ida", "Lev"]
_SURNAME_WORDS = ["Ashdown", "Bell", "Corbin", "Penn", "Everly", "Fenwick", "Garrow", "Holloway", "Ingram",
                  "Jessop", "Kettle", "Larkin", "Merrow", "Norland", "Pryce", "Radley", "Sallow", "Thorne",
                  "Upton", "Varley", "Whitlow", "Yardley", "Abbott", "Birch", "Crane", "Dorsey", "Elwood", "Hart",
                  "Gable", "Hollis", "Irving", "Jansen", "Keller", "Lowry", "Marsh", "Nash", "Orwell", "Pike",
                  "Rook", "Sutter", "Tully", "Vance", "Webb", "York", "Ames", "Boyle", "Cobb", "Drake", "Eames",
                  "Frost", "Grady", "Hayes", "Joyce", "Kemp", "Lyle", "Moss", "Noble", "Platt", "Reyes", "Shaw",
                  "Toft", "Quill", "Dunn", "Voss"]
_PLACE_HEAD = ["Ar", "Bel", "Cor", "Dun", "El", "Fal", "Gil", "Hal", "Ist", "Kel", "Lor", "Mor", "Nor", "Ost",
               "Pel", "Quen", "Ros", "Sel", "Tam", "Ul", "Ver", "Wyn"]
_PLACE_TAIL = ["dale", "mere", "ford", "holm", "bury", "port", "stead", "wold"]
_JOBS = ["baker", "carpenter", "teacher", "nurse", "painter", "farmer", "sailor", "doctor", "engineer",
         "librarian", "potter", "tailor", "pilot", "chemist", "architect", "gardener", "musician", "lawyer",
         "miner", "weaver", "jeweler", "butcher", "writer", "astronomer"]
_COMPANY = (["Silver", "Golden", "Red", "Blue", "Green", "Iron", "Stone", "Oak", "River", "North", "South",
             "White"],
            ["Lantern", "Anchor", "Crown", "Bridge", "Harbor", "Arrow", "Falcon", "Garden", "Hammer", "Tower"],
            ["Press", "Works", "Mills", "Bakery", "Studio", "Foundry", "Company", "Shipyard"])

# Sentences per fact group. {S} is the subject at the start of a sentence, {s} inside one: the person's
# name in the first sentence of a document, a pronoun after it. Documents use one variant, paraphrases
# another, so a paraphrase says the same facts in other words and another order.
_SENTENCES = {
    "birth": ["{S} was born in {place} in {year}.", "{S} was born in {year} in the town of {place}.",
              "In {year}, {s} was born in {place}.", "{place} is where {s} was born, back in {year}."],
    "job": ["{S} works as {a_job}.", "{S} is {a_job} by trade.", "By profession, {s} is {a_job}."],
    "home": ["{S} lives in {home}.", "{S} now lives in {home}.", "These days {s} makes a home in {home}."],
    "founded": ["{S} founded {company} in {fyear}.", "In {fyear}, {s} founded {company}.",
                "{company} was started in {fyear}, and {s} was its founder."],
    "mentor": ["{S} studied under {mentor}.", "{S} learned the craft from {mentor}.",
               "As a student, {s} studied under {mentor}."],
}
# Question phrasings per answerable item; {n} is the full name. Every answer is a short span of the document.
_QUESTIONS = {
    "place": ["Where was {n} born?", "In which town was {n} born?"],
    "year": ["In what year was {n} born?", "When was {n} born?"],
    "job": ["What does {n} work as?", "What is the occupation of {n}?"],
    "home": ["Where does {n} live?", "In which town does {n} live now?"],
    "company": ["What did {n} found?", "Which company was founded by {n}?"],
    "fyear": ["In what year did {n} found {company}?", "When did {n} found {company}?"],
    "mentor": ["Who did {n} study under?", "Who was the teacher of {n}?"],
}
# Stage-1 QA only (names_asked=True): one more question per document, answered by the person's NAME. In the
# CPU lab they teach the stage-0 base to copy a name out of a text, and its raw-text reading of every
# question improved with them (8.7% -> 40.7% in one fast-lab run each); they did not make the tiny encoder's
# memories keep the name (BENCHMARKS.md, session 5).
_WHO = {"birth": "Who was born in {place}?", "job": "Who works as {a_job}?", "home": "Who lives in {home}?",
        "founded": "Who founded {company}?", "mentor": "Who studied under {mentor}?"}
# describe=True: every person has a job, and a stage-2/3 question about another fact names its person AND
# describes the job in other words, "Where does Edda Dunn (who makes bread) live?"; no distractor has that job.
# The CPU lab needs it: its tiny encoder's memories keep the facts its questions ask about but not the
# person's name (BENCHMARKS.md, sessions 5-6), so the name alone cannot tell the document from similar
# people's. The description shares no word with the job, so the untrained query reasoner (a copy of the
# document encoder) cannot match it by surface form: stage 3 has to learn that "who makes bread" finds the
# baker's document. Job questions stay plain and stage-2 only: a memory drops a fact no question asks.
_JOB_DESCRIPTIONS = {
    "baker": "who makes bread", "carpenter": "who builds furniture", "teacher": "who runs a classroom",
    "nurse": "who cares for patients", "painter": "who fills canvases", "farmer": "who grows crops",
    "sailor": "who goes to sea", "doctor": "who treats the sick", "engineer": "who designs machines",
    "librarian": "who keeps the books", "potter": "who shapes clay", "tailor": "who sews clothes",
    "pilot": "who flies planes", "chemist": "who mixes compounds", "architect": "who plans buildings",
    "gardener": "who tends flower beds", "musician": "who plays the violin", "lawyer": "who argues cases in court",
    "miner": "who digs for ore", "weaver": "who works a loom", "jeweler": "who sets precious stones",
    "butcher": "who cuts meat", "writer": "who pens novels", "astronomer": "who studies the stars"}
_ITEMS = {"birth": ("place", "year"), "job": ("job",), "home": ("home",), "founded": ("company", "fyear"),
          "mentor": ("mentor",)}


def _values(person: dict) -> dict:
    """The template fields of a person's facts, plus "a_job" ("a baker", "an engineer") when there is a job."""
    values = {**person["facts"], "a_job": None}
    if "job" in values:
        values["a_job"] = ("an " if values["job"][0] in "aeiou" else "a ") + values["job"]
    return values


def _render(person: dict, order: list[str], variants: dict) -> str:
    """The sentences of `order` (fact groups) with the chosen template variant of each, name first."""
    pron = person["pronoun"]
    values = _values(person)
    out = []
    for j, group in enumerate(order):
        subject = person["name"] if j == 0 else pron
        out.append(_SENTENCES[group][variants[group]].format(S=subject if j == 0 else pron.capitalize(),
                                                             s=subject, **values))
    return " ".join(out)


def _people(rng, n: int, firsts: list[str], used: set, places: list[str], names: str,
            every_job: bool = False) -> list[dict]:
    """n people in families of 2-4 sharing a surname, each with 2-4 fact groups (with every_job, one is "job").

    `used` holds what the other split may not reuse: surnames (names="syllables": a new family name each
    time) or full names (names="words": a surname word can return, a first-name + surname pair cannot).
    """
    people = []
    while len(people) < n:
        for _ in range(100_000):
            if names == "words":
                surname = rng.choice(_SURNAME_WORDS)
                free = [f for f in firsts if f"{f} {surname}" not in used]
                if len(free) >= 2:
                    break
            else:
                surname = "".join(rng.choice(_SURNAME) for _ in range(rng.choice((2, 2, 3)))).capitalize()
                if surname not in used:
                    used.add(surname)
                    free = firsts
                    break
        else:  # syllables: 20^2 + 20^3 surnames, 2-4 people each; words: 48 x 64 names
            raise ValueError(f"make_synthetic: out of {names} names after {len(people)} people; ask for fewer "
                             f"entities (about {20_000 if names == 'syllables' else 3_000} fit)")
        for first in rng.sample(free, min(rng.randint(2, 4), n - len(people), len(free))):
            if names == "words":
                used.add(f"{first} {surname}")
            year = rng.randint(1900, 1990)
            place, home = rng.sample(places, 2)
            facts = {"place": place, "year": str(year), "job": rng.choice(_JOBS), "home": home,
                     "company": " ".join(rng.choice(part) for part in _COMPANY),
                     "fyear": str(rng.randint(year + 20, min(year + 50, 2020)))}
            groups = rng.sample(sorted(_ITEMS), rng.randint(2, 4))
            if every_job and "job" not in groups:
                groups[-1] = "job"  # no extra random draw: the rest of the data set stays as without it
            people.append({"name": f"{first} {surname}", "first": first, "surname": surname,
                           "pronoun": rng.choice(("he", "she")), "facts": facts, "groups": groups})
    for p in people:  # mentors come from the same split (a held-out name never enters the training files)
        if "mentor" in p["groups"]:
            p["facts"]["mentor"] = rng.choice([q for q in people if q is not p])["name"]
        p["facts"] = {k: v for k, v in p["facts"].items() if any(k in _ITEMS[g] for g in p["groups"])}
        # The document, and a paraphrase of it: other template variants, other order when possible.
        doc_var = {g: rng.randrange(len(_SENTENCES[g])) for g in p["groups"]}
        para_var = {g: rng.choice([v for v in range(len(_SENTENCES[g])) if v != doc_var[g]]) for g in p["groups"]}
        order = p["groups"][:]
        while order == p["groups"]:
            rng.shuffle(order)
        p["doc"] = _render(p, p["groups"], doc_var)
        p["paraphrase"] = _render(p, order, para_var)
        p["items"] = [item for g in p["groups"] for item in _ITEMS[g]]
    return people


def question_fact(question: str) -> str:
    """The fact a synthetic question asks about (a key of _QUESTIONS), read back from its template."""
    for fact, templates in _QUESTIONS.items():
        for t in templates:
            head, tail = t.split("{n}")
            tail = tail.split("{company}")[-1]  # "... found {company}?": the company varies
            if question.startswith(head) and question.endswith(tail) and len(question) > len(head) + len(tail):
                return fact
    raise ValueError(f"not a synthetic question: {question!r}")


def _question(rng, person: dict, item: str, describe: bool = False) -> str:
    """A question about `item`; with describe, the job's description follows the name in brackets."""
    n = f"{person['name']} ({_JOB_DESCRIPTIONS[person['facts']['job']]})" if describe else person["name"]
    return rng.choice(_QUESTIONS[item]).format(n=n, company=person["facts"].get("company"))


def _who(rng, person: dict) -> str:
    """A question whose answer is the person's name, about one of their fact groups."""
    return _WHO[rng.choice(person["groups"])].format(**_values(person))


def _distractors(rng, person: dict, item: str, answer: str, people: list[dict], index: dict, n: int,
                 avoid: str | None = None) -> list[str]:
    """n documents of OTHER people that do not contain `answer`, as similar to `person` as possible.

    Tiers, in order: the same family (surname), the same first name, anyone else. Within a tier the order is
    random. With word names (index["mix"]) a surname is shared by dozens of people, so the first two tiers
    are taken in turn: about half the distractors share the surname, half the first name, and only the
    whole name singles the person out. Every distractor has a fact of the asked kind (index["same_kind"],
    the default: only the name tells the documents apart) or, with same_kind False, none (the question's
    topic alone then finds the document: an easier retrieval task). No distractor contains `avoid` either
    (describe=True: the person's job).
    """
    group = next(g for g, items in _ITEMS.items() if item in items)
    kind = lambda q: (group in q["groups"]) == index["same_kind"]  # noqa: E731
    chosen, seen = [], {person["name"]}
    needles = [answer.lower()] + ([avoid.lower()] if avoid else [])
    tiers = [[q for q in index["surname"][person["surname"]] if kind(q)],
             [q for q in index["first"][person["first"]] if kind(q)]]
    tiers = [rng.sample(t, len(t)) for t in tiers]
    if index["mix"]:  # word names: many share a surname; alternate the two tiers so both halves of the name matter
        tiers = [[q for pair in itertools.zip_longest(*tiers) for q in pair if q is not None]]
    if index["same_kind"]:
        tiers += [(rng.choice(index["group"][group]) for _ in range(20 * n)),
                  (rng.choice(people) for _ in range(20 * n)), people]  # the last is exhaustive
    else:
        tiers += [(q for q in rng.sample(people, len(people)) if kind(q))]  # every possible pick, shuffled
    for tier in tiers:
        for q in tier:
            if len(chosen) == n:
                return chosen
            if q["name"] not in seen and not any(x in q["doc"].lower() for x in needles):
                seen.add(q["name"])
                chosen.append(q["doc"])
    if len(chosen) < n:
        raise ValueError(f"make_synthetic: only {len(chosen)} of {n} distractors for {person['name']!r} avoid the "
                         f"answer {answer!r}; generate more entities")
    return chosen


def _records(rng, people: list[dict], k: int, n_candidates: int, questions_per_entity: int, asked, mix: bool,
             same_kind: bool, describe: bool = False):
    """Stage-2 and stage-3 records: questions with k documents / with N candidates and pos_index.

    describe: a question about another fact also describes the person's job (_JOB_DESCRIPTIONS), and no
    distractor has that job; a question about the job is asked plainly in stage 2 (so the memories must keep
    the job) and has no stage-3 record (nothing but the name would tell its document apart)."""
    index = {"surname": {}, "first": {}, "group": {}, "mix": mix, "same_kind": same_kind}
    for p in people:
        index["surname"].setdefault(p["surname"], []).append(p)
        index["first"].setdefault(p["first"], []).append(p)
        for g in p["groups"]:
            index["group"].setdefault(g, []).append(p)
    stage2, stage3 = [], []
    for p in people:
        items = [i for i in p["items"] if asked is None or i in asked]
        for item in rng.sample(items, min(questions_per_entity, len(items))):
            answer = p["facts"][item]
            described = describe and item != "job"
            job = p["facts"]["job"] if described else None
            docs = _distractors(rng, p, item, answer, people, index, k - 1, job) + [p["doc"]]
            rng.shuffle(docs)
            stage2.append({"question": _question(rng, p, item, described), "docs": docs, "answer": answer,
                           "gold_answer": answer})
            if describe and not described:
                continue
            # Sometimes the paraphrase is a second positive: pos_index is a list, recall is over all of it.
            positives = [p["doc"], p["paraphrase"]] if rng.random() < 0.3 else [p["doc"]]
            docs = positives + _distractors(rng, p, item, answer, people, index, n_candidates - len(positives),
                                            job)
            perm = rng.sample(range(n_candidates), n_candidates)  # candidate j goes to position perm[j]
            shuffled = [None] * n_candidates
            for j, d in enumerate(docs):
                shuffled[perm[j]] = d
            stage3.append({"question": _question(rng, p, item, described), "docs": shuffled, "answer": answer,
                           "pos_index": sorted(perm[:len(positives)])})
    return stage2, stage3


def make_synthetic(out_dir, seed: int = 0, n_train_entities: int = 1000, n_test_entities: int = 200, k: int = 5,
                   n_candidates: int = 8, questions_per_entity: int = 1, asked: list[str] | None = None,
                   names: str = "syllables", names_asked: bool = False, distractors: str = "same-kind",
                   describe: bool = False) -> dict:
    """Write a synthetic data set in the official formats; deterministic for a seed. Returns the counts.

    out_dir/stage1.jsonl       per training person: one "qa" record (a question and answer per fact, and
                               with names_asked one "Who ...?" question answered by the person's name) and
                               one "paraphrase" record (answers[0] = the same facts in other words), mixed
    out_dir/stage2.jsonl       `questions_per_entity` questions per person, each with k documents: the
                               person's and k-1 distractors (similar people, without the answer string).
                               The questions ask about the facts in `asked` (default: any of place, year,
                               job, home, company, fyear, mentor)
    out_dir/stage3.jsonl       the same questions with N candidates; pos_index = the person's document
                               (and 30% of the time its paraphrase too)
    out_dir/test_stage2.jsonl, test_stage3.jsonl   the same for held-out people (other families; with word
                               names, first-name + surname pairs never seen in training)
    out_dir/corpus.txt         the training documents and their paraphrases, one per line (tokenizer / LM)

    names: "syllables" or "words", how people are named (see the comment above _FIRST).
    distractors: "same-kind" (every distractor also has a fact of the asked kind: only the name tells the
    person's document apart) or "other-kind" (similar names, but no fact of the asked kind: the question's
    topic is enough, an easier retrieval task).
    describe: every person has a job, and stage-2/3 questions about another fact describe it in other words,
    "Where does Edda Dunn (who makes bread) live?"; no distractor has that job, so the description alone
    finds the document once a query reasoner has learned what it means (the CPU lab's setting). Questions
    about the job stay plain and are stage-2 only.
    """
    if names not in ("syllables", "words"):
        raise ValueError(f"make_synthetic: names={names!r}; choose 'syllables' or 'words'")
    if distractors not in ("same-kind", "other-kind"):
        raise ValueError(f"make_synthetic: distractors={distractors!r}; choose 'same-kind' or 'other-kind'")
    unknown = sorted(set(asked or ()) - set(_QUESTIONS))
    if unknown:
        raise ValueError(f"make_synthetic: unknown fact(s) {unknown} in asked; choose from {sorted(_QUESTIONS)}")
    if describe and asked is not None and set(asked) <= {"job"}:
        raise ValueError(f"make_synthetic: describe=True describes the job, so stage 3 needs questions about "
                         f"another fact than {asked}")
    if k < 1 or n_candidates < 2 or questions_per_entity < 1:
        raise ValueError(f"make_synthetic: need k >= 1, n_candidates >= 2, questions_per_entity >= 1; got k={k}, "
                         f"n_candidates={n_candidates}, questions_per_entity={questions_per_entity}")
    for name, n in (("n_train_entities", n_train_entities), ("n_test_entities", n_test_entities)):
        if n and n < 2 * max(k, n_candidates):  # distractors need enough other people without the answer
            raise ValueError(f"make_synthetic: {name}={n}; use 0 or at least 2 * max(k, n_candidates) = "
                             f"{2 * max(k, n_candidates)}")
    import random
    rng = random.Random(seed)
    if names == "words":
        firsts = list(_FIRST_WORDS)
    else:
        firsts = sorted({(rng.choice(_FIRST) + rng.choice(_FIRST) + rng.choice(_FIRST_END)).capitalize()
                         for _ in range(100)})
    places = sorted({h + t for h in _PLACE_HEAD for t in _PLACE_TAIL})
    places = rng.sample(places, 40)
    used = set()
    train = _people(rng, n_train_entities, firsts, used, places, names, describe)
    test = _people(rng, n_test_entities, firsts, used, places, names, describe)

    stage1 = []
    for p in train:
        questions = [_question(rng, p, item) for item in p["items"]]
        answers = [p["facts"][i] for i in p["items"]]
        if names_asked:
            questions.append(_who(rng, p))
            answers.append(p["name"])
        stage1.append({"data_type": "qa", "question": questions, "answers": answers, "docs": [p["doc"]]})
        stage1.append({"data_type": "paraphrase", "question": [], "answers": [p["paraphrase"]], "docs": [p["doc"]]})
    rng.shuffle(stage1)
    same = distractors == "same-kind"
    stage2, stage3 = _records(rng, train, k, n_candidates, questions_per_entity, asked, names == "words", same,
                              describe)
    test2, test3 = _records(rng, test, k, n_candidates, questions_per_entity, asked, names == "words", same,
                            describe)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"stage1.jsonl": stage1, "stage2.jsonl": stage2, "stage3.jsonl": stage3,
             "test_stage2.jsonl": test2, "test_stage3.jsonl": test3}
    for name, rows in files.items():
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    corpus = [p["doc"] for p in train] + [p["paraphrase"] for p in train]
    (out / "corpus.txt").write_text("".join(t + "\n" for t in corpus), encoding="utf-8")
    return {"train_entities": len(train), "test_entities": len(test), "corpus_lines": len(corpus),
            **{name.removesuffix(".jsonl"): len(rows) for name, rows in files.items()}}


def main(argv=None):
    """`python data.py synth ...` writes a synthetic data set; `python data.py check ...` validates files."""
    import argparse
    p = argparse.ArgumentParser(description="CLaRa data: synthetic corpus generator and format checker",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write a synthetic data set (train and held-out) in the official formats",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", required=True, help="output directory (created if missing)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    s.add_argument("--train", type=int, default=1000, help="number of training people (one document each)")
    s.add_argument("--test", type=int, default=200, help="number of held-out people (other families)")
    s.add_argument("--k", type=int, default=5, help="documents per stage-2 question")
    s.add_argument("--candidates", type=int, default=8, help="candidate documents per stage-3 question")
    s.add_argument("--questions", type=int, default=1, help="stage-2/3 questions per person (at most its facts)")
    s.add_argument("--ask", nargs="+", default=None, choices=sorted(_QUESTIONS), help="the facts stage-2/3 "
                   "questions ask about (default: all); documents and stage-1 QA always hold every fact")
    s.add_argument("--names", default="syllables", choices=("syllables", "words"), help="people's names: built "
                   "from syllables (several tokens, held-out surnames unseen) or two words from fixed lists (one "
                   "token each, held-out = unseen first+surname pairs)")
    s.add_argument("--ask-names", action="store_true", help="stage-1 QA also asks one 'Who ...?' question per "
                   "document, answered by the person's name")
    s.add_argument("--distractors", default="same-kind", choices=("same-kind", "other-kind"), help="stage-2/3 "
                   "distractors (people with similar names) also have a fact of the asked kind, so only the name "
                   "tells them apart, or have none, so the question's topic is enough (easier)")
    s.add_argument("--describe", action="store_true", help="every person has a job; stage-2/3 questions about "
                   "other facts describe it in other words, 'Where does Edda Dunn (who makes bread) live?', and no "
                   "distractor has it; job questions are plain and stage-2 only (the CPU lab: its tiny encoder "
                   "keeps facts, not names)")
    c = sub.add_parser("check", help="validate JSONL files against the format of a stage",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("files", nargs="+", help="JSONL files")
    c.add_argument("--stage", type=int, required=True, choices=(1, 2, 3), help="training stage of the format")
    c.add_argument("--max-errors", type=int, default=20, help="stop after this many errors")
    a = p.parse_args(argv)
    if a.command == "synth":
        counts = make_synthetic(a.out, a.seed, a.train, a.test, a.k, a.candidates, a.questions, a.ask, a.names,
                                a.ask_names, a.distractors, a.describe)
        print(json.dumps(counts))
        return 0
    dataset = JsonlDataset(a.files, a.stage)
    errors = dataset.check(a.max_errors)
    if len(errors) == a.max_errors:
        errors.append(f"(stopped after {a.max_errors} errors; --max-errors to see more)")
    print("\n".join(errors) if errors else f"{len(dataset)} records: all valid for stage {a.stage}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

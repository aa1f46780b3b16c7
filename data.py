"""Text in, token ids out: the tokenizer, the chat format and padding; the data readers.

Two sections, top to bottom:

    Prompt, ChatFormat, Tokenizer, left_pad      the model's conventions and chat format, text that stays text,
    train_tokenizer                              padding, a tiny BPE
    validate_record, JsonlDataset, batches       the official JSONL formats (docs/method.md#data-formats), checked
                                                 record by record and streamed in a resumable, sharded order;
    loads_record, question_and_docs, positives   the one reader of a line and of the shared fields, which
                                                 eval.py's evaluation files go through as well

Command line: `python data.py check --stage S FILE...` validates files. The CPU lab's synthetic corpus
generator (and the shipped sample data/sample, which it writes) is lab/synth.py, not part of the method.

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
    copying a token instead of learning a token-to-token mapping (lab/pretrain.py uses it).
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
# One JSON object per line (docs/method.md#data-formats). Every record is checked and normalised to one fixed set of
# keys before the model sees it, so that a malformed line fails loudly with its file, line and field
# instead of training on garbage: the official loader, given "docs": "some text", iterates the string and
# trains on single characters as documents.

STAGE_KEYS = {1: ("data_type", "question", "answers", "docs"),
              2: ("question", "docs", "answer"),
              3: ("question", "docs", "answer", "pos_index")}
DOC_KEYS = ("docs", "context", "content")  # the official loader's fallbacks, in its order


class DataError(ValueError):
    """A record that does not follow its format. The message is "{where}: {reason}{detail}": `where` is the
    record's path:line, `reason` the kind of problem without this record's particulars (eval.py counts the
    records it skips by reason), `detail` the rest."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        super().__init__(f"{where}: {reason}{detail}")
        self.where, self.reason = where, reason


def json_type(x) -> str:
    """The JSON type of a value, for error messages ("found a string")."""
    if isinstance(x, bool):  # before int: bool is an int subclass
        return "a boolean"
    names = {str: "a string", list: "a list", dict: "an object", int: "a number", float: "a number"}
    return "null" if x is None else names.get(type(x), type(x).__name__)


def _str_list(obj: dict, key: str, where: str, what: str) -> list[str]:
    """obj[key] as a list of non-empty strings; a bare string is the classic mistake, named as such."""
    value = obj[key]
    if isinstance(value, str):
        raise DataError(where, f"field '{key}': expected a list of {what}s", ", found a string (the official "
                        "loader would iterate it character by character); write [\"...\"]")
    if not isinstance(value, list):
        raise DataError(where, f"field '{key}': expected a list of {what}s", f", found {json_type(value)}")
    for i, x in enumerate(value):
        _text(x, f"{key}[{i}]", where, what)
    return value


def _text(value, field: str, where: str, what: str) -> str:
    """value as a non-empty string; `field` names it in the message ("answer", "docs[2]")."""
    if not isinstance(value, str):
        raise DataError(where, f"field '{field}': expected a {what} string", f", found {json_type(value)}")
    if not value.strip():
        raise DataError(where, f"field '{field}': empty {what}", " (the string is empty or only whitespace)")
    return value


def _nonempty_str(obj: dict, key: str, where: str, what: str) -> str:
    return _text(obj[key], key, where, what)


def _object(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(where, "expected a JSON object per line", f", found {json_type(obj)}")
    return obj


def _docs(obj: dict, stage: int | None, where: str) -> list[str]:
    key = next((k for k in DOC_KEYS if k in obj), None)
    if key is None:
        raise DataError(where, "missing field 'docs'", f" (also accepted: 'context', 'content'); the record has "
                        f"{sorted(obj)}")
    docs = _str_list(obj, key, where, "document")
    if not docs:
        raise DataError(where, "empty candidate list", f" (field '{key}' is [], expected at least one document)")
    if stage == 1 and len(docs) != 1:
        raise DataError(where, f"field '{key}': stage 1 takes exactly one document per record", f", found {len(docs)}")
    return docs


def question_and_docs(obj, where: str) -> tuple[str, list[str]]:
    """The fields every question record shares, checked: the record is an object, its documents (`docs`, else
    `context`, else `content`) a non-empty list of non-empty strings, its `question` a non-empty string.
    Stages 2 and 3 (validate_record) and eval.py's evaluation files read these two fields through here."""
    docs = _docs(_object(obj, where), None, where)
    if "question" not in obj:
        raise DataError(where, "missing field 'question'", " (a string)")
    return _nonempty_str(obj, "question", where, "question"), docs


def _answer(obj: dict, where: str) -> str:
    """The target of a stage-2/3 record, with the official fallbacks: answer, answers[0], golden_answers[0].

    `gold_answer` (str or list) comes last: the format documents it but the official loader rejects
    records that carry only it (docs/method.md#known-defects); we take it.
    """
    if "answer" in obj:
        return _nonempty_str(obj, "answer", where, "answer")
    for key in ("answers", "golden_answers"):
        if key in obj:
            answers = _str_list(obj, key, where, "answer")
            if not answers:
                raise DataError(where, f"field '{key}': empty list", ", expected at least one answer")
            return answers[0]
    if "gold_answer" in obj:
        if isinstance(obj["gold_answer"], list):
            answers = _str_list(obj, "gold_answer", where, "answer")
            if not answers:
                raise DataError(where, "field 'gold_answer': empty list", ", expected at least one answer")
            return answers[0]
        return _nonempty_str(obj, "gold_answer", where, "answer")
    raise DataError(where, "missing field 'answer'", " (also accepted: 'answers', 'golden_answers', "
                    f"'gold_answer'); the record has {sorted(obj)}")


def positives(obj: dict, n_docs: int, where: str) -> list[int] | None:
    """`pos_index`, the indices of the documents that hold the answer (None when absent): distinct ints in
    0..n_docs-1. Stage 3 logs recall@k with it (the warm-up trains on it); eval.py scores recall@k."""
    value = obj.get("pos_index")
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(where, "field 'pos_index': expected a list of document indices", f", found {json_type(value)}")
    for i, p in enumerate(value):
        if isinstance(p, bool) or not isinstance(p, int):
            raise DataError(where, f"field 'pos_index[{i}]': expected an integer index",
                            f", found {json_type(p)} {p!r}")
        if not 0 <= p < n_docs:
            raise DataError(where, f"field 'pos_index[{i}]': index {p} is out of range", f" for {n_docs} documents "
                            f"(0-based, expected 0..{n_docs - 1})")
    if len(set(value)) != len(value):
        raise DataError(where, "field 'pos_index': repeated index", f" in {value}")
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
    if stage != 1:
        question, docs = question_and_docs(obj, where)
        record = {"question": question, "docs": docs, "answer": _answer(obj, where)}
        if stage == 3:
            record["pos_index"] = positives(obj, len(docs), where)
        record["_where"] = where
        return record
    docs = _docs(_object(obj, where), stage, where)
    if "data_type" not in obj:
        raise DataError(where, "missing field 'data_type'", " (\"qa\" or \"paraphrase\")")
    kind = obj["data_type"]
    if kind not in ("qa", "paraphrase"):
        raise DataError(where, "field 'data_type': expected \"qa\" or \"paraphrase\"", f", found {kind!r}")
    if "answers" not in obj:
        raise DataError(where, "missing field 'answers'", " (a list of strings)")
    answers = _str_list(obj, "answers", where, "answer")
    if kind == "paraphrase":
        if not answers:
            raise DataError(where, "field 'answers': empty list", ", a paraphrase record needs answers[0]")
        return {"data_type": kind, "question": [], "answers": answers, "docs": docs, "_where": where}
    if "question" not in obj:
        raise DataError(where, "missing field 'question'", " (a list of strings, one per answer)")
    questions = _str_list(obj, "question", where, "question")
    if len(questions) != len(answers) or not questions:
        raise DataError(where, "fields 'question' and 'answers': a qa record needs lists of the same length >= 1",
                        f", found {len(questions)} questions and {len(answers)} answers")
    return {"data_type": kind, "question": questions, "answers": answers, "docs": docs, "_where": where}


def _unique_keys(where: str):
    """json object_pairs_hook: a key given twice in one object is an error (json keeps the last silently)."""
    def hook(pairs):
        obj = {}
        for k, v in pairs:
            if k in obj:
                raise DataError(where, "duplicate key", f" {k!r} in a JSON object (json.loads would keep only the "
                                "last value)")
            obj[k] = v
        return obj
    return hook


def loads_record(line: bytes | str, where: str):
    """One JSONL line -> the parsed JSON value: valid UTF-8, valid JSON, no key twice in an object, not
    nested beyond Python's recursion limit. Raises DataError naming `where` (file:line)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(where, "not valid UTF-8", f" ({e})") from None
    try:
        obj = json.loads(line, object_pairs_hook=_unique_keys(where))
    except json.JSONDecodeError as e:
        raise DataError(where, "not valid JSON", f" ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(where, "JSON nested too deeply to read") from None
    bad = lone_surrogate(obj, line)
    if bad:  # json.loads accepts it, but the string cannot be encoded (nor tokenised)
        raise DataError(where, "not valid text", f" (the escape {bad} is half of a UTF-16 surrogate pair)")
    return obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def lone_surrogate(obj, line: str) -> str | None:
    """The first \\uD800-\\uDFFF escape of `line` if a string of `obj` kept it unpaired (json.loads accepts
    it; encoding or tokenising that string fails later). Only lines holding such an escape are walked."""
    match = _SURROGATE_ESCAPE.search(line)
    if match is None:
        return None

    def bad(x):
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return True
            return False
        if isinstance(x, dict):
            return any(bad(k) or bad(v) for k, v in x.items())
        return isinstance(x, list) and any(bad(v) for v in x)
    return match.group(0) if bad(obj) else None


def parse_record(line: bytes | str, stage: int, where: str) -> dict:
    """One JSONL line -> a validated record (see loads_record and validate_record)."""
    return validate_record(loads_record(line, where), stage, where)


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
            raise DataError(r["_where"], "field 'docs'", f": {len(r['docs'])} documents, but {batch[0]['_where']} "
                            f"in the same batch has {len(batch[0]['docs'])}; every record of a batch needs the "
                            f"same number of documents (split the data by document count)")
        batch.append(r)
        if len(batch) == batch_size:
            yield batch
            batch = []


def main(argv=None):
    """`python data.py check --stage S FILE...` validates files against the format of a stage."""
    import argparse
    p = argparse.ArgumentParser(description="CLaRa data: format checker",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate JSONL files against the format of a stage",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("files", nargs="+", help="JSONL files")
    c.add_argument("--stage", type=int, required=True, choices=(1, 2, 3), help="training stage of the format")
    c.add_argument("--max-errors", type=int, default=20, help="stop after this many errors")
    a = p.parse_args(argv)
    dataset = JsonlDataset(a.files, a.stage)
    errors = dataset.check(a.max_errors)
    if len(errors) == a.max_errors:
        errors.append(f"(stopped after {a.max_errors} errors; --max-errors to see more)")
    print("\n".join(errors) if errors else f"{len(dataset)} records: all valid for stage {a.stage}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

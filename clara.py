"""CLaRa: compress documents into memory-token vectors, answer from them, and learn retrieval end to end.

This file is the method (paper arXiv 2511.18659; behaviour of the official `modeling_clara.py` as written
down in docs/method.md, never its code). One frozen decoder (model.py) carries three LoRA adapters:

    encoder  compresses a document:  "<ENC><s>{doc}</s>" (cut, left padded) + <MEM0..M-1>: L tokens
             -> final hidden states (after the last RMSNorm) at the M memory positions  = (M, H)
    decoder  answers: a chat prompt whose memory slots <MEM0..M-1><SEP> (one group per document)
             have their embeddings overwritten by the compressed vectors of those documents
    query    (stage 3) encodes the question like a document; cosine similarity with the compressed
             candidates -> differentiable top-k (topk.py) -> the selected vectors go into the slots

Stages (docs/method.md#stages): 1 = compression pretraining (QA / paraphrase targets, encoder + decoder +
<MEMi> embedding rows), 2 = instruction tuning (K documents per question, encoder + a fresh
decoder), 3 = end to end (query + decoder; documents compressed without gradient by the frozen
encoder).

Also here: the inference API of the official model (same names), a memory bank of compressed documents
searched by the query reasoner, our checkpoint format, and an importer for the released folders.

Shape legend: B questions, N candidates, K documents per prompt (top-k), M memory tokens per document,
T decoder tokens, L tokens of an encoder row (doc_max_length + 3 + M), H hidden size; E documents
per question in a batch (K in stages 1 and 2, N in stage 3).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors import SafetensorError

from data import MISTRAL, ChatFormat, Prompt, Tokenizer, left_pad
from model import HF_PROJ, LoRAConfig, Transformer, generate
from topk import topk_select

# ----------------------------------------------------------------------------------------------------
# Configuration and prompts

@dataclass
class ClaraConfig:
    doc_max_length: int = 256     # document tokens kept before compression (longer ones are cut)
    compr_rate: int = 32          # doc_max_length / compr_rate = memory tokens per document
    generation_top_k: int = 5     # documents per prompt (stages 2, 3 and inference)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    tau: float = 0.02             # temperature of the differentiable top-k (stage 3)
    topk_estimator: str = "straight_through"  # topk.py: straight_through | gumbel | soft
    mse_weight: float = 0.1       # weight of the alignment loss (stages 1 and 2)
    max_len: int = 2048           # decoder tokens per example, truncated on the right
    training_stage: int = 1

    def __post_init__(self):
        if self.compr_rate < 1 or self.n_mem < 1:
            raise ValueError(f"doc_max_length {self.doc_max_length} // compr_rate {self.compr_rate} = 0 memory tokens")

    @property
    def n_mem(self) -> int:
        return self.doc_max_length // self.compr_rate

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ClaraConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{source}: unknown ClaraConfig field(s) {sorted(unknown)}")
        return cls(**d)


SYSTEM_QA = ("You are a helpful assistant. Given a document, your task is to generate some single questions "
             "to cover all key information of the document and answer them sequentially.")
SYSTEM_PARAPHRASE = ("You are a helpful assistant. Your task is follow the instructions to paraphrase the "
                     "background information.")
SYSTEM_ANSWER = ("You are a helpful assistant. Your task is to extract relevant information from provided "
                 "documents and to answer to questions as briefly as possible.")
PARAPHRASE_TEMPLATES = [
    "Background: {docs} means the same as",
    "Background: {docs} Can you put the above sentences in your own terms?",
    "Background: {docs} Please provide a reinterpretation of the preceding background text.",
    "These two expressions are equivalent in essence:\n(1) {docs}\n(2)",
    "Background: {docs} is a paraphrase of what?",
    "Background: {docs} Could you give me a different version of the background sentences above?",
    "In other words, background: {docs} is just another way of saying:",
    "You're getting across the same point whether you say background: {docs} or",
    "Background: {docs} After unpacking the ideas in the background information above, we got:",
    "Background: {docs} Please offer a restatement of the background sentences I've just read.",
    "Background: {docs}, which also means:",
    "Strip away the mystery, and you'll find background: {docs} is simply another rendition of:",
    "The essence of background: {docs} is captured again in the following statement:",
]
# Every fixed string the prompts are built from: a tokenizer trained for a tiny model (train.py) sees them too,
# so that the system prompt costs a few dozen tokens instead of one per character.
PROMPT_TEXTS = [SYSTEM_QA, SYSTEM_PARAPHRASE, SYSTEM_ANSWER, *(t.replace("{docs}", "") for t in PARAPHRASE_TEMPLATES),
                "Background:", "Question:", "Answer:"]


def build_prompt(kind: str, docs: str, question: str = "", qa: list[tuple[str, str]] | None = None,
                 template: int = 0, fmt: ChatFormat = MISTRAL) -> tuple[Prompt, str | None]:
    """The one prompt builder: the chat text of every kind of example (docs/method.md, "Prompts").

    kind: "qa" (stage 1), "paraphrase" (stage 1), "answer" (stages 2/3 and inference), "closed_book".
    docs: the background, either memory slots (`Clara.mem_slots` per document) or raw text
    (`Prompt.text(...)`, as `text_prompt` does). A plain str is read as slots: its <MEMi> / <SEP> are the tokens.
    fmt: the model's chat format (data.CHAT_FORMATS); Mistral's gives the official strings exactly.
    Returns (prompt, target text or None); the target is what the loss covers (plus the end-of-turn token).
    The prompt is a `data.Prompt`: a str whose question and document pieces are text, never control tokens.
    """
    text = Prompt.text
    if not isinstance(docs, Prompt):
        docs = Prompt([(piece, i % 2 == 1) for i, piece in enumerate(re.split(r"(<MEM\d+>|<SEP>)", docs))])
    if kind == "qa":
        target = "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in qa) if qa else None
        return fmt.prompt(text("Background:\n") + docs, SYSTEM_QA), target
    if kind == "paraphrase":
        before, after = PARAPHRASE_TEMPLATES[template].split("{docs}")
        return fmt.prompt(text(before) + docs + after, SYSTEM_PARAPHRASE), None
    if kind == "answer":
        return fmt.prompt(text("Background:\n") + docs + "\n\nQuestion:" + question, SYSTEM_ANSWER), None
    if kind == "closed_book":
        return fmt.prompt(text("Question:") + question, SYSTEM_ANSWER), None
    raise ValueError(f"unknown prompt kind {kind!r}")


def retrieval_infonce(scores: torch.Tensor, pos_index: list[list[int]], tau: float = 0.02,
                      reduction: str = "mean") -> torch.Tensor:
    """Multi-positive InfoNCE over cosine scores, averaged over rows (docs/method.md#losses, the official optional
    retrieval warm-up; supervised by pos_index, so NOT the end-to-end stage 3, which never sees pos_index):

        loss_b = -log( sum_{p in pos_b} exp(s_bp / tau) / sum_n exp(s_bn / tau) )

    scores (B, N); pos_index: the positives of each row (a row without positives is an error);
    reduction "mean" or "sum" over rows (train.py sums, then divides by the rows of the whole step).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"retrieval_infonce: reduction must be 'mean' or 'sum', got {reduction!r}")
    if any(not p for p in pos_index):
        raise ValueError("retrieval_infonce: every row needs at least one positive in pos_index")
    z = scores.float() / tau  # (B, N)
    pos = torch.zeros_like(z, dtype=torch.bool)
    for b, p in enumerate(pos_index):
        pos[b, p] = True
    loss = torch.logsumexp(z, 1) - torch.logsumexp(z.masked_fill(~pos, float("-inf")), 1)  # (B,)
    return loss.sum() if reduction == "sum" else loss.mean()


def text_prompt(question: str, docs: list[str], fmt: ChatFormat = MISTRAL) -> Prompt:
    """The raw-text answer prompt (the uncompressed baseline, and stage-0 QA text): the documents one per line."""
    return build_prompt("answer", Prompt.text("\n".join(docs)), question=question, fmt=fmt)[0]


# ----------------------------------------------------------------------------------------------------
# A training batch, and what a stage's forward returns

@dataclass
class Batch:
    """The tensors of one training batch (`Clara.collate`); a field means one thing in every stage.

    The encoder rows are question-major: question b owns rows b*E .. b*E+E-1, E = docs_per_question.
    """
    doc_ids: torch.Tensor      # (B*E, L) the documents as encoder rows (`tokenize_for_encoder`)
    doc_mask: torch.Tensor     # (B*E, L) 1 = token, 0 = left padding
    docs_per_question: int     # E: K documents per prompt (stages 1, 2), N candidates (stage 3)
    truncated: int             # documents longer than doc_max_length, cut on the right
    dec_ids: torch.Tensor      # (B, T) decoder prompt + target, left padded; slots as <MEMi>
    dec_mask: torch.Tensor     # (B, T)
    labels: torch.Tensor       # (B, T) the target tokens (answer + end of turn), -100 elsewhere
    q_ids: torch.Tensor | None = None    # (B, L) stage 3: the questions as encoder rows
    q_mask: torch.Tensor | None = None   # (B, L)
    pos_index: list | None = None        # stage 3: each question's positives (a list, or None)

    @property
    def docs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.doc_ids, self.doc_mask

    @property
    def questions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_ids, self.q_mask

    @property
    def n_targets(self) -> int:
        """Target tokens of the answer objective (what its summed CE is divided by)."""
        return int((self.labels != -100).sum())


@dataclass
class StageLoss:
    """What one stage's forward returns (`Clara.loss`), made into the training loss by `total_loss`.

    The answer objective fills ce_sum / n_targets, the retrieval warm-up infonce_sum / n_questions.
    """
    mse: torch.Tensor                         # the alignment loss (stages 1, 2); 0 in stage 3
    ce_sum: torch.Tensor | None = None        # the decoder's CE summed over its target tokens
    n_targets: torch.Tensor | None = None     # their number
    infonce_sum: torch.Tensor | None = None   # the warm-up's InfoNCE summed over the questions
    n_questions: torch.Tensor | None = None   # their number
    topk: torch.Tensor | None = None          # (B, K) stage 3: the selected candidates, best first

    @property
    def objective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the objective summed over its terms, their number), whichever objective ran."""
        if self.infonce_sum is not None:
            return self.infonce_sum, self.n_questions
        return self.ce_sum, self.n_targets


# ----------------------------------------------------------------------------------------------------
# The model

class Clara(nn.Module):
    def __init__(self, model: Transformer, tokenizer: Tokenizer, cfg: ClaraConfig, base_path: str | None = None):
        """Wrap a loaded base decoder: add CLaRa's tokens, grow the vocabulary, add the adapters."""
        super().__init__()
        self.cfg, self.tok, self.base_path = cfg, tokenizer, base_path
        self.base_vocab = tokenizer.vocab_size
        M = cfg.n_mem
        mem_tokens = [f"<MEM{i}>" for i in range(M)]
        if tokenizer.has_token("<ENC>"):  # a tokenizer saved with CLaRa's tokens: check they are ours
            self.base_vocab = tokenizer.token_id("<MEM0>") if tokenizer.has_token("<MEM0>") else -1
            if not all(tokenizer.has_token(t) for t in mem_tokens) or tokenizer.has_token(f"<MEM{M}>"):
                raise ValueError(f"{tokenizer.source}: its <MEMi> tokens do not match n_mem={M} "
                                 f"(doc_max_length {cfg.doc_max_length} / compr_rate {cfg.compr_rate})")
        if self.base_vocab > model.cfg.vocab_size:
            raise ValueError(f"{tokenizer.source}: tokenizer has {self.base_vocab} base tokens but the model's "
                             f"embedding has only {model.cfg.vocab_size} rows: wrong tokenizer for this model?")
        ids = tokenizer.add_special_tokens(mem_tokens + ["<AE>", "<ENC>", "<SEP>"])
        self.mem_ids = torch.tensor(ids[:M])
        self.ae_id, self.enc_id, self.sep_id = ids[M:]
        if ids != list(range(ids[0], ids[0] + M + 3)):
            raise ValueError(f"{tokenizer.source}: CLaRa's tokens must be contiguous after the base vocabulary, got ids {ids}")
        if tokenizer.vocab_size > model.cfg.vocab_size:
            model.resize_vocab(tokenizer.vocab_size)
        self.model = model.requires_grad_(False)
        for name in ("encoder", "decoder"):
            model.add_adapter(name, cfg.lora)
        if cfg.training_stage == 3:
            model.add_adapter("query", cfg.lora)
        self.loaded_adapters: set[str] = set()  # the adapters from_pretrained read from a checkpoint
        # The base decoder's weight files, pinned by content hash in every checkpoint saved from this model.
        # base_carried: a save copies the base into `<ckpt>/base`: a base loaded from inside a checkpoint (a
        # checkpoint never points into another checkpoint, which a rerun may replace), or a small base the
        # caller wants the checkpoint to carry (train.py: the shipped tiny base), so it loads from anywhere.
        self.base_carried = False
        self.base_sha256: dict[str, str] | None = None  # None: hashed from base_path at the first save
        self.loaded_stage: int | None = None  # the training stage that wrote that checkpoint
        # The <MEMi> input embeddings train in stage 1 (docs/method.md#added-tokens). Rather than a gradient mask over
        # the whole (V, H) embedding (and AdamW state for all of it), they live in their own (M, H)
        # parameter, used by `embed`, and are written into the embedding rows when a checkpoint is saved.
        emb = model.tok_embeddings.weight
        self.mem_embeddings = nn.Parameter(emb[ids[0]:ids[0] + M].detach().clone().float(), requires_grad=False)

    # -- small helpers ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def mem_slots(self) -> Prompt:
        """One document's slot in a prompt: <MEM0>..<MEM{M-1}><SEP> (control tokens; `* K` for K documents)."""
        return Prompt.control(*(f"<MEM{i}>" for i in range(self.cfg.n_mem)), "<SEP>")

    @property
    def fmt(self) -> ChatFormat:
        """The base model's chat format (data.CHAT_FORMATS), read from its tokenizer files."""
        return self.tok.chat_format

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, H), with the <MEMi> rows taken from `mem_embeddings`."""
        x = self.model.tok_embeddings(ids)  # (B, T, H)
        m0, M = int(self.mem_ids[0]), self.cfg.n_mem
        is_mem = (ids >= m0) & (ids < m0 + M)  # (B, T)
        mem = self.mem_embeddings.to(x.dtype)[(ids - m0).clamp(0, M - 1)]  # (B, T, H)
        return torch.where(is_mem[..., None], mem, x)

    def trainable_parameters(self, stage: int) -> dict[str, nn.Parameter]:
        """Mark and return what trains in `stage` (docs/method.md#stages, the table); everything else, the
        base decoder included, is frozen."""
        self.requires_grad_(False)
        names = {1: ("encoder", "decoder"), 2: ("encoder", "decoder"), 3: ("query", "decoder")}[stage]
        params = {}
        for a in names:
            params.update({f"model.{k}": v for k, v in self.model.adapter_parameters(a).items()})
        if stage == 1:
            params["mem_embeddings"] = self.mem_embeddings
        for p in params.values():
            p.requires_grad_(True)
        return params

    # -- the encoder: documents (and stage-3 questions) -> memory vectors -------------------------

    def tokenize_for_encoder(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Documents, or stage-3 questions (laid out exactly alike), as encoder rows of L tokens:
        "<ENC><s>text</s>" cut on the right to doc_max_length + 3 tokens, LEFT padded to that, then
        the M memory tokens (L = doc_max_length + 3 + M).

        <s> / </s> are the model's own bos / eos (`Tokenizer.document`; no bos for a model without
        one). The text is text: a document holding "<MEM0>" or "</s>" does not open a slot or end.
        Returns ids and mask (n, L) on the model's device and the number of texts that were cut.
        """
        n_text = self.cfg.doc_max_length + 3  # <ENC>, <s>, the text, </s>
        rows = self.tok.encode_batch([self.tok.document(t) for t in texts])
        truncated = sum(len(r) > n_text for r in rows)
        ids, mask = left_pad([r[:n_text] for r in rows], self.tok.pad_id, n_text)  # (n, L - M)
        n = len(texts)
        ids = torch.cat([ids, self.mem_ids.expand(n, -1)], 1)  # (n, L)
        mask = torch.cat([mask, torch.ones(n, self.cfg.n_mem, dtype=mask.dtype)], 1)
        return ids.to(self.device), mask.to(self.device), truncated

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, adapter: str = "encoder"):
        """Encoder rows (n, L) -> memory vectors (n, M, H) and the alignment loss
        (docs/method.md#losses). adapter "encoder" compresses documents, "query" encodes stage-3
        questions (the query reasoner).

        mse = mean over rows and hidden units of (mean_t∈mem h_t - mean_t∈text h_t)^2, where
        "text" is every real non-memory token (<ENC>, <s>, the text, </s>).
        """
        M = self.cfg.n_mem
        h = self.model(inputs_embeds=self.embed(ids), attention_mask=mask, adapter=adapter,
                       output="hidden")  # (n, L, H)
        mem = h[:, -M:]  # (n, M, H): the memory tokens are always the last M positions
        text_mask = mask.clone()
        text_mask[:, -M:] = 0
        n_text = text_mask.sum(1, keepdim=True).clamp(min=1)  # (n, 1)
        text_mean = (h * text_mask[..., None]).sum(1) / n_text  # (n, H)
        mse = (mem.float().mean(1) - text_mean.float()).pow(2).mean()
        return mem, mse

    # -- decoder prompts ---------------------------------------------------------------------------

    def tokenize_prompts(self, prompts: list[str], targets: list[str | None]):
        """Chat prompts (+ targets) -> left-padded ids, mask and labels, (B, T) each; the labels are
        -100 but on the target and its end of turn.

        A prompt from `build_prompt` keeps its text as text; a plain str is read as a template the
        caller wrote (every special-token string in it is the token). The target is joined as the
        chat format says (Mistral: " {answer}</s>"; ChatML: "{answer}<|im_end|>"). Sequences are
        capped at max_len tokens by cutting on the right (the official truncation).
        """
        rows, labels = [], []
        for p, t in zip(prompts, targets):
            p = p if isinstance(p, Prompt) else self.tok.template(p)
            p_ids = self.tok.encode(p)
            if t is None:
                rows.append(p_ids)
                labels.append([-100] * len(p_ids))
                continue
            full = self.tok.encode(p + self.fmt.target(t))
            if full[:len(p_ids)] != p_ids:
                raise ValueError(f"{self.tok.source}: the prompt's tokens are not a prefix of "
                                 "prompt+answer tokens (a piece crosses the boundary); cannot "
                                 "place the labels")
            full = full[:self.cfg.max_len]
            rows.append(full)
            labels.append([-100] * len(p_ids) + full[len(p_ids):])
        ids, mask = left_pad(rows, self.tok.pad_id)  # (B, T)
        lab, _ = left_pad([lb[:len(r)] for lb, r in zip(labels, rows)], -100)  # (B, T)
        return ids.to(self.device), mask.to(self.device), lab.to(self.device)

    def splice(self, ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings with document j's M vectors written into the j-th memory slot.

        ids (B, T) holding K slot groups per row; memory (B, K, M, H). One masked scatter: the
        memory positions of the flattened batch, in row-major order, are exactly (b, j, m) in order.
        """
        emb = self.embed(ids)  # (B, T, H)
        m0, M = int(self.mem_ids[0]), self.cfg.n_mem
        is_mem = (ids >= m0) & (ids < m0 + M)  # (B, T)
        B, K = memory.shape[:2]
        counts = is_mem.sum(1)
        if not bool((counts == K * M).all()):
            raise ValueError(f"splice: every prompt must hold {K} slots of {M} memory tokens; "
                             f"found {counts.tolist()} memory tokens (the prompt is longer than "
                             f"max_len={self.cfg.max_len} and was cut: raise max_len)")
        return emb.masked_scatter(is_mem[..., None], memory.to(emb.dtype))

    def decoder_ce_sum(self, batch: "Batch", memory: torch.Tensor):
        """The decoder's cross-entropy SUMMED over the target tokens (fp32, shifted by one), and
        their number; memory (B, K, M, H) fills the slots. `total_loss` divides by the whole step's
        count."""
        emb = self.splice(batch.dec_ids, memory)  # (B, T, H)
        h = self.model(inputs_embeds=emb, attention_mask=batch.dec_mask, adapter="decoder",
                       output="hidden")  # (B, T, H)
        labels = batch.labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        keep = labels != -100
        logits = self.model.output(h[:, :-1][keep]).float()  # (n_targets, V): only at the targets
        ce = F.cross_entropy(logits, labels[keep], reduction="sum")
        return ce, keep.sum()

    # -- batches and the three stage losses --------------------------------------------------------

    def collate(self, records: list[dict], stage: int, seed: int = 0) -> "Batch":
        """Validated records (data.py) -> the tensors of one batch.

        stage 1: {"data_type", "question", "answers", "docs"} one document each
        stage 2: {"question", "docs" (K), "answer"}
        stage 3: {"question", "docs" (N), "answer", "pos_index"}
        The paraphrase template is drawn per record from (seed, the record's file:line), so it does
        not depend on how records are grouped into batches or ranks.
        """
        E = len(records[0]["docs"])  # documents per question: K (stages 1, 2), N (stage 3)
        if any(len(r["docs"]) != E for r in records):
            raise ValueError(f"collate: every record of a batch needs the same number of "
                             f"documents; got {[len(r['docs']) for r in records]}")
        docs = [d for r in records for d in r["docs"]]
        doc_ids, doc_mask, truncated = self.tokenize_for_encoder(docs)  # (B*E, L)
        examples = [self.example(r, stage, seed, i) for i, r in enumerate(records)]
        dec_ids, dec_mask, labels = self.tokenize_prompts(*map(list, zip(*examples)))  # (B, T) each
        batch = Batch(doc_ids, doc_mask, E, truncated, dec_ids, dec_mask, labels)
        if stage == 3:  # the questions, for the query reasoner; pos_index: recall@k, the warm-up
            questions = [r["question"] for r in records]
            batch.q_ids, batch.q_mask, _ = self.tokenize_for_encoder(questions)  # (B, L)
            batch.pos_index = [r.get("pos_index") for r in records]
        return batch

    def example(self, record: dict, stage: int, seed: int = 0, i: int = 0) -> tuple[Prompt, str]:
        """One record's training prompt and target (docs/method.md#prompts). Stage 3's prompt has
        top-k slots, whatever the number of candidates; `i` names a record without a `_where`."""
        r, slots, fmt = record, self.mem_slots, self.fmt
        if stage == 1 and r["data_type"] == "qa":
            return build_prompt("qa", slots, qa=list(zip(r["question"], r["answers"])), fmt=fmt)
        if stage == 1:
            rng = random.Random(f"{seed}:{r.get('_where', i)}")
            template = rng.randrange(len(PARAPHRASE_TEMPLATES))
            return build_prompt("paraphrase", slots, template=template, fmt=fmt)[0], r["answers"][0]
        K = self.cfg.generation_top_k if stage == 3 else len(r["docs"])
        return build_prompt("answer", slots * K, question=r["question"], fmt=fmt)[0], r["answer"]

    def forward(self, batch: "Batch", stage: int, objective: str = "answer") -> "StageLoss":
        """The training forward is the stage loss (FSDP's hooks run around a module's forward)."""
        return self.loss(batch, stage, objective)

    def loss(self, batch: "Batch", stage: int, objective: str = "answer") -> "StageLoss":
        """One stage's loss pieces (see `StageLoss`, `total_loss`).

        objective="retrieval_warmup" (stage 3 only): the official optional warm-up instead of the
        answer loss: InfoNCE over the query reasoner's scores, supervised by pos_index; no decoder.
        """
        zero = torch.zeros((), device=batch.dec_ids.device)
        if objective == "retrieval_warmup":
            if stage != 3:
                raise ValueError(f"the retrieval warm-up is a stage-3 objective, got stage {stage}")
            scores, _ = self.score_candidates(batch.docs, batch.questions)  # (B, N)
            nce = retrieval_infonce(scores, batch.pos_index, self.cfg.tau, reduction="sum")
            idx = scores.topk(self.cfg.generation_top_k, dim=1).indices  # (B, K): for recall@k
            n = torch.tensor(scores.shape[0], device=nce.device)
            return StageLoss(mse=zero, infonce_sum=nce, n_questions=n, topk=idx)
        if objective != "answer":
            raise ValueError(f"objective must be 'answer' or 'retrieval_warmup', got {objective!r}")
        if stage in (1, 2):
            mem, mse = self.encode(batch.doc_ids, batch.doc_mask)  # (B*K, M, H)
            B, K = batch.dec_ids.shape[0], batch.docs_per_question
            ce, n = self.decoder_ce_sum(batch, mem.view(B, K, *mem.shape[1:]))  # (B, K, M, H)
            return StageLoss(mse=mse, ce_sum=ce, n_targets=n)
        if stage != 3:
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
        selected, idx, _ = self.retrieve(batch.docs, batch.questions)  # (B, K, M, H), (B, K)
        ce, n = self.decoder_ce_sum(batch, selected)
        return StageLoss(mse=zero, ce_sum=ce, n_targets=n, topk=idx)

    def retrieve(self, docs, questions, top_k: int | None = None):
        """Stage 3: query reasoner -> cosine scores -> differentiable top-k -> selected memory.

        docs: (ids, mask) of the B*N candidates, question-major; questions: (ids, mask) of the B
        questions (`tokenize_for_encoder`). Returns selected (B, K, M, H) in rank order, idx (B, K)
        and scores (B, N).
        """
        top_k = top_k or self.cfg.generation_top_k
        N = docs[0].shape[0] // questions[0].shape[0]
        if top_k > N:
            raise ValueError(f"top-k {top_k} is larger than the number of candidates {N}")
        scores, D = self.score_candidates(docs, questions)  # (B, N), (B, N, M*H)
        W, idx = topk_select(scores, top_k, self.cfg.tau, self.cfg.topk_estimator,
                             training=self.training)  # (B, K, N), (B, K)
        selected = torch.einsum("bkn,bnd->bkd", W, D)  # (B, K, M*H): slot j = the j-th ranked doc
        return selected.view(scores.shape[0], top_k, self.cfg.n_mem, -1), idx, scores

    def score_candidates(self, docs, questions):
        """Cosine scores (B, N) in fp32 between the query reasoner's question vector and each
        candidate's memory, and the candidates' memory D (B, N, M*H) in fp32 (arguments as in
        `retrieve`).

        As in stage 3 the documents go through the frozen encoder under no_grad with dropout off.
        """
        B = questions[0].shape[0]
        N = docs[0].shape[0] // B
        was_training = self.model.training
        with torch.no_grad():  # documents: frozen encoder, and no LoRA dropout (an official defect)
            self.model.eval()
            mem, _ = self.encode(*docs)  # (B*N, M, H)
            self.model.train(was_training)
        D = mem.view(B, N, -1).float()  # (B, N, M*H)
        q, _ = self.encode(*questions, adapter="query")  # (B, M, H)
        return F.cosine_similarity(q.reshape(B, 1, -1).float(), D, dim=-1), D  # (B, N) fp32

    def total_loss(self, out: "StageLoss", n_terms=None, ranks: int = 1,
                   micro_batches: int = 1) -> torch.Tensor:
        """The one loss formula: the objective summed over its terms / their number + mse_weight *
        the alignment loss (stages 1 and 2; 0 in stage 3). The terms: target tokens (CE), or
        questions (the warm-up's InfoNCE).

        For one micro-batch's share of an optimizer step (train.py): `n_terms` the terms of the
        whole step (all micro-batches, all ranks), `ranks` the number of ranks (FSDP averages their
        gradients, so each rank's sum is scaled up by it), `micro_batches` the accumulation steps
        (the mse is their mean).
        """
        summed, count = out.objective
        n = count if n_terms is None else n_terms
        return summed * ranks / n.clamp(min=1) + self.cfg.mse_weight * out.mse / micro_batches

    # -- inference API (names and meaning of the official model) -----------------------------------

    @torch.no_grad()
    def compress_documents(self, documents: list[str],
                           batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Documents -> (embeddings (n, M, H), mse), as the official call returns them.

        Encoder adapter, eval mode (no dropout). mse is the alignment loss of `encode` over all n
        documents (the batches' losses weighted by their sizes: the same mean as one pass over all
        of them). Port `emb, _ = model.compress_documents(docs)` as it is; `compress_texts` returns
        the tensor alone.
        """
        if not documents:
            raise ValueError("compress_documents: no documents to compress")
        self.eval()
        out, mse = [], 0.0
        for i in range(0, len(documents), batch_size):
            ids, mask, _ = self.tokenize_for_encoder(documents[i:i + batch_size])
            mem, m = self.encode(ids, mask)  # (b, M, H), ()
            out.append(mem)
            mse = mse + m * len(ids)
        return torch.cat(out), mse / len(documents)

    def compress_texts(self, documents: list[str], batch_size: int = 32) -> torch.Tensor:
        """Documents -> memory vectors (n, M, H) only: `compress_documents` without the mse."""
        return self.compress_documents(documents, batch_size)[0]

    def _check_docs(self, questions, documents):
        if len(questions) != len(documents):
            raise ValueError(f"{len(questions)} questions but {len(documents)} document lists")
        E = len(documents[0])  # documents per question
        bad = [i for i, d in enumerate(documents) if len(d) != E or isinstance(d, str)]
        if bad:
            first = documents[bad[0]]
            has = "a string" if isinstance(first, str) else len(first)
            raise ValueError(f"every question needs a list of the same number of documents ({E}); "
                             f"question {bad[0]} has {has}")
        return E

    @torch.no_grad()
    def _generate(self, prompts: list[str], memory: torch.Tensor | None, max_new_tokens: int,
                  adapter: str | None = "decoder") -> list[str]:
        self.eval()
        ids, mask, _ = self.tokenize_prompts(prompts, [None] * len(prompts))  # (B, T)
        emb = self.splice(ids, memory) if memory is not None else self.embed(ids)  # (B, T, H)
        out = generate(self.model, inputs_embeds=emb, attention_mask=mask, adapter=adapter,
                       max_new_tokens=max_new_tokens, eos_id=self.tok.stop_ids)
        return self.tok.decode_batch(out)

    def _memory_per_question(self, questions: list[str], compressed_documents) -> torch.Tensor:
        """Any accepted layout of compressed documents -> (B, K, M, H), row b = question b's K documents.

        Accepted: the official flat (B*K, M, H) of `compress_documents` on the concatenated document lists
        (K = n // B, as officially; question b owns rows b*K..b*K+K-1), (B, K, M, H), or a list of B (K, M, H).
        """
        B, M, H = len(questions), self.cfg.n_mem, self.model.cfg.dim
        mem = torch.stack(list(compressed_documents)) if isinstance(compressed_documents, (list, tuple)) else compressed_documents
        got = tuple(mem.shape)
        if mem.dim() == 3:
            n = mem.shape[0]
            if n == 0 or n % B:
                raise ValueError(f"compressed_documents holds {n} documents for {B} questions: the flat "
                                 f"(n_questions * k, M, H) layout needs a positive multiple of {B}")
            mem = mem.reshape(B, n // B, *mem.shape[1:])  # (B, K, M, H)
        if mem.dim() != 4 or mem.shape[0] != B or mem.shape[2] != M or mem.shape[3] != H:
            raise ValueError(f"compressed_documents must be (B*K, M={M}, H={H}), (B={B}, K, M, H) or a list "
                             f"of B (K, M, H); got {got}")
        return mem

    def generate_from_compressed_documents_and_questions(self, questions: list[str], compressed_documents,
                                                         max_new_tokens: int = 128) -> list[str]:
        """Answer each question from its compressed documents: the official flat (B*K, M, H) tensor that
        `compress_documents` returns for the concatenated document lists (K = n // B), or (B, K, M, H), or
        a list of B (K, M, H). Unlike the official method, changes no model state."""
        mem = self._memory_per_question(questions, compressed_documents)  # (B, K, M, H)
        prompts = [build_prompt("answer", self.mem_slots * mem.shape[1], question=q, fmt=self.fmt)[0] for q in questions]
        return self._generate(prompts, mem.to(self.device), max_new_tokens)

    def generate_from_text(self, questions: list[str], documents: list[list[str]], max_new_tokens: int = 128) -> list[str]:
        """The official meaning: compress every given document (encoder adapter, no dropout), then answer
        from their memory vectors (decoder adapter), k = len(documents[0]) slots. The decoder never sees
        the raw text; for that baseline see `generate_from_raw_text`. Unlike the official method, changes
        no model state (the official one overwrites generation_top_k)."""
        self._check_docs(questions, documents)
        mem = self.compress_texts([d for ds in documents for d in ds])  # (B*K, M, H), question-major
        return self.generate_from_compressed_documents_and_questions(questions, mem, max_new_tokens)

    def generate_from_raw_text(self, questions: list[str], documents: list[list[str]], max_new_tokens: int = 128,
                               adapter: str | None = "decoder") -> list[str]:
        """Answer from the raw text of the documents (no compression): the uncompressed baseline, not an
        official call.

        The documents replace the memory slots, one per line. adapter=None reads with the bare base model
        (the paper's "Mistral-7B w/ retrieval" row).
        """
        self._check_docs(questions, documents)
        prompts = [text_prompt(q, d, self.fmt) for q, d in zip(questions, documents)]
        return self._generate(prompts, None, max_new_tokens, adapter)

    def generate_closed_book(self, questions: list[str], max_new_tokens: int = 128,
                             adapter: str | None = None) -> list[str]:
        """Answer with no documents at all (the closed-book baseline); the bare base model by default."""
        prompts = [build_prompt("closed_book", "", question=q, fmt=self.fmt)[0] for q in questions]
        return self._generate(prompts, None, max_new_tokens, adapter)

    def generate_from_paraphrase(self, questions: list[str], documents: list[list[str]], max_new_tokens: int = 128) -> list[str]:
        """Stage-1 (Base) checkpoints: regenerate each question's documents from their memory vectors."""
        k = self._check_docs(questions, documents)
        mem = self.compress_texts([d for ds in documents for d in ds])  # (B*K, M, H)
        prompts = [build_prompt("paraphrase", self.mem_slots * k, fmt=self.fmt)[0] for _ in questions]
        return self._generate(prompts, mem.view(len(questions), k, *mem.shape[1:]), max_new_tokens)

    def generate_from_questions(self, questions: list[str], documents: list[list[str]],
                                max_new_tokens: int = 64,
                                top_k: int | None = None) -> tuple[list[str], torch.Tensor]:
        """Stage-3 (E2E) checkpoints: pick the top-k of each question's N candidates, then answer.

        Returns (answers, topk_indices (B, K) into each question's candidate list, in rank order).
        """
        if "query" not in self.model.adapters:
            raise ValueError("generate_from_questions needs a stage-3 checkpoint (no query adapter "
                             "loaded)")
        self._check_docs(questions, documents)
        self.eval()
        with torch.no_grad():
            flat = [d for ds in documents for d in ds]
            docs = self.tokenize_for_encoder(flat)[:2]  # ids, mask (B*N, L)
            selected, idx, _ = self.retrieve(docs, self.tokenize_for_encoder(questions)[:2], top_k)
        slots = self.mem_slots * idx.shape[1]
        prompts = [build_prompt("answer", slots, question=q, fmt=self.fmt)[0] for q in questions]
        return self._generate(prompts, selected, max_new_tokens), idx

    @torch.no_grad()
    def encode_queries(self, questions: list[str]) -> torch.Tensor:
        """Question vectors (B, M*H) from the query reasoner, L2-normalised (for cosine search)."""
        self.eval()
        ids, mask, _ = self.tokenize_for_encoder(questions)
        q, _ = self.encode(ids, mask, adapter="query")
        return F.normalize(q.flatten(1).float(), dim=-1)

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """What a CLaRa checkpoint holds: every adapter, the <MEMi> rows, and all added-token rows.

        Under FSDP every rank must call this (sharded parameters are gathered with a collective).
        """
        full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()  # DTensor -> tensor
        sd = {}
        for a in self.model.adapters:
            sd.update({k: full(v) for k, v in self.model.adapter_parameters(a).items()})
        V0, M = int(self.mem_ids[0]), self.cfg.n_mem
        added = full(self.model.tok_embeddings.weight)[V0:].clone()  # (M + 3, H): <MEMi>, <AE>, <ENC>, <SEP>
        added[:M] = full(self.mem_embeddings).to(added.dtype)  # the trained <MEMi> rows
        sd["added_embeddings"] = added
        if not self.model.cfg.tie_embeddings:
            sd["added_lm_head"] = full(self.model.output.weight)[V0:]
        return {k: v.contiguous().cpu() for k, v in sd.items()}

    def save_pretrained(self, path: str | Path, extra: dict | None = None, state: dict | None = None):
        """Write `clara_config.json` + `clara.safetensors` + `tokenizer.json` (+ `base/`), atomically.

        Everything is written into a temporary sibling directory which then replaces `path` by renames
        (replace_dir), so a crash mid-save leaves the previous checkpoint loadable. The folder is
        self-contained: a carried base (`base_carried`: one that came from inside another checkpoint, or a
        small one the caller chose to carry) is copied into `base/`; an external base (an HF directory) is
        named by absolute path and pinned by the sha256 of its weight files. `files_sha256` pins every file of the folder itself; loading checks both.
        """
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        state = state if state is not None else self.state_to_save()
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            self._write_checkpoint(tmp, path, extra, state)
        except SAVE_ERRORS as e:  # a full disk, a read-only folder: the last checkpoint stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"{path}: cannot save the checkpoint ({error_line(e)}); the previous one, if any, is "
                          "untouched") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, path)

    def _write_checkpoint(self, tmp: Path, path: Path, extra: dict | None, state: dict):
        """Everything of save_pretrained but the final swap, written into `tmp`."""
        from safetensors.torch import save_file
        base = str(Path(self.base_path).resolve()) if self.base_path else None
        if self.base_carried:  # the frozen base, copied exactly; named relative to the checkpoint directory
            src = Path(self.base_path)
            (tmp / "base").mkdir()
            for name in ["config.json", "tokenizer.json", *base_weight_files(src)]:
                if (src / name).exists():
                    shutil.copy2(src / name, tmp / "base" / name)
            base_sha = weight_hashes(tmp / "base")
            if self.base_sha256 is not None and base_sha != self.base_sha256:
                raise ValueError(f"{src}: the base decoder's weights changed on disk since this model was loaded "
                                 f"from it; nothing was saved to {path}")
            base = "base"
        else:
            base_sha = self.base_sha256 if self.base_sha256 is not None else (
                weight_hashes(Path(self.base_path)) if self.base_path else None)
        self.base_sha256 = base_sha
        save_file(state, tmp / "clara.safetensors")
        self.tok.save(tmp)
        files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
        meta = {"clara": asdict(self.cfg), "base_model": base, "adapters": sorted(self.model.adapters),
                **(extra or {}), "base_sha256": base_sha,
                "files_sha256": {f: file_sha256(tmp / f) for f in files}}
        (tmp / "clara_config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, base_model: str | Path | None = None, dtype=None, device=None,
                        compr_rate: int | None = None, training_stage: int | None = None) -> "Clara":
        """Load a CLaRa checkpoint: ours (clara_config.json) or an official released folder (config.json +
        adapters.pth), or the train.py run folder holding one. `base_model` overrides where the base decoder
        is read from (an HF directory). A `compr_rate` that disagrees with the checkpoint's is an error, never
        silently ignored (an official defect)."""
        path = checkpoint_dir(path)  # a run folder means its checkpoint/; path.old after a killed swap
        if (path / "clara_config.json").exists():
            return _load_native(cls, path, base_model, dtype, device, compr_rate, training_stage)
        return _load_official(cls, path, base_model, dtype, device, compr_rate)


# ----------------------------------------------------------------------------------------------------
# Checkpoint integrity: content hashes, readable errors, the crash-safe directory swap

# Everything a bad or foreign folder raises while loading (Clara.from_pretrained, and Transformer /
# Tokenizer.from_pretrained that train.py calls on a base directly) is one of these, with a message that
# starts with the file it is about: our loaders' deliberate ValueError, KeyError and FileNotFoundError, the
# OS's, safetensors' for a damaged file. A command line prints error_line(e). SAVE_ERRORS: writing.
LOAD_ERRORS = (OSError, ValueError, KeyError, SafetensorError)
SAVE_ERRORS = (OSError, SafetensorError)
_HASHES: dict = {}  # (path, size, mtime) -> sha256 of large files: a 14 GB base is hashed once per process


def file_sha256(file: Path) -> str:
    """sha256 of a file's bytes (read in 16 MiB blocks)."""
    st = file.stat()
    # Only large files are cached: a small file rewritten within one clock tick keeps its size and mtime.
    key = (str(Path(file).resolve()), st.st_size, st.st_mtime_ns) if st.st_size >= 1 << 26 else None
    if key in _HASHES:
        return _HASHES[key]
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    if key is not None:
        _HASHES[key] = h.hexdigest()
    return h.hexdigest()


def base_weight_files(base: Path) -> list[str]:
    """The weight files Transformer.from_pretrained reads from an HF directory (what a base hash covers)."""
    if (base / "model.safetensors").is_file():
        return ["model.safetensors"]
    index = base / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: not a valid safetensors index (no 'weight_map' object)")
        return ["model.safetensors.index.json", *sorted(set(map(str, weight_map.values())))]
    raise FileNotFoundError(f"{base}: no model.safetensors or model.safetensors.index.json")


def weight_hashes(base: Path) -> dict[str, str]:
    return {f: file_sha256(base / f) for f in base_weight_files(base)}


def _read_json(file: Path) -> dict:
    """A JSON object from a file, or one clear error naming it."""
    try:
        obj = json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(obj).__name__}")
    return obj


def error_line(e: BaseException) -> str:
    """An exception's message as the one line a command line prints: its first line (library errors can
    span lines, torch's with a C++ backtrace), whitespace collapsed, without the quotes a KeyError adds;
    the exception's type name if the message is empty."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join((text.strip().splitlines() or [""])[0].split()) or type(e).__name__


def _check_hashes(where: Path, recorded, what: str, hint: str):
    """Every file of `recorded` ({relative name: sha256}) under `where` must still have that content."""
    if recorded is None:  # a checkpoint written before hashes were recorded
        return
    if not isinstance(recorded, dict):
        raise ValueError(f"{where}: clara_config.json field {what!r} is not an object of file hashes")
    for name, sha in sorted(recorded.items()):
        file = where / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing ({what} in clara_config.json lists it){hint}")
        got = file_sha256(file)
        if got != sha:
            raise ValueError(f"{file}: content differs from the one this checkpoint was saved with (sha256 "
                             f"{got[:12]}..., recorded {str(sha)[:12]}...){hint}")


def _fault(point: str, path: Path):
    """Fault injection for the crash tests: CLARA_FAULT=POINT or POINT@NAME (NAME: the directory's name)
    kills the process right there, as a power cut or kill -9 would."""
    want = os.environ.get("CLARA_FAULT", "")
    if want and want.split("@")[0] == point and ("@" not in want or want.split("@", 1)[1] == path.name):
        os._exit(137)


def complete_dir(path: Path) -> Path:
    """`path`, or `path.old` when a swap was killed between its two renames (replace_dir)."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        print(f"note: {path} is missing (a save was interrupted); using the previous copy {old}", file=sys.stderr)
        return old
    return path


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint folder a user means by `path`: the folder itself when it holds a checkpoint (ours or an
    official release), or the `checkpoint/` of a train.py run folder (`out/stage1` for `out/stage1/checkpoint`,
    the likeliest slip). Anything else is a FileNotFoundError that names what is there and what to pass."""
    path = complete_dir(Path(path))  # path.old when a save was killed inside its swap
    is_ckpt = lambda p: (p / "clara_config.json").is_file() or (p / "adapters.pth").is_file()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: CLaRa checkpoint directory does not exist")
    if is_ckpt(path):
        return path
    if is_ckpt(complete_dir(path / "checkpoint")):  # a run folder holds exactly one checkpoint, under this name
        return complete_dir(path / "checkpoint")
    raise FileNotFoundError(f"{path}: not a CLaRa checkpoint: neither clara_config.json (this project) nor "
                            "adapters.pth (official release), and no checkpoint/ holding one (pass the "
                            "checkpoint folder, e.g. OUT/checkpoint of a train.py run)")


def _check_rate(cfg: ClaraConfig, compr_rate, path):
    if compr_rate is not None and compr_rate != cfg.compr_rate:
        raise ValueError(f"{path}: checkpoint was trained with compr_rate={cfg.compr_rate}, "
                         f"but compr_rate={compr_rate} was requested")


def _load_native(cls, path, base_model, dtype, device, compr_rate, training_stage):
    from safetensors.torch import load_file
    conf = path / "clara_config.json"
    meta = _read_json(conf)
    for key, typ in (("clara", dict), ("adapters", list)):
        if not isinstance(meta.get(key), typ):
            raise ValueError(f"{conf}: field {key!r} missing or not {'an object' if typ is dict else 'a list'}")
    if not all(isinstance(a, str) and a.isidentifier() for a in meta["adapters"]):
        raise ValueError(f"{conf}: field 'adapters' must list adapter names, found {meta['adapters']!r}")
    kinds = {int: (int,), float: (int, float), str: (str,)}
    for f in fields(ClaraConfig):
        v = meta["clara"].get(f.name)
        want = kinds.get({"int": int, "float": float, "str": str}.get(str(f.type), object), (object,))
        if f.name in meta["clara"] and (isinstance(v, bool) or not isinstance(v, want)):
            raise ValueError(f"{conf}: field 'clara.{f.name}' is {v!r}, expected {f.type}")
    try:
        cfg = ClaraConfig.from_dict(meta["clara"], str(conf))
    except TypeError as e:  # a field of the wrong type fails inside __post_init__'s arithmetic
        raise ValueError(f"{conf}: field 'clara' holds a value of the wrong type ({e})") from None
    _check_rate(cfg, compr_rate, path)
    saved_stage = cfg.training_stage
    if training_stage is not None:
        cfg.training_stage = training_stage
    base = base_model or meta.get("base_model")
    if base == "base":  # the checkpoint carries its own base
        base = path / "base"
    if base is None or not Path(str(base)).is_dir():
        raise FileNotFoundError(f"{path}: base model {str(base)!r} is not a directory; pass base_model=DIR")
    base = Path(str(base))
    # The folder's own files: a flipped byte, a truncated file or another run's tokenizer.json. A carried base/
    # that base_model= replaces is not read, so not checked (the base actually used is, just below).
    files = meta.get("files_sha256")
    if isinstance(files, dict) and base != path / "base":
        files = {k: v for k, v in files.items() if not str(k).startswith("base/")}
    _check_hashes(path, files, "files_sha256", "; the checkpoint is corrupted or was altered")
    base_sha = meta.get("base_sha256")
    _check_hashes(base, base_sha, "base_sha256", f"; {base} is not the base decoder this checkpoint was trained "
                  "on (pass base_model=the original)")
    tok = Tokenizer.from_pretrained(path)
    tok.token_id("<MEM0>")  # a checkpoint's tokenizer must carry CLaRa's tokens (clear KeyError otherwise)
    clara = cls(_base_model(base, dtype, device), tok, cfg, base_path=str(base))
    clara.base_carried = base == path / "base"
    clara.base_sha256 = base_sha if isinstance(base_sha, dict) else None
    for a in meta["adapters"]:
        if a not in clara.model.adapters:
            clara.model.add_adapter(a, cfg.lora)
    file = path / "clara.safetensors"
    try:
        sd = load_file(file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({error_line(e)})") from None
    required = ["added_embeddings"] + ([] if clara.model.cfg.tie_embeddings else ["added_lm_head"])
    _assign_state(clara, sd, file, meta["adapters"], required)
    clara.loaded_stage = saved_stage
    return clara


def _assign_state(clara: Clara, sd: dict, where, adapters, required=()):
    """Copy a `state_to_save` dict into the model: every key must match a tensor of the same shape, and
    every LoRA tensor of every listed adapter and every `required` tensor must be there."""
    missing = [k for k in required if k not in sd]
    params = dict(clara.model.named_parameters())
    missing += [k for k in params if ".lora_" in k and k.rsplit(".", 1)[1] in adapters and k not in sd]
    if missing:
        raise KeyError(f"{where}: no tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more missing)"
                       if len(missing) > 1 else "") + ": a truncated file, or not a checkpoint of this model")
    clara.loaded_adapters = set(adapters)
    V0 = int(clara.mem_ids[0])
    with torch.no_grad():
        for k, v in sd.items():
            if k == "added_embeddings":
                target = clara.model.tok_embeddings.weight[V0:]
            elif k == "added_lm_head":
                target = clara.model.output.weight[V0:]
            elif k in params:
                target = params[k]
            else:
                raise KeyError(f"{where}: unexpected tensor {k!r}")
            if target.shape != v.shape:
                raise ValueError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(target.shape)}")
            if not v.is_floating_point():
                raise ValueError(f"{where}: tensor {k!r} has dtype {v.dtype}, expected floating point")
            target.copy_(v)
            if k == "added_embeddings":  # the first M added rows are the trained <MEMi> embeddings
                clara.mem_embeddings.copy_(v[:clara.cfg.n_mem])


# The official released folders (docs/method.md#checkpoints).
OFFICIAL_ADAPTERS = {"encoder_adapter": "encoder", "decoder_adapter": "decoder", "query_reasoner_adapter": "query"}
OFFICIAL_PROJ = {hf: ours for ours, hf in HF_PROJ.items()}  # the official (HF) module name -> ours
OFFICIAL_STAGE = {"stage1": 1, "stage1_2": 2, "stage2": 3}


def official_key(key: str, adapter: str) -> str | None:
    """'...model.layers.3.self_attn.q_proj.lora_A.weight' -> 'layers.3.attention.wq.lora_A.<adapter>'."""
    parts = key.split(".")
    try:
        i = parts.index("layers")
        layer, proj, ab = parts[i + 1], ".".join(parts[i + 2:i + 4]), parts[i + 4]
    except (ValueError, IndexError):
        return None
    if proj not in OFFICIAL_PROJ or ab not in ("lora_A", "lora_B"):
        return None
    return f"layers.{layer}.{OFFICIAL_PROJ[proj]}.{ab}.{adapter}"


def _base_model(base: Path, dtype, device) -> Transformer:
    """The base decoder a checkpoint names; a damaged weight file is a ValueError naming the folder."""
    try:
        return Transformer.from_pretrained(base, dtype=dtype, device=device)
    except SafetensorError as e:
        raise ValueError(f"{base}: a weight file cannot be read ({error_line(e)})") from None


def _torch_file(file: Path):
    """An official .pth file: tensors and plain containers only (weights_only=True never runs pickled
    code); any unreadable file is one clear error naming it."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (an official release folder holds adapters.pth and "
                                "decoder_first_last_layers.pth)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text suggests weights_only=False: never here
        raise ValueError(f"{file}: cannot be read as a PyTorch weights file (not one, or it pickles Python "
                         "objects besides tensors, which this project never unpickles)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, IndexError,
            TypeError) as e:
        raise ValueError(f"{file}: cannot be read as a PyTorch weights file (broken or truncated: "
                         f"{error_line(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _load_official(cls, path, base_model, dtype, device, compr_rate):
    conf_file = path / "config.json"
    conf = _read_json(conf_file)
    for key in ("compr_rate", "doc_max_length"):
        if key not in conf:
            raise KeyError(f"{conf_file}: missing {key!r}")
    stage = OFFICIAL_STAGE.get(conf.get("training_stage", "stage1"))
    if stage is None:
        raise ValueError(f"{conf_file}: unknown training_stage {conf.get('training_stage')!r}")
    r = conf.get("lora_r", 16)
    try:
        cfg = ClaraConfig(doc_max_length=conf["doc_max_length"], compr_rate=conf["compr_rate"],
                          generation_top_k=conf.get("generation_top_k", 5), lora_r=r, lora_alpha=2 * r,
                          training_stage=stage)
    except TypeError as e:
        raise ValueError(f"{conf_file}: a value of the wrong type ({e})") from None
    _check_rate(cfg, compr_rate, path)
    base = base_model or conf.get("decoder_model_name")
    if base is None or not Path(str(base)).is_dir():
        raise FileNotFoundError(f"{path}: base model {base!r} is not a local directory; pass base_model=DIR "
                                "(this project never downloads)")
    # Both files are read before the model is built: a bad file fails in seconds, not after a 7B load.
    adapters = _torch_file(path / "adapters.pth")
    first_last = _torch_file(path / "decoder_first_last_layers.pth")
    for off_name, tensors in adapters.items():
        if off_name in OFFICIAL_ADAPTERS and not (isinstance(tensors, dict) and
                                                  all(isinstance(v, torch.Tensor) for v in tensors.values())):
            raise ValueError(f"{path / 'adapters.pth'}: entry {off_name!r} is not a dict of tensors")
    if not any(a in OFFICIAL_ADAPTERS for a in adapters):
        raise ValueError(f"{path / 'adapters.pth'}: none of the adapters {sorted(OFFICIAL_ADAPTERS)}; found "
                         f"{sorted(map(str, adapters))[:5]}")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if not isinstance(first_last.get(key), torch.Tensor):
            raise KeyError(f"{path / 'decoder_first_last_layers.pth'}: no tensor {key!r}")
    tok = Tokenizer.from_pretrained(path if (path / "tokenizer.json").exists() else base)
    clara = cls(_base_model(base, dtype, device), tok, cfg, base_path=str(base))
    sd = {}
    for off_name, tensors in adapters.items():
        name = OFFICIAL_ADAPTERS.get(off_name)
        if name is None:
            continue
        if name not in clara.model.adapters:
            clara.model.add_adapter(name, cfg.lora)
        for k, v in tensors.items():
            ours = official_key(k, name)
            if ours is not None:
                sd[ours] = v
    emb, head = first_last["model.embed_tokens.weight"], first_last["lm_head.weight"]
    V, H = tok.vocab_size, clara.model.cfg.dim
    if tuple(emb.shape) != (V, H) or tuple(head.shape) != (V, H):
        raise ValueError(f"{path / 'decoder_first_last_layers.pth'}: embedding {tuple(emb.shape)} and lm_head "
                         f"{tuple(head.shape)}, expected ({V}, {H}): {V} tokens with CLaRa's, hidden size {H}")
    with torch.no_grad():  # load both matrices whole: the added rows cannot be recreated
        clara.model.tok_embeddings.weight.copy_(emb)
        if not clara.model.cfg.tie_embeddings:
            clara.model.output.weight.copy_(head)
        clara.mem_embeddings.copy_(emb[int(clara.mem_ids[0]):int(clara.mem_ids[0]) + cfg.n_mem])
    _assign_state(clara, sd, path / "adapters.pth", [OFFICIAL_ADAPTERS[a] for a in adapters if a in OFFICIAL_ADAPTERS])
    clara.loaded_stage = stage
    return clara


def replace_dir(tmp: Path, path: Path):
    """Swap the finished directory `tmp` in for `path` with renames, so that a kill at any instant leaves
    one complete copy: `path`, or `path.old` between the two renames (loading and --resume then read it,
    see complete_dir). `path.old` is deleted only while `path` exists: the step that would delete the only
    complete copy (after a killed swap) first moves it back."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():  # a swap was killed between its renames: old is the good copy
        os.replace(old, path)
    if old.exists():  # a stale copy (a kill during the clean-up below); `path` is complete
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
        _fault("after_first_rename", path)  # only `old` (and the finished tmp) exist here
    os.replace(tmp, path)
    _fault("after_second_rename", path)  # both `path` and `old` exist
    if old.exists():
        shutil.rmtree(old)


# ----------------------------------------------------------------------------------------------------
# Memory bank: compress a corpus once, retrieve from the vectors themselves

class MemoryBank:
    """Compressed documents with their ids, searchable by the query reasoner (exact inner product).

    The official code asks an HTTP retrieval server; here the compressed vectors ARE the index (the
    paper's point: no second encoding of documents at question time). Search runs in chunks, so a bank
    that does not fit one matmul still works.
    """

    def __init__(self, vectors: torch.Tensor, ids: list[str]):
        if vectors.shape[0] != len(ids):
            raise ValueError(f"MemoryBank: {vectors.shape[0]} vectors but {len(ids)} ids")
        self.vectors, self.ids = vectors, list(ids)  # (n, M, H)

    @classmethod
    def build(cls, clara: Clara, documents: list[str], ids: list[str] | None = None, batch_size: int = 32):
        vecs = clara.compress_texts(documents, batch_size).cpu()
        return cls(vecs, ids if ids is not None else [str(i) for i in range(len(documents))])

    def save(self, path: str | Path):
        from safetensors.torch import save_file
        tmp = Path(str(path) + ".tmp")
        save_file({"vectors": self.vectors.contiguous()}, tmp, metadata={"ids": json.dumps(self.ids)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return cls(f.get_tensor("vectors"), json.loads(f.metadata()["ids"]))

    def search(self, queries: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, M*H), unit norm -> (scores (B, k), indices (B, k)) of the top-k cosine matches."""
        if k > len(self.ids):
            raise ValueError(f"top-k {k} is larger than the bank ({len(self.ids)} documents)")
        best_s = torch.full((queries.shape[0], 0), -2.0)
        best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long)
        q = queries.float().cpu()
        for start in range(0, len(self.ids), chunk):
            d = F.normalize(self.vectors[start:start + chunk].flatten(1).float(), dim=-1)  # (c, M*H)
            s = q @ d.T  # (B, c)
            s_all = torch.cat([best_s, s], 1)
            i_all = torch.cat([best_i, torch.arange(start, start + d.shape[0]).expand(q.shape[0], -1)], 1)
            best_s, order = s_all.topk(min(k, s_all.shape[1]), dim=1)
            best_i = i_all.gather(1, order)
        return best_s, best_i

    def answer(self, clara: Clara, questions: list[str], k: int | None = None, max_new_tokens: int = 64):
        """Retrieve each question's top-k documents from the bank and answer from their vectors."""
        k = k or clara.cfg.generation_top_k
        _, idx = self.search(clara.encode_queries(questions), k)  # (B, k)
        mem = self.vectors[idx]  # (B, k, M, H)
        answers = clara.generate_from_compressed_documents_and_questions(questions, mem, max_new_tokens)
        return answers, [[self.ids[i] for i in row] for row in idx.tolist()]

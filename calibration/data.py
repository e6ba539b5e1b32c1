"""Calibration samples and held-out evaluation tokens. Samples are seeded windows over one token stream,
hashed with their source and seed, so a job's calibration input is reproducible and part of its record."""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from core.errors import CalibrationError

from .sources import C4_RELPATH, WIKITEXT2_RELPATH, resolve_text_source, sample_from_model, shared_file

TOKENIZE_CHUNK = 64         # documents tokenized per call: batched for speed, small enough to stop early
POOL_FACTOR = 4             # stop tokenizing past POOL_FACTOR × n_samples × seq_len tokens
EVAL_SEQ_LEN = 512          # sample length when evaluation text is sampled from the model
DEFAULT_EVAL_TOKENS = 32 * EVAL_SEQ_LEN  # model-sampled eval text: 32 windows of 512


def content_hash(source: str, seed: int, tokens: torch.Tensor) -> str:
    """sha256 over json([source, seed, shape]) + "\\n" + the tokens as little-endian int64 bytes (C order).
    Spelled out so any tool can recompute it from a saved tensor."""
    h = hashlib.sha256()
    h.update(json.dumps([source, int(seed), list(tokens.shape)]).encode() + b"\n")
    h.update(tokens.detach().cpu().contiguous().to(torch.int64).numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """The tokens a quantization job calibrates on. Two sets are equal when their content_hash is."""
    tokens: torch.Tensor  # int64 [n_samples, seq_len], CPU
    source: str           # canonical: "c4:c4/...jsonl", "wikitext2:...", "file:/abs/path", "hf:NAME:CONFIG:SPLIT", "model"
    seed: int
    content_hash: str

    def __eq__(self, other):
        return isinstance(other, CalibrationSet) and other.content_hash == self.content_hash

    def __hash__(self):
        return hash(self.content_hash)

    @property
    def n_samples(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]


def tokenize_stream(documents: Iterable[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """One int64 stream: each document without special tokens, joined by EOS so windows that span two
    documents still look like real document boundaries. Stops (deterministically, at a chunk boundary)
    once more than `max_tokens` are gathered, so a large corpus is not tokenized for a small sample."""
    eos = getattr(tokenizer, "eos_token_id", None)  # no EOS: documents are joined directly
    sep = [] if eos is None else [int(eos)]
    ids: list[int] = []
    chunk: list[str] = []

    def flush():
        if tokenizer is None:  # checked here, after the source produced text, so source errors come first
            raise CalibrationError("a tokenizer is needed to build samples from text")
        for doc_ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            if doc_ids:
                ids.extend((sep if ids else []) + list(doc_ids))
        chunk.clear()

    for doc in documents:
        if doc:
            chunk.append(doc)
        if len(chunk) >= TOKENIZE_CHUNK:
            flush()
            if max_tokens is not None and len(ids) > max_tokens:
                break
    if chunk:
        flush()
    return torch.tensor(ids, dtype=torch.int64)


def _windows(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int, describe: str) -> torch.Tensor:
    """n_samples windows at offsets drawn from a Generator seeded with `seed` (the global RNG is not used)."""
    if stream.numel() < seq_len + 1:
        raise CalibrationError(
            f"{describe} has only {stream.numel()} tokens; calibration windows of seq_len={seq_len} need at "
            f"least {seq_len + 1}. Use more text or a smaller seq_len")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, stream.numel() - seq_len, (n_samples,), generator=gen)
    return stream[offsets[:, None] + torch.arange(seq_len)]


def resolve_calibration_source(source: str) -> str:
    """The calibration source "auto" stands for here ("model": sampled from the fp16 model)."""
    return _resolve_auto(source)


def _resolve_auto(source: str) -> str:
    if source == "auto":
        return "c4" if shared_file(C4_RELPATH) is not None else "model"
    return source


def build_calibration(source: str, tokenizer, *, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                      model=None) -> CalibrationSet:
    """The calibration set for a job: `source` is "auto", "c4", "wikitext2", "model", a .txt/.jsonl path
    (or file:PATH) or "hf:NAME[:CONFIG[:SPLIT]]". Same arguments, same tensor and hash."""
    if not (isinstance(n_samples, int) and n_samples > 0 and isinstance(seq_len, int) and seq_len > 0):
        raise CalibrationError(f"n_samples and seq_len must be positive integers (got {n_samples}, {seq_len})")
    source = _resolve_auto(source)
    if source == "model":
        tokens, describe = sample_from_model(model, tokenizer, n_samples, seq_len, seed), "model"
    else:
        text = resolve_text_source(source)
        stream = tokenize_stream(text.documents(), tokenizer, max_tokens=POOL_FACTOR * n_samples * seq_len)
        tokens, describe = _windows(stream, n_samples, seq_len, seed, text.describe), text.describe
    tokens = tokens.to(torch.int64).contiguous()
    return CalibrationSet(tokens=tokens, source=describe, seed=seed, content_hash=content_hash(describe, seed, tokens))


def resolve_eval_source(source: str | None) -> str:
    """The held-out text source a job's evaluation uses ("model" means sampled from the fp16 model)."""
    if source is None:
        source = "wikitext2" if shared_file(WIKITEXT2_RELPATH) is not None else "model"
    return _resolve_auto(source)


def eval_tokens(source: str | None, tokenizer, *, model=None, seed: int = 1234,
                n_tokens: int | None = None) -> tuple[torch.Tensor, str]:
    """Held-out text for perplexity as one 1-D int64 stream and its description. Default: WikiText-2
    validation when the shared data has it (the whole file; the caller slices), else text sampled from
    the model with a seed distinct from calibration's (DEFAULT_EVAL_TOKENS tokens, in BOS-led samples of
    EVAL_SEQ_LEN). `n_tokens` caps the length."""
    if n_tokens is not None and (not isinstance(n_tokens, int) or n_tokens <= 0):
        raise CalibrationError(f"n_tokens must be a positive integer (got {n_tokens})")
    source = resolve_eval_source(source)
    if source == "model":
        n = n_tokens or DEFAULT_EVAL_TOKENS
        seq = min(n, EVAL_SEQ_LEN)
        samples = sample_from_model(model, tokenizer, math.ceil(n / seq), seq, seed)
        return samples.reshape(-1)[:n].contiguous(), f"model:seed={seed}"
    text = resolve_text_source(source)
    stream = tokenize_stream(text.documents(), tokenizer, max_tokens=n_tokens)
    if stream.numel() == 0:
        raise CalibrationError(f"{text.describe} holds no text to evaluate on")
    return (stream if n_tokens is None else stream[:n_tokens]), text.describe

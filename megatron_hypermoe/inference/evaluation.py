"""Perplexity of a model on a text corpus, the same way for our checkpoints and HF directories.

Documents are tokenized with the model's own tokenizer, each followed by EOD (as preprocessing
writes them), concatenated, and cut into non-overlapping windows of ``seq_length`` predicted
tokens. Token-level perplexity is exp(total NLL / predicted tokens); word-level perplexity
divides the same total NLL by the number of whitespace-separated words instead, which does not
depend on the tokenizer and so compares models with different vocabularies.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable, Iterable, List

import torch

from megatron_hypermoe.data.corpus import iter_documents
from megatron_hypermoe.errors import DataError
from megatron_hypermoe.model.gpt import causal_attention_mask


@dataclasses.dataclass
class Perplexity:
    nll: float
    tokens: int
    words: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll / max(self.tokens, 1), 700.0))

    @property
    def word_ppl(self) -> float:
        return math.exp(min(self.nll / max(self.words, 1), 700.0))


def token_stream(texts: Iterable[str], tokenizer, eod: int):
    """(token ids with EOD after each document, number of words)."""
    ids: List[int] = []
    words = 0
    for text in texts:
        ids.extend(tokenizer.tokenize(text))
        ids.append(eod)
        words += len(text.split())
    return ids, words


def windows(ids: List[int], seq_length: int):
    """Non-overlapping (input, target) windows; the last one may be shorter."""
    for start in range(0, max(len(ids) - 1, 0), seq_length):
        chunk = ids[start:start + seq_length + 1]
        if len(chunk) >= 2:
            yield chunk[:-1], chunk[1:]


@torch.no_grad()
def perplexity(token_nll: Callable, ids: List[int], words: int, seq_length: int,
               progress: bool = True) -> Perplexity:
    """``token_nll(inputs [1, s], targets [1, s]) -> per-token NLL [1, s]`` (float64 summed)."""
    from tqdm import tqdm

    total, count = 0.0, 0
    chunks = list(windows(ids, seq_length))
    for inputs, targets in tqdm(chunks, desc="evaluating", unit="window", file=sys.stderr,
                                disable=not progress):
        nll = token_nll(torch.tensor([inputs]), torch.tensor([targets]))
        total += float(nll.double().sum())
        count += len(targets)
    return Perplexity(nll=total, tokens=count, words=words)


def megatron_token_nll(model):
    def score(inputs, targets):
        device = next(model.parameters()).device
        inputs, targets = inputs.to(device), targets.to(device)
        positions = torch.arange(inputs.shape[1], device=device).unsqueeze(0)
        return model(inputs, positions, causal_attention_mask(inputs.shape[1], device),
                     labels=targets)
    return score


def hf_token_nll(model):
    def score(inputs, targets):
        device = next(model.parameters()).device
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(input_ids=inputs, use_cache=False).logits.float()
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]),
                                                 targets.view(-1), reduction="none")
    return score


def corpus_ids(loaded, inputs, json_keys):
    """(token ids, words) of every document in ``inputs``, with the loaded model's tokenizer."""
    texts = (text for document in iter_documents(inputs, json_keys)
             for text in document.fields.values())
    ids, words = token_stream(texts, loaded.tokenizer, loaded.tokenizer.eod)
    if len(ids) < 2:
        raise DataError(f"{' '.join(inputs)} holds no text to evaluate")
    return ids, words


def evaluate_model(loaded, inputs, json_keys=("text",), seq_length=None) -> Perplexity:
    """Perplexity of a loaded model (:mod:`~megatron_hypermoe.inference.model_source`) on the
    documents in ``inputs``; windows of ``seq_length`` (default: the model's maximum)."""
    seq_length = seq_length or loaded.max_sequence_length
    if seq_length > loaded.max_sequence_length:
        raise DataError(f"--seq-length {seq_length} exceeds the model's maximum "
                        f"{loaded.max_sequence_length}")
    ids, words = corpus_ids(loaded, inputs, json_keys)
    score = megatron_token_nll(loaded.model) if loaded.kind == "megatron" \
        else hf_token_nll(loaded.model)
    return perplexity(score, ids, words, seq_length)

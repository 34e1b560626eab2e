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
    from megatron_hypermoe.model import causal_attention_mask

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


def main(argv=None) -> int:
    import argparse
    import json

    from megatron_hypermoe.data.corpus import DataError, iter_documents
    from megatron_hypermoe.hf.model_source import add_model_source_args, load_model
    from megatron_hypermoe.training.checkpointing import CheckpointError

    parser = argparse.ArgumentParser(
        description="Perplexity of a checkpoint (--load) or Hugging Face directory (--hf) on a "
                    "text/jsonl/parquet/csv file, with the model's own tokenizer.")
    add_model_source_args(parser)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--seq-length", type=int, default=None,
                        help="window length; default the model's maximum")
    parser.add_argument("--word-level", action="store_true",
                        help="also report perplexity per whitespace-separated word")
    parser.add_argument("--json", action="store_true",
                        help="make the last line a JSON object (ppl, tokens, ...)")
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args)
        seq_length = args.seq_length or loaded.max_sequence_length
        if seq_length > loaded.max_sequence_length:
            raise DataError(f"--seq-length {seq_length} exceeds the model's maximum "
                            f"{loaded.max_sequence_length}")
        texts = (text for document in iter_documents(args.input, args.json_keys)
                 for text in document.fields.values())
        ids, words = token_stream(texts, loaded.tokenizer, loaded.tokenizer.eod)
        if len(ids) < 2:
            raise DataError(f"{' '.join(args.input)} holds no text to evaluate")
        score = megatron_token_nll(loaded.model) if loaded.kind == "megatron" \
            else hf_token_nll(loaded.model)
        result = perplexity(score, ids, words, seq_length)
    except (CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    line = f"{result.tokens:,} tokens: loss {result.nll / result.tokens:.4f}, ppl {result.ppl:.3f}"
    if args.word_level:
        line += f"; {result.words:,} words: word-level ppl {result.word_ppl:.3f}"
    print(line)
    if args.json:
        summary = {"ppl": result.ppl, "loss": result.nll / result.tokens,
                   "tokens": result.tokens, "model": args.load or args.hf,
                   "seq_length": seq_length}
        if args.word_level:
            summary.update(word_ppl=result.word_ppl, words=result.words)
        print(json.dumps(summary))
    return 0

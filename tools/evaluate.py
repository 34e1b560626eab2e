#!/usr/bin/env python
"""Perplexity of a checkpoint (--load) or Hugging Face directory (--hf) on a text corpus.

    python tools/evaluate.py --load runs/demo/checkpoints --input held_out.jsonl --word-level
    python tools/evaluate.py --hf hf/demo --input held_out.jsonl --json     # the same number

See ``megatron_hypermoe/inference/evaluation.py`` for how windows and word-level perplexity are
counted.
"""

import argparse
import json
import sys

from megatron_hypermoe.cli.model_source_flags import add_model_source_args, model_source
from megatron_hypermoe.errors import exit_on_user_error
from megatron_hypermoe.inference.evaluation import evaluate_model
from megatron_hypermoe.inference.model_source import load_model


@exit_on_user_error
def main(argv=None) -> int:
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
    loaded = load_model(model_source(args))
    seq_length = args.seq_length or loaded.max_sequence_length
    result = evaluate_model(loaded, args.input, args.json_keys, seq_length)
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


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train a SentencePiece tokenizer on the inputs preprocess_data.py accepts.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 8000 --model-prefix tok8k

Writes PREFIX.model / PREFIX.vocab atomically; see ``megatron_hypermoe/data/train_tokenizer.py``.
"""

import argparse
import sys

from megatron_hypermoe.data.corpus import TEXT_SAMPLE_BY
from megatron_hypermoe.data.train_tokenizer import TokenizerTrainingJob, train_tokenizer
from megatron_hypermoe.errors import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a SentencePiece tokenizer.")
    parser.add_argument("--input", nargs="+", required=True,
                        help="files, globs or directories, as for preprocess_data.py")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--text-sample-by", choices=TEXT_SAMPLE_BY, default="document")
    parser.add_argument("--skip-bad-lines", action="store_true")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="paragraphs sampled for training on large corpora (0: all)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--overwrite", action="store_true")
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    fields = {name: getattr(args, name) for name in TokenizerTrainingJob.__dataclass_fields__}
    path = train_tokenizer(TokenizerTrainingJob(**{
        **fields, "input": tuple(args.input), "json_keys": tuple(args.json_keys)}))
    print(f"wrote {path} (vocab size {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tokenizer flags (Megatron-LM's names), shared by training, preprocessing and the tools."""

from __future__ import annotations

import argparse

from megatron_hypermoe.data.tokenizer import TOKENIZER_TYPES, TokenizerConfig


def tokenizer_config(args) -> TokenizerConfig:
    """The tokenizer the flags describe."""
    return TokenizerConfig(args.tokenizer_type, getattr(args, "tokenizer_model", None),
                           getattr(args, "vocab_file", None), getattr(args, "merge_file", None),
                           getattr(args, "vocab_size", None))


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, required=False,
                       help="SentencePieceTokenizer, GPTSentencePieceTokenizer or "
                            "Llama2Tokenizer (--tokenizer-model FILE.model), "
                            "HuggingFaceTokenizer (--tokenizer-model DIR), "
                            "GPT2BPETokenizer (--vocab-file and --merge-file), "
                            "NullTokenizer (--vocab-size; ids only, for --mock-data)")
    group.add_argument("--tokenizer-model", help="SentencePiece .model file or HF tokenizer dir")
    group.add_argument("--vocab-file", help="GPT-2 BPE vocab.json")
    group.add_argument("--merge-file", help="GPT-2 BPE merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer's vocabulary")
    return parser

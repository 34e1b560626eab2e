"""Tokenizer construction, shared by preprocessing, training and the tools.

The same :class:`TokenizerConfig` (the flags --tokenizer-type, --tokenizer-model, --vocab-file,
--merge-file, --vocab-size: cli/data_flags.py) builds the same tokenizer everywhere, through
megatron-core's own ``build_tokenizer``.
``tokenizer_fingerprint`` identifies a tokenizer by content, so a dataset preprocessed with one
tokenizer is refused when training with another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import types
from typing import Optional

from megatron_hypermoe.errors import DataError

# The SentencePiece types megatron-core reads the same way (a .model file); Llama2Tokenizer is
# the name Megatron-LM's Llama and Mixtral scripts pass.
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
TOKENIZER_TYPES = (*SENTENCEPIECE_TYPES, "HuggingFaceTokenizer", "GPT2BPETokenizer",
                   "NullTokenizer")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None  # SentencePiece .model file or HF tokenizer directory
    vocab_file: Optional[str] = None  # GPT-2 BPE vocab.json
    merge_file: Optional[str] = None  # GPT-2 BPE merges.txt
    vocab_size: Optional[int] = None  # NullTokenizer's vocabulary


def _require(value: Optional[str], flag: str, tokenizer_type: str, kind: str = "file"):
    if not value:
        raise DataError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    exists = os.path.isdir(value) if kind == "dir" else os.path.isfile(value)
    if not exists:
        raise DataError(f"{flag} {value} is not an existing {kind}")


# The file flags each tokenizer type reads (a file given to another type would do nothing).
FILES_READ = {**{kind: ("tokenizer_model",) for kind in SENTENCEPIECE_TYPES},
              "HuggingFaceTokenizer": ("tokenizer_model",),
              "GPT2BPETokenizer": ("vocab_file", "merge_file"), "NullTokenizer": ()}


def validate_tokenizer(config: TokenizerConfig) -> None:
    kind = config.tokenizer_type
    if kind is None:
        raise DataError("--tokenizer-type is required: one of " + ", ".join(TOKENIZER_TYPES))
    for dest in ("tokenizer_model", "vocab_file", "merge_file"):
        if getattr(config, dest) and dest not in FILES_READ[kind]:
            raise DataError(f"--{dest.replace('_', '-')} is not read by --tokenizer-type {kind}: "
                            "drop it or pick the type that reads it")
    if kind in SENTENCEPIECE_TYPES:
        _require(config.tokenizer_model, "--tokenizer-model", kind)
    elif kind == "HuggingFaceTokenizer":
        _require(config.tokenizer_model, "--tokenizer-model", kind, kind="dir")
    elif kind == "GPT2BPETokenizer":
        _require(config.vocab_file, "--vocab-file", kind)
        _require(config.merge_file, "--merge-file", kind)
    elif kind == "NullTokenizer" and not config.vocab_size:
        raise DataError("--tokenizer-type NullTokenizer needs --vocab-size")


def build_tokenizer(config: TokenizerConfig):
    """megatron-core's tokenizer for these flags (it has .tokenize, .detokenize, .eod,
    .vocab_size)."""
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer as mcore_build

    validate_tokenizer(config)
    if config.tokenizer_type == "GPT2BPETokenizer":
        return _build_gpt2_bpe(config, mcore_build)
    megatron_args = _megatron_tokenizer_args(config.tokenizer_type, config.tokenizer_model,
                                             config.vocab_file, config.merge_file)
    megatron_args.vocab_size = config.vocab_size
    if config.tokenizer_type == "HuggingFaceTokenizer":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never ask the hub
    return mcore_build(megatron_args)


def _build_gpt2_bpe(config: TokenizerConfig, mcore_build):
    # megatron-core 0.16.1's GPT2BPETokenizer fetches the "gpt2" config from the Hugging Face
    # Hub even when given vocab and merges (and passes the merges under a misspelt keyword).
    # Build the same byte-level BPE locally and hand it to megatron's HuggingFaceTokenizer.
    import tempfile

    from transformers import GPT2Tokenizer

    hf_tokenizer = GPT2Tokenizer(vocab=config.vocab_file, merges=config.merge_file)
    with tempfile.TemporaryDirectory() as directory:
        hf_tokenizer.save_pretrained(directory)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return mcore_build(_megatron_tokenizer_args("HuggingFaceTokenizer", directory))


def _megatron_tokenizer_args(tokenizer_type, tokenizer_model, vocab_file=None, merge_file=None):
    """The namespace megatron-core's build_tokenizer reads (Megatron-LM's argument names)."""
    return types.SimpleNamespace(
        tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model,
        vocab_file=vocab_file,
        merge_file=merge_file,
        tokenizer_special_tokens=None,
        tokenizer_hf_use_fast=True,
        tokenizer_hf_include_special_tokens=False,
        trust_remote_code=False,
        tokenizer_sentencepiece_legacy=False,
        tokenizer_metadata=None,
        tiktoken_pattern=None,
        tiktoken_num_special_tokens=1000,
        vocab_size=None,
    )


def _hash_files(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(config: TokenizerConfig, tokenizer) -> dict:
    """What identifies the tokenizer a dataset was written with."""
    if config.tokenizer_type == "NullTokenizer":
        files = []
    elif config.tokenizer_type in SENTENCEPIECE_TYPES:
        files = [config.tokenizer_model]
    elif config.tokenizer_type == "GPT2BPETokenizer":
        files = [config.vocab_file, config.merge_file]
    else:
        files = sorted(
            os.path.join(config.tokenizer_model, name)
            for name in os.listdir(config.tokenizer_model)
            if name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model",
                        "tokenizer_config.json", "special_tokens_map.json")
        )
    return {
        "tokenizer_type": config.tokenizer_type,
        "vocab_size": int(tokenizer.vocab_size),
        "eod": int(tokenizer.eod),
        "sha256": _hash_files(files),
    }

"""The tokenizer travels with a converted model, and must be the one it was trained with.

Export copies the tokenizer's files into the Hugging Face directory, with a
``tokenizer_config.json`` for ``AutoTokenizer`` and ``megatron_tokenizer.json``, which tells our
tools (evaluate, generate, the reverse converter) how to rebuild exactly the megatron-core
tokenizer used in training. Before copying, the files are checked against the fingerprint the
checkpoint recorded (type, vocabulary size, sha256 of the files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Optional

from megatron_hypermoe.data.tokenizer import (SENTENCEPIECE_TYPES, build_tokenizer,
                                              tokenizer_fingerprint)
from megatron_hypermoe.errors import CheckpointError

MEGATRON_TOKENIZER_FILE = "megatron_tokenizer.json"
_HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model",
                       "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_args(tokenizer_type, tokenizer_model=None, vocab_file=None, merge_file=None,
                   vocab_size=None) -> argparse.Namespace:
    return argparse.Namespace(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                              vocab_file=vocab_file, merge_file=merge_file,
                              vocab_size=vocab_size)


def checked_training_tokenizer(train_args, recorded: Optional[dict],
                               tokenizer_model: Optional[str] = None):
    """The checkpoint's tokenizer args (``tokenizer_model`` overrides a moved file), verified
    against the recorded fingerprint; returns (args, tokenizer)."""
    args = tokenizer_args(train_args.tokenizer_type,
                          tokenizer_model or train_args.tokenizer_model,
                          train_args.vocab_file, train_args.merge_file, train_args.vocab_size)
    try:
        tokenizer = build_tokenizer(args)
    except Exception as error:  # a missing or unreadable file
        raise CheckpointError(f"cannot rebuild the checkpoint's tokenizer "
                              f"({str(error).splitlines()[0][:200]}); pass --tokenizer-model "
                              "with the file it was trained with") from None
    if recorded is not None:
        found = tokenizer_fingerprint(args, tokenizer)
        if found["sha256"] != recorded["sha256"] or found["vocab_size"] != recorded["vocab_size"]:
            raise CheckpointError(
                f"tokenizer {args.tokenizer_model or args.vocab_file} does not match the one the "
                f"checkpoint was trained with (vocab {found['vocab_size']} vs "
                f"{recorded['vocab_size']}, sha256 {found['sha256'][:12]} vs "
                f"{recorded['sha256'][:12]}): pass --tokenizer-model with the training tokenizer")
    return args, tokenizer


def write_tokenizer_files(args, tokenizer, directory: str) -> None:
    """Copy the tokenizer into an HF directory (plus the two JSON files described above)."""
    kind = args.tokenizer_type
    record = {"tokenizer_type": kind, "eod": int(tokenizer.eod),
              "vocab_size": int(tokenizer.vocab_size)}
    hf_config = None
    if kind in SENTENCEPIECE_TYPES:
        shutil.copyfile(args.tokenizer_model, os.path.join(directory, "tokenizer.model"))
        record["tokenizer_model"] = "tokenizer.model"
        hf_config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                     "add_eos_token": False, "legacy": False, "add_prefix_space": True}
    elif kind == "GPT2BPETokenizer":
        shutil.copyfile(args.vocab_file, os.path.join(directory, "vocab.json"))
        shutil.copyfile(args.merge_file, os.path.join(directory, "merges.txt"))
        record.update(vocab_file="vocab.json", merge_file="merges.txt")
        hf_config = {"tokenizer_class": "GPT2Tokenizer"}
    elif kind == "HuggingFaceTokenizer":
        for name in _HF_TOKENIZER_FILES:
            source = os.path.join(args.tokenizer_model, name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(directory, name))
        record["tokenizer_model"] = "."
    else:  # NullTokenizer: ids only, nothing to copy
        record["vocab_size"] = int(args.vocab_size)
    if hf_config is not None:
        hf_config["eos_token_id"] = int(tokenizer.eod)
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as handle:
            json.dump(hf_config, handle, indent=1)
    with open(os.path.join(directory, MEGATRON_TOKENIZER_FILE), "w") as handle:
        json.dump(record, handle, indent=1)


def hf_directory_tokenizer(directory: str):
    """(args, tokenizer) for an HF directory: from megatron_tokenizer.json when we wrote it,
    else from the usual HF files (tokenizer.model -> SentencePiece, otherwise the HF
    tokenizer)."""
    record_path = os.path.join(directory, MEGATRON_TOKENIZER_FILE)
    if os.path.isfile(record_path):
        with open(record_path) as handle:
            record = json.load(handle)

        def local(key):
            return os.path.join(directory, record[key]) if record.get(key) else None

        args = tokenizer_args(record["tokenizer_type"], local("tokenizer_model"),
                              local("vocab_file"), local("merge_file"),
                              record.get("vocab_size"))
    elif os.path.isfile(os.path.join(directory, "tokenizer.model")):
        args = tokenizer_args("SentencePieceTokenizer", os.path.join(directory, "tokenizer.model"))
    elif any(os.path.isfile(os.path.join(directory, n)) for n in ("tokenizer.json", "vocab.json")):
        args = tokenizer_args("HuggingFaceTokenizer", directory)
    else:
        raise CheckpointError(f"{directory} has no tokenizer files (tokenizer.model, "
                              "tokenizer.json or vocab.json)")
    return args, build_tokenizer(args)

"""The tokenizer travels with a converted model, and must be the one it was trained with.

Export copies the tokenizer's files into the Hugging Face directory, with a
``tokenizer_config.json`` for ``AutoTokenizer`` and ``megatron_tokenizer.json``, which tells our
tools (evaluate, generate, the reverse converter) how to rebuild exactly the megatron-core
tokenizer used in training. Before copying, the files are checked against the fingerprint the
checkpoint recorded (type, vocabulary size, sha256 of the files).

A SentencePiece or GPT-2 BPE tokenizer also gets a ``tokenizer.json`` (the ``tokenizers``
library's file, what models on the Hub ship), built here so that it encodes and decodes exactly
as the training tokenizer does; ``tokenizer_config.json`` names ``PreTrainedTokenizerFast``, which
transformers 4 and 5 load from that file as it is. Without it transformers would convert
``tokenizer.model`` at load time, which needs protobuf (and fails without it with a misleading
tiktoken error), and its conversion differs from SentencePiece on a text that starts with a space
(and, reading a unigram model as BPE, on most texts of one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Optional

from megatron_hypermoe.data.tokenizer import (
    SENTENCEPIECE_TYPES,
    TokenizerConfig,
    build_tokenizer,
    tokenizer_fingerprint,
)
from megatron_hypermoe.errors import CheckpointError

MEGATRON_TOKENIZER_FILE = "megatron_tokenizer.json"
HF_TOKENIZER_JSON = "tokenizer.json"
_HF_TOKENIZER_FILES = (HF_TOKENIZER_JSON, "vocab.json", "merges.txt", "tokenizer.model",
                       "tokenizer_config.json", "special_tokens_map.json")


def checked_training_tokenizer(trained: TokenizerConfig, recorded: Optional[dict],
                               tokenizer_model: Optional[str] = None):
    """The checkpoint's tokenizer (``tokenizer_model`` overrides a moved file), verified
    against the recorded fingerprint; returns (its config, the tokenizer)."""
    config = dataclasses.replace(trained,
                                 tokenizer_model=tokenizer_model or trained.tokenizer_model)
    try:
        tokenizer = build_tokenizer(config)
    except Exception as error:  # a missing or unreadable file
        raise CheckpointError(f"cannot rebuild the checkpoint's tokenizer "
                              f"({str(error).splitlines()[0][:200]}); pass --tokenizer-model "
                              "with the file it was trained with") from None
    if recorded is not None:
        found = tokenizer_fingerprint(config, tokenizer)
        if found["sha256"] != recorded["sha256"] or found["vocab_size"] != recorded["vocab_size"]:
            raise CheckpointError(
                f"tokenizer {config.tokenizer_model or config.vocab_file} does not match the one "
                f"the "
                f"checkpoint was trained with (vocab {found['vocab_size']} vs "
                f"{recorded['vocab_size']}, sha256 {found['sha256'][:12]} vs "
                f"{recorded['sha256'][:12]}): pass --tokenizer-model with the training tokenizer")
    return config, tokenizer


def write_tokenizer_files(config: TokenizerConfig, tokenizer, directory: str) -> None:
    """Copy the tokenizer into an HF directory (plus tokenizer.json and the two JSON files
    described above)."""
    kind = config.tokenizer_type
    record = {"tokenizer_type": kind, "eod": int(tokenizer.eod),
              "vocab_size": int(tokenizer.vocab_size)}
    hf_config = None
    if kind in SENTENCEPIECE_TYPES:
        shutil.copyfile(config.tokenizer_model, os.path.join(directory, "tokenizer.model"))
        record["tokenizer_model"] = "tokenizer.model"
        tokenizer_json, hf_config = sentencepiece_tokenizer_json(config.tokenizer_model) or \
            (None, {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                    "add_eos_token": False, "legacy": False, "add_prefix_space": True})
    elif kind == "GPT2BPETokenizer":
        shutil.copyfile(config.vocab_file, os.path.join(directory, "vocab.json"))
        shutil.copyfile(config.merge_file, os.path.join(directory, "merges.txt"))
        record.update(vocab_file="vocab.json", merge_file="merges.txt")
        tokenizer_json, hf_config = gpt2_bpe_tokenizer_json(config.vocab_file, config.merge_file)
    elif kind == "HuggingFaceTokenizer":
        for name in _HF_TOKENIZER_FILES:
            source = os.path.join(config.tokenizer_model, name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(directory, name))
        record["tokenizer_model"] = "."
    else:  # NullTokenizer: ids only, nothing to copy
        record["vocab_size"] = int(config.vocab_size)
    if hf_config is not None:
        hf_config["eos_token_id"] = int(tokenizer.eod)
        if tokenizer_json is not None:
            with open(os.path.join(directory, HF_TOKENIZER_JSON), "w",
                      encoding="utf-8") as handle:
                handle.write(tokenizer_json)
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as handle:
            json.dump(hf_config, handle, indent=1)
    with open(os.path.join(directory, MEGATRON_TOKENIZER_FILE), "w") as handle:
        json.dump(record, handle, indent=1)


def _fast_tokenizer_config(bos, eos, unk, pad, split_special_tokens: bool) -> dict:
    """tokenizer_config.json for a tokenizer.json that is complete as it is: transformers 4 and
    5 load ``PreTrainedTokenizerFast`` from the file without rebuilding it (a model class such
    as LlamaTokenizer would rebuild it with its own normalisation), add no BOS/EOS, and do not
    touch the spaces of a decoded text."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "unk_token": unk, "pad_token": pad, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": split_special_tokens}


# SentencePiece's ModelProto enums
_SP_UNIGRAM, _SP_BPE, _SP_CHAR = 1, 2, 4
_SP_NORMAL, _SP_USER_DEFINED = 1, 4


def sentencepiece_tokenizer_json(model_path: str):
    """(tokenizer.json text, tokenizer_config) that encode and decode like
    ``SentencePieceProcessor`` on ``model_path``, which megatron's SentencePiece tokenizer calls
    (no BOS or EOS added). As in SentencePiece: the text gets one dummy-prefix ``▁`` even when it
    starts with a space (transformers' own conversion skips it then); user-defined pieces (our
    ``\\n``) are cut out whole, with no ``▁`` after them; unknown characters fall back to
    bytes; and a text never yields a control piece (``<s>``, ``</s>``, ``<unk>`` or a byte piece
    written out), hence ``split_special_tokens``. None for a model outside what is reproduced
    here (a word model, whitespace as a suffix, user-defined pieces that the normalisation rule
    would change or, in a BPE model, longer than one character): its export keeps only
    tokenizer.model, which transformers converts at load time (with protobuf)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as handle:
        proto.ParseFromString(handle.read())
    trainer, spec, pieces = proto.trainer_spec, proto.normalizer_spec, list(proto.pieces)
    user_defined = sorted((p.piece for p in pieces if p.type == _SP_USER_DEFINED),
                          key=len, reverse=True)
    if trainer.model_type not in (_SP_UNIGRAM, _SP_BPE, _SP_CHAR) or \
            trainer.treat_whitespace_as_suffix or \
            (trainer.model_type != _SP_UNIGRAM and any(len(p) > 1 for p in user_defined)):
        return None  # (a tokenizers BPE has no merges that make a user-defined piece)
    steps = []  # the normaliser, in SentencePiece's order
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    escaped = (lambda text: text.replace(" ", "▁")) if spec.escape_whitespaces else str
    if any(normalizers.Sequence(steps).normalize_str(piece) != escaped(piece)
           for piece in user_defined):
        return None  # SentencePiece leaves them as they are, a tokenizers normaliser cannot
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))  # once, before the whole text (none if empty)

    # SentencePiece finds only normal and user-defined pieces in a text
    matched = [p for p in pieces if p.type in (_SP_NORMAL, _SP_USER_DEFINED)]
    splits = [Regex("|".join(re.escape(piece) for piece in user_defined))] if user_defined \
        else []
    if trainer.model_type == _SP_UNIGRAM:
        # The tokenizers library's Unigram finds every piece in a text. Scored far below any
        # split into normal pieces, a control piece loses to them; and runs of characters that
        # no piece has are cut out (no piece spans them), so that it cannot win over their
        # unknown-character score either.
        lowest = min(p.score for p in matched if p.type == _SP_NORMAL)
        floor = lowest * (2 + max(len(p.piece) for p in pieces))
        names = {p.piece for p in matched}
        model = models.Unigram([(p.piece, p.score if p.piece in names else floor)
                                for p in pieces], unk_id=trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
        known = sorted(set("".join(names)) | {"▁"})
        splits.append(Regex("[^" + "".join(f"\\x{{{ord(c):X}}}" for c in known) + "]+"))
    else:
        # SentencePiece BPE merges the neighbours whose joined piece scores highest, over
        # normal pieces only: one merge per way to split each piece, ranked by its score.
        normal = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == _SP_NORMAL}
        merges = [] if trainer.model_type == _SP_CHAR else sorted(
            (normal[piece], piece[:cut], piece[cut:])
            for piece in normal for cut in range(1, len(piece))
            if piece[:cut] in normal and piece[cut:] in normal)
        model = models.BPE({p.piece: i for i, p in enumerate(pieces)},
                           [(left, right) for _, left, right in merges],
                           unk_token=trainer.unk_piece, fuse_unk=True,
                           byte_fallback=trainer.byte_fallback)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence(steps)
    if splits:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(pattern, behavior="isolated") for pattern in splits])
    steps = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    else:
        steps.insert(0, decoders.Replace(trainer.unk_piece, trainer.unk_surface))
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # of the fused text: the dummy prefix only
    backend.decoder = decoders.Sequence(steps)
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")

    def special(piece_id, piece):
        return piece if 0 <= piece_id < len(pieces) and pieces[piece_id].piece == piece else None

    names = (special(trainer.bos_id, trainer.bos_piece),  # bos, eos, unk, pad
             special(trainer.eos_id, trainer.eos_piece),
             special(trainer.unk_id, trainer.unk_piece),
             special(trainer.pad_id, trainer.pad_piece))
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False)
                                for name in names if name is not None])
    return backend.to_str(), _fast_tokenizer_config(*names, split_special_tokens=True)


def gpt2_bpe_tokenizer_json(vocab_file: str, merge_file: str):
    """(tokenizer.json text, tokenizer_config) of the byte-level BPE that the training tokenizer
    is (data/tokenizer.py builds it the same way: transformers' GPT2Tokenizer, which matches its
    special tokens in a text)."""
    from transformers import GPT2Tokenizer

    hf_tokenizer = GPT2Tokenizer(vocab=vocab_file, merges=merge_file)
    names = (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.unk_token,
             hf_tokenizer.pad_token)
    return (hf_tokenizer.backend_tokenizer.to_str(),
            _fast_tokenizer_config(*names, split_special_tokens=False))


def hf_directory_tokenizer(directory: str):
    """(tokenizer config, tokenizer) for an HF directory: from megatron_tokenizer.json when we
    wrote it,
    else from the usual HF files (tokenizer.model -> SentencePiece, otherwise the HF
    tokenizer)."""
    record_path = os.path.join(directory, MEGATRON_TOKENIZER_FILE)
    if os.path.isfile(record_path):
        with open(record_path) as handle:
            record = json.load(handle)

        def local(key):
            return os.path.join(directory, record[key]) if record.get(key) else None

        config = TokenizerConfig(record["tokenizer_type"], local("tokenizer_model"),
                              local("vocab_file"), local("merge_file"),
                              record.get("vocab_size"))
    elif os.path.isfile(os.path.join(directory, "tokenizer.model")):
        config = TokenizerConfig("SentencePieceTokenizer",
                                 os.path.join(directory, "tokenizer.model"))
    elif any(os.path.isfile(os.path.join(directory, n)) for n in ("tokenizer.json", "vocab.json")):
        config = TokenizerConfig("HuggingFaceTokenizer", directory)
    else:
        raise CheckpointError(f"{directory} has no tokenizer files (tokenizer.model, "
                              "tokenizer.json or vocab.json)")
    return config, build_tokenizer(config)

"""Train a SentencePiece tokenizer on the same inputs preprocess_data accepts.

The model keeps text exactly: identity normalisation, no whitespace collapsing, newline as its
own symbol and byte fallback, so ``detokenize(tokenize(text)) == text`` for any UTF-8 text.
Documents are fed to the trainer paragraph by paragraph (SentencePiece wants sentence-sized
pieces). Output PREFIX.model / PREFIX.vocab appears atomically.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Tuple

from megatron_hypermoe.data.corpus import iter_documents
from megatron_hypermoe.data.outputs import check_output_paths
from megatron_hypermoe.errors import DataError

MAX_PIECE_CHARS = 8192


def _pieces(text: str):
    """Paragraphs, cut to at most MAX_PIECE_CHARS characters on line boundaries."""
    for paragraph in text.split("\n\n"):
        if not paragraph.strip():
            continue
        while len(paragraph) > MAX_PIECE_CHARS:
            cut = paragraph.rfind("\n", 0, MAX_PIECE_CHARS)
            cut = cut if cut > 0 else MAX_PIECE_CHARS
            yield paragraph[:cut]
            paragraph = paragraph[cut:]
        yield paragraph


def _record_final_prefix(model_path: str, final_prefix: str) -> None:
    """The model embeds its trainer options, including the (temporary) output prefix: store the
    final one instead, so the same flags and data give a byte-identical file."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as handle:
        model.ParseFromString(handle.read())
    model.trainer_spec.model_prefix = os.path.basename(final_prefix)
    with open(model_path, "wb") as handle:
        handle.write(model.SerializeToString())


@dataclasses.dataclass(frozen=True)
class TokenizerTrainingJob:
    """What tools/train_tokenizer.py's flags ask for (the same names)."""
    input: Tuple[str, ...]
    vocab_size: int
    model_prefix: str
    json_keys: Tuple[str, ...] = ("text",)
    text_sample_by: str = "document"
    skip_bad_lines: bool = False
    model_type: str = "bpe"
    character_coverage: float = 1.0
    input_sentence_size: int = 2_000_000
    seed: int = 1234
    overwrite: bool = False


def train_tokenizer(job: TokenizerTrainingJob) -> str:
    import sentencepiece as spm

    if job.vocab_size < 16:
        raise DataError(f"--vocab-size {job.vocab_size} is too small; use at least 16")
    outputs = [job.model_prefix + ".model", job.model_prefix + ".vocab"]
    check_output_paths(outputs, job.overwrite, job.model_prefix, "--model-prefix")
    directory = os.path.dirname(os.path.abspath(job.model_prefix))

    count = 0

    def sentences():
        nonlocal count
        for document in iter_documents(job.input, job.json_keys, job.skip_bad_lines,
                                       job.text_sample_by):
            for text in document.fields.values():
                for piece in _pieces(text):
                    count += 1
                    yield piece

    spm.set_random_generator_seed(job.seed)  # sampling and shuffling: same flags, same model
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        scratch_prefix = os.path.join(scratch, "tokenizer")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(),
                model_prefix=scratch_prefix,
                vocab_size=job.vocab_size,
                model_type=job.model_type,
                character_coverage=job.character_coverage,
                input_sentence_size=job.input_sentence_size,
                shuffle_input_sentence=True,
                seed_sentencepiece_size=1_000_000,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                split_digits=True,
                byte_fallback=True,
                user_defined_symbols=["\n"],
                max_sentence_length=4 * MAX_PIECE_CHARS,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as error:
            if count == 0:
                raise DataError(f"no text found in {' '.join(job.input)}; check --input "
                                "and --json-keys") from None
            message = str(error).strip().splitlines()[-1]
            raise DataError(f"SentencePiece training failed: {message}") from None
        _record_final_prefix(scratch_prefix + ".model", job.model_prefix)
        for suffix in (".vocab", ".model"):  # .model last: it is what users load
            os.replace(scratch_prefix + suffix, job.model_prefix + suffix)
    return job.model_prefix + ".model"

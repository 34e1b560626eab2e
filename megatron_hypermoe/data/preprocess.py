"""Raw text -> megatron-core mmap IndexedDataset (PREFIX_<key>_document.bin/.idx).

The command line and output match Megatron-LM's tools/preprocess_data.py; see
``tools/preprocess_data.py --help``. Beside the .bin/.idx pair a small JSON sidecar
(PREFIX_<key>_document.tokenizer.json) records which tokenizer wrote the ids, so training refuses
a dataset made with another tokenizer.

Output appears atomically: everything is written under temporary names and renamed at the end,
so an interrupted or failed run leaves no half-written dataset behind.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import time
from itertools import islice
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np

from megatron_hypermoe.data.corpus import ReadStats, iter_documents
from megatron_hypermoe.data.outputs import check_output_paths
from megatron_hypermoe.data.tokenizer import (
    TokenizerConfig,
    build_tokenizer,
    tokenizer_fingerprint,
    validate_tokenizer,
)
from megatron_hypermoe.errors import DataError

CHUNK_DOCUMENTS = 64


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def sidecar_path(dataset_prefix: str) -> str:
    return dataset_prefix + ".tokenizer.json"


def output_files(output_prefix: str, json_keys: Sequence[str]) -> List[str]:
    files = []
    for key in json_keys:
        prefix = output_prefix_for_key(output_prefix, key)
        files += [prefix + ".bin", prefix + ".idx", sidecar_path(prefix)]
    return files


# Tokenization, in the main process or in a worker pool ----------------------------------------
_worker_tokenizer = None
_worker_append_eod = False


def _init_worker(tokenizer: TokenizerConfig, append_eod: bool):
    global _worker_tokenizer, _worker_append_eod
    _worker_tokenizer = build_tokenizer(tokenizer)
    _worker_append_eod = append_eod


def _tokenize_chunk(chunk: List[Dict[str, str]]) -> List[Dict[str, np.ndarray]]:
    results = []
    for fields in chunk:
        encoded = {}
        for key, text in fields.items():
            ids = _worker_tokenizer.tokenize(text) if text.strip() else []
            if ids and _worker_append_eod:
                ids = list(ids) + [_worker_tokenizer.eod]
            encoded[key] = np.asarray(ids, dtype=np.int64)
        results.append(encoded)
    return results


def _chunks(documents: Iterable, size: int) -> Iterator[List[Dict[str, str]]]:
    iterator = iter(documents)
    while True:
        chunk = [doc.fields for doc in islice(iterator, size)]
        if not chunk:
            return
        yield chunk


def _tokenized(documents, tokenizer: TokenizerConfig, append_eod: bool, workers: int):
    chunks = _chunks(documents, CHUNK_DOCUMENTS)
    if workers <= 1:
        _init_worker(tokenizer, append_eod)
        for chunk in chunks:
            yield from _tokenize_chunk(chunk)
        return
    with multiprocessing.get_context("fork").Pool(
        workers, initializer=_init_worker, initargs=(tokenizer, append_eod)
    ) as pool:
        # imap keeps input order, so any worker count writes the same bytes.
        for results in pool.imap(_tokenize_chunk, chunks):
            yield from results


class _Progress:
    def __init__(self, log_interval: int):
        self.start = time.time()
        self.log_interval = log_interval
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", file=sys.stderr)

    def update(self, documents: int, tokens: int):
        elapsed = max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            if documents % 100 == 0:
                self.bar.set_postfix(tokens_per_s=f"{tokens / elapsed:,.0f}")
        elif documents % self.log_interval == 0:
            print(f"processed {documents:,} documents, {tokens:,} tokens "
                  f"({documents / elapsed:,.1f} docs/s, {tokens / elapsed:,.0f} tokens/s)",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass(frozen=True)
class PreprocessJob:
    """What tools/preprocess_data.py's flags ask for (the same names)."""
    input: Tuple[str, ...]
    output_prefix: str
    tokenizer: TokenizerConfig
    json_keys: Tuple[str, ...] = ("text",)
    text_sample_by: str = "document"
    skip_bad_lines: bool = False
    append_eod: bool = False
    overwrite: bool = False
    workers: int = 1
    log_interval: int = 1000


def preprocess(job: PreprocessJob) -> dict:
    """Run the conversion; returns a summary. Raises DataError on bad input."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    validate_tokenizer(job.tokenizer)
    if job.workers < 1:
        raise DataError(f"--workers {job.workers} must be at least 1")
    finals = output_files(job.output_prefix, job.json_keys)
    check_output_paths(finals, job.overwrite, job.output_prefix, "--output-prefix")

    tokenizer = build_tokenizer(job.tokenizer)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    suffix = f".tmp-{os.getpid()}"
    temporaries = {path: path + suffix for path in finals}
    prefixes = {key: output_prefix_for_key(job.output_prefix, key) for key in job.json_keys}
    stats = ReadStats()
    empty = {key: 0 for key in job.json_keys}
    written = {key: 0 for key in job.json_keys}
    tokens = 0
    builders = {}
    progress = _Progress(job.log_interval)
    try:
        builders = {key: IndexedDatasetBuilder(temporaries[prefix + ".bin"], dtype=dtype)
                    for key, prefix in prefixes.items()}
        documents = iter_documents(job.input, job.json_keys, job.skip_bad_lines,
                                   job.text_sample_by, stats)
        for index, encoded in enumerate(
                _tokenized(documents, job.tokenizer, job.append_eod, job.workers), start=1):
            for key, ids in encoded.items():
                if ids.size == 0:
                    empty[key] += 1
                    continue
                builders[key].add_document(ids, [ids.size])
                written[key] += 1
                tokens += int(ids.size)
            progress.update(index, tokens)
        if stats.documents == 0:
            raise DataError(f"no documents found in {' '.join(job.input)}; check --input")
        for key, prefix in prefixes.items():
            if written[key] == 0:
                raise DataError(f"every document's {key!r} field is empty; check --json-keys")
            builders[key].finalize(temporaries[prefix + ".idx"])
            with open(temporaries[sidecar_path(prefix)], "w") as handle:
                json.dump(dict(tokenizer_fingerprint(job.tokenizer, tokenizer), json_key=key,
                               append_eod=bool(job.append_eod)), handle, indent=1)
        for key, prefix in prefixes.items():  # .idx last: a reader needs both
            for path in (prefix + ".bin", sidecar_path(prefix), prefix + ".idx"):
                os.replace(temporaries[path], path)
    except BaseException:
        for builder in builders.values():
            if not builder.data_file.closed:
                builder.data_file.close()
        for path in temporaries.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        progress.close()
    return dict(documents=stats.documents, written=written, empty_documents=empty,
                skipped_bad_lines=stats.skipped_bad_lines,
                bad_line_examples=stats.bad_line_examples, tokens=tokens,
                outputs=list(prefixes.values()), dtype=np.dtype(dtype).name,
                seconds=time.time() - progress.start)

"""Training-side data: megatron-core's GPTDataset through its blended dataset builder.

``--data-path`` follows Megatron-LM: either prefixes (``A B``, weighted by size) or weight/prefix
pairs (``0.3 A 0.7 B``). ``--split 969,30,1`` splits documents into train/valid/test. Sample
indices are cached under ``--data-cache-path`` (megatron-core's .npy index files). ``--mock-data``
uses megatron-core's MockGPTDataset for smoke runs.

Before building, every dataset is checked against the tokenizer the model uses: a dataset written
with another tokenizer is refused (by its .tokenizer.json sidecar, or by its largest token id when
it has none).
"""

from __future__ import annotations

import json
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_hypermoe.data.preprocess import sidecar_path
from megatron_hypermoe.errors import DataError


def parse_data_path(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's --data-path: ``PREFIX...`` or ``WEIGHT PREFIX WEIGHT PREFIX...``."""
    items = list(data_path)
    if not items:
        raise DataError("--data-path is empty; give dataset prefixes, or weight/prefix pairs")
    if len(items) == 1:
        return items, None

    def is_number(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    numeric = [is_number(item) for item in items]
    if not any(numeric):
        return items, None
    if len(items) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise DataError(f"--data-path {' '.join(items)}: blend weights do not parse; write "
                        "'WEIGHT PREFIX WEIGHT PREFIX ...' (e.g. 0.3 A 0.7 B) or only prefixes")
    weights = [float(w) for w in items[0::2]]
    if any(not np.isfinite(w) or w <= 0 for w in weights):
        raise DataError(f"--data-path weights {weights} must be positive numbers")
    return items[1::2], weights


def check_dataset_files(prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise DataError(f"--data-path {prefix}: {prefix}{suffix} does not exist; write it "
                            "with tools/preprocess_data.py (give the prefix without .bin/.idx)")


def check_tokenizer_matches(prefix: str, tokenizer, fingerprint: Optional[dict]) -> None:
    """Refuse a dataset whose ids come from a different tokenizer than the model's."""
    path = sidecar_path(prefix)
    if os.path.isfile(path) and fingerprint is not None:
        with open(path) as handle:
            recorded = json.load(handle)
        for field in ("tokenizer_type", "vocab_size", "sha256"):
            if recorded.get(field) != fingerprint.get(field):
                raise DataError(
                    f"{prefix} was tokenized with another tokenizer ({field} "
                    f"{recorded.get(field)!r} != {fingerprint.get(field)!r}); re-run "
                    "tools/preprocess_data.py with this tokenizer or pass the one it used")
        return
    # No sidecar (e.g. written by Megatron-LM's own tool): the ids must at least fit the vocab.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = np.memmap(prefix + ".bin", mode="r", dtype=IndexedDataset(prefix).index.dtype)
    largest = int(tokens.max()) if len(tokens) else -1
    if largest >= tokenizer.vocab_size:
        raise DataError(f"{prefix} holds token id {largest}, beyond the tokenizer's vocabulary "
                        f"of {tokenizer.vocab_size}; it was written with another tokenizer")


def gpt_dataset_config(*, seed: int, seq_length: int, tokenizer, data_path=None, split="969,30,1",
                       data_cache_path=None, mock=False, fingerprint=None):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    blend = None
    if not mock:
        if not data_path:
            raise DataError("no training data: pass --data-path PREFIX... or --mock-data")
        prefixes, weights = parse_data_path(data_path)
        for prefix in prefixes:
            check_dataset_files(prefix)
            check_tokenizer_matches(prefix, tokenizer, fingerprint)
        blend = (prefixes, weights)
    _check_split(split)
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )


def _check_split(split: str) -> None:
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"--split {split!r} must be up to three non-negative numbers, "
                        "e.g. 969,30,1")


def build_gpt_datasets(config, num_samples: Sequence[int]):
    """(train, valid, test) datasets with at least these many samples each (None if 0)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    cls = MockGPTDataset if config.mock else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, list(num_samples), lambda: True, config).build()


class PretrainingSampler(torch.utils.data.Sampler):
    """Megatron's sequential pretraining sampler: each global step takes the next
    micro_batch_size * data_parallel_size samples; this rank takes its micro_batch_size slice.
    Starting at ``consumed_samples`` makes a resumed run read exactly what it would have read."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.stride = micro_batch_size * data_parallel_size

    def __len__(self):
        return (self.total_samples - self.consumed_samples) // self.stride

    def __iter__(self) -> Iterator[List[int]]:
        start = self.consumed_samples
        while start + self.stride <= self.total_samples:
            first = start + self.rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += self.stride


def build_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                      data_parallel_rank: int = 0, data_parallel_size: int = 1,
                      num_workers: int = 0):
    if dataset is None:
        return None
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                 data_parallel_rank, data_parallel_size)
    # Its own generator: each new iterator draws a worker base seed, from torch's global
    # generator by default, which on the CPU also draws the dropout masks; a resumed run makes
    # its iterators at another point of that stream than the run it continues did. (The batches
    # are the sampler's, fixed by consumed_samples; the seed only seeds workers.)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(0))

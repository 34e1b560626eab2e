"""Join indexed-dataset shards into one (Megatron-LM's tools/merge_datasets.py).

Shards must share token dtype and tokenizer; the merged dataset appears atomically.
"""

from __future__ import annotations

import glob
import json
import os

from megatron_hypermoe.data.outputs import check_output_paths
from megatron_hypermoe.data.preprocess import sidecar_path
from megatron_hypermoe.errors import DataError


def find_shards(inputs):
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p[:-4] for p in glob.glob(os.path.join(item, "*.idx")))
            if not found:
                raise DataError(f"--input directory {item} holds no .idx/.bin shards")
            prefixes.extend(found)
        else:
            prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise DataError(f"shard {prefix} has no {suffix} file; give the prefix of a "
                                "dataset written by preprocess_data.py")
    return prefixes


def _tokenizer_record(prefix):
    path = sidecar_path(prefix)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        record = json.load(handle)
    record.pop("json_key", None)
    return record


def merge(inputs, output_prefix, overwrite=False) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    prefixes = find_shards(inputs)
    finals = [output_prefix + ".bin", output_prefix + ".idx", sidecar_path(output_prefix)]
    check_output_paths(finals, overwrite, output_prefix, "--output-prefix")
    records = [_tokenizer_record(p) for p in prefixes]
    if any(r != records[0] for r in records):
        raise DataError("shards were written with different tokenizers (see their "
                        ".tokenizer.json); re-run preprocess_data.py with one tokenizer")
    dtypes = {IndexedDataset(p).index.dtype for p in prefixes}
    if len(dtypes) > 1:
        raise DataError(f"shards have different token dtypes {sorted(map(str, dtypes))}")
    suffix = f".tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(finals[0] + suffix, dtype=dtypes.pop())
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(finals[1] + suffix)
        if records[0] is not None:
            with open(finals[2] + suffix, "w") as handle:
                json.dump(records[0], handle, indent=1)
        for path in (finals[0], finals[2], finals[1]):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, path)
    except BaseException:
        for path in finals:
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        raise
    return len(prefixes)

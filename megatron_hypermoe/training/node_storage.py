"""Storage on several nodes: which directories every rank must share, and which may be local.

``--save`` must be one directory every rank sees: each rank writes its shards into
``iter_N.partial/``, rank 0 renames it and moves ``latest``, and every rank loads from it. A
``--save`` that is node-local is refused before the first step (and before ``--load`` reads a
different ``latest`` on each node), in one line naming the ranks that cannot see it.

``--data-cache-path`` may be shared or node-local (the same path on every node, each on its own
disk). megatron-core builds the sample-index cache on global rank 0 only and has every other
rank load it; on another node's disk the files are missing and that rank fails in ``np.load``.
So the first rank of each node that cannot see rank 0's cache directory builds its node's copy
first, in a one-process child (megatron-core's own path: it builds wherever torch.distributed is
not initialised); the node's other ranks then read it.

Both are decided by the same probe: rank 0 writes a file, every rank looks for it.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from typing import List, Optional, Sequence

import torch.distributed as dist

from megatron_hypermoe.data.gpt_data import build_gpt_datasets, gpt_dataset_config, parse_data_path
from megatron_hypermoe.data.tokenizer import TokenizerConfig, build_tokenizer, tokenizer_fingerprint
from megatron_hypermoe.errors import CheckpointError, DataError
from megatron_hypermoe.training.config import DataConfig, RunConfig, TrainingConfig

# A probe not seen at once is looked for this long (a network filesystem's lookup cache).
PROBE_SECONDS = 1.0


def ranks_that_cannot_see(directory: str) -> List[int]:
    """The ranks that do not see a file rank 0 writes into ``directory`` (collective); none
    when rank 0 cannot write there (a read-only dataset directory: nothing to decide)."""
    name, path = [None], None
    try:
        os.makedirs(directory, exist_ok=True)
        if dist.get_rank() == 0:
            path = os.path.join(directory, f".hypermoe-shared-probe-{uuid.uuid4().hex}")
            with open(path, "w"):
                name = [os.path.basename(path)]
    except OSError:
        pass
    dist.broadcast_object_list(name, src=0)
    if name[0] is None:
        return []
    probe = os.path.join(directory, name[0])
    deadline = time.monotonic() + PROBE_SECONDS
    while not os.path.exists(probe) and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, os.path.exists(probe))
    if path is not None:
        os.remove(path)
    return [rank for rank, visible in enumerate(seen) if not visible]


def check_save_is_shared(save: Optional[str]) -> None:
    """Refuse a --save that some rank cannot see (collective; several processes only)."""
    if not save or dist.get_world_size() == 1:
        return
    blind = ranks_that_cannot_see(save)
    if blind:
        raise CheckpointError(
            f"--save {save} is not shared: rank(s) {', '.join(map(str, blind))} cannot see "
            "the files rank 0 writes there (a node-local directory?); every rank writes its "
            "part of a checkpoint into it and rank 0 completes it: put --save (and --load) on "
            "a filesystem every node mounts")


# Datasets -----------------------------------------------------------------------------------------
def dataset_config_and_sizes(data: DataConfig, training: TrainingConfig,
                             tokenizer_config: TokenizerConfig, tokenizer):
    """megatron-core's GPTDatasetConfig for the run, and the samples each split needs."""
    fingerprint = None if data.mock_data else tokenizer_fingerprint(tokenizer_config, tokenizer)
    config = gpt_dataset_config(
        seed=training.seed, seq_length=data.seq_length, tokenizer=tokenizer,
        data_path=data.data_path, split=data.split, data_cache_path=data.data_cache_path,
        mock=data.mock_data, fingerprint=fingerprint)
    evals = (training.train_iters // training.eval_interval + 1) if training.eval_interval \
        else 1
    sizes = [training.train_iters * training.global_batch_size,
             evals * training.eval_iters * training.global_batch_size, 0]
    return config, sizes


def cache_directories(data: DataConfig) -> Sequence[str]:
    """Where megatron-core caches sample indices: --data-cache-path, else next to each dataset."""
    if data.mock_data:
        return ()
    if data.data_cache_path:
        return (data.data_cache_path,)
    prefixes, _ = parse_data_path(data.data_path)
    return tuple(sorted({os.path.dirname(os.path.abspath(p)) for p in prefixes}))


def _build_alone(data: DataConfig, training: TrainingConfig,
                 tokenizer_config: TokenizerConfig) -> None:
    """In a fresh process (torch.distributed not initialised): megatron builds and caches."""
    build_gpt_datasets(*dataset_config_and_sizes(data, training, tokenizer_config,
                                                 build_tokenizer(tokenizer_config)))


def build_node_local_cache(run: RunConfig) -> None:
    child = multiprocessing.get_context("spawn").Process(
        target=_build_alone, args=(run.data, run.training, run.tokenizer))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise DataError(f"building the sample-index cache in {cache_directories(run.data)[0]} "
                        f"on this node failed (exit {child.exitcode}; its output is above)")


def build_training_datasets(run: RunConfig, tokenizer):
    """(train, valid, test) on every rank: rank 0 builds megatron's cached sample indices first,
    the others then read them; a node that cannot see rank 0's cache builds its own first."""
    config, sizes = dataset_config_and_sizes(run.data, run.training, run.tokenizer, tokenizer)
    rank = dist.get_rank()
    if dist.get_world_size() > 1:
        blind = set()
        for directory in cache_directories(run.data):
            blind.update(ranks_that_cannot_see(directory))
        if rank in blind and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"rank {rank}: the index cache is node-local here; building this node's copy",
                  flush=True)
            build_node_local_cache(run)
    if rank == 0:
        datasets = build_gpt_datasets(config, sizes)
    dist.barrier()
    if rank != 0:
        datasets = build_gpt_datasets(config, sizes)
    return datasets

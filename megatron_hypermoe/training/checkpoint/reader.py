"""Read one of our checkpoints, saved with any TP/EP layout, as one full model state dict.

DeepSpeed keeps each tensor-parallel rank's module weights in ``mp_rank_XX_model_states.pt``
(written by data-parallel rank 0, so with EP > 1 they hold EP rank 0's experts only); our
``experts_ep_rank_*_tp_rank_*.safetensors`` hold every EP rank's experts under GLOBAL ids. The
reader merges tensor-parallel shards by megatron's name rules (``tensor_sharding``), takes the
experts from our files when EP > 1, and returns megatron parameter names with global expert
ids, as a single-process (TP=1, EP=1) model names them. Reads only: nothing is unpickled beyond
tensors and DeepSpeed's plain records.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional

import torch

from megatron_hypermoe.compat.deepspeed import load_deepspeed_file
from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.parallel.experts import global_parameter_name, is_expert_parameter
from megatron_hypermoe.parallel.tensor_sharding import merge, partition_dim
from megatron_hypermoe.training.checkpoint.experts import expert_file_name
from megatron_hypermoe.training.checkpoint.files import META_FILE, read_latest, tag_for
from megatron_hypermoe.training.config import RunConfig


@dataclasses.dataclass
class Checkpoint:
    directory: str  # the iter_N directory
    meta: dict  # hypermoe_checkpoint.json
    state: Dict[str, torch.Tensor]  # full tensors, megatron names, global expert ids

    @property
    def run(self) -> RunConfig:
        """The training run's config, from the flags it recorded (flags added since: the
        values before them, else their defaults)."""
        return RunConfig.from_flags(self.meta["args"])

    def single_process_run(self) -> RunConfig:
        """The run's config for one fp32 process (TP=1, EP=1): the whole model in one place."""
        return self.run.single_process()

    def model_config(self):
        """The config of the model this checkpoint holds, for one fp32 process."""
        return self.single_process_run().model


def _checkpoint_directory(load_dir: str, iteration: Optional[int]):
    if iteration is None:
        tag, meta = read_latest(load_dir)
        return os.path.join(load_dir, tag), meta
    directory = os.path.join(load_dir, tag_for(iteration))
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{load_dir} has no complete checkpoint for iteration {iteration} "
                              f"(no {meta_path})")
    with open(meta_path) as handle:
        return directory, json.load(handle)


def _load_module(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError.missing_file(path)
    saved = load_deepspeed_file(path, map_location="cpu")
    return {name: tensor for name, tensor in saved["module"].items()
            if isinstance(tensor, torch.Tensor) and not name.endswith("_extra_state")}


def _load_experts(directory: str, ep_size: int, tp_size: int, pp_rank: Optional[int]):
    from safetensors.torch import load_file

    per_tp_rank = [{} for _ in range(tp_size)]
    for tp_rank in range(tp_size):
        for ep_rank in range(ep_size):
            path = os.path.join(directory, expert_file_name(ep_rank, tp_rank, pp_rank))
            if not os.path.isfile(path):
                raise CheckpointError(f"expert shard {path} is missing (EP={ep_size}, "
                                      f"TP={tp_size} checkpoint); copy the whole checkpoint "
                                      "directory")
            per_tp_rank[tp_rank].update(load_file(path))
    return per_tp_rank


def _read_stage(directory: str, stage: int, sizes: dict, num_layers: int):
    """One pipeline stage's full tensors (TP merged, experts from our files), global names."""
    tp_size, ep_size, pp_size = sizes["tp"], sizes["ep"], sizes["pp"]
    # DeepSpeed names its files by the rank in megatron's TP x PP model-parallel group.
    shards = [_load_module(os.path.join(directory,
                                        f"mp_rank_{stage * tp_size + rank:02d}_model_states.pt"))
              for rank in range(tp_size)]
    offset = stage * (num_layers // pp_size)  # DeepSpeed's files number a stage's layers from 0
    shards = [{global_parameter_name(n, 0, 0, offset): t for n, t in shard.items()}
              for shard in shards]
    if ep_size > 1:
        # DeepSpeed's files hold only EP rank 0's experts, under local ids: use ours.
        shards = [{n: t for n, t in shard.items() if not is_expert_parameter(n)}
                  for shard in shards]
        experts = _load_experts(directory, ep_size, tp_size, stage if pp_size > 1 else None)
        for shard, stage_experts in zip(shards, experts):
            shard.update(stage_experts)
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            raise CheckpointError(f"{directory}: tensor-parallel rank {rank} holds other "
                                  "parameters than rank 0; the checkpoint is damaged")
    return {name: merge([shard[name] for shard in shards], name, partition_dim(name),
                        gated=True).clone()
            for name in names}


def read_checkpoint(load_dir: str, iteration: Optional[int] = None) -> Checkpoint:
    """The full state of the newest (or the given) checkpoint under ``load_dir``. Under
    pipeline parallelism the stages' states are joined; what several stages hold (the shared
    hypernetwork's replicas) is taken from the first."""
    directory, meta = _checkpoint_directory(load_dir, iteration)
    flags = meta["args"]
    sizes = {"tp": int(flags.get("tensor_model_parallel_size", 1)),
             "ep": int(flags.get("expert_model_parallel_size", 1)),
             "pp": int(flags.get("pipeline_model_parallel_size", 1))}
    state = {}
    for stage in range(sizes["pp"]):
        for name, tensor in _read_stage(directory, stage, sizes,
                                        int(flags["num_layers"])).items():
            state.setdefault(name, tensor)
    return Checkpoint(directory=directory, meta=meta, state=state)

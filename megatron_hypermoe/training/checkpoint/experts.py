"""Each expert-parallel rank's experts in a checkpoint, by GLOBAL expert id.

DeepSpeed saves module weights from data-parallel rank 0 only, so after a load every
expert-parallel (EP) rank would hold EP rank 0's experts. Every EP rank therefore writes its own
experts (safetensors, tensors named by global expert id, one file per EP x expert-TP rank) and
puts them back after DeepSpeed's load, then refreshes ZeRO's fp32 master copy. (Optimizer state is
per rank in DeepSpeed's files and comes back right.)
"""

from __future__ import annotations

import glob
import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.parallel.experts import global_name_function, is_expert_parameter


def expert_file_name(ep_rank: int, expert_tp_rank: int, pp_rank: Optional[int] = None) -> str:
    """One file per (EP rank, expert-TP rank), and pipeline stage under pipeline parallelism
    (``pp_rank`` not None): with expert tensor parallelism each holds a shard of its experts;
    the tensor names inside are global (``decoder.layers.<global layer>`` ...
    ``local_experts.<global id>``)."""
    stage = "" if pp_rank is None else f"pp_rank_{pp_rank:02d}_"
    return f"experts_{stage}ep_rank_{ep_rank:05d}_tp_rank_{expert_tp_rank:02d}.safetensors"


def this_rank_expert_file_name() -> str:
    pp_rank = parallel_state.get_pipeline_model_parallel_rank() \
        if parallel_state.get_pipeline_model_parallel_world_size() > 1 else None
    return expert_file_name(parallel_state.get_expert_model_parallel_rank(),
                            parallel_state.get_expert_tensor_parallel_rank(), pp_rank)


def _global_expert_state(model, num_experts: int):
    to_global = global_name_function(model.config)
    return {to_global(name): param
            for name, param in model.named_parameters() if is_expert_parameter(name)}


def save_local_experts(model, directory: str, num_experts: int) -> None:
    """Every EP rank (its expert-data-parallel rank 0) writes its experts."""
    from safetensors.torch import save_file

    if parallel_state.get_expert_data_parallel_rank() != 0:
        return
    tensors = {name: param.detach().cpu().contiguous()
               for name, param in _global_expert_state(model, num_experts).items()}
    save_file(tensors, os.path.join(directory, this_rank_expert_file_name()))


def restore_local_experts(engine, directory: str, num_experts: int) -> None:
    """Put this rank's experts back after DeepSpeed's load, then refresh the fp32 masters."""
    from safetensors import safe_open

    wanted = _global_expert_state(engine.module, num_experts)
    found = set()
    # Every EP rank's file of this rank's expert-TP shard (a checkpoint of another EP size
    # loads through layout_free.py instead).
    expert_tp_rank = parallel_state.get_expert_tensor_parallel_rank()
    own_shard = f"experts_*ep_rank_*_tp_rank_{expert_tp_rank:02d}.safetensors"
    with torch.no_grad():
        for path in sorted(glob.glob(os.path.join(directory, own_shard))):
            try:
                with safe_open(path, framework="pt") as handle:
                    for name in handle.keys():
                        if name in wanted:
                            wanted[name].copy_(handle.get_tensor(name))
                            found.add(name)
            except Exception as error:  # safetensors' own error class, or an OSError
                raise CheckpointError.damaged_file(path, error) from None
    missing = sorted(set(wanted) - found)
    if missing:
        raise CheckpointError(f"{directory} lacks expert weights {missing[0]} (and "
                              f"{len(missing) - 1} more): an expert shard file is missing")
    engine.optimizer.refresh_fp32_params()
    if dist.is_initialized():
        dist.barrier()

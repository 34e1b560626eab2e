"""megatron-core expert parallelism under DeepSpeed ZeRO: the glue between the two libraries.

Four clashes, each fixed here and nowhere else:

a. megatron marks expert parameters ``allreduce=False`` (when EP > 1), which DeepSpeed reads as
   "MoE parameter" and then requires ``param.group_name``: we set it.
b. DeepSpeed reduces expert gradients over its own expert-data-parallel groups: we register
   megatron-core's expert-parallel and expert-data-parallel groups under that name, so both
   libraries use the same ranks, and split the optimizer groups into MoE / non-MoE groups.
c. DeepSpeed turns its MoE handling on only when it finds its own MoE class: during
   ``deepspeed.initialize`` it is shown megatron's MoELayer as well.
d. DeepSpeed saves module weights from data-parallel rank 0 only, so after a load every
   expert-parallel rank would hold rank 0's experts: each EP rank saves its own experts (named by
   GLOBAL expert id, safetensors, one file per EP x expert-TP rank) and restores them after
   DeepSpeed's load, then refreshes the fp32 master copy. (Optimizer state is per rank in DeepSpeed's files and comes back right.)

Checked by tests/test_training.py: EP=2 vs EP=1 losses and gradient norms, and EP=2 resume.
"""

from __future__ import annotations

import contextlib
import glob
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hypermoe.initialization import global_parameter_name

EXPERT_FILE_PATTERN = "experts_ep_rank_*_tp_rank_*.safetensors"


def expert_file_name(ep_rank: int, expert_tp_rank: int) -> str:
    """One file per (EP rank, expert-TP rank): with expert tensor parallelism each holds a shard
    of its experts; the tensor names inside are global (``local_experts.<global id>``)."""
    return f"experts_ep_rank_{ep_rank:05d}_tp_rank_{expert_tp_rank:02d}.safetensors"


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def is_expert_parameter(param) -> bool:
    return not getattr(param, "allreduce", True)


def register_expert_parallel(model, num_experts: int, ep_size: int) -> None:
    """Clashes a and b (groups) and the attribute DeepSpeed reads in c."""
    from deepspeed.utils import groups
    from megatron.core.transformer.moe.moe_layer import MoELayer

    name = expert_group_name(ep_size)
    for param in model.parameters():
        if is_expert_parameter(param):
            param.group_name = name
    groups._EXPERT_PARALLEL_GROUP[name] = parallel_state.get_expert_model_parallel_group()
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = parallel_state.get_expert_data_parallel_group()
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.num_experts = num_experts


def split_moe_param_groups(param_groups):
    """Clash b: expert parameters in their own optimizer groups, as DeepSpeed requires."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(param_groups)


@contextlib.contextmanager
def deepspeed_recognises_megatron_moe():
    """Clash c: while DeepSpeed builds its engine, megatron's MoELayer counts as MoE."""
    import deepspeed.runtime.engine as engine_module
    from megatron.core.transformer.moe.moe_layer import MoELayer

    original = engine_module.MoE
    engine_module.MoE = (original, MoELayer)
    try:
        yield
    finally:
        engine_module.MoE = original


def _global_expert_state(model, num_experts: int):
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    return {
        global_parameter_name(name, num_experts // ep_size, ep_rank): param
        for name, param in model.named_parameters() if is_expert_parameter(param)
    }


def save_local_experts(model, directory: str, num_experts: int) -> None:
    """Clash d: every EP rank (its expert-data-parallel rank 0) writes its experts."""
    from safetensors.torch import save_file

    if parallel_state.get_expert_data_parallel_rank() != 0:
        return
    tensors = {name: param.detach().cpu().contiguous()
               for name, param in _global_expert_state(model, num_experts).items()}
    name = expert_file_name(parallel_state.get_expert_model_parallel_rank(),
                            parallel_state.get_expert_tensor_parallel_rank())
    save_file(tensors, os.path.join(directory, name))


def restore_local_experts(engine, directory: str, num_experts: int) -> None:
    """Clash d: put this rank's experts back after DeepSpeed's load, then refresh fp32 masters."""
    from safetensors import safe_open

    from megatron_hypermoe.training.checkpointing import CheckpointError

    wanted = _global_expert_state(engine.module, num_experts)
    found = set()
    # Every EP rank's file of this rank's expert-TP shard (a checkpoint saved with a different
    # EP size is refused before this point, by its recorded layout).
    own_shard = f"experts_ep_rank_*_tp_rank_{parallel_state.get_expert_tensor_parallel_rank():02d}" \
        ".safetensors"
    with torch.no_grad():
        for path in sorted(glob.glob(os.path.join(directory, own_shard))):
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    if name in wanted:
                        wanted[name].copy_(handle.get_tensor(name))
                        found.add(name)
    missing = sorted(set(wanted) - found)
    if missing:
        raise CheckpointError(f"{directory} lacks expert weights {missing[0]} (and "
                              f"{len(missing) - 1} more): an expert shard file is missing")
    engine.optimizer.refresh_fp32_params()
    if dist.is_initialized():
        dist.barrier()

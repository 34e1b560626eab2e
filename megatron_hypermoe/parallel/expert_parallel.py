"""megatron-core expert parallelism under DeepSpeed ZeRO: the glue between the two libraries.

Four clashes, each fixed in one place:

a. megatron marks expert parameters ``allreduce=False`` (when EP > 1), which DeepSpeed reads as
   "MoE parameter" and then requires ``param.group_name``: :func:`register_expert_parallel`
   sets it.
b. DeepSpeed reduces expert gradients over its own expert-data-parallel groups: we register
   megatron-core's expert-parallel and expert-data-parallel groups under that name, so both
   libraries use the same ranks (``compat.deepspeed.register_expert_groups``), and split the
   optimizer groups into MoE / non-MoE groups (:func:`split_moe_param_groups`).
c. DeepSpeed turns its MoE handling on only when it finds its own MoE class: during
   ``deepspeed.initialize`` it is shown megatron's MoELayer as well
   (:func:`deepspeed_recognises_megatron_moe`).
d. DeepSpeed saves module weights from data-parallel rank 0 only, so each EP rank checkpoints
   its own experts by global id (``training/checkpoint/experts.py``).

Checked by the EP tests: EP=2 vs EP=1 losses and gradient norms, and EP=2 resume.
"""

from __future__ import annotations

from megatron.core import parallel_state

from megatron_hypermoe.compat.deepspeed import engine_treats_as_moe, register_expert_groups
from megatron_hypermoe.parallel.experts import is_expert_parameter


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def register_expert_parallel(model, num_experts: int, ep_size: int) -> None:
    """Clashes a and b (groups) and the expert count DeepSpeed reads in c."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    name = expert_group_name(ep_size)
    for param_name, param in model.named_parameters():
        if is_expert_parameter(param_name):
            param.group_name = name
    register_expert_groups(name, parallel_state.get_expert_model_parallel_group(),
                           parallel_state.get_expert_data_parallel_group())
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.num_experts = num_experts


def split_moe_param_groups(param_groups):
    """Clash b: expert parameters in their own optimizer groups, as DeepSpeed requires."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def deepspeed_recognises_megatron_moe():
    """Clash c: while DeepSpeed builds its engine, megatron's MoELayer counts as MoE."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return engine_treats_as_moe(MoELayer)

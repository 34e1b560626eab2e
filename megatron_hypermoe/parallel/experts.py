"""Which parameters are experts, and every parameter's global name: experts by global id under
expert parallelism, layers by global index under pipeline parallelism.

The one definition used everywhere a parameter must be told apart as an expert weight
(initialisation, DeepSpeed's expert groups, checkpoints, the checkpoint reader, FLOP and
parameter counts). megatron-core names the experts of an MoE layer
``...mlp.experts.local_experts.<i>...``, where ``i`` counts the experts THIS expert-parallel
(EP) rank holds; global expert ``p * num_local + i`` lives on EP rank ``p``. Under EP > 1
megatron also marks exactly these parameters ``allreduce=False`` (a worker test checks that
the two agree).
"""

from __future__ import annotations

import re

_LOCAL_EXPERT = re.compile(r"(^|\.)experts\.local_experts\.(\d+)\.")
# megatron numbers a pipeline stage's layers from 0 in parameter names (decoder.layers.<i>.)
_LOCAL_LAYER = re.compile(r"(^|\.)decoder\.layers\.(\d+)\.")


def is_expert_parameter(name: str) -> bool:
    """True for a weight of one of the routed experts (by its parameter name)."""
    return _LOCAL_EXPERT.search(name) is not None


def global_parameter_name(name: str, num_local_experts: int, ep_rank: int,
                          layer_offset: int = 0) -> str:
    """Rename local expert i on EP rank p to global expert p * num_local_experts + i, and a
    pipeline stage's layer j to global layer layer_offset + j."""

    def to_global(match):
        global_id = ep_rank * num_local_experts + int(match.group(2))
        return f"{match.group(1)}experts.local_experts.{global_id}."

    def to_global_layer(match):
        return f"{match.group(1)}decoder.layers.{layer_offset + int(match.group(2))}."

    if layer_offset:
        name = _LOCAL_LAYER.sub(to_global_layer, name)
    return _LOCAL_EXPERT.sub(to_global, name)


def global_name_function(config):
    """local name -> global name on this rank, for a model of ``config`` (needs megatron's
    parallel state)."""
    from megatron.core import parallel_state

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    num_local_experts = (config.num_moe_experts or ep_size) // ep_size
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    layer_offset = parallel_state.get_pipeline_model_parallel_rank() * (config.num_layers //
                                                                         pp_size)
    return lambda name: global_parameter_name(name, num_local_experts, ep_rank, layer_offset)


def tensor_parallel_size_and_rank(name: str) -> tuple:
    """The (size, rank) of the tensor-parallel group that splits parameter ``name``: the
    expert-TP group for experts, the TP group otherwise (needs megatron's parallel state)."""
    from megatron.core import parallel_state

    if is_expert_parameter(name):
        return (parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_rank())
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())

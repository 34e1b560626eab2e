"""Which parameters are experts, and their global ids under expert parallelism.

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


def is_expert_parameter(name: str) -> bool:
    """True for a weight of one of the routed experts (by its parameter name)."""
    return _LOCAL_EXPERT.search(name) is not None


def global_parameter_name(name: str, num_local_experts: int, ep_rank: int) -> str:
    """Rename local expert i on EP rank p to global expert p * num_local_experts + i."""

    def to_global(match):
        global_id = ep_rank * num_local_experts + int(match.group(2))
        return f"{match.group(1)}experts.local_experts.{global_id}."

    return _LOCAL_EXPERT.sub(to_global, name)


def tensor_parallel_size_and_rank(name: str) -> tuple:
    """The (size, rank) of the tensor-parallel group that splits parameter ``name``: the
    expert-TP group for experts, the TP group otherwise (needs megatron's parallel state)."""
    from megatron.core import parallel_state

    if is_expert_parameter(name):
        return (parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_rank())
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())

"""DeepSpeed's ``mpu``: its view of the model-parallel layout, answered by megatron-core.

Given this object, DeepSpeed reduces gradients over megatron's data-parallel group, names its
checkpoint files by tensor-parallel rank (``mp_rank_XX``), and computes the global gradient norm
the model-parallel way: tensor-parallel shards summed over the TP group, replicated weights
counted on TP rank 0 only.

It deliberately has no ``get_sequence_parallel_*`` methods: DeepSpeed reads those as its own
(Ulysses) sequence parallelism, which splits the data-parallel world, while megatron's sequence
parallelism lives inside the tensor-parallel group and needs nothing from DeepSpeed.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state


class MegatronMPU:
    """The model-parallel group is megatron's tensor x pipeline group (we run PP = 1)."""

    # Model parallel (what DeepSpeed all-reduces gradient norms over).
    @staticmethod
    def get_model_parallel_group():
        return parallel_state.get_model_parallel_group()

    @staticmethod
    def get_model_parallel_rank():
        return dist.get_rank(parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size():
        return dist.get_world_size(parallel_state.get_model_parallel_group())

    # Tensor parallel.
    @staticmethod
    def get_tensor_model_parallel_group():
        return parallel_state.get_tensor_model_parallel_group()

    @staticmethod
    def get_tensor_model_parallel_rank():
        return parallel_state.get_tensor_model_parallel_rank()

    @staticmethod
    def get_tensor_model_parallel_world_size():
        return parallel_state.get_tensor_model_parallel_world_size()

    @staticmethod
    def get_tensor_model_parallel_src_rank():
        return parallel_state.get_tensor_model_parallel_src_rank()

    # Pipeline (always 1 stage here).
    @staticmethod
    def get_pipeline_model_parallel_rank():
        return parallel_state.get_pipeline_model_parallel_rank()

    @staticmethod
    def get_pipeline_model_parallel_world_size():
        return parallel_state.get_pipeline_model_parallel_world_size()

    # Data parallel (non-expert weights; expert groups are registered in expert_parallel.py).
    @staticmethod
    def get_data_parallel_group():
        return parallel_state.get_data_parallel_group()

    @staticmethod
    def get_data_parallel_rank():
        return parallel_state.get_data_parallel_rank()

    @staticmethod
    def get_data_parallel_world_size():
        return parallel_state.get_data_parallel_world_size()

    @staticmethod
    def get_data_parallel_group_ranks():
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())

"""Run under torchrun with 2 processes (TP=2): the two collective patches of cpu_compat.

5. a torch norm built with sequence_parallel=True is allowed and marked, and with the sequence-
   parallel hooks its gradient is summed over the TP group;
6. megatron's _gather_along_first_dim gathers slices of different sizes over gloo;
and tensor_sharding's name rules agree with the partition_dim megatron gives every parameter.
Exits non-zero (AssertionError) if either is wrong.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_hypermoe.parallel.distributed import destroy_distributed, initialize_distributed
from megatron_hypermoe.parallel.sequence_parallel import (
    allreduce_sequence_parallel_grads_in_backward,
)
from megatron_hypermoe.parallel.tensor_sharding import partition_dim
from tests.support.tiny_model import tiny_config, tiny_model


def check_uneven_gather(rank):
    sizes = [3, 1]
    local = torch.full((sizes[rank], 2), float(rank + 1))
    group = parallel_state.get_tensor_model_parallel_group()
    gathered = mappings._gather_along_first_dim(local, group, output_split_sizes=sizes)
    expected = torch.cat([torch.full((n, 2), float(r + 1)) for r, n in enumerate(sizes)])
    assert torch.equal(gathered, expected), gathered


def check_sequence_parallel_norm(rank):
    config = tiny_config(tensor_model_parallel_size=2, sequence_parallel=True)
    norm = WrappedTorchNorm(config, hidden_size=8)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    assert len(allreduce_sequence_parallel_grads_in_backward(norm)) == 1
    inputs = [torch.randn(5, 8, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    norm(inputs[rank]).pow(2).sum().backward()
    # Reference: the same norm on the whole sequence in one process.
    reference = torch.nn.RMSNorm(8, eps=norm.eps)
    reference(torch.cat(inputs)).pow(2).sum().backward()
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, rtol=1e-6, atol=1e-6)


def check_partition_name_rules():
    for moe_type in ("hypermoe", "dense"):
        model, _ = tiny_model(moe_type, tensor_model_parallel_size=2, sequence_parallel=True)
        for name, param in model.named_parameters():
            expected = param.partition_dim if getattr(param, "tensor_model_parallel", False) \
                else None
            assert partition_dim(name) == expected, (name, partition_dim(name), expected)


def main():
    initialize_distributed(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    check_uneven_gather(rank)
    check_sequence_parallel_norm(rank)
    check_partition_name_rules()
    print(f"rank {rank}: tp collectives OK")
    destroy_distributed()


if __name__ == "__main__":
    main()

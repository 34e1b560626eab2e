"""Run under torchrun with 2 processes: EP=2 forward/backward of tiny models, one batch per rank.

Writes <out>/<case>_rank<r>.pt with the loss and every gradient keyed by GLOBAL parameter name;
tests/test_parallel_equivalence.py compares them with a single-process EP=1 run.
"""

import argparse
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hypermoe.parallel.distributed import destroy_distributed, initialize_distributed
from megatron_hypermoe.parallel.experts import is_expert_parameter
from tests.support.ep_cases import (
    EP_CAPACITY_CASES,
    EP_CASES,
    EP_IMPL_CASES,
    EP_RECOMPUTE_CASES,
    ep_case_model,
    loss_and_global_grads,
)
from tests.support.tiny_model import tiny_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    initialize_distributed(expert_model_parallel_size=2, seed=7)
    rank = dist.get_rank()
    assert parallel_state.get_expert_model_parallel_world_size() == 2
    for moe_type in ("hypermoe", "moe", "moe_adapter"):
        # The one expert predicate (by name) picks exactly the parameters megatron marks as
        # expert-parallel (allreduce=False) when the config says EP > 1, as the trainer's does:
        # what DeepSpeed goes by.
        model, _ = tiny_model(moe_type, expert_model_parallel_size=2)
        marked = {n for n, p in model.named_parameters() if not getattr(p, "allreduce", True)}
        assert marked and marked == {n for n, _ in model.named_parameters()
                                     if is_expert_parameter(n)}, moe_type
    cases = {f"{moe_type}_{dispatcher}": (moe_type, dispatcher, {})
             for moe_type, dispatcher in EP_CASES}
    for name, (moe_type, dispatcher, overrides) in {**cases, **EP_CAPACITY_CASES,
                                                     **EP_RECOMPUTE_CASES, **EP_IMPL_CASES}.items():
        model, config = ep_case_model(moe_type, dispatcher, **overrides)
        loss, grads = loss_and_global_grads(model, config, data_seed=100 + rank)
        torch.save({"loss": loss, "grads": grads},
                   os.path.join(args.out, f"{name}_rank{rank}.pt"))
    destroy_distributed()


if __name__ == "__main__":
    main()

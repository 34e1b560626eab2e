"""Run under torchrun with 2 processes: EP=2 forward/backward of tiny models, one batch per rank.

Writes <out>/<case>_rank<r>.pt with the loss and every gradient keyed by GLOBAL parameter name;
tests/test_parallel_equivalence.py compares them with a single-process EP=1 run.
"""

import argparse
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hypermoe.initialization import global_parameter_name, initialize_from_global_names
from megatron_hypermoe.parallel import destroy_distributed, initialize_distributed
from tests.model_factory import batch, lm_loss, tiny_model

CASES = [(moe_type, dispatcher) for moe_type in ("hypermoe", "moe")
         for dispatcher in ("alltoall", "allgather")]
INIT_SEED = 42


def build(moe_type, dispatcher):
    """The equivalence tests' model: tiny, top-2 of 4 experts, weights from global names."""
    model, config = tiny_model(moe_type, moe_router_topk=2, moe_token_dispatcher_type=dispatcher)
    initialize_from_global_names(model, config, INIT_SEED)
    if moe_type == "hypermoe":
        with torch.no_grad():  # make the HyperExpert's contribution large enough to matter
            for head in ("down_weight", "up_weight"):
                getattr(model.hypernetwork, head).weight.mul_(1000)
    return model, config


def loss_and_global_grads(model, config, data_seed):
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, *batch(seed=data_seed))
    loss.backward()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    num_local = config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    grads = {
        global_parameter_name(name, num_local, ep_rank): p.grad.detach().clone()
        for name, p in model.named_parameters()
    }
    return loss.detach(), grads


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    initialize_distributed(expert_model_parallel_size=2, seed=7)
    rank = dist.get_rank()
    for moe_type, dispatcher in CASES:
        model, config = build(moe_type, dispatcher)
        loss, grads = loss_and_global_grads(model, config, data_seed=100 + rank)
        torch.save({"loss": loss, "grads": grads},
                   os.path.join(args.out, f"{moe_type}_{dispatcher}_rank{rank}.pt"))
    destroy_distributed()


if __name__ == "__main__":
    main()

"""Expert parallelism against one process: the cases and the model every EP=2 worker builds."""

import torch

from tests.support.tiny_model import batch, lm_loss, tiny_model

EP_CASES = [(moe_type, dispatcher) for moe_type in ("hypermoe", "moe")
            for dispatcher in ("alltoall", "allgather")]


# Token dropping under EP: capacity is per rank's micro-batch, as in one process on that batch.
EP_CAPACITY_CASES = {
    "hypermoe_alltoall_drop": ("hypermoe", "alltoall", dict(moe_expert_capacity_factor=0.5)),
    "hypermoe_allgather_drop": ("hypermoe", "allgather", dict(moe_expert_capacity_factor=0.5)),
    "hypermoe_alltoall_pad": ("hypermoe", "alltoall", dict(moe_expert_capacity_factor=1.0,
                                                           moe_pad_expert_input_to_capacity=True)),
    "moe_alltoall_pad": ("moe", "alltoall", dict(moe_expert_capacity_factor=0.5,
                                                 moe_pad_expert_input_to_capacity=True)),
}


EP_INIT_SEED = 42


# Recomputation re-runs the dispatcher's collectives in backward.
EP_RECOMPUTE_CASES = {
    "hypermoe_alltoall_recompute_full": ("hypermoe", "alltoall", dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    "hypermoe_alltoall_recompute_moe": ("hypermoe", "alltoall", dict(
        recompute_granularity="selective", recompute_modules=["moe"])),
}


# Each HyperExpert form under EP (the cases above take auto: allsets at these token counts),
# and megatron's SequentialMLP experts (the cases above take the grouped-GEMM ones).
EP_IMPL_CASES = {
    **{f"hypermoe_alltoall_{impl}": ("hypermoe", "alltoall", dict(hyper_expert_impl=impl))
       for impl in ("grouped", "factored")},
    "moe_alltoall_sequential_mlp": ("moe", "alltoall", dict(moe_grouped_gemm=False)),
}


# What every EP=2 case is compared with in one process: megatron's own attention and experts
# (SequentialMLP), so EP=2 with SDPA and grouped-GEMM experts is checked against them too.
EP_REFERENCE_OVERRIDES = dict(core_attention_backend="local", moe_grouped_gemm=False)


def ep_case_model(moe_type, dispatcher, **overrides):
    """The EP equivalence tests' model: tiny, top-2 of 4 experts, weights from global names
    (``overrides``: other config fields, e.g. a capacity factor)."""
    from megatron_hypermoe.model.initialization import initialize_from_global_names

    model, config = tiny_model(moe_type, **{"moe_router_topk": 2,
                                            "moe_token_dispatcher_type": dispatcher,
                                            **overrides})
    initialize_from_global_names(model, config, EP_INIT_SEED)
    if moe_type == "hypermoe":
        with torch.no_grad():  # make the HyperExpert's contribution large enough to matter
            for head in ("down_weight", "up_weight"):
                getattr(model.hypernetwork, head).weight.mul_(1000)
    return model, config


def loss_and_global_grads(model, config, data_seed):
    """Loss and every gradient, keyed by GLOBAL parameter name, for one batch."""
    from megatron.core import parallel_state

    from megatron_hypermoe.parallel.experts import global_parameter_name

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

"""Model FLOPs per token, counting what actually runs: top-k experts, the router and the
HyperExpert (its per-token application, and its generation once per distinct selected set); and
parameter counts, total and active per token."""

from math import comb

import torch

from megatron_hypermoe.model.config import moe_layer_pattern
from megatron_hypermoe.parallel.experts import is_expert_parameter


def forward_flops_per_token(args, tokens_per_micro_batch: int) -> float:
    d, s, L = args.hidden_size, args.seq_length, args.num_layers
    heads = args.num_attention_heads
    head_dim = args.kv_channels or d // heads
    q_dim, kv_dim = head_dim * heads, head_dim * (args.num_query_groups or heads)
    attention = 2 * d * (q_dim + 2 * kv_dim) + 2 * q_dim * d + 2 * 2 * s * q_dim

    def swiglu(f):
        return 2 * d * 2 * f + 2 * f * d

    moe_layers = sum(moe_layer_pattern(args))
    mlp = (L - moe_layers) * swiglu(args.ffn_hidden_size)
    if moe_layers:
        E, k = args.num_experts, args.moe_router_topk
        moe = k * swiglu(args.moe_ffn_hidden_size or args.ffn_hidden_size) + 2 * d * E
        if args.moe_shared_expert_intermediate_size:
            moe += swiglu(args.moe_shared_expert_intermediate_size)
            moe += 2 * d if args.moe_shared_expert_gate else 0
        if args.moe_type == "moe_adapter":
            moe += 2 * d * args.hyper_adapter_dim * 2
        if args.moe_type == "hypermoe":
            r, d_g = args.hyper_adapter_dim, args.hyper_hidden_size
            d_e, d_p = args.hyper_expert_embedding_dim, args.hyper_selection_hidden_size
            d_h, d_l = args.hyper_selection_output_size, args.hyper_layer_embedding_dim
            apply = 2 * d * r + 2 * r * d
            per_set = (2 * E * d_e + 2 * d_e * d_p + 2 * d_p * d_h + 2 * (d_h + d_l) * d_g
                       + 2 * d_g * (2 * d * r + d + r))
            sets = min(tokens_per_micro_batch, comb(E, k))  # upper bound on distinct sets
            moe += apply + per_set * sets / tokens_per_micro_batch
        mlp += moe_layers * moe
    logits = 2 * d * args.padded_vocab_size
    return L * attention + mlp + logits


def training_flops_per_iteration(args) -> float:
    """Forward + backward (3x forward) for one global batch."""
    tokens = args.micro_batch_size * args.seq_length
    return 3 * forward_flops_per_token(args, tokens) * args.global_batch_size * args.seq_length


def parameter_counts(model, args):
    """(total, active per token) parameters of the whole model, from one rank's shards: a
    tensor-parallel shard counts TP times, a local expert EP times, pipeline stages are summed
    (the hypernetwork's replicas once); a token uses top-k of E experts. Collective under
    pipeline parallelism."""
    from megatron.core import parallel_state

    from megatron_hypermoe.parallel.pipeline import sum_over_stages

    tp = parallel_state.get_tensor_model_parallel_world_size()
    expert_tp = parallel_state.get_expert_tensor_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    total = experts = 0
    for name, param in model.named_parameters():
        if getattr(param, "ds_pipe_replicated", False):
            continue  # the first stage counts the shared hypernetwork
        is_expert = is_expert_parameter(name)
        count = param.numel()
        if getattr(param, "tensor_model_parallel", False):
            count *= expert_tp if is_expert else tp
        if is_expert:
            count *= ep
            experts += count
        total += count
    # (on the model's device: NCCL reduces only accelerator tensors)
    device = next(model.parameters()).device
    total, experts = sum_over_stages(
        torch.tensor([total, experts], dtype=torch.float64, device=device)).tolist()
    active = total - experts
    if experts:
        active += experts * args.moe_router_topk / args.num_experts
    return int(total), int(active)

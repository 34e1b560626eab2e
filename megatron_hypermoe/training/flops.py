"""Model FLOPs per token, counting what actually runs: top-k experts, the router and the
HyperExpert (its per-token application, and its generation once per distinct selected set); and
parameter counts, total and active per token."""

from math import comb

import torch

from megatron_hypermoe.model.config import moe_layer_pattern
from megatron_hypermoe.parallel.experts import is_expert_parameter
from megatron_hypermoe.training.config import RunConfig


def forward_flops_per_token(run: RunConfig, tokens_per_micro_batch: int) -> float:
    config = run.model
    d, s, L = config.hidden_size, run.data.seq_length, config.num_layers
    heads = config.num_attention_heads
    head_dim = config.kv_channels or d // heads
    q_dim, kv_dim = head_dim * heads, head_dim * (config.num_query_groups or heads)
    attention = 2 * d * (q_dim + 2 * kv_dim) + 2 * q_dim * d + 2 * 2 * s * q_dim

    def swiglu(f):
        return 2 * d * 2 * f + 2 * f * d

    moe_layers = sum(moe_layer_pattern(config))
    mlp = (L - moe_layers) * swiglu(config.ffn_hidden_size)
    if moe_layers:
        E, k = config.num_moe_experts, config.moe_router_topk
        moe = k * swiglu(config.moe_ffn_hidden_size or config.ffn_hidden_size) + 2 * d * E
        if config.moe_shared_expert_intermediate_size:
            moe += swiglu(config.moe_shared_expert_intermediate_size)
            moe += 2 * d if config.moe_shared_expert_gate else 0
        if config.moe_type == "moe_adapter":
            moe += 2 * d * config.hyper_adapter_dim * 2
        if config.moe_type == "hypermoe":
            r, d_g = config.hyper_adapter_dim, config.hyper_hidden_size
            d_e, d_p = config.hyper_expert_embedding_dim, config.hyper_selection_hidden_size
            d_h, d_l = config.hyper_selection_output_size, config.hyper_layer_embedding_dim
            apply = 2 * d * r + 2 * r * d
            per_set = (2 * E * d_e + 2 * d_e * d_p + 2 * d_p * d_h + 2 * (d_h + d_l) * d_g
                       + 2 * d_g * (2 * d * r + d + r))
            sets = min(tokens_per_micro_batch, comb(E, k))  # upper bound on distinct sets
            moe += apply + per_set * sets / tokens_per_micro_batch
        mlp += moe_layers * moe
    logits = 2 * d * run.embedding.padded_vocab_size
    return L * attention + mlp + logits


def training_flops_per_iteration(run: RunConfig) -> float:
    """Forward + backward (3x forward) for one global batch."""
    tokens = run.training.micro_batch_size * run.data.seq_length
    return (3 * forward_flops_per_token(run, tokens) * run.training.global_batch_size
            * run.data.seq_length)


def parameter_counts(model, run: RunConfig):
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
        active += experts * run.model.moe_router_topk / run.model.num_moe_experts
    return int(total), int(active)

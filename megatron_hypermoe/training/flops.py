"""Model FLOPs per token, counting what actually runs: top-k experts, the router and the
HyperExpert (its per-token application, and its generation once per distinct selected set)."""

from math import comb


def forward_flops_per_token(args, tokens_per_micro_batch: int) -> float:
    d, s, f, L = args.hidden_size, args.seq_length, args.ffn_hidden_size, args.num_layers
    heads = args.num_attention_heads
    kv_dim = d // heads * (args.num_query_groups or heads)
    attention = 2 * d * (d + 2 * kv_dim) + 2 * d * d + 2 * 2 * s * d
    swiglu = 2 * d * 2 * f + 2 * f * d
    if args.moe_type == "dense":
        mlp = swiglu
    else:
        E, k = args.num_experts, args.moe_router_topk
        mlp = k * swiglu + 2 * d * E
        if args.moe_type == "hypermoe":
            r, d_g = args.hyper_adapter_dim, args.hyper_hidden_size
            d_e, d_p = args.hyper_expert_embedding_dim, args.hyper_selection_hidden_size
            d_h, d_l = args.hyper_selection_output_size, args.hyper_layer_embedding_dim
            apply = 2 * d * r + 2 * r * d
            per_set = (2 * E * d_e + 2 * d_e * d_p + 2 * d_p * d_h + 2 * (d_h + d_l) * d_g
                       + 2 * d_g * (2 * d * r + d + r))
            sets = min(tokens_per_micro_batch, comb(E, k))  # upper bound on distinct sets
            mlp += apply + per_set * sets / tokens_per_micro_batch
    logits = 2 * d * args.padded_vocab_size
    return L * (attention + mlp) + logits


def training_flops_per_iteration(args) -> float:
    """Forward + backward (3x forward) for one global batch."""
    tokens = args.micro_batch_size * args.seq_length
    return 3 * forward_flops_per_token(args, tokens) * args.global_batch_size * args.seq_length

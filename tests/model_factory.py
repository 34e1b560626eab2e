"""Tiny configurations and models shared by the tests."""

import torch

from megatron_hypermoe.config import make_config
from megatron_hypermoe.model import build_gpt_model, causal_attention_mask

TINY = dict(
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    num_moe_experts=4,
    moe_router_topk=1,
    hyper_adapter_dim=8,
    hyper_hidden_size=16,
    hyper_expert_embedding_dim=12,
    hyper_selection_hidden_size=10,
    hyper_selection_output_size=14,
    hyper_layer_embedding_dim=6,
    init_method_std=0.02,
)
VOCAB = 64
SEQ = 16


def tiny_config(moe_type="hypermoe", **overrides):
    return make_config(moe_type, **{**TINY, **overrides})


def tiny_model(moe_type="hypermoe", seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(moe_type, **overrides)
    return build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ), config


def batch(seed=0, batch_size=2, seq=SEQ):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, seq + 1), generator=generator)
    position_ids = torch.arange(seq).expand(batch_size, seq)
    return tokens[:, :-1], position_ids, tokens[:, 1:]


def lm_loss(model, tokens, position_ids, labels):
    """Mean token loss, as megatron's pretrain_gpt computes it."""
    mask = causal_attention_mask(tokens.shape[1], tokens.device)
    per_token = model(tokens, position_ids, mask, labels=labels)
    return per_token.float().mean()

"""The one tiny model the tests share: as config fields, built in-process, and as trainer flags."""

import torch

from megatron_hypermoe.model.config import VARIANT_HYPER_FIELDS, make_config
from megatron_hypermoe.model.gpt import build_gpt_model, causal_attention_mask
from megatron_hypermoe.training.config import MODEL_FLAGS, MOE_FLAGS

# Every hyper size differs from the others, so a transposed or mixed-up weight cannot pass a
# shape check by accident.
TINY = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_moe_experts=4,
    moe_router_topk=2,
    hyper_adapter_dim=8,
    hyper_hidden_size=16,
    hyper_expert_embedding_dim=12,
    hyper_selection_hidden_size=10,
    hyper_selection_output_size=14,
    hyper_layer_embedding_dim=6,
    init_method_std=0.02,
)


VOCAB = 64  # for models built in-process


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


def random_tokens(batch=2, length=SEQ, vocab=VOCAB, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def megatron_logits(model, ids):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model(ids, positions, causal_attention_mask(ids.shape[1])).float()


@torch.no_grad()
def hf_logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


def tiny_flags(moe_type="hypermoe", **overrides):
    """The tiny model as pretrain_gpt_hypermoe.py flags (config field names as in TINY), with
    only the --hyper-* flags that ``moe_type`` reads (the others are refused)."""
    flag_of = {field: flag for flag, field in {**MODEL_FLAGS, **MOE_FLAGS}.items()}
    flag_of.update({field: field for field in VARIANT_HYPER_FIELDS["hypermoe"]})
    unread = set(VARIANT_HYPER_FIELDS["hypermoe"]) - set(VARIANT_HYPER_FIELDS[moe_type])
    if moe_type == "dense":  # (no MoE flag either)
        unread |= set(MOE_FLAGS.values())
    flags = []
    for field, value in {**TINY, **overrides}.items():
        if field not in unread:
            flags += ["--" + flag_of[field].replace("_", "-"), str(value)]
    return flags


# The tiny model as a training run: sequence 32, micro-batch 2 (the trainer tests' setting).
RUN_FLAGS = ["--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-3", "--log-interval",
             "1", "--seed", "7"]


TINY_MODEL = tiny_flags() + RUN_FLAGS


def tiny_run(moe_type="hypermoe", **overrides):
    """TINY_MODEL for a variant: ``--moe-type moe_type`` and the --hyper-* flags it reads."""
    return tiny_flags(moe_type, **overrides) + RUN_FLAGS + ["--moe-type", moe_type]


# The flags of megatron-core's own attention and experts, which one-process reference runs take
# (parallel runs take the defaults: SDPA and grouped-GEMM experts).
MEGATRON_KERNELS = ["--attention-backend", "local", "--no-moe-grouped-gemm"]

"""What a checkpoint must match to be loaded: the model's shape (``SHAPE_FIELDS``) and, with the
optimizer, its parameter groups; and whether a load adds a side path to an MoE."""

from __future__ import annotations

from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.model.config import (
    HYPER_SIZE_NAMES,
    SIDE_PATH_VARIANTS,
    VARIANT_HYPER_FIELDS,
)
from megatron_hypermoe.training.checkpoint.layout_free import vocab_padding_message
from megatron_hypermoe.training.config import RunConfig, hyper_lr_mult_of

# Fields a checkpoint must match; --finetune may not change them either. The parallel layout is
# not one: layout_free.py loads any layout's checkpoint into any other.
# Of the HyperMoE sizes, only those the variant reads (model/config.py VARIANT_HYPER_FIELDS).
SHAPE_FIELDS = (
    "moe_type", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "num_experts", "moe_router_topk", "padded_vocab_size",
    "max_position_embeddings", "kv_channels", "qk_layernorm", "add_qkv_bias",
    "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", *HYPER_SIZE_NAMES,
)


# The shape fields only MoE layers have: a dense model's are not compared (checkpoints written
# before the config recorded the parser's defaults there).
MOE_SHAPE_FIELDS = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq",
                    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate")


def checkpoint_shape(flags: dict) -> dict:
    """The values of SHAPE_FIELDS (by flag, RunConfig.to_flags), which a checkpoint records and
    a load must match."""
    unread = set(HYPER_SIZE_NAMES) - set(VARIANT_HYPER_FIELDS[flags["moe_type"]])
    if flags["moe_type"] == "dense":
        unread |= set(MOE_SHAPE_FIELDS)
    return {field: flags.get(field) for field in SHAPE_FIELDS if field not in unread}


def _as_built(shape: dict) -> dict:
    """The fields whose flag default stands for a value (None: one key/value group per head,
    heads of hidden / heads channels) as that value, whichever way a checkpoint recorded them."""
    shape = dict(shape)
    heads = shape.get("num_attention_heads")
    if heads:
        if shape.get("num_query_groups") is None:
            shape["num_query_groups"] = heads
        if shape.get("kv_channels") is None and shape.get("hidden_size"):
            shape["kv_channels"] = shape["hidden_size"] // heads
    return shape


def check_model_shape(meta: dict, run: RunConfig, adding_side_path: bool = False) -> None:
    saved, current = _as_built(meta.get("model", {})), _as_built(checkpoint_shape(run.to_flags()))
    for field in SHAPE_FIELDS:
        if field == "moe_type" and adding_side_path:
            continue
        # (a field the variant does not read: not recorded now, any value recorded before)
        if field in saved and field in current and saved[field] != current[field]:
            if field == "moe_type" and saved[field] == "moe" and \
                    current[field] in SIDE_PATH_VARIANTS:
                raise CheckpointError(f"checkpoint is a moe model and the flags give "
                                      f"--moe-type {current[field]}: add --finetune to start one "
                                      "from it (its side path is added with a zero output), or "
                                      "pass --moe-type moe")
            if field == "padded_vocab_size":  # TP is part of Megatron's vocabulary padding
                raise CheckpointError(vocab_padding_message(meta, run))
            flag = "--" + field.replace("_", "-")
            fix = (("add " if saved[field] else "drop ") + flag) \
                if isinstance(saved[field], bool) else f"pass {flag} {saved[field]}"
            raise CheckpointError(f"checkpoint has {field}={saved[field]!r} but the flags give "
                                  f"{current[field]!r}: {fix} or load another checkpoint")


def check_optimizer_groups(meta: dict, run: RunConfig) -> None:
    """DeepSpeed's optimizer files hold one flat partition per parameter group: a run whose
    groups differ (--hyper-lr-mult 1 has no group of its own, any other value has) cannot take
    them."""
    recorded = meta.get("args", {})
    saved = hyper_lr_mult_of(recorded)
    as_passed = recorded.get("hyper_lr_mult", saved)  # a number, or the rule it was given as
    as_passed = as_passed if isinstance(as_passed, str) else f"{as_passed:g}"
    if (saved != 1.0) != (run.optimizer.hyper_lr_mult != 1.0):
        raise CheckpointError(f"checkpoint was trained with --hyper-lr-mult {saved:g}, this run "
                              f"has {run.optimizer.hyper_lr_mult:g}: the optimizer's parameter "
                              f"groups differ; pass --hyper-lr-mult {as_passed} to keep "
                              "the checkpoint's, or add --no-load-optim to start the optimizer "
                              "and the learning-rate schedule afresh")


def side_path_added(meta: dict, run: RunConfig) -> bool:
    """Whether this load upcycles an MoE checkpoint into HyperMoE or the static-adapter variant
    (``--finetune --moe-type hypermoe`` on a ``moe`` checkpoint): the paper's setting."""
    return (run.checkpoint.finetune and meta.get("model", {}).get("moe_type") == "moe"
            and run.model.moe_type in SIDE_PATH_VARIANTS)

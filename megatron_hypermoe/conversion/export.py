"""Our checkpoint (any TP/EP layout) -> a Hugging Face directory.

``dense`` becomes a native LlamaForCausalLM directory and ``moe`` a native MixtralForCausalLM one
(no custom code). ``hypermoe`` keeps every Mixtral key and adds the HyperMoE ones, with
``configuration_hypermoe.py`` and ``modeling_hypermoe.py`` beside the weights (``auto_map``,
``trust_remote_code=True``). config.json is written with the classic field names that
transformers 4.x and 5.x both read. The directory appears whole or not at all: everything is
written into a temporary sibling that is renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import megatron_hypermoe.hf
from megatron_hypermoe.data.tokenizer_files import checked_training_tokenizer, write_tokenizer_files
from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.hf.mapping import NameMapShape, to_hf
from megatron_hypermoe.model.config import HYPER_SIZE_NAMES, gates_renormalised
from megatron_hypermoe.training.checkpoint_reader import Checkpoint, read_checkpoint

HF_FILES_DIRECTORY = os.path.dirname(os.path.abspath(megatron_hypermoe.hf.__file__))
REMOTE_CODE_FILES = ("configuration_hypermoe.py", "modeling_hypermoe.py")


def unrepresentable_routing(config) -> Optional[str]:
    """What of the router's options the Hugging Face models (Mixtral's routing: softmax over
    all experts, top-k, optionally renormalised) cannot compute, or None."""
    if config.moe_type == "dense":
        return None
    options = (
        (config.moe_expert_capacity_factor is not None,
         f"drops tokens over capacity (--moe-expert-capacity-factor "
         f"{config.moe_expert_capacity_factor})"),
        (config.moe_router_score_function != "softmax",
         f"routes by {config.moe_router_score_function} scores"),
        (config.moe_router_load_balancing_type == "sinkhorn", "routes by sinkhorn"),
        (bool(config.moe_router_topk_scaling_factor),
         f"scales the gates by {config.moe_router_topk_scaling_factor}"),
        (bool(config.moe_router_group_topk), "routes group-limited top-k"),
        (config.moe_router_enable_expert_bias, "selects with a learned expert bias"),
        (config.moe_input_jitter_eps is not None, "jitters the router input"),
        (config.moe_router_force_load_balancing, "routes by random logits"),
    )
    return next((what for applies, what in options if applies), None)


def check_representable(checkpoint: Checkpoint) -> None:
    args = checkpoint.args
    routing = unrepresentable_routing(checkpoint.model_config())
    if routing:
        raise CheckpointError(f"this {args.moe_type} model {routing}, which the Hugging Face "
                              "model (Mixtral's routing) cannot compute: not exported")
    if args.moe_type == "moe_adapter":
        raise CheckpointError("moe_adapter (the static-adapter ablation) has no Hugging Face "
                              "architecture to export to; it exists for benchmarks/"
                              "compare_variants.py")
    if args.moe_type == "moe" and not gates_renormalised(checkpoint.model_config()):
        top1 = "top-1 " if args.moe_router_topk == 1 else ""
        raise CheckpointError(
            f"a {top1}megatron MoE with unrenormalised gates cannot be exported as "
            "MixtralForCausalLM exactly: Mixtral renormalises the selected experts' weights, "
            "pre-softmax routing (the default for top-1) keeps the softmax probabilities; train "
            "with --moe-router-renormalize to export to Mixtral")


def hf_config(checkpoint: Checkpoint, eod: Optional[int]) -> dict:
    args = checkpoint.args
    config = checkpoint.model_config()
    dtype = "bfloat16" if checkpoint.meta["args"].get("bf16") else "float32"
    common = dict(
        vocab_size=args.padded_vocab_size, hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=config.num_query_groups, head_dim=config.kv_channels,
        hidden_act="silu", max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon, rope_theta=config.rotary_base,
        initializer_range=args.init_method_std, tie_word_embeddings=False, use_cache=True,
        torch_dtype=dtype, attention_dropout=0.0,
    )
    if eod is not None:
        common["eos_token_id"] = eod
    if args.moe_type == "dense":
        return dict(model_type="llama", architectures=["LlamaForCausalLM"],
                    attention_bias=False, mlp_bias=False, **common)
    moe = dict(num_local_experts=args.num_experts, num_experts_per_tok=args.moe_router_topk,
               router_aux_loss_coef=args.moe_aux_loss_coeff, output_router_logits=False,
               sliding_window=None, **common)
    if args.moe_type == "moe":
        return dict(model_type="mixtral", architectures=["MixtralForCausalLM"], **moe)
    return dict(
        model_type="hypermoe", architectures=["HyperMoeForCausalLM"],
        auto_map={"AutoConfig": "configuration_hypermoe.HyperMoeConfig",
                  "AutoModelForCausalLM": "modeling_hypermoe.HyperMoeForCausalLM"},
        norm_topk_prob=gates_renormalised(config),
        **{name: getattr(config, name) for name in HYPER_SIZE_NAMES},
        hyper_init=config.hyper_init, hyper_lr_mult=args.hyper_lr_mult, **moe)


def write_hf_directory(output: str, state: dict, config: dict, write_extra) -> None:
    """Write weights + config (+ ``write_extra(tmp_dir)``) into ``output`` atomically."""
    from safetensors.torch import save_file

    if os.path.exists(output) and os.listdir(output):
        raise CheckpointError(f"--output {output} exists and is not empty: choose a new "
                              "directory")
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".hf-export-", dir=parent)
    try:
        save_file(state, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(staging, "config.json"), "w") as handle:
            json.dump(config, handle, indent=1)
        if config["model_type"] == "hypermoe":
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(os.path.join(HF_FILES_DIRECTORY, name),
                                os.path.join(staging, name))
        write_extra(staging)
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked above
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_checkpoint(load_dir: str, output: str, iteration: Optional[int] = None,
                      tokenizer_model: Optional[str] = None) -> dict:
    """Convert; returns the HF config written."""
    checkpoint = read_checkpoint(load_dir, iteration)
    check_representable(checkpoint)
    tokenizer_args, tokenizer = checked_training_tokenizer(
        checkpoint.args, checkpoint.meta.get("tokenizer"), tokenizer_model)
    eod = None if tokenizer_args.tokenizer_type == "NullTokenizer" else int(tokenizer.eod)
    config = hf_config(checkpoint, eod)
    state = to_hf(checkpoint.state, NameMapShape.of(checkpoint.model_config()))
    write_hf_directory(output, state, config,
                       lambda staging: write_tokenizer_files(tokenizer_args, tokenizer, staging))
    return config

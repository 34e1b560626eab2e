"""Our checkpoint (any TP/EP layout) -> a Hugging Face directory.

The HF family is the one that holds the model exactly (:func:`hf_family`): ``dense`` becomes a
native LlamaForCausalLM directory; ``moe`` a native MixtralForCausalLM one, or, with a shared
expert, qkv bias, q/k norm or dense layers between the MoE layers, a native
Qwen2MoeForCausalLM (shared expert, gated; qkv bias) or Qwen3MoeForCausalLM (q/k norm) one (no
custom code); what neither can hold is refused. ``hypermoe`` keeps every Mixtral key and adds
the HyperMoE ones (and the optional parts' keys), with ``configuration_hypermoe.py`` and
``modeling_hypermoe.py`` beside the weights (``auto_map``, ``trust_remote_code=True``).
config.json is written with the classic field names that transformers 4.x and 5.x both read, and
the MoE layer pattern as ``mlp_only_layers`` with ``decoder_sparse_step`` 1. The directory
appears whole or not at all: everything is written into a temporary sibling that is renamed at
the end.
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
from megatron_hypermoe.hf.mapping import NameMapShape, to_hf, unrepresentable
from megatron_hypermoe.model.config import HYPER_SIZE_NAMES, gates_renormalised
from megatron_hypermoe.training.checkpoint.reader import Checkpoint, read_checkpoint

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


QWEN_FAMILIES = (("qwen2_moe", "Qwen2-MoE"), ("qwen3_moe", "Qwen3-MoE"))


def hf_family(config) -> str:
    """The HF family a model exports to: llama, mixtral (an MoE with nothing Mixtral lacks),
    qwen2_moe or qwen3_moe (the first that holds the MoE exactly), hypermoe."""
    if config.moe_type == "dense":
        family = "llama"
    elif config.moe_type != "moe":
        return config.moe_type
    else:
        shape = NameMapShape.of(config)
        if shape.shared_expert_size or shape.qkv_bias or shape.qk_layernorm or \
                shape.has_dense_layers:
            problems = [(name, unrepresentable(shape._replace(family=family)))
                        for family, name in QWEN_FAMILIES]
            fits = [family for (family, _), (_, problem) in zip(QWEN_FAMILIES, problems)
                    if problem is None]
            if not fits:
                raise CheckpointError(
                    "this moe model cannot be exported exactly: "
                    + "; ".join(f"{name} cannot hold {problem}" for name, problem in problems))
            return fits[0]
        family = "mixtral"
    problem = unrepresentable(NameMapShape.of(config, family))
    if problem:
        raise CheckpointError(f"this {config.moe_type} model has {problem}, which "
                              f"{family} cannot hold: not exported")
    return family


def check_representable(checkpoint: Checkpoint) -> str:
    """The HF family of the checkpoint's model, or a one-line refusal."""
    config = checkpoint.model_config()
    routing = unrepresentable_routing(config)
    if routing:
        raise CheckpointError(f"this {config.moe_type} model {routing}, which the Hugging Face "
                              "model (Mixtral's routing) cannot compute: not exported")
    if config.moe_type == "moe_adapter":
        raise CheckpointError("moe_adapter (the static-adapter ablation) has no Hugging Face "
                              "architecture to export to; it exists for benchmarks/"
                              "compare_variants.py")
    family = hf_family(config)
    if family == "mixtral" and not gates_renormalised(config):
        top1 = "top-1 " if config.moe_router_topk == 1 else ""
        raise CheckpointError(
            f"a {top1}megatron MoE with unrenormalised gates cannot be exported as "
            "MixtralForCausalLM exactly: Mixtral renormalises the selected experts' weights, "
            "pre-softmax routing (the default for top-1) keeps the softmax probabilities; train "
            "with --moe-router-renormalize to export to Mixtral")
    return family


def hf_config(checkpoint: Checkpoint, eod: Optional[int], family: Optional[str] = None) -> dict:
    run = checkpoint.run
    config = checkpoint.model_config()
    family = family or hf_family(config)
    shape = NameMapShape.of(config, family)
    dtype = "bfloat16" if run.model.bf16 else "float32"
    common = dict(
        vocab_size=run.embedding.padded_vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups, head_dim=config.kv_channels,
        hidden_act="silu", max_position_embeddings=run.embedding.max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon, rope_theta=config.rotary_base,
        initializer_range=config.init_method_std, tie_word_embeddings=False, use_cache=True,
        torch_dtype=dtype, attention_dropout=0.0,
    )
    if eod is not None:
        common["eos_token_id"] = eod
    if family == "llama":
        return dict(model_type="llama", architectures=["LlamaForCausalLM"],
                    attention_bias=shape.qkv_bias, mlp_bias=False, **common)
    moe = dict(num_experts_per_tok=config.moe_router_topk,
               router_aux_loss_coef=config.moe_aux_loss_coeff, output_router_logits=False,
               sliding_window=None, **common)
    dense_layers = [layer for layer in range(shape.num_layers) if not shape.is_moe_layer(layer)]
    if family == "mixtral":
        moe["intermediate_size"] = config.moe_ffn_hidden_size  # (every layer is an MoE layer)
        return dict(model_type="mixtral", architectures=["MixtralForCausalLM"],
                    num_local_experts=config.num_moe_experts, **moe)
    # The MoE layers as Qwen's rule reads them: every layer (decoder_sparse_step 1) but these.
    qwen = dict(num_experts=config.num_moe_experts,
                moe_intermediate_size=config.moe_ffn_hidden_size,
                norm_topk_prob=gates_renormalised(config), decoder_sparse_step=1,
                mlp_only_layers=dense_layers, use_sliding_window=False, **moe)
    if family == "qwen2_moe":
        return dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                    shared_expert_intermediate_size=shape.shared_expert_size,
                    qkv_bias=shape.qkv_bias, max_window_layers=config.num_layers, **qwen)
    if family == "qwen3_moe":
        return dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                    attention_bias=shape.qkv_bias, **qwen)
    return dict(
        model_type="hypermoe", architectures=["HyperMoeForCausalLM"],
        auto_map={"AutoConfig": "configuration_hypermoe.HyperMoeConfig",
                  "AutoModelForCausalLM": "modeling_hypermoe.HyperMoeForCausalLM"},
        num_local_experts=config.num_moe_experts, norm_topk_prob=gates_renormalised(config),
        moe_intermediate_size=config.moe_ffn_hidden_size,
        shared_expert_intermediate_size=shape.shared_expert_size,
        shared_expert_gate=shape.shared_expert_gate, qkv_bias=shape.qkv_bias,
        qk_norm=shape.qk_layernorm, mlp_only_layers=dense_layers,
        **{name: getattr(config, name) for name in HYPER_SIZE_NAMES},
        hyper_init=config.hyper_init, hyper_lr_mult=run.optimizer.hyper_lr_mult, **moe)


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
    family = check_representable(checkpoint)
    tokenizer_config, tokenizer = checked_training_tokenizer(
        checkpoint.run.tokenizer, checkpoint.meta.get("tokenizer"), tokenizer_model)
    eod = None if tokenizer_config.tokenizer_type == "NullTokenizer" else int(tokenizer.eod)
    config = hf_config(checkpoint, eod, family)
    state = to_hf(checkpoint.state, NameMapShape.of(checkpoint.model_config(), family))
    write_hf_directory(output, state, config,
                       lambda staging: write_tokenizer_files(tokenizer_config, tokenizer, staging))
    return config

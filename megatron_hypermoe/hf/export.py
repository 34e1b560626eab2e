"""Our checkpoint (any TP/EP layout) -> a Hugging Face directory; the megatron model it holds.

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

import torch

from megatron_hypermoe.hf.mapping import to_hf
from megatron_hypermoe.hf.tokenizer_files import checked_training_tokenizer, write_tokenizer_files
from megatron_hypermoe.training.checkpoint_reader import Checkpoint, read_checkpoint
from megatron_hypermoe.training.checkpointing import CheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE_FILES = ("configuration_hypermoe.py", "modeling_hypermoe.py")
ROPE_THETA = 10000.0  # megatron-core GPTModel's default rotary base, which we build with


def single_process_args(checkpoint: Checkpoint):
    """The checkpoint's arguments for one fp32 process (TP=1, EP=1): the full model."""
    args = checkpoint.args
    args.tensor_model_parallel_size = 1
    args.expert_model_parallel_size = 1
    args.sequence_parallel = False
    args.bf16 = args.fp16 = False
    return args


def megatron_config(checkpoint: Checkpoint):
    from megatron_hypermoe.training.trainer import model_config

    return model_config(single_process_args(checkpoint))


def build_megatron_model(checkpoint: Checkpoint):
    """The checkpoint's model in this process (megatron parallel state initialised, TP=EP=1)."""
    from megatron_hypermoe.model import build_gpt_model

    args = single_process_args(checkpoint)
    config = megatron_config(checkpoint)
    model = build_gpt_model(config, args.padded_vocab_size, args.max_position_embeddings)
    missing, unexpected = model.load_state_dict(checkpoint.state, strict=False)
    missing = [name for name in missing if not name.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint.directory} does not fit the model it describes "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), config


def model_shape(checkpoint: Checkpoint) -> dict:
    args = checkpoint.args
    return dict(moe_type=args.moe_type, num_layers=args.num_layers,
                num_attention_heads=args.num_attention_heads,
                num_query_groups=args.num_query_groups or args.num_attention_heads,
                hidden_size=args.hidden_size, num_experts=args.num_experts)


def check_representable(checkpoint: Checkpoint) -> None:
    args = checkpoint.args
    if args.moe_type == "moe_adapter":
        raise CheckpointError("moe_adapter (the static-adapter ablation) has no Hugging Face "
                              "architecture to export to; it exists for benchmarks/"
                              "compare_variants.py")
    if args.moe_type == "moe" and args.moe_router_topk == 1:
        raise CheckpointError(
            "a top-1 megatron MoE cannot be exported as MixtralForCausalLM exactly: Mixtral "
            "renormalises the selected experts' weights (giving 1.0), megatron's top-1 keeps the "
            "softmax probability; train with --moe-router-topk 2 or more to export to Mixtral")


def hf_config(checkpoint: Checkpoint, eod: Optional[int]) -> dict:
    args = checkpoint.args
    config = megatron_config(checkpoint)
    dtype = "bfloat16" if checkpoint.meta["args"].get("bf16") else "float32"
    common = dict(
        vocab_size=args.padded_vocab_size, hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=config.num_query_groups, head_dim=config.kv_channels,
        hidden_act="silu", max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon, rope_theta=ROPE_THETA,
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
        # megatron: top-k > 1 softmaxes the k selected logits; top-1 keeps the probability.
        norm_topk_prob=args.moe_router_topk > 1,
        hyper_adapter_dim=args.hyper_adapter_dim, hyper_hidden_size=args.hyper_hidden_size,
        hyper_expert_embedding_dim=args.hyper_expert_embedding_dim,
        hyper_selection_hidden_size=args.hyper_selection_hidden_size,
        hyper_selection_output_size=args.hyper_selection_output_size,
        hyper_layer_embedding_dim=args.hyper_layer_embedding_dim, **moe)


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
                shutil.copyfile(os.path.join(HERE, name), os.path.join(staging, name))
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
    state = to_hf(checkpoint.state, model_shape(checkpoint))
    write_hf_directory(output, state, config,
                       lambda staging: write_tokenizer_files(tokenizer_args, tokenizer, staging))
    return config


def load_hf_model(directory: str):
    """An exported (or any Llama/Mixtral/HyperMoE) directory as an fp32 transformers model."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(f"{directory} is not a Hugging Face model directory (no "
                              "config.json)")
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True,
                                                 dtype=torch.float32)
    return model.eval()


def main(argv=None) -> int:
    import argparse
    import sys

    from megatron_hypermoe.data.corpus import DataError

    parser = argparse.ArgumentParser(
        description="Convert a megatron-hypermoe checkpoint (any TP/EP layout) to a Hugging "
                    "Face directory: dense -> Llama, moe -> Mixtral, hypermoe -> HyperMoE "
                    "(trust_remote_code).")
    parser.add_argument("--load", required=True, help="checkpoint directory (a run's --save)")
    parser.add_argument("--output", required=True, help="new Hugging Face directory")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest")
    parser.add_argument("--tokenizer-model", default=None,
                        help="the training tokenizer, if it is no longer where training read it")
    args = parser.parse_args(argv)
    try:
        config = export_checkpoint(args.load, args.output, args.iteration, args.tokenizer_model)
    except (CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {config['architectures'][0]} ({config['num_hidden_layers']} layers) to "
          f"{args.output}")
    return 0

"""A Hugging Face Llama / Mixtral / HyperMoE directory -> one of our checkpoints.

The weights are mapped to megatron names (``mapping.from_hf``), handed to a trainer built with
the matching flags (any TP/EP layout: run under torchrun for more than one rank), cut into each
rank's shard by global name, and saved as iteration 0 with a fresh optimizer; train on with
``--load DIR --finetune`` or plain ``--load DIR``. ``--upcycle`` turns a dense Llama into an MoE
or HyperMoE with E copies of each MLP, a fresh router and a fresh hyper path (how the paper
built its GPT-2 MoE). Only safetensors weights are read: nothing is unpickled.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import List, Optional

from megatron_hypermoe.hf.mapping import from_hf
from megatron_hypermoe.hf.tokenizer_files import hf_directory_tokenizer
from megatron_hypermoe.training.checkpointing import CheckpointError

SOURCE_TYPES = {"llama": "dense", "mixtral": "moe", "hypermoe": "hypermoe"}
_DENSE_MLP = re.compile(r"^(decoder\.layers\.\d+\.mlp\.)(linear_fc[12]\.weight)$")


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} is not a Hugging Face model directory (no "
                              "config.json)")
    with open(path) as handle:
        config = json.load(handle)
    model_type = config.get("model_type")
    if model_type not in SOURCE_TYPES:
        raise CheckpointError(f"{directory} holds a {model_type!r} model; only llama, mixtral "
                              "and hypermoe can be converted")
    return config


def _rope_theta(config: dict) -> float:
    parameters = config.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


def check_representable(config: dict) -> None:
    """Refuse what megatron's GPTModel as we build it cannot compute exactly."""
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']} (SwiGLU with silu only)")
    if _rope_theta(config) != 10000.0:
        problems.append(f"rope_theta {_rope_theta(config)} (10000 only)")
    scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type")
    if scaling not in (None, "default"):
        problems.append(f"rope scaling {scaling}")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if config.get(flag):
            problems.append(f"{flag}=true")
    heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // heads):
        problems.append(f"head_dim {config['head_dim']} != hidden_size / heads")
    if config["model_type"] == "mixtral" and config["num_experts_per_tok"] == 1:
        problems.append("Mixtral top-1 (it renormalises the weight to 1.0; megatron's top-1 "
                        "keeps the softmax probability)")
    if config["model_type"] == "hypermoe" and \
            config.get("norm_topk_prob") != (config["num_experts_per_tok"] > 1):
        problems.append("norm_topk_prob must be true exactly when num_experts_per_tok > 1")
    if problems:
        raise CheckpointError("cannot represent this model in megatron-hypermoe: "
                              + "; ".join(problems))


def read_hf_weights(directory: str) -> dict:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors weights (pickled .bin weights "
                              "are not read: convert them with safetensors first)")
    state = {}
    for path in files:
        state.update(load_file(path))
    return state


def _upcycle(state: dict, num_experts: int) -> dict:
    """Every dense MLP becomes num_experts identical experts."""
    out = {}
    for name, tensor in state.items():
        match = _DENSE_MLP.match(name)
        if not match:
            out[name] = tensor
            continue
        for expert in range(num_experts):
            out[f"{match.group(1)}experts.local_experts.{expert}.{match.group(2)}"] = tensor
    return out


def _vocab_divisor(tokenizer_vocab: int, hf_vocab: int, tp: int) -> int:
    for divisor in (128, 64, 32, 16, 8, 4, 2, 1):
        multiple = divisor * tp
        if -(-tokenizer_vocab // multiple) * multiple == hf_vocab:
            return divisor
    raise CheckpointError(f"the model's vocab_size {hf_vocab} is not the tokenizer's "
                          f"{tokenizer_vocab} padded to a multiple of the TP size {tp}; "
                          "the tokenizer does not match this model")


def import_hf(hf_dir: str, save: str, extra_flags: List[str], upcycle: bool = False,
              moe_type: Optional[str] = None, num_experts: Optional[int] = None,
              topk: Optional[int] = None, tensor_model_parallel_size: int = 1,
              expert_model_parallel_size: int = 1, seed: int = 1234) -> str:
    """Convert (collective under torchrun). Returns the checkpoint directory written."""
    import torch.distributed as dist

    from megatron_hypermoe.initialization import load_global_state
    from megatron_hypermoe.training.arguments import parse_args
    from megatron_hypermoe.training.trainer import Trainer

    config = read_hf_config(hf_dir)
    check_representable(config)
    source = SOURCE_TYPES[config["model_type"]]
    if upcycle and source != "dense":
        raise CheckpointError("--upcycle starts from a dense (llama) model; this one is "
                              f"{config['model_type']}")
    if not upcycle and (moe_type or num_experts or topk):
        raise CheckpointError("--moe-type/--num-experts/--moe-router-topk only apply with "
                              "--upcycle; otherwise they come from the model")
    target = (moe_type or "hypermoe") if upcycle else source
    tokenizer_args, tokenizer = hf_directory_tokenizer(hf_dir)
    tp = tensor_model_parallel_size
    heads = config["num_attention_heads"]
    flags = [
        "--moe-type", target, "--num-layers", str(config["num_hidden_layers"]),
        "--hidden-size", str(config["hidden_size"]),
        "--ffn-hidden-size", str(config["intermediate_size"]),
        "--num-attention-heads", str(heads),
        "--max-position-embeddings", str(config["max_position_embeddings"]),
        "--seq-length", str(config["max_position_embeddings"]),
        "--init-method-std", str(config.get("initializer_range", 0.02)),
        "--make-vocab-size-divisible-by",
        str(_vocab_divisor(int(tokenizer.vocab_size), config["vocab_size"], tp)),
        "--tokenizer-type", tokenizer_args.tokenizer_type,
        "--tensor-model-parallel-size", str(tp),
        "--expert-model-parallel-size", str(expert_model_parallel_size),
        "--mock-data", "--train-iters", "1", "--micro-batch-size", "1",
        "--seed", str(seed), "--save", save,
    ]
    if tp > 1:
        flags.append("--sequence-parallel")
    if config.get("num_key_value_heads") not in (None, heads):  # GQA; MHA is the default
        flags += ["--num-query-groups", str(config["num_key_value_heads"])]
    for flag, value in (("--tokenizer-model", tokenizer_args.tokenizer_model),
                        ("--vocab-file", tokenizer_args.vocab_file),
                        ("--merge-file", tokenizer_args.merge_file),
                        ("--vocab-size", tokenizer_args.vocab_size)):
        if value is not None:
            flags += [flag, str(value)]
    if target != "dense":
        flags += ["--num-experts", str(num_experts or config["num_local_experts"]),
                  "--moe-router-topk", str(topk or config.get("num_experts_per_tok", 1))]
    if source == "hypermoe":
        for field in ("adapter_dim", "hidden_size", "expert_embedding_dim",
                      "selection_hidden_size", "selection_output_size", "layer_embedding_dim"):
            flags += ["--hyper-" + field.replace("_", "-"), str(config["hyper_" + field])]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = parse_args(flags + list(extra_flags), world_size)
    shape = dict(moe_type=source, num_layers=args.num_layers,
                 num_attention_heads=args.num_attention_heads,
                 num_query_groups=args.num_query_groups or args.num_attention_heads,
                 hidden_size=args.hidden_size, num_experts=args.num_experts)
    try:
        state = from_hf(read_hf_weights(hf_dir), shape)
    except KeyError as error:
        raise CheckpointError(f"{hf_dir} lacks weight {error.args[0]} for a "
                              f"{config['model_type']} model") from None
    if upcycle and target != "dense":
        state = _upcycle(state, args.num_experts)
    trainer = Trainer(args)
    trainer.setup()
    try:
        load_global_state(trainer.model, trainer.config, state,
                          fallback_seed=seed if upcycle else None)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{hf_dir} does not fit the model its config.json describes: "
                              f"{error.args[0]}") from None
    trainer.optimizer.refresh_fp32_params()  # ZeRO's fp32 master weights follow the new ones
    trainer.save()
    dist.barrier()
    return save


def main(argv=None) -> int:
    import argparse
    import sys

    from megatron_hypermoe.data.corpus import DataError
    from megatron_hypermoe.parallel import destroy_distributed
    from megatron_hypermoe.training.arguments import ArgumentError

    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face Llama / Mixtral / HyperMoE directory to a "
                    "megatron-hypermoe checkpoint (iteration 0, fresh optimizer). Run under "
                    "torchrun for TP/EP > 1.")
    parser.add_argument("--hf", required=True, help="Hugging Face model directory")
    parser.add_argument("--save", required=True, help="new checkpoint directory")
    parser.add_argument("--upcycle", action="store_true",
                        help="dense Llama -> MoE/HyperMoE: every MLP becomes --num-experts "
                             "copies, with a fresh router and hyper path")
    parser.add_argument("--moe-type", choices=("hypermoe", "moe", "moe_adapter"), default=None)
    parser.add_argument("--num-experts", type=int, default=None)
    parser.add_argument("--moe-router-topk", type=int, default=None)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234, help="fresh weights when upcycling")
    args, extra = parser.parse_known_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as the trainer does
    if os.path.exists(args.save) and os.listdir(args.save):
        print(f"error: --save {args.save} exists and is not empty: choose a new directory",
              file=sys.stderr)
        return 1
    try:
        import_hf(args.hf, args.save, extra, upcycle=args.upcycle, moe_type=args.moe_type,
                  num_experts=args.num_experts, topk=args.moe_router_topk,
                  tensor_model_parallel_size=args.tensor_model_parallel_size,
                  expert_model_parallel_size=args.expert_model_parallel_size, seed=args.seed)
    except (CheckpointError, DataError, ArgumentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    destroy_distributed()
    print(f"wrote checkpoint {args.save}")
    return 0

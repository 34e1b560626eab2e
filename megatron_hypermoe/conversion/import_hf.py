"""A Hugging Face Llama / Mixtral / HyperMoE directory -> one of our checkpoints.

The HF config becomes a megatron config object directly; the weights are mapped to megatron
names (``hf.mapping.from_hf``), cut into each rank's shard by global name (any TP/EP layout: run
under torchrun for more than one rank), wrapped in the training engine
(``training/setup.py``) and saved as iteration 0 with a fresh optimizer, together with the flags
a run of this model has; train on with ``--load DIR --finetune`` or plain ``--load DIR``.
``--upcycle`` turns a dense Llama into an MoE or HyperMoE with E copies of each MLP, a fresh
router and a fresh hyper path (how the paper
built its GPT-2 MoE). Only safetensors weights are read: nothing is unpickled.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional

from megatron_hypermoe.data.tokenizer_files import hf_directory_tokenizer
from megatron_hypermoe.errors import ArgumentError, CheckpointError
from megatron_hypermoe.hf.mapping import NameMapShape, from_hf
from megatron_hypermoe.model.config import (HYPER_SIZE_NAMES, VARIANT_HYPER_FIELDS, make_config,
                                            routing_fields)

SOURCE_TYPES = {"llama": "dense", "mixtral": "moe", "hypermoe": "hypermoe"}
# What each transformers config class assumes when config.json leaves rms_norm_eps out.
HF_DEFAULT_RMS_NORM_EPS = {"llama": 1e-6, "mixtral": 1e-5, "hypermoe": 1e-5}
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
    scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type")
    if scaling not in (None, "default"):
        problems.append(f"rope scaling {scaling}")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if config.get(flag):
            problems.append(f"{flag}=true")
    heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // heads):
        problems.append(f"head_dim {config['head_dim']} != hidden_size / heads")
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


def megatron_config(hf_config: dict, moe_type: str, upcycle_fields: Optional[dict] = None,
                    tensor_model_parallel_size: int = 1, expert_model_parallel_size: int = 1):
    """The megatron config of an HF Llama/Mixtral/HyperMoE config, as ``moe_type``: the source's
    own type, or an upcycling target whose MoE fields (experts, top-k, routing, hyper sizes and
    init) ``upcycle_fields`` sets."""
    heads = hf_config["num_attention_heads"]
    fields = dict(
        num_layers=hf_config["num_hidden_layers"], hidden_size=hf_config["hidden_size"],
        ffn_hidden_size=hf_config["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        init_method_std=hf_config.get("initializer_range", 0.02),
        rotary_base=_rope_theta(hf_config),
        layernorm_epsilon=hf_config.get("rms_norm_eps",
                                        HF_DEFAULT_RMS_NORM_EPS[hf_config["model_type"]]),
        tensor_model_parallel_size=tensor_model_parallel_size,
        sequence_parallel=tensor_model_parallel_size > 1,
        expert_model_parallel_size=expert_model_parallel_size,
        num_moe_experts=hf_config.get("num_local_experts"),
        moe_router_topk=hf_config.get("num_experts_per_tok", 1),
    )
    if hf_config["model_type"] == "mixtral":  # renormalised top-k weights (1.0 for top-1)
        fields.update(routing_fields(fields["moe_router_topk"], renormalised=True))
    if hf_config["model_type"] == "hypermoe":
        fields.update({name: hf_config[name] for name in HYPER_SIZE_NAMES})
        fields.update(routing_fields(fields["moe_router_topk"],
                                     renormalised=hf_config.get("norm_topk_prob", False)))
        fields["hyper_init"] = hf_config.get("hyper_init", "hyperfanin")
    fields.update(upcycle_fields or {})
    return make_config(moe_type, **fields)


def import_hf(hf_dir: str, save: str, upcycle: bool = False, moe_type: Optional[str] = None,
              upcycle_fields: Optional[dict] = None, hyper_lr_mult=None,
              tensor_model_parallel_size: int = 1, expert_model_parallel_size: int = 1,
              zero_stage: int = 1, seed: int = 1234) -> str:
    """Convert (collective under torchrun). Returns the checkpoint directory written.
    ``upcycle_fields``: config fields of the upcycled MoE (``num_moe_experts``,
    ``moe_router_topk``, ``moe_router_pre_softmax``, hyper sizes, ``hyper_init``); None values
    are left to the defaults."""
    import torch.distributed as dist

    from megatron_hypermoe.data.tokenizer import tokenizer_fingerprint
    from megatron_hypermoe.model.initialization import load_global_state
    from megatron_hypermoe.training.arguments import args_for_model
    from megatron_hypermoe.training.checkpointing import TrainState, save_checkpoint
    from megatron_hypermoe.training.setup import build_engine, build_model, initialize_parallel

    hf_config = read_hf_config(hf_dir)
    check_representable(hf_config)
    source = SOURCE_TYPES[hf_config["model_type"]]
    upcycle_fields = {name: value for name, value in (upcycle_fields or {}).items()
                      if value is not None}
    if upcycle and source != "dense":
        raise CheckpointError("--upcycle starts from a dense (llama) model; this one is "
                              f"{hf_config['model_type']}")
    if not upcycle and (moe_type or upcycle_fields or hyper_lr_mult is not None):
        raise CheckpointError("--moe-type/--num-experts/--moe-router-topk/--moe-router-pre-"
                              "softmax/--hyper-* only apply with --upcycle; otherwise they come "
                              "from the model")
    target = (moe_type or "hypermoe") if upcycle else source
    unread = [name for name in upcycle_fields if name.startswith("hyper_")
              and name not in VARIANT_HYPER_FIELDS[target]]
    if hyper_lr_mult is not None and target != "hypermoe":
        unread.append("hyper_lr_mult")
    if unread:  # as the trainer refuses them (training/arguments.py resolve_hyper_flags)
        raise ArgumentError(f"--{unread[0].replace('_', '-')} does not apply to --moe-type "
                            f"{target}: drop it")
    if hyper_lr_mult is None and source == "hypermoe":  # as it trained (1 before it was recorded)
        hyper_lr_mult = hf_config.get("hyper_lr_mult", 1.0)
    tokenizer_args, tokenizer = hf_directory_tokenizer(hf_dir)
    tp, ep = tensor_model_parallel_size, expert_model_parallel_size
    config = megatron_config(hf_config, target, upcycle_fields, tp, ep)
    positions = hf_config["max_position_embeddings"]
    args = args_for_model(
        config, int(os.environ.get("WORLD_SIZE", "1")),
        max_position_embeddings=positions, seq_length=positions,
        make_vocab_size_divisible_by=_vocab_divisor(int(tokenizer.vocab_size),
                                                    hf_config["vocab_size"], tp),
        **vars(tokenizer_args), mock_data=True, train_iters=1, micro_batch_size=1,
        zero_stage=zero_stage, seed=seed, save=save, hyper_lr_mult=hyper_lr_mult)
    args.padded_vocab_size = hf_config["vocab_size"]
    source_shape = NameMapShape.of(config)._replace(moe_type=source)
    try:
        state = from_hf(read_hf_weights(hf_dir), source_shape)
    except KeyError as error:
        raise CheckpointError(f"{hf_dir} lacks weight {error.args[0]} for a "
                              f"{hf_config['model_type']} model") from None
    if upcycle and target != "dense":
        state = _upcycle(state, config.num_moe_experts)
    initialize_parallel(args)
    model = build_model(config, args, initialize=False)
    try:
        load_global_state(model, config, state, fallback_seed=seed if upcycle else None)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{hf_dir} does not fit the model its config.json describes: "
                              f"{error.args[0]}") from None
    engine, _ = build_engine(model, args)  # ZeRO's fp32 master weights copy the loaded ones
    save_checkpoint(engine, args, TrainState(),
                    tokenizer=tokenizer_fingerprint(tokenizer_args, tokenizer))
    dist.barrier()
    return save

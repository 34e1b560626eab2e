"""A Hugging Face Llama / Mixtral / Qwen2-MoE / Qwen3-MoE / HyperMoE directory -> one of our
checkpoints.

The HF config becomes a megatron config object directly (:func:`hf_architecture` reads each
family's fields into one description: experts, routing, shared expert, q/k norm, qkv bias,
head_dim, which layers are MoE layers); the weights are mapped to megatron names
(``hf.mapping.from_hf``), cut into each rank's shard by global name (any TP/EP layout: run under
torchrun for more than one rank), wrapped in the training engine (``training/setup.py``) and
saved as iteration 0 with a fresh optimizer, together with the flags a run of this model has;
train on with ``--load DIR --finetune`` or plain ``--load DIR``.

``--upcycle`` adds what the target variant has and the source lacks. From a dense Llama: every
MLP becomes E copies, with a fresh router and a fresh side path (how the paper built its GPT-2
MoE). From an MoE (Mixtral, Qwen2-MoE, Qwen3-MoE): the experts, router (and its routing),
shared expert and everything else are kept, and the hypernetwork and selection embeddings
(``hypermoe``) or the static adapter (``moe_adapter``) are added with the part that makes their
output zeroed (``zero_side_path_output_``): the model computes what the source did until it
trains. Only safetensors weights are read: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import NamedTuple, Optional, Tuple

from megatron_hypermoe.data.tokenizer_files import hf_directory_tokenizer
from megatron_hypermoe.errors import ArgumentError, CheckpointError
from megatron_hypermoe.hf.mapping import NameMapShape, from_hf, hf_names, nonzero_hf_only
from megatron_hypermoe.model.config import (
    HYPER_SIZE_NAMES,
    VARIANT_HYPER_FIELDS,
    make_config,
    routing_fields,
)

SOURCE_TYPES = {"llama": "dense", "mixtral": "moe", "qwen2_moe": "moe", "qwen3_moe": "moe",
                "hypermoe": "hypermoe"}
# What each transformers config class assumes when config.json leaves a field out.
HF_DEFAULT_RMS_NORM_EPS = {"llama": 1e-6, "mixtral": 1e-5, "qwen2_moe": 1e-6, "qwen3_moe": 1e-6,
                           "hypermoe": 1e-5}
_QWEN_DEFAULTS = {
    "qwen2_moe": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, norm_topk_prob=False,
                      decoder_sparse_step=1, qkv_bias=True),
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                      norm_topk_prob=False, decoder_sparse_step=1, attention_bias=False),
}
OLMOE_REFUSAL = ("OLMoE's q/k RMSNorm normalises the whole q and k projections (heads x head_dim "
                 "at once) before the split into heads, while megatron's qk_layernorm normalises "
                 "each head on its own, so it cannot be represented exactly: not converted")
_DENSE_MLP = re.compile(r"^(decoder\.layers\.\d+\.mlp\.)(linear_fc[12]\.weight)$")
# What an upcycled MoE adds: the only parameters that may be missing from an MoE source.
_SIDE_PATH = re.compile(r"(^hypernetwork\.|\.mlp\.selection\.|\.mlp\.adapter\.)")


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} is not a Hugging Face model directory (no "
                              "config.json)")
    with open(path) as handle:
        config = json.load(handle)
    model_type = config.get("model_type")
    if model_type == "olmoe":
        raise CheckpointError(f"{directory} holds an OLMoE model: {OLMOE_REFUSAL}")
    if model_type not in SOURCE_TYPES:
        raise CheckpointError(f"{directory} holds a {model_type!r} model; only llama, mixtral, "
                              "qwen2_moe, qwen3_moe and hypermoe can be converted")
    return config


def _rope_theta(config: dict) -> float:
    parameters = config.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


class HfArchitecture(NamedTuple):
    """What an HF config describes, in one form for every family."""
    num_experts: int  # 0: dense
    topk: int
    renormalised: bool  # the selected experts' weights sum to 1 (norm_topk_prob)
    ffn_hidden_size: int  # dense MLPs (dense layers of an MoE model)
    moe_ffn_hidden_size: Optional[int]  # the experts
    moe_layers: Optional[Tuple[bool, ...]]  # per layer; None: dense model
    shared_expert_size: int
    shared_expert_gate: bool
    qkv_bias: bool
    qk_layernorm: bool
    head_dim: int


def hf_architecture(config: dict) -> HfArchitecture:
    model_type = config["model_type"]
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    ffn = config["intermediate_size"]
    if model_type == "llama":
        return HfArchitecture(0, 1, False, ffn, None, None, 0, False,
                              bool(config.get("attention_bias")), False, head_dim)
    if model_type == "mixtral":
        return HfArchitecture(config["num_local_experts"], config.get("num_experts_per_tok", 2),
                              True, ffn, ffn, (True,) * layers, 0, False, False, False, head_dim)
    if model_type == "hypermoe":
        dense = set(config.get("mlp_only_layers") or ())
        return HfArchitecture(
            config["num_local_experts"], config.get("num_experts_per_tok", 1),
            bool(config.get("norm_topk_prob", False)), ffn,
            config.get("moe_intermediate_size") or ffn,
            tuple(layer not in dense for layer in range(layers)),
            config.get("shared_expert_intermediate_size") or 0,
            bool(config.get("shared_expert_gate", False)), bool(config.get("qkv_bias", False)),
            bool(config.get("qk_norm", False)), head_dim)
    defaults = _QWEN_DEFAULTS[model_type]

    def get(name):
        return config[name] if config.get(name) is not None else defaults[name]

    experts = config.get("num_experts") or config.get("num_local_experts") or \
        defaults["num_experts"]
    dense, step = set(config.get("mlp_only_layers") or ()), get("decoder_sparse_step")
    # transformers' rule (Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer)
    moe_layers = tuple(layer not in dense and (layer + 1) % step == 0
                       for layer in range(layers))
    shared = get("shared_expert_intermediate_size") if model_type == "qwen2_moe" else 0
    return HfArchitecture(
        experts, get("num_experts_per_tok"), bool(get("norm_topk_prob")), ffn,
        get("moe_intermediate_size"), moe_layers, shared, bool(shared),
        bool(get("qkv_bias") if model_type == "qwen2_moe" else get("attention_bias")),
        model_type == "qwen3_moe", head_dim)


def check_representable(config: dict) -> None:
    """Refuse what megatron's GPTModel as we build it cannot compute exactly."""
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']} (SwiGLU with silu only)")
    scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type")
    if scaling not in (None, "default"):
        problems.append(f"rope scaling {scaling}")
    for flag in ("mlp_bias", "tie_word_embeddings"):
        if config.get(flag):
            problems.append(f"{flag}=true")
    if config.get("attention_bias") and config["model_type"] not in ("llama", "qwen3_moe"):
        problems.append("attention_bias=true")
    window = config.get("sliding_window")
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types")
                                                                   or ()) or \
            (config["model_type"] == "mixtral" and window is not None
             and window < config.get("max_position_embeddings", 0)):
        problems.append(f"sliding-window attention ({window})")
    if config["model_type"] != "llama":
        architecture = hf_architecture(config)
        if not any(architecture.moe_layers):
            problems.append("no MoE layer (mlp_only_layers / decoder_sparse_step leave none)")
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
    """The megatron config of an HF config, as ``moe_type``: the source's own type, or an
    upcycling target whose MoE fields (experts, top-k, routing, hyper sizes and init)
    ``upcycle_fields`` sets."""
    heads, hidden = hf_config["num_attention_heads"], hf_config["hidden_size"]
    architecture = hf_architecture(hf_config)
    moe = architecture.num_experts > 0
    fields = dict(
        num_layers=hf_config["num_hidden_layers"], hidden_size=hidden,
        ffn_hidden_size=architecture.ffn_hidden_size, num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        init_method_std=hf_config.get("initializer_range", 0.02),
        rotary_base=_rope_theta(hf_config),
        layernorm_epsilon=hf_config.get("rms_norm_eps",
                                        HF_DEFAULT_RMS_NORM_EPS[hf_config["model_type"]]),
        tensor_model_parallel_size=tensor_model_parallel_size,
        sequence_parallel=tensor_model_parallel_size > 1,
        expert_model_parallel_size=expert_model_parallel_size,
        num_moe_experts=architecture.num_experts or None, moe_router_topk=architecture.topk,
    )
    if architecture.head_dim != hidden // heads:
        fields["kv_channels"] = architecture.head_dim
    if architecture.qk_layernorm:
        fields["qk_layernorm"] = True
    if architecture.qkv_bias:
        fields["add_qkv_bias"] = True
    if moe:
        fields.update(routing_fields(architecture.topk, architecture.renormalised))
        if all(architecture.moe_layers):  # intermediate_size has no use: one width
            fields["ffn_hidden_size"] = architecture.moe_ffn_hidden_size
        else:
            fields["moe_layer_freq"] = [int(moe_layer) for moe_layer in architecture.moe_layers]
        fields["moe_ffn_hidden_size"] = architecture.moe_ffn_hidden_size
        if architecture.shared_expert_size:
            fields["moe_shared_expert_intermediate_size"] = architecture.shared_expert_size
            fields["moe_shared_expert_gate"] = architecture.shared_expert_gate
    if hf_config["model_type"] == "hypermoe":
        fields.update({name: hf_config[name] for name in HYPER_SIZE_NAMES})
        fields["hyper_init"] = hf_config.get("hyper_init", "hyperfanin")
    fields.update(upcycle_fields or {})
    return make_config(moe_type, **fields)


def _check_upcycle(hf_config: dict, source: str, target: str, upcycle_fields: dict) -> None:
    """Refuse an upcycle that would add nothing or change the source's experts or routing."""
    model_type = hf_config["model_type"]
    if source == "hypermoe":
        raise CheckpointError("--upcycle adds a side path to a dense or MoE model; this hypermoe "
                              "model has one: convert it without --upcycle")
    if source == "dense":
        return
    if target == "moe":
        raise CheckpointError(f"--upcycle --moe-type moe adds nothing to a {model_type} model: "
                              "convert it without --upcycle, or upcycle to hypermoe or "
                              "moe_adapter")
    architecture = hf_architecture(hf_config)
    for field, flag, own in (("num_moe_experts", "--num-experts", architecture.num_experts),
                             ("moe_router_topk", "--moe-router-topk", architecture.topk)):
        if upcycle_fields.get(field, own) != own:
            raise ArgumentError(f"{flag} {upcycle_fields[field]} differs from the {model_type} "
                                f"model's {own}: upcycling an MoE keeps its experts and router; "
                                "drop it")
    for field in ("moe_router_pre_softmax", "moe_router_renormalize"):
        if field in upcycle_fields:
            raise ArgumentError(f"--{field.replace('_', '-')}: upcycling an MoE keeps its "
                                f"routing (norm_topk_prob={architecture.renormalised}); drop it")


def _check_hf_weights(hf_dir: str, hf_state: dict, shape: NameMapShape, model_type: str):
    nonzero = nonzero_hf_only(hf_state, shape)
    if nonzero:
        raise CheckpointError(f"{hf_dir}: {nonzero[0]} is not zero, and megatron's attention "
                              "output projection has no bias (--add-qkv-bias biases q, k and v "
                              "only): cannot be represented")
    unused = sorted(name for name in set(hf_state) - hf_names(shape)
                    if not name.endswith("rotary_emb.inv_freq"))
    if unused:
        raise CheckpointError(f"{hf_dir} has {len(unused)} weights that a {model_type} model as "
                              f"its config.json describes does not have (the first: "
                              f"{unused[0]}): config.json and the weights disagree")


def import_hf(hf_dir: str, save: str, upcycle: bool = False, moe_type: Optional[str] = None,
              upcycle_fields: Optional[dict] = None, hyper_lr_mult=None,
              tensor_model_parallel_size: int = 1, expert_model_parallel_size: int = 1,
              zero_stage: int = 1, seed: int = 1234, *, run_config_for_model) -> str:
    """Convert (collective under torchrun). Returns the checkpoint directory written.
    ``run_config_for_model(config, world_size, **flags)``: the command-line boundary's
    (cli/arguments.py), which validates the run that will resume the checkpoint as a parsed
    command line would be.
    ``upcycle_fields``: config fields of the upcycled MoE (``num_moe_experts``,
    ``moe_router_topk``, ``moe_router_pre_softmax``, hyper sizes, ``hyper_init``); None values
    are left to the defaults (for an MoE source: to the source's)."""
    import torch.distributed as dist

    from megatron_hypermoe.data.tokenizer import tokenizer_fingerprint
    from megatron_hypermoe.model.initialization import load_global_state
    from megatron_hypermoe.parallel.experts import global_name_function
    from megatron_hypermoe.training.checkpoint.save_load import TrainState, save_checkpoint
    from megatron_hypermoe.training.setup import build_engine, build_model, initialize_parallel

    hf_config = read_hf_config(hf_dir)
    check_representable(hf_config)
    model_type = hf_config["model_type"]
    source = SOURCE_TYPES[model_type]
    upcycle_fields = {name: value for name, value in (upcycle_fields or {}).items()
                      if value is not None}
    if not upcycle and (moe_type or upcycle_fields or hyper_lr_mult is not None):
        raise CheckpointError("--moe-type/--num-experts/--moe-router-topk/--moe-router-pre-"
                              "softmax/--hyper-* only apply with --upcycle; otherwise they come "
                              "from the model")
    target = (moe_type or "hypermoe") if upcycle else source
    if upcycle:
        _check_upcycle(hf_config, source, target, upcycle_fields)
    unread = [name for name in upcycle_fields if name.startswith("hyper_")
              and name not in VARIANT_HYPER_FIELDS[target]]
    if hyper_lr_mult is not None and target != "hypermoe":
        unread.append("hyper_lr_mult")
    if unread:  # as the trainer refuses them (cli/arguments.py resolve_hyper_flags)
        raise ArgumentError(f"--{unread[0].replace('_', '-')} does not apply to --moe-type "
                            f"{target}: drop it")
    if hyper_lr_mult is None and source == "hypermoe":  # as it trained (1 before it was recorded)
        hyper_lr_mult = hf_config.get("hyper_lr_mult", 1.0)
    tokenizer_config, tokenizer = hf_directory_tokenizer(hf_dir)
    tp, ep = tensor_model_parallel_size, expert_model_parallel_size
    config = megatron_config(hf_config, target, upcycle_fields, tp, ep)
    positions = hf_config["max_position_embeddings"]
    run = run_config_for_model(
        config, int(os.environ.get("WORLD_SIZE", "1")),
        max_position_embeddings=positions, seq_length=positions,
        make_vocab_size_divisible_by=_vocab_divisor(int(tokenizer.vocab_size),
                                                    hf_config["vocab_size"], tp),
        **dataclasses.asdict(tokenizer_config), mock_data=True, train_iters=1, micro_batch_size=1,
        zero_stage=zero_stage, seed=seed, save=save, hyper_lr_mult=hyper_lr_mult)
    run = dataclasses.replace(run, embedding=dataclasses.replace(
        run.embedding, padded_vocab_size=hf_config["vocab_size"]))
    source_shape = NameMapShape.of(config, family=model_type)._replace(moe_type=source)
    hf_state = read_hf_weights(hf_dir)
    try:
        state = from_hf(hf_state, source_shape)
    except KeyError as error:
        raise CheckpointError(f"{hf_dir} lacks weight {error.args[0]} for a {model_type} model "
                              "as its config.json describes") from None
    _check_hf_weights(hf_dir, hf_state, source_shape, model_type)
    del hf_state
    if upcycle and source == "dense" and target != "dense":
        state = _upcycle(state, config.num_moe_experts)
    initialize_parallel(run)
    config = run.model
    model = build_model(run, initialize=False)
    if upcycle and source != "dense":  # everything but the side path comes from the source
        to_global = global_name_function(config)
        lacking = [to_global(name) for name, _ in model.named_parameters()
                   if to_global(name) not in state and not _SIDE_PATH.search(to_global(name))]
        if lacking:
            raise CheckpointError(f"{hf_dir} lacks weight {lacking[0]} of the upcycled "
                                  f"{target} model")
    try:
        load_global_state(model, config, state, fallback_seed=seed if upcycle else None)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{hf_dir} does not fit the model its config.json describes: "
                              f"{error.args[0]}") from None
    if upcycle and source != "dense":
        from megatron_hypermoe.model.initialization import zero_side_path_output_

        zero_side_path_output_(model)  # the side path adds exactly 0: the source's outputs
    engine, _ = build_engine(model, run)  # ZeRO's fp32 master weights copy the loaded ones
    save_checkpoint(engine, run, TrainState(),
                    tokenizer=tokenizer_fingerprint(tokenizer_config, tokenizer))
    dist.barrier()
    return save

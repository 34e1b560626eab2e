"""A run's configuration: frozen, typed sections, built once at the command-line boundary
(``megatron_hypermoe/cli/``) and read by everything below it; nothing below reads flags.

Sections: ``model`` (megatron-core's TransformerConfig with the HyperMoE fields, as today),
``parallel`` (:class:`ParallelLayout`), ``embedding``, ``tokenizer``, ``data``, ``training``,
``optimizer``, ``schedule``, ``checkpoint``, ``logging`` and ``deepspeed``.

:data:`FLAG_FIELDS` is the one map between a flag (its argparse dest, Megatron-LM's name) and
the field it sets, used both ways: :meth:`RunConfig.from_flags` builds a config from flag values
(a parsed command line, or the flags a checkpoint recorded, Megatron's ``args`` in its
metadata) and :meth:`RunConfig.to_flags` gives the flags a run of a config would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional, Tuple

import torch

from megatron_hypermoe.data.tokenizer import TokenizerConfig
from megatron_hypermoe.model.config import VARIANT_HYPER_FIELDS, HyperMoEConfig, make_config
from megatron_hypermoe.model.recompute import recompute_modules_flag
from megatron_hypermoe.parallel.layout import ParallelLayout

frozen = dataclasses.dataclass(frozen=True)


@frozen
class EmbeddingConfig:
    padded_vocab_size: Optional[int] = None  # set once the tokenizer is built
    max_position_embeddings: Optional[int] = None
    make_vocab_size_divisible_by: int = 128


@frozen
class DataConfig:
    data_path: Optional[Tuple[str, ...]] = None
    split: Optional[str] = None
    data_cache_path: Optional[str] = None
    mock_data: bool = False
    num_workers: int = 0
    seq_length: int = 256


@frozen
class TrainingConfig:
    micro_batch_size: int = 4
    global_batch_size: Optional[int] = None
    gradient_accumulation_steps: int = 1
    train_iters: Optional[int] = None
    train_samples: Optional[int] = None
    seed: int = 1234
    max_consecutive_skipped_iters: int = 10
    inject_nan_loss_at: Optional[Tuple[int, ...]] = None
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    eval_only: bool = False
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[int] = None
    manual_gc: bool = False
    manual_gc_interval: int = 0
    generate_tokens: int = 0
    generate_prompt: str = "\n"
    distributed_timeout_minutes: int = 10


@frozen
class OptimizerConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # the hypernetwork's generating weights' multiplier, a number (the rule "1/d_g" is resolved
    # by from_flags, once)
    hyper_lr_mult: float = 1.0
    optimizer_cpu_offload: bool = False


@frozen
class ScheduleConfig:
    """Megatron-LM's learning-rate and weight-decay schedule flags (training/lr_schedule.py)."""
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_init: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    lr_warmup_samples: int = 0
    lr_warmup_tokens: Optional[int] = None
    lr_decay_iters: Optional[int] = None
    lr_decay_samples: Optional[int] = None
    lr_decay_tokens: Optional[int] = None
    lr_wsd_decay_style: str = "exponential"
    lr_wsd_decay_iters: Optional[int] = None
    lr_wsd_decay_samples: Optional[int] = None
    start_weight_decay: Optional[float] = None
    end_weight_decay: Optional[float] = None
    weight_decay_incr_style: str = "constant"
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@frozen
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    ckpt_step: Optional[int] = None
    save_retain: Optional[int] = None


@frozen
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None
    moe_per_layer_logging: bool = False
    log_throughput: bool = False
    tensorboard_log_interval: int = 1
    tensorboard_queue_size: int = 1000
    log_timers_to_tensorboard: bool = False
    log_batch_size_to_tensorboard: bool = False
    log_validation_ppl_to_tensorboard: bool = False
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None

    @property
    def writes_scalars(self) -> bool:
        """Whether anything receives TensorBoard-style scalars (TensorBoard or W&B)."""
        return bool(self.tensorboard_dir or self.wandb_project)


@frozen
class DeepSpeedConfig:
    """The engine's config: the flags' keys merged with a --deepspeed_config file (resolved and
    checked at the boundary, cli/deepspeed_config.py), as JSON text so that it stays frozen."""
    config_json: Optional[str] = None  # None: not resolved (a config read from recorded flags)
    use_distributed_optimizer: bool = False
    overlap_param_gather: bool = False

    def engine_config(self) -> dict:
        if self.config_json is None:  # an engine built from "{}" would take DeepSpeed's defaults
            raise ValueError("this run's DeepSpeed config was never resolved: build the "
                             "RunConfig with megatron_hypermoe.cli.arguments.run_config")
        return json.loads(self.config_json)


SECTIONS = {"embedding": EmbeddingConfig, "data": DataConfig, "training": TrainingConfig,
            "optimizer": OptimizerConfig, "schedule": ScheduleConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig,
            "parallel": ParallelLayout, "tokenizer": TokenizerConfig,
            "deepspeed": DeepSpeedConfig}
# Fields whose flag has another name (the others: the field's name).
RENAMED_FLAGS = {("parallel", "tp"): "tensor_model_parallel_size",
                 ("parallel", "ep"): "expert_model_parallel_size",
                 ("parallel", "pp"): "pipeline_model_parallel_size",
                 ("parallel", "dp"): "data_parallel_size",
                 ("parallel", "zero"): "zero_stage"}
NOT_FLAGS = {("deepspeed", "config_json")}  # resolved from a file and the flags together

# The model: flag -> HyperMoEConfig field (the parallel sizes come from ``parallel``).
MODEL_FLAGS = {
    "moe_type": "moe_type",
    "num_layers": "num_layers", "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups", "hidden_dropout": "hidden_dropout",
    "attention_dropout": "attention_dropout", "init_method_std": "init_method_std",
    "rotary_base": "rotary_base", "norm_epsilon": "layernorm_epsilon",
    "bf16": "bf16", "fp16": "fp16", "kv_channels": "kv_channels",
    "qk_layernorm": "qk_layernorm", "add_qkv_bias": "add_qkv_bias",
    "attention_backend": "core_attention_backend",
    **{name: name for name in ("recompute_granularity", "recompute_method",
                               "recompute_num_layers", "recompute_modules")},
}
# ... and those only MoE variants have (a dense config has no experts).
MOE_FLAGS = {
    "num_experts": "num_moe_experts", "moe_router_topk": "moe_router_topk",
    "moe_aux_loss_coeff": "moe_aux_loss_coeff", "moe_z_loss_coeff": "moe_z_loss_coeff",
    "moe_token_dispatcher_type": "moe_token_dispatcher_type",
    "moe_router_pre_softmax": "moe_router_pre_softmax",
    "moe_router_renormalize": "moe_router_renormalize",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size", "moe_layer_freq": "moe_layer_freq",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate": "moe_shared_expert_gate", "moe_grouped_gemm": "moe_grouped_gemm",
    **{name: name for name in (
        "moe_router_load_balancing_type", "moe_expert_capacity_factor",
        "moe_pad_expert_input_to_capacity", "moe_token_drop_policy", "moe_router_score_function",
        "moe_router_topk_scaling_factor", "moe_router_dtype", "moe_input_jitter_eps",
        "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
        "moe_router_bias_update_rate", "moe_router_force_load_balancing",
        "moe_eval_capacity_factor", "moe_min_capacity")},
}
HYPER_FLAGS = {name: name for name in VARIANT_HYPER_FIELDS["hypermoe"]}


def _section_flags() -> dict:
    table = {}
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            if (section, field.name) not in NOT_FLAGS:
                table[RENAMED_FLAGS.get((section, field.name), field.name)] = (section,
                                                                               field.name)
    return table


# The one flag <-> field map: flag dest -> (section, field).
FLAG_FIELDS = {**_section_flags(),
               **{flag: ("model", field) for flag, field in
                  {**MODEL_FLAGS, **MOE_FLAGS, **HYPER_FLAGS}.items()}}

# What a checkpoint written before a flag existed trained with, where the field's default
# differs (the paper's multiplier 1, before --hyper-lr-mult).
VALUES_BEFORE_FLAG = {"hyper_lr_mult": 1.0}
HYPER_LR_MULT_RULES = ("1/d_g",)


def resolve_hyper_lr_mult(value, hyper_hidden_size: Optional[int]) -> float:
    """--hyper-lr-mult as a number: "1/d_g" (each generated entry sums d_g head weights, so
    their effective step is d_g times a static weight's) is 1 / --hyper-hidden-size."""
    if value == "1/d_g":
        return 1.0 / hyper_hidden_size
    return float(value)


def hyper_lr_mult_of(flags: Mapping[str, Any]) -> float:
    """The multiplier a run with these flags (or a checkpoint that recorded them) trains with."""
    if flags.get("moe_type", "hypermoe") != "hypermoe":
        return 1.0  # no hypernetwork: nothing is scaled
    return resolve_hyper_lr_mult(flags.get("hyper_lr_mult", VALUES_BEFORE_FLAG["hyper_lr_mult"]),
                                 flags.get("hyper_hidden_size"))


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's padding: a multiple of --make-vocab-size-divisible-by x TP."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def _frozen_value(value):
    return tuple(value) if isinstance(value, list) else value


@frozen
class RunConfig:
    model: HyperMoEConfig
    parallel: ParallelLayout = ParallelLayout()
    embedding: EmbeddingConfig = EmbeddingConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    @property
    def moe_type(self) -> str:
        return self.model.moe_type

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], deepspeed_config: Optional[dict] = None):
        """The config the flag values ``flags`` (by dest) describe. A flag missing from them (a
        checkpoint written before it existed) takes :data:`VALUES_BEFORE_FLAG`, else the
        field's default."""
        sections = {}
        for section, cls_ in SECTIONS.items():
            values = {}
            for flag, (where, field) in FLAG_FIELDS.items():
                if where != section:
                    continue
                if flag in flags:
                    values[field] = _frozen_value(flags[flag])
                elif flag in VALUES_BEFORE_FLAG:
                    values[field] = VALUES_BEFORE_FLAG[flag]
            sections[section] = values
        sections["optimizer"]["hyper_lr_mult"] = hyper_lr_mult_of(flags)
        if deepspeed_config is not None:
            sections["deepspeed"]["config_json"] = json.dumps(deepspeed_config, sort_keys=True)
        parallel = ParallelLayout(**sections["parallel"])
        built = {section: SECTIONS[section](**values) for section, values in sections.items()}
        return cls(model=_model_config(flags, parallel), **built)

    def to_flags(self) -> dict:
        """The flags (by dest, JSON values) of a run of this config: what a checkpoint records
        (Megatron's ``args``); from_flags(to_flags()) gives this config back."""
        flags = {}
        for flag, (section, field) in FLAG_FIELDS.items():
            if section != "model":
                flags[flag] = _jsonable(getattr(getattr(self, section), field))
        flags.update(model_flags(self.model))
        flags["world_size"] = self.parallel.world_size
        return flags

    def with_vocab(self, vocab_size: int) -> "RunConfig":
        """This config with the tokenizer's vocabulary padded as Megatron pads it."""
        padded = padded_vocab_size(vocab_size, self.embedding.make_vocab_size_divisible_by,
                                   self.parallel.tp)
        return dataclasses.replace(
            self, embedding=dataclasses.replace(self.embedding, padded_vocab_size=padded))

    def single_process(self) -> "RunConfig":
        """The same model in one process, in fp32 (how the tools read a checkpoint)."""
        flags = {**self.to_flags(), "bf16": False, "fp16": False}
        flags.update({flag: 1 for flag in ("tensor_model_parallel_size",
                                            "expert_model_parallel_size",
                                            "pipeline_model_parallel_size",
                                            "data_parallel_size")})
        flags["sequence_parallel"] = False
        return RunConfig.from_flags(flags)


def _model_config(flags: Mapping[str, Any], parallel: ParallelLayout) -> HyperMoEConfig:
    moe_type = flags.get("moe_type", "hypermoe")
    table = dict(MODEL_FLAGS)
    if moe_type != "dense":
        table.update(MOE_FLAGS)
        table.update({field: field for field in VARIANT_HYPER_FIELDS[moe_type]})
    fields = {field: _frozen_value(flags[flag]) for flag, field in table.items()
              if flag in flags}
    fields.pop("moe_type", None)
    for listed in ("moe_layer_freq", "moe_aux_loss_coeff", "moe_router_load_balancing_type",
                   "recompute_modules"):
        if isinstance(fields.get(listed), tuple):
            fields[listed] = list(fields[listed])
    if fields.get("recompute_granularity") != "selective" and \
            fields.get("recompute_modules") is None:
        fields["recompute_modules"] = []  # nothing recomputed selectively (as cli/ gives it)
    if fields.get("moe_router_pre_softmax", False) is None:
        del fields["moe_router_pre_softmax"]  # make_config's default for the top-k
    fields.update(tensor_model_parallel_size=parallel.tp,
                  pipeline_model_parallel_size=parallel.pp,
                  sequence_parallel=parallel.sequence_parallel)
    if moe_type != "dense":
        fields["expert_model_parallel_size"] = parallel.ep
    fields["params_dtype"] = torch.bfloat16 if fields.get("bf16") else torch.float16 \
        if fields.get("fp16") else torch.float32
    return make_config(moe_type, **fields)


def model_flags(config: HyperMoEConfig) -> dict:
    """The model flags (by dest) of a run of ``config`` (the inverse of _model_config)."""
    table = dict(MODEL_FLAGS)
    if config.moe_type != "dense":
        table.update(MOE_FLAGS)
        table.update({field: field for field in VARIANT_HYPER_FIELDS[config.moe_type]})
    flags = {flag: _jsonable(getattr(config, field)) for flag, field in table.items()}
    flags["recompute_modules"] = recompute_modules_flag(config)
    if flags["num_query_groups"] == config.num_attention_heads:
        flags["num_query_groups"] = None  # what the flag's default means
    if flags["kv_channels"] == config.hidden_size // config.num_attention_heads:
        flags["kv_channels"] = None  # likewise
    return flags

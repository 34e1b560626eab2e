"""The DeepSpeed config: generated from the flags, or read from --deepspeed_config and checked.

Every key of a config file is looked up in one decision table (:data:`TOP_LEVEL_KEYS` and, for
the sections whose keys differ in kind, :data:`SECTION_KEYS`):

- ``honoured``: DeepSpeed applies it as written in this trainer's setup (a torch optimizer
  under ZeRO 1/2, megatron-core's model and process groups);
- ``checked``: it states what a flag also states (batch sizes, clipping, precision, ZeRO stage,
  overlap, offload); it must agree with the flag, defaults included (a silent disagreement is
  how a run trains with another batch than its logs say);
- ``stage 3 only``: honoured with ``--zero-stage 3`` (dense models), refused otherwise;
- ``refused``: DeepSpeed would accept it and then do nothing here, or fail later; the message
  names the flag to use instead.

A key the table does not know is refused as well (DeepSpeed ignores unknown keys, so a typo
would be silently dropped); keys starting with ``_`` are comments. Keys the file leaves out are
filled from the flags.

With ``--bf16``/``--fp16`` gradients accumulate and are reduced in fp32
(``data_types.grad_accum_dtype`` and ``communication_data_type``), as Megatron does for bf16;
``--grad-reduce-in-bf16`` or those two keys in the file ask for 16-bit gradients explicitly.
"""

from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

from megatron_hypermoe.errors import ArgumentError, DeepSpeedConfigError

HONOURED = "honoured"
CHECKED = "checked"
STAGE3 = "stage 3 only"
REFUSED = "refused"


class Rule(NamedTuple):
    action: str
    note: str  # honoured: what it does; checked: the flag; refused: why, and what to use


_BATCH = "set by --global-batch-size / --micro-batch-size"
_NOT_USED = "DeepSpeed reads it only for a feature this trainer does not use"
_DS_REMOVED = "removed from DeepSpeed 0.19.8 (it refuses the key itself)"

# Every top-level key DeepSpeed 0.19.8 reads (DeepSpeedConfig and deepspeed.initialize).
TOP_LEVEL_KEYS = {
    # batch, clipping, precision, ZeRO: what the flags also say
    "train_batch_size": Rule(CHECKED, "--global-batch-size"),
    "train_micro_batch_size_per_gpu": Rule(CHECKED, "--micro-batch-size"),
    "gradient_accumulation_steps": Rule(CHECKED, "--global-batch-size / (--micro-batch-size x "
                                                 "data-parallel size)"),
    "gradient_clipping": Rule(CHECKED, "--clip-grad"),
    "bf16": Rule(CHECKED, "--bf16 (keys: see the bf16 section)"),
    "fp16": Rule(CHECKED, "--fp16 (keys: see the fp16 section)"),
    "zero_optimization": Rule(CHECKED, "--zero-stage (keys: see the zero_optimization section)"),
    "data_types": Rule(HONOURED, "gradient accumulation dtype etc. (see the data_types section)"),
    "communication_data_type": Rule(HONOURED, "dtype of the gradient reduction; default fp32 "
                                              "with --bf16/--fp16 (--grad-reduce-in-bf16: bf16)"),
    **{key: Rule(REFUSED, "gradients are averaged over the data-parallel ranks after the "
                          "reduction (as in Megatron; the expert groups' scaling relies on it, "
                          "and ZeRO-2's reduce-scatter asserts on other settings): remove it")
       for key in ("prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op")},
    "zero_allow_untested_optimizer": Rule(HONOURED, "DeepSpeed's check of the client optimizer"),
    "zero_force_ds_cpu_optimizer": Rule(HONOURED, "with offload, require DeepSpeedCPUAdam (the "
                                                  "trainer builds it)"),
    # DeepSpeed's own diagnostics
    "steps_per_print": Rule(HONOURED, "DeepSpeed's own progress lines (off by default: the "
                                      "trainer logs every --log-interval)"),
    "wall_clock_breakdown": Rule(HONOURED, "DeepSpeed's forward/backward/step timers"),
    "memory_breakdown": Rule(HONOURED, "DeepSpeed's memory report"),
    "dump_state": Rule(HONOURED, "print the engine's state at start"),
    "log_level": Rule(HONOURED, "DeepSpeed's log level"),
    "timers": Rule(HONOURED, "DeepSpeed's throughput timer"),
    "disable_python_gc": Rule(HONOURED, "DeepSpeed's control of Python's garbage collector"),
    "comms_logger": Rule(REFUSED, "it logs only collectives called through deepspeed.comm, and "
                                  "megatron-core calls torch.distributed: profile with "
                                  "torch.profiler instead"),
    # Optimizer and schedule: the trainer's
    "optimizer": Rule(REFUSED, "the trainer builds AdamW from --lr/--weight-decay/--adam-*: "
                               "remove the section"),
    "scheduler": Rule(REFUSED, "the trainer applies Megatron's schedule from --lr-decay-style/"
                               "--lr-warmup-iters: remove the section"),
    "disable_allgather": Rule(REFUSED, "DeepSpeed 0.19.8 parses it and never reads it"),
    "managed_gradient_accumulation": Rule(REFUSED, "the trainer steps the engine every "
                                                   "micro-batch: remove it"),
    # Features the trainer provides by its own flags
    "activation_checkpointing": Rule(REFUSED, "DeepSpeed's checkpointing only applies to "
                                              "models that call it: use --recompute-granularity "
                                              "/ --recompute-activations"),
    "tensorboard": Rule(REFUSED, "DeepSpeed's monitor would log only its own values: use "
                                 "--tensorboard-dir"),
    "wandb": Rule(REFUSED, "DeepSpeed's monitor would log only its own values: use "
                           "--wandb-project / --wandb-exp-name"),
    "csv_monitor": Rule(REFUSED, "DeepSpeed's monitor would log only its own values: use "
                                 "--metrics-file (JSON lines)"),
    "comet": Rule(REFUSED, "DeepSpeed's monitor would log only its own values: use "
                           "--tensorboard-dir or --metrics-file"),
    "flops_profiler": Rule(REFUSED, "the trainer logs TFLOP/s per device (counting top-k experts "
                                    "and the HyperExpert) every --log-interval"),
    "checkpoint": Rule(HONOURED, "keys: see the checkpoint section"),
    "torch_autocast": Rule(REFUSED, "the model is built in the precision of --bf16/--fp16"),
    "amp": Rule(REFUSED, "NVIDIA Apex AMP: use --bf16 or --fp16"),
    "bfloat16": Rule(REFUSED, "the old spelling of bf16: write \"bf16\""),
    "tensor_parallel": Rule(REFUSED, "DeepSpeed's AutoTP: use --tensor-model-parallel-size"),
    "expert_parallel": Rule(REFUSED, "DeepSpeed's AutoEP: use --expert-model-parallel-size"),
    "use_data_before_expert_parallelism": Rule(REFUSED, "the process groups are megatron-core's "
                                                        "(--expert-model-parallel-size)"),
    "sequence_parallel_size": Rule(REFUSED, "DeepSpeed-Ulysses: use --tensor-model-parallel-size "
                                            "with --sequence-parallel"),
    "data_parallel_size": Rule(REFUSED, "the data-parallel size is the world size / TP"),
    "seq_parallel_communication_data_type": Rule(REFUSED, "DeepSpeed-Ulysses only: " + _NOT_USED),
    "pipeline": Rule(REFUSED, "DeepSpeed's PipelineEngine is not used: pipeline parallelism is "
                              "--pipeline-model-parallel-size (megatron-core's schedule)"),
    "dataloader_drop_last": Rule(REFUSED, "DeepSpeed's data loader is not used: the data come "
                                          "from megatron-core's datasets (--data-path)"),
    "data_efficiency": Rule(REFUSED, "DeepSpeed's data sampling/routing needs its data loader; "
                                     "the data come from megatron-core's datasets"),
    "vocabulary_size": Rule(REFUSED, "DeepSpeed only warns from it: the vocabulary is padded by "
                                     "--make-vocab-size-divisible-by"),
    "sparse_gradients": Rule(REFUSED, "the model has no sparse embedding gradients"),
    "autotuning": Rule(REFUSED, "needs DeepSpeed's autotuning launcher, which does not know "
                                "these flags"),
    "compression_training": Rule(REFUSED, "needs DeepSpeed's compression wrappers in the model"),
    "quantize_training": Rule(REFUSED, "needs DeepSpeed's quantizer in the model"),
    "weight_quantization": Rule(REFUSED, "inference only"),
    "hybrid_engine": Rule(REFUSED, "RLHF generation engine: not a pretraining feature"),
    "compile": Rule(REFUSED, "applies only when engine.compile() is called, which the trainer "
                             "does not do"),
    "aio": Rule(REFUSED, "asynchronous I/O for NVMe offload, which is not supported"),
    "nebula": Rule(REFUSED, "Azure Nebula checkpoint service: checkpoints are written by --save"),
    "datastates_ckpt": Rule(REFUSED, "DataStates asynchronous checkpointing: checkpoints are "
                                     "written by --save"),
    **{key: Rule(REFUSED, _DS_REMOVED) for key in (
        "sparse_attention", "elasticity", "curriculum_learning", "progressive_layer_drop",
        "eigenvalue", "graph_harvesting")},
}

_STAGE3_KEYS = (
    "sub_group_size", "prefetch_bucket_size", "stage3_prefetch_bucket_size",
    "param_persistence_threshold", "stage3_param_persistence_threshold",
    "model_persistence_threshold", "stage3_model_persistence_threshold",
    "max_live_parameters", "stage3_max_live_parameters", "max_reuse_distance",
    "stage3_max_reuse_distance", "gather_16bit_weights_on_model_save",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
    "module_granularity_threshold", "stage3_module_granularity_threshold",
    "use_all_reduce_for_fetch_params", "stage3_use_all_reduce_for_fetch_params",
    "allgather_sequential", "stage3_allgather_sequential", "zero_hpz_partition_size",
    "zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients",
    "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
    "log_trace_cache_warnings", "enable_sanity_checks", "leaf_module")
_OLD_OFFLOAD = "an old spelling: use --optimizer-cpu-offload (or offload_optimizer)"

SECTION_KEYS = {
    "zero_optimization": {
        "stage": Rule(CHECKED, "--zero-stage"),
        "overlap_comm": Rule(CHECKED, "--overlap-grad-reduce (overlap the gradient reduction "
                                      "with backward; the file may turn it on by itself; "
                                      "refused with pipeline parallelism)"),
        "offload_optimizer": Rule(CHECKED, "--optimizer-cpu-offload (device cpu; the trainer "
                                           "then builds DeepSpeedCPUAdam)"),
        "contiguous_gradients": Rule(HONOURED, "copy gradients into one buffer as produced"),
        "reduce_scatter": Rule(HONOURED, "reduce-scatter instead of all-reduce"),
        "reduce_bucket_size": Rule(HONOURED, "elements per gradient-reduction bucket"),
        "use_multi_rank_bucket_allreduce": Rule(HONOURED, "bucketed all-reduce across ranks"),
        "allgather_partitions": Rule(HONOURED, "all-gather the updated parameter partitions"),
        "allgather_bucket_size": Rule(HONOURED, "elements per parameter all-gather bucket"),
        "load_from_fp32_weights": Rule(HONOURED, "on load, rebuild 16-bit weights from the fp32 "
                                                 "masters"),
        "ignore_unused_parameters": Rule(HONOURED, "tolerate parameters without a gradient"),
        "round_robin_gradients": Rule(HONOURED, "stage 2's round-robin gradient copy"),
        "parameter_alignment": Rule(HONOURED, "align partitions"),
        "compute_grad_norm": Rule(REFUSED, "the trainer clips by (--clip-grad) and logs the "
                                           "global gradient norm"),
        "elastic_checkpoint": Rule(REFUSED, "DeepSpeed's elastic ZeRO checkpoints are not "
                                            "what this trainer writes or reads; any checkpoint "
                                            "resumes in another layout (TP/EP/PP/DP/ZeRO stage) "
                                            "from its layout_free/ files: load it with the new "
                                            "layout's flags"),
        "offload_param": Rule(REFUSED, "parameter offload needs ZeRO stage 3, which MoE models "
                                       "cannot use: use --optimizer-cpu-offload"),
        "zenflow": Rule(REFUSED, "ZenFlow's stale-gradient optimizer is not tested with MoE "
                                 "expert groups"),
        "legacy_stage1": Rule(REFUSED, "removed from DeepSpeed"),
        "save_muon_momentum_buffer_in_memory": Rule(REFUSED, "the optimizer is AdamW"),
        "cpu_offload": Rule(REFUSED, _OLD_OFFLOAD),
        "cpu_offload_use_pin_memory": Rule(REFUSED, _OLD_OFFLOAD),
        "cpu_offload_param": Rule(REFUSED, "parameter offload needs ZeRO stage 3, which MoE "
                                           "models cannot use"),
        **{key: Rule(STAGE3, "ZeRO-3 parameter partitioning") for key in _STAGE3_KEYS},
    },
    "bf16": {
        "enabled": Rule(CHECKED, "--bf16"),
        "immediate_grad_update": Rule(HONOURED, "fold 16-bit gradients into the fp32 ones as "
                                                "they are produced (refused with pipeline "
                                                "parallelism)"),
        "check_grad_overflow": Rule(HONOURED, "skip a step whose gradient is not finite"),
        "bf16_master_weights_and_grads": Rule(REFUSED, "bf16 master weights need ZeRO-Offload "
                                                       "with DeepSpeed's CPU optimizer; the "
                                                       "masters stay fp32"),
        "bf16_optimizer_states": Rule(REFUSED, "needs bf16_master_weights_and_grads"),
    },
    "fp16": {
        "enabled": Rule(CHECKED, "--fp16"),
        "loss_scale": Rule(HONOURED, "0: dynamic loss scaling, else this static scale"),
        "initial_scale_power": Rule(HONOURED, "dynamic scaling starts at 2**this"),
        "loss_scale_window": Rule(HONOURED, "steps without overflow before the scale grows"),
        "hysteresis": Rule(HONOURED, "overflows tolerated before the scale shrinks"),
        "consecutive_hysteresis": Rule(HONOURED, "refill the hysteresis after a good step"),
        "min_loss_scale": Rule(HONOURED, "lowest dynamic scale"),
        "auto_cast": Rule(REFUSED, "the model is built in fp16 by --fp16"),
        "fp16_master_weights_and_grads": Rule(REFUSED, "fp16 master weights need ZeRO-Offload "
                                                       "with DeepSpeed's CPU optimizer; the "
                                                       "masters stay fp32"),
    },
    "data_types": {
        "grad_accum_dtype": Rule(HONOURED, "gradient accumulation dtype; default fp32 with "
                                           "--bf16/--fp16 (--grad-reduce-in-bf16: bf16)"),
        "param_dtype": Rule(CHECKED, "--bf16 / --fp16"),
        "buffer_dtype": Rule(HONOURED, "dtype the module's buffers are cast to"),
        "keep_in_fp32_modules": Rule(HONOURED, "buffers kept in fp32 under bf16/fp16"),
    },
    "checkpoint": {
        "tag_validation": Rule(HONOURED, "check every rank saves the same tag"),
        "load_universal": Rule(REFUSED, "DeepSpeed's universal checkpoints are not what this "
                                        "trainer writes or reads; any checkpoint resumes in "
                                        "another layout (TP/EP/PP/DP/ZeRO stage) from its "
                                        "layout_free/ files: load it with the new layout's "
                                        "flags"),
        "use_node_local_storage": Rule(REFUSED, "the checkpoint's metadata and expert files are "
                                                "written to the shared --save directory"),
        "parallel_write": Rule(REFUSED, "pipeline parallelism only"),
        "checkpoint_serialization": Rule(REFUSED, "DeepSpeed's fast checkpoint writer is not "
                                                  "used"),
        "writer": Rule(REFUSED, "DeepSpeed's decoupled/fast checkpoint writers are not used"),
    },
}


def decision_table():
    """(key, action, note) for every key, sections' keys as ``section.key`` (the table in
    docs/deepspeed-config.md)."""
    rows = []
    for key, rule in TOP_LEVEL_KEYS.items():
        rows.append((key, rule.action, rule.note))
        for sub, sub_rule in SECTION_KEYS.get(key, {}).items():
            rows.append((f"{key}.{sub}", sub_rule.action, sub_rule.note))
    return rows


def check_config_keys(config: dict, source: str, zero_stage: int) -> None:
    """Refuse, in one line, every key of ``config`` the table refuses or does not know."""
    for key, value in config.items():
        if key.startswith("_"):
            continue  # JSON has no comments; "_comment" keys are the usual workaround
        rule = TOP_LEVEL_KEYS.get(key)
        if rule is None:
            raise DeepSpeedConfigError(f"{source}: {key!r} is not a key DeepSpeed 0.19.8 reads "
                                       "(misspelt?): remove or fix it")
        if rule.action == REFUSED:
            raise DeepSpeedConfigError(f"{source}: {key!r} is not supported here: {rule.note}")
        section = SECTION_KEYS.get(key)
        if section is None or not isinstance(value, dict):
            continue
        for sub in value:
            _check_section_key(section.get(sub), f"{key}.{sub}", source, zero_stage)


def _check_section_key(rule, name, source, zero_stage):
    if rule is None:
        raise DeepSpeedConfigError(f"{source}: {name!r} is not a key DeepSpeed 0.19.8 reads "
                                   "(misspelt?): remove or fix it")
    if rule.action == REFUSED:
        raise DeepSpeedConfigError(f"{source}: {name!r} is not supported here: {rule.note}")
    if rule.action == STAGE3 and zero_stage != 3:
        raise DeepSpeedConfigError(f"{source}: {name!r} applies to ZeRO stage 3 only and this "
                                   f"run is stage {zero_stage}: remove it")


# Flags --------------------------------------------------------------------------------------------
def add_deepspeed_args(parser) -> None:
    """Megatron-LM's flags that DeepSpeed's ZeRO and precision settings answer."""
    g = parser.add_argument_group("ZeRO (Megatron-LM's names)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over the data-parallel ranks: what DeepSpeed "
                        "ZeRO always does here (stage 1 is Megatron's distributed optimizer); "
                        "accepted and logged")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the gradient reduction with backward "
                        "(zero_optimization.overlap_comm)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="needs --overlap-grad-reduce. Under ZeRO 1/2 DeepSpeed all-gathers the "
                        "updated parameters right after the optimizer step (in "
                        "allgather_bucket_size buckets) and offers no overlap with the next "
                        "forward; ZeRO-3 prefetches parameters during forward anyway. Accepted "
                        "and logged")
    g.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="ZeRO-Offload: optimizer state and step on the CPU "
                        "(zero_optimization.offload_optimizer device cpu) with DeepSpeed's "
                        "CPUAdam, JIT-built once into TORCH_EXTENSIONS_DIR")
    g = parser.add_argument_group("mixed precision")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16: accumulate and reduce gradients in bf16 (DeepSpeed's "
                        "default; less memory and traffic, less exact). Default: fp32, as "
                        "Megatron does for bf16")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="accumulate and reduce gradients in fp32: already the default with "
                        "--bf16/--fp16 (accepted for Megatron-LM scripts)")
    g = parser.add_argument_group("fp16 loss scaling (Megatron-LM's flags; DeepSpeed's scaler; "
                                  "None: the config file's value or DeepSpeed's default)")
    for flag, (key, kind, meaning) in LOSS_SCALE_FLAGS.items():
        g.add_argument(flag, type=kind, default=None, help=f"{meaning} (fp16.{key})")


# Megatron's fp16 loss-scale flags -> DeepSpeed's fp16 section (key, flag type, meaning).
LOSS_SCALE_FLAGS = {
    "--loss-scale": ("loss_scale", float, "a static loss scale (0 or unset: dynamic)"),
    "--initial-loss-scale": ("initial_scale_power", float,
                             "dynamic scaling starts here (a power of 2; DeepSpeed: 2**16)"),
    "--min-loss-scale": ("min_loss_scale", float, "lowest dynamic scale"),
    "--loss-scale-window": ("loss_scale_window", int,
                            "steps without overflow before the scale doubles"),
    "--hysteresis": ("hysteresis", int, "overflows tolerated before the scale halves"),
}


def _loss_scale_values(args) -> dict:
    """The fp16 section keys the loss-scale flags given set."""
    values = {}
    for flag, (key, _, _) in LOSS_SCALE_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if key == "initial_scale_power":
            power = math.log2(value) if value > 0 else -1
            if power != int(power) or power < 0:
                raise ArgumentError(f"--initial-loss-scale {value:g} must be a power of 2 "
                                    "(DeepSpeed's scaler starts at 2**initial_scale_power)")
            value = int(power)
        values[key] = value
    return values


def check_deepspeed_args(args) -> None:
    if _loss_scale_values(args) and not args.fp16:
        given = [flag for flag in LOSS_SCALE_FLAGS
                 if getattr(args, flag[2:].replace("-", "_")) is not None]
        raise ArgumentError(f"{given[0]} applies to --fp16 loss scaling only: add --fp16 or "
                            "drop it")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise ArgumentError("--overlap-param-gather needs --overlap-grad-reduce (as in "
                            "Megatron-LM): add it")
    if args.accumulate_allreduce_grads_in_fp32 and args.grad_reduce_in_bf16:
        raise ArgumentError("--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 "
                            "contradict each other: pick one")
    if args.grad_reduce_in_bf16 and not args.bf16:
        raise ArgumentError("--grad-reduce-in-bf16 needs --bf16 (for fp16 gradients set "
                            "data_types.grad_accum_dtype \"fp16\" in --deepspeed_config)")


def gradient_dtype(args):
    """The dtype gradients accumulate and reduce in (DeepSpeed's name), None for fp32 runs."""
    if not (args.bf16 or args.fp16):
        return None  # fp32 weights: gradients are fp32 anyway
    return "bf16" if args.grad_reduce_in_bf16 else "fp32"


_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
                "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
                "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16"}


def _check_gradient_precision(config, args, source):
    """A file's explicit gradient dtypes win over the default, not over an explicit flag."""
    flag = "--grad-reduce-in-bf16" if args.grad_reduce_in_bf16 else \
        "--accumulate-allreduce-grads-in-fp32" if args.accumulate_allreduce_grads_in_fp32 else None
    if flag is None or gradient_dtype(args) is None:
        return
    for name, value in (("data_types.grad_accum_dtype",
                         config.get("data_types", {}).get("grad_accum_dtype")),
                        ("communication_data_type", config.get("communication_data_type"))):
        if value is not None and _DTYPE_NAMES.get(str(value)) != gradient_dtype(args):
            raise DeepSpeedConfigError(f"{source} says {name} = {value} but {flag} says "
                                       f"{gradient_dtype(args)}: make them agree")


def describe_precision(engine) -> str:
    """One line: what the engine really does with weights and gradients."""
    names = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    model_dtype, accum_dtype = (names[str(d)] for d in engine.get_data_types())
    reduce_dtype = names[str(engine.communication_data_type)]
    optimizer = type(engine.optimizer).__name__
    if model_dtype == "fp32":
        return f"precision: fp32 weights, activations and gradients ({optimizer})"
    return (f"precision: {model_dtype} weights/activations, fp32 master weights, {accum_dtype} "
            f"gradient accumulation, {reduce_dtype} reduction ({optimizer})")


def engine_summary_lines(args, engine) -> list:
    """What the engine does with precision, ZeRO and Megatron's ZeRO flags (for the log)."""
    stage = engine.zero_optimization_stage()
    lines = [describe_precision(engine)]
    if args.bf16 and args.pipeline_model_parallel_size > 1:
        lines.append("pipeline parallelism with --bf16: a step's micro-batch gradients "
                     "accumulate in bf16 on each stage, then fold into the fp32 ones once")
    zero = f"ZeRO stage {stage}: optimizer state sharded over the data-parallel ranks"
    if args.use_distributed_optimizer:
        zero += " (--use-distributed-optimizer: this is Megatron's distributed optimizer)"
    zero += (f"; gradient reduction {'overlapped with' if engine.zero_overlap_comm() else 'after'}"
             " backward")
    if engine.zero_cpu_offload():
        zero += "; optimizer state and step on the CPU (ZeRO-Offload)"
    lines.append(zero)
    if args.overlap_param_gather and stage < 3:
        lines.append("--overlap-param-gather: ZeRO 1/2 all-gathers the updated parameters right "
                     "after the optimizer step; DeepSpeed has nothing to overlap it with")
    return lines


# The config ---------------------------------------------------------------------------------------
def config_from_args(args) -> dict:
    zero = {"stage": args.zero_stage}
    if args.overlap_grad_reduce:
        zero["overlap_comm"] = True
    if args.optimizer_cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(args.bf16)},
        "fp16": {"enabled": bool(args.fp16), "loss_scale": 0, "initial_scale_power": 16,
                 **_loss_scale_values(args)},
        "steps_per_print": 2**31 - 1,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    dtype = gradient_dtype(args)
    if dtype is not None:
        config["data_types"] = {"grad_accum_dtype": dtype}
        config["communication_data_type"] = dtype
    return config


def _check_pipeline_fit(config: dict, args, source: str) -> None:
    """What pipeline parallelism needs of a config file (the flags already ask for it)."""
    if args.pipeline_model_parallel_size == 1:
        return
    if config.get("zero_optimization", {}).get("overlap_comm"):
        raise DeepSpeedConfigError(f"{source} says zero_optimization.overlap_comm = true, which "
                                   "pipeline parallelism cannot use (the schedule runs backward "
                                   "outside DeepSpeed's engine): set it false")
    if args.bf16 and config.get("bf16", {}).get("immediate_grad_update"):
        # measured: under the schedule the folded gradients gave another norm (1.055 against
        # one process's 1.288 on the tiny model); folding once per step matches
        raise DeepSpeedConfigError(f"{source} says bf16.immediate_grad_update = true, which "
                                   "does not fold the pipeline schedule's gradients correctly: "
                                   "drop it from the file")


def _offload_device(zero: dict):
    offload = zero.get("offload_optimizer")
    device = offload.get("device", "none") if isinstance(offload, dict) else "none"
    return None if device == "none" else device


def _flag_views(config: dict) -> dict:
    """The values of a config that correspond to flags, by the flag's name."""
    views = {}
    if "train_batch_size" in config:
        views["--global-batch-size"] = config["train_batch_size"]
    if "train_micro_batch_size_per_gpu" in config:
        views["--micro-batch-size"] = config["train_micro_batch_size_per_gpu"]
    if "gradient_accumulation_steps" in config:
        views["gradient accumulation (from the batch flags)"] = \
            config["gradient_accumulation_steps"]
    if "gradient_clipping" in config:
        views["--clip-grad"] = float(config["gradient_clipping"])
    zero = config.get("zero_optimization", {})
    if "stage" in zero:
        views["--zero-stage"] = zero["stage"]
    if "offload_optimizer" in zero:
        views["--optimizer-cpu-offload (zero_optimization.offload_optimizer.device)"] = \
            _offload_device(zero)
    if "enabled" in config.get("bf16", {}):
        views["--bf16"] = bool(config["bf16"]["enabled"])
    if "enabled" in config.get("fp16", {}):
        views["--fp16"] = bool(config["fp16"]["enabled"])
    if "param_dtype" in config.get("data_types", {}):
        views["--bf16/--fp16 (data_types.param_dtype)"] = \
            _DTYPE_NAMES.get(str(config["data_types"]["param_dtype"]))
    return views


def _generated_views(generated: dict, args) -> dict:
    views = _flag_views(generated)
    views["--optimizer-cpu-offload (zero_optimization.offload_optimizer.device)"] = \
        _offload_device(generated["zero_optimization"])
    views["--bf16/--fp16 (data_types.param_dtype)"] = \
        "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return views


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise DeepSpeedConfigError(f"--deepspeed_config {path} does not exist")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" (line {error.lineno}, column {error.colno})" if hasattr(error, "lineno") else ""
        raise DeepSpeedConfigError(f"--deepspeed_config {path} is not valid JSON{where}; fix "
                                   "the file or drop the flag to generate one") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"--deepspeed_config {path} must hold a JSON object")
    return config


def resolve_config(args) -> dict:
    """The config DeepSpeed gets: generated from the flags, or the file, checked against them."""
    generated = config_from_args(args)
    if not args.deepspeed_config:
        return generated
    config = load_config_file(args.deepspeed_config)
    source = f"--deepspeed_config {args.deepspeed_config}"
    check_config_keys(config, source, args.zero_stage)
    from_flags = _generated_views(generated, args)
    for name, value in _flag_views(config).items():
        if value != from_flags[name]:
            raise DeepSpeedConfigError(
                f"{source} says {name} = {value} but the "
                f"flags say {from_flags[name]}: make them agree or drop it from the file")
    overlap = config.get("zero_optimization", {}).get("overlap_comm")
    if args.overlap_grad_reduce and overlap is False:
        raise DeepSpeedConfigError(f"{source} says zero_optimization.overlap_comm = false but "
                                   "--overlap-grad-reduce asks for it: make them agree")
    _check_gradient_precision(config, args, source)
    _check_pipeline_fit(config, args, source)
    for key, value in _loss_scale_values(args).items():
        stated = config.get("fp16", {}).get(key)
        if stated is not None and stated != value:
            raise DeepSpeedConfigError(f"{source} says fp16.{key} = {stated} but the flags say "
                                       f"{value}: make them agree or drop it from the file")
    merged = {**generated, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for section in ("zero_optimization", "bf16", "fp16", "data_types"):
        if section in generated or section in config:
            merged[section] = {**generated.get(section, {}), **config.get(section, {})}
    return merged

"""The DeepSpeed config: generated from the flags, or read from --deepspeed_config and checked.

Every key of a config file is looked up in one decision table (``ds_config_keys.py``:
``TOP_LEVEL_KEYS`` and, for the sections whose keys differ in kind, ``SECTION_KEYS``):

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

from megatron_hypermoe.cli.deepspeed_config_keys import (
    REFUSED,
    SECTION_KEYS,
    STAGE3,
    TOP_LEVEL_KEYS,
)
from megatron_hypermoe.errors import ArgumentError, DeepSpeedConfigError


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

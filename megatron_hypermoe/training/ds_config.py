"""The DeepSpeed config: generated from the flags, or read from --deepspeed_config and checked.

A config file may add anything DeepSpeed understands (ZeRO bucket sizes, offload, ...), but where
it states something the flags also state (batch sizes, clipping, precision, ZeRO stage) it must
agree with the flags, defaults included: a silent disagreement is how a run trains with another
batch than its logs say. Keys the file leaves out are filled from the flags.
"""

from __future__ import annotations

import json
import os

from megatron_hypermoe.errors import DeepSpeedConfigError


def config_from_args(args) -> dict:
    config = {
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": bool(args.bf16)},
        "fp16": {"enabled": bool(args.fp16), "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    return config


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
    if "stage" in config.get("zero_optimization", {}):
        views["--zero-stage"] = config["zero_optimization"]["stage"]
    if "enabled" in config.get("bf16", {}):
        views["--bf16"] = bool(config["bf16"]["enabled"])
    if "enabled" in config.get("fp16", {}):
        views["--fp16"] = bool(config["fp16"]["enabled"])
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
    if "optimizer" in config or "scheduler" in config:
        raise DeepSpeedConfigError(
            f"--deepspeed_config {path} sets an optimizer/scheduler; the trainer builds AdamW "
            "and the LR schedule from --lr/--lr-decay-style: remove those sections")
    return config


def resolve_config(args) -> dict:
    """The config DeepSpeed gets: generated from the flags, or the file, checked against them."""
    generated = config_from_args(args)
    if not args.deepspeed_config:
        return generated
    config = load_config_file(args.deepspeed_config)
    from_flags = _flag_views(generated)
    for name, value in _flag_views(config).items():
        if value != from_flags[name]:
            raise DeepSpeedConfigError(
                f"--deepspeed_config {args.deepspeed_config} says {name} = {value} but the "
                f"flags say {from_flags[name]}: make them agree or drop it from the file")
    merged = {**generated, **config}
    for section in ("zero_optimization", "bf16", "fp16"):
        merged[section] = {**generated[section], **config.get(section, {})}
    return merged

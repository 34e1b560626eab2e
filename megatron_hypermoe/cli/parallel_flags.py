"""Flags of the process groups: --distributed-timeout-minutes and pipeline parallelism."""

from __future__ import annotations

import argparse

from megatron_hypermoe.errors import ArgumentError
from megatron_hypermoe.parallel.distributed import (
    DEFAULT_TIMEOUT_MINUTES,
    TIMEOUT_SECONDS_VARIABLE,
    distributed_timeout,
)


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed")
    g.add_argument("--distributed-timeout-minutes", type=int, default=DEFAULT_TIMEOUT_MINUTES,
                   help="how long a collective of the world or megatron-core's groups waits "
                        "(gloo and NCCL), and how long a rank's heartbeat may be silent before "
                        "it counts as lost; the environment variable "
                        f"{TIMEOUT_SECONDS_VARIABLE}, in seconds, overrides it")


def check_distributed_args(args) -> None:
    if args.distributed_timeout_minutes < 1:
        raise ArgumentError(f"--distributed-timeout-minutes {args.distributed_timeout_minutes} "
                            "must be at least 1")
    distributed_timeout(args.distributed_timeout_minutes)  # a bad override fails here


# Flags --------------------------------------------------------------------------------------------
def add_pipeline_args(parser) -> None:
    g = parser.add_argument_group("pipeline parallelism (megatron-core's 1F1B schedule)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages; each holds --num-layers / N consecutive layers (and a "
                        "replica of the shared hypernetwork); needs --zero-stage 1")


def check_pipeline_args(args, world_size: int) -> None:
    """Refuse, in one line, the layouts the schedule cannot run."""
    pp = args.pipeline_model_parallel_size
    if pp < 1:
        raise ArgumentError("--pipeline-model-parallel-size must be at least 1")
    if pp == 1:
        return
    if args.num_layers % pp:
        raise ArgumentError(f"--num-layers {args.num_layers} is not divisible by "
                            f"--pipeline-model-parallel-size {pp} (every stage holds the same "
                            "number of layers): change one of them")
    if world_size % pp:
        raise ArgumentError(f"world size {world_size} is not divisible by "
                            f"--pipeline-model-parallel-size {pp}")
    if args.zero_stage != 1:
        raise ArgumentError(f"--zero-stage {args.zero_stage} does not work with pipeline "
                            "parallelism (ZeRO-2/3 partition gradients inside each backward "
                            "pass, which the pipeline schedule runs micro-batch by micro-batch "
                            "outside DeepSpeed's engine): use --zero-stage 1")
    if args.overlap_grad_reduce:
        raise ArgumentError("--overlap-grad-reduce overlaps ZeRO's reduction with each backward "
                            "pass, which the pipeline schedule runs outside DeepSpeed's engine: "
                            "drop it with --pipeline-model-parallel-size > 1")

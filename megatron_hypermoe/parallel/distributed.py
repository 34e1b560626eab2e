"""Start torch.distributed and megatron-core's parallel state, on GPU (NCCL) or CPU (gloo).

Works for plain ``python`` (one process, no launcher), ``torchrun`` and the ``deepspeed``
launcher, which all describe the job through RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_hypermoe.compat.megatron_core import apply_patches
from megatron_hypermoe.errors import ArgumentError

# Megatron-LM's default for --distributed-timeout-minutes.
DEFAULT_TIMEOUT_MINUTES = 10
# Seconds, overriding --distributed-timeout-minutes: Megatron's flag takes whole minutes, and the
# tests need a lost node to be noticed within seconds.
TIMEOUT_SECONDS_VARIABLE = "HYPERMOE_DISTRIBUTED_TIMEOUT_SECONDS"


def distributed_timeout(minutes: int = DEFAULT_TIMEOUT_MINUTES) -> timedelta:
    """The collectives' timeout: the flag's minutes, or the environment's seconds."""
    override = os.environ.get(TIMEOUT_SECONDS_VARIABLE)
    if override is None:
        return timedelta(minutes=minutes)
    try:
        seconds = float(override)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ArgumentError(f"{TIMEOUT_SECONDS_VARIABLE}={override!r} must be a positive number "
                            "of seconds: fix or unset it")
    return timedelta(seconds=seconds)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_distributed(tensor_model_parallel_size: int = 1,
                           expert_model_parallel_size: int = 1,
                           seed: int = 1234, pipeline_model_parallel_size: int = 1,
                           timeout: timedelta | None = None) -> None:
    """Initialise the process group (if needed), megatron's parallel groups and RNG streams;
    every group's collectives wait at most ``timeout`` (default: Megatron's 10 minutes)."""
    timeout = timeout or distributed_timeout()
    apply_patches()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                  "MASTER_PORT"))
        if launched:
            init_method = "env://"
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        elif int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: launch "
                               "with torchrun or deepspeed")
        else:
            # Plain `python`: a one-process job on a free local port. Nothing but LOCAL_RANK
            # (which DeepSpeed insists on) goes into the environment, so child processes
            # started later do not inherit this job's rendezvous.
            init_method, rank, world_size = f"tcp://127.0.0.1:{free_port()}", 0, 1
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    world_size = dist.get_world_size()
    model_parallel = (tensor_model_parallel_size * expert_model_parallel_size
                      * pipeline_model_parallel_size)
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor-model-parallel size "
            f"{tensor_model_parallel_size} x expert-model-parallel size "
            f"{expert_model_parallel_size} x pipeline-model-parallel size "
            f"{pipeline_model_parallel_size}: change the process count or the parallel sizes"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout.total_seconds() / 60,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def global_rank() -> int:
    """This process's rank in the world (0 outside torch.distributed: one process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def print_rank0(*values, **kwargs) -> None:
    """print on global rank 0 only, flushed (the one place the package prints once per job)."""
    if global_rank() == 0:
        print(*values, **kwargs, flush=True)

"""Set up a run's parallel layout and engine, before any training step (torchtitan's
"parallelize" step): process groups, the model built and initialised, the tensor-parallel hooks,
expert groups registered with DeepSpeed, the optimizer, and DeepSpeed's engine with megatron's
mpu. The loop (``training/trainer.py``) and the Hugging Face importer both start here.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from megatron_hypermoe.compat.deepspeed import (
    quiet_bf16_optimizer_memory_report,
    skip_unused_shm_comm_op,
)
from megatron_hypermoe.errors import ArgumentError
from megatron_hypermoe.model.gpt import build_gpt_model
from megatron_hypermoe.model.initialization import initialize_from_global_names
from megatron_hypermoe.parallel.deepspeed_mpu import MegatronMPU
from megatron_hypermoe.parallel.distributed import (
    distributed_timeout,
    initialize_distributed,
    print_rank0,
)
from megatron_hypermoe.parallel.expert_parallel import (
    deepspeed_recognises_megatron_moe,
    register_expert_parallel,
    split_moe_param_groups,
)
from megatron_hypermoe.parallel.pipeline import (
    configure_schedule,
    mark_shared_replicas,
    pipeline_size,
    stage_kwargs,
)
from megatron_hypermoe.parallel.sequence_parallel import (
    allreduce_sequence_parallel_grads_in_backward,
)
from megatron_hypermoe.training.arguments import hyper_lr_mult
from megatron_hypermoe.training.cpu_allocator import keep_freed_memory
from megatron_hypermoe.training.ds_config import resolve_config


def training_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    keep_freed_memory()  # (training/cpu_allocator.py: glibc's thresholds, once per process)
    return torch.device("cpu")


def initialize_parallel(args) -> None:
    """torch.distributed and megatron-core's TP/EP groups for the flags' layout."""
    if args.local_rank is not None:
        # An older deepspeed launcher passes --local_rank only; a newer one also sets the
        # variable, which then agrees.
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    initialize_distributed(args.tensor_model_parallel_size, args.expert_model_parallel_size,
                           args.seed, args.pipeline_model_parallel_size,
                           distributed_timeout(args.distributed_timeout_minutes))


def build_model(config, args, initialize: bool = True):
    """This rank's shard of the model; with ``initialize`` every weight drawn from (seed, global
    name), so any layout starts from the same model."""
    model = build_gpt_model(config, args.padded_vocab_size, args.max_position_embeddings,
                            **stage_kwargs())
    if initialize:
        initialize_from_global_names(model, config, args.seed)
    return model


def optimizer_param_groups(model, weight_decay: float, expert_parallel: bool,
                           hyper_lr_mult: float = 1.0):
    """Megatron's rule: no weight decay on biases and norm weights (1-D parameters: ``wd_mult``
    0, Megatron's key, which the weight-decay schedule multiplies by); with
    ``hyper_lr_mult`` != 1 the hypernetwork's generating weights in a group of their own whose
    ``lr_mult`` (Megatron's key) the trainer applies at every step; with expert parallelism,
    experts in their own groups (DeepSpeed reduces them differently)."""
    hypernetwork = getattr(model, "hypernetwork", None)
    generating = {id(p) for p in hypernetwork.generating_weights()} \
        if hypernetwork is not None and hyper_lr_mult != 1.0 else set()
    decay, no_decay, hyper = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in generating:
            hyper.append(param)
        else:
            (no_decay if param.ndim == 1 else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]
    if hyper:
        groups.append({"name": "hyper_generating", "params": hyper,
                       "weight_decay": weight_decay, "lr_mult": hyper_lr_mult})
    return split_moe_param_groups(groups) if expert_parallel else groups


def build_optimizer(param_groups, args):
    """AdamW; with ZeRO-Offload DeepSpeed's CPUAdam (the same AdamW update, run on the CPU
    where the offloaded state lives; DeepSpeed refuses a torch optimizer there). Both read each
    group's lr and weight_decay at every step, so lr_mult groups work the same."""
    kwargs = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
    if not args.optimizer_cpu_offload:
        # On the CPU torch's fused kernel: the default one-tensor-at-a-time update allocates two
        # temporaries the size of each tensor it steps, and under ZeRO that tensor is the flat
        # fp32 partition of the whole model (2 x 0.5 GB per step at GPT-2 width, page-faulted in
        # every step: 1.4 s of a 5 s step). Same update (1e-7 apart in fp32 rounding).
        on_cpu = all(p.device.type == "cpu" for group in param_groups for p in group["params"])
        return torch.optim.AdamW(param_groups, fused=on_cpu or None, **kwargs)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    print_rank0("--optimizer-cpu-offload: loading DeepSpeed's CPUAdam (JIT-built on first use, "
                "a minute or two; then cached in TORCH_EXTENSIONS_DIR)")
    return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **kwargs)


def check_precision_supported(args) -> None:
    """DeepSpeed refuses fp16 on an accelerator without it with a traceback, after the model is
    built; say it in one line instead (DeepSpeed's CPU accelerator has fp16 only with oneDNN
    fp16 support)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if args.fp16 and not accelerator.is_fp16_supported():
        raise ArgumentError(f"--fp16: DeepSpeed's {accelerator.device_name()} accelerator does "
                            "not support fp16 on this machine: use --bf16")


def build_engine(model, args):
    """Wrap a built model for training: returns (DeepSpeed engine, its optimizer)."""
    import deepspeed

    skip_unused_shm_comm_op()
    quiet_bf16_optimizer_memory_report()
    check_precision_supported(args)
    # Norms, router and the HyperMoE path see one sequence slice per TP rank: sum their
    # gradients over the TP group (DeepSpeed only reduces over data-parallel ranks).
    allreduce_sequence_parallel_grads_in_backward(model)
    expert_parallel = args.expert_model_parallel_size > 1
    if expert_parallel:
        register_expert_parallel(model, args.num_experts, args.expert_model_parallel_size)
    optimizer = build_optimizer(
        optimizer_param_groups(model, args.weight_decay, expert_parallel, hyper_lr_mult(args)),
        args)
    if pipeline_size() > 1:
        mark_shared_replicas(model)
    with deepspeed_recognises_megatron_moe() if expert_parallel else nullcontext():
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model.to(training_device()), optimizer=optimizer, config=resolve_config(args),
            mpu=MegatronMPU())
    if pipeline_size() > 1:
        # megatron's schedule runs every micro-batch of a step; each engine.step() is then an
        # accumulation boundary. fp16: the last stage's loss carries DeepSpeed's loss scale.
        engine.set_gradient_accumulation_boundary(True)
        configure_schedule(model.config, grad_scale=(lambda loss: loss * optimizer.cur_scale)
                           if args.fp16 else None)
    return engine, optimizer

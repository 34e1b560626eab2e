"""Set up a run's parallel layout and engine, before any training step (torchtitan's
"parallelize" step): process groups, the model built and initialised, the tensor-parallel hooks,
expert groups registered with DeepSpeed, the optimizer, and DeepSpeed's engine with megatron's
mpu. The loop (``training/trainer.py``) and the Hugging Face importer both start here.
"""

from __future__ import annotations

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
from megatron_hypermoe.training.config import OptimizerConfig, RunConfig
from megatron_hypermoe.training.cpu_allocator import keep_freed_memory


def training_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    keep_freed_memory()  # (training/cpu_allocator.py: glibc's thresholds, once per process)
    return torch.device("cpu")


def initialize_parallel(run: RunConfig) -> None:
    """torch.distributed and megatron-core's TP/EP/PP groups for the run's layout."""
    initialize_distributed(run.parallel.tp, run.parallel.ep, run.training.seed, run.parallel.pp,
                           distributed_timeout(run.training.distributed_timeout_minutes))


def build_model(run: RunConfig, initialize: bool = True):
    """This rank's shard of the model; with ``initialize`` every weight drawn from (seed, global
    name), so any layout starts from the same model."""
    model = build_gpt_model(run.model, run.embedding.padded_vocab_size,
                            run.embedding.max_position_embeddings, **stage_kwargs())
    if initialize:
        initialize_from_global_names(model, run.model, run.training.seed)
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


def build_optimizer(param_groups, optimizer: OptimizerConfig):
    """AdamW; with ZeRO-Offload DeepSpeed's CPUAdam (the same AdamW update, run on the CPU
    where the offloaded state lives; DeepSpeed refuses a torch optimizer there). Both read each
    group's lr and weight_decay at every step, so lr_mult groups work the same."""
    kwargs = dict(lr=optimizer.lr, betas=(optimizer.adam_beta1, optimizer.adam_beta2),
                  eps=optimizer.adam_eps)
    if not optimizer.optimizer_cpu_offload:
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


def check_precision_supported(fp16: bool) -> None:
    """DeepSpeed refuses fp16 on an accelerator without it with a traceback, after the model is
    built; say it in one line instead (DeepSpeed's CPU accelerator has fp16 only with oneDNN
    fp16 support)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if fp16 and not accelerator.is_fp16_supported():
        raise ArgumentError(f"--fp16: DeepSpeed's {accelerator.device_name()} accelerator does "
                            "not support fp16 on this machine: use --bf16")


def build_engine(model, run: RunConfig):
    """Wrap a built model for training: returns (DeepSpeed engine, its optimizer)."""
    import deepspeed

    skip_unused_shm_comm_op()
    quiet_bf16_optimizer_memory_report()
    check_precision_supported(run.model.fp16)
    # Norms, router and the HyperMoE path see one sequence slice per TP rank: sum their
    # gradients over the TP group (DeepSpeed only reduces over data-parallel ranks).
    allreduce_sequence_parallel_grads_in_backward(model)
    expert_parallel = run.parallel.ep > 1
    if expert_parallel:
        register_expert_parallel(model, run.model.num_moe_experts, run.parallel.ep)
    optimizer = build_optimizer(
        optimizer_param_groups(model, run.optimizer.weight_decay, expert_parallel,
                               run.optimizer.hyper_lr_mult), run.optimizer)
    if pipeline_size() > 1:
        mark_shared_replicas(model)
    with deepspeed_recognises_megatron_moe() if expert_parallel else nullcontext():
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model.to(training_device()), optimizer=optimizer,
            config=run.deepspeed.engine_config(), mpu=MegatronMPU())
    if pipeline_size() > 1:
        # megatron's schedule runs every micro-batch of a step; each engine.step() is then an
        # accumulation boundary. fp16: the last stage's loss carries DeepSpeed's loss scale.
        engine.set_gradient_accumulation_boundary(True)
        configure_schedule(model.config, grad_scale=(lambda loss: loss * optimizer.cur_scale)
                           if run.model.fp16 else None)
    return engine, optimizer


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


def engine_summary_lines(run: RunConfig, engine) -> list:
    """What the engine does with precision, ZeRO and Megatron's ZeRO flags (for the log)."""
    stage = engine.zero_optimization_stage()
    lines = [describe_precision(engine)]
    if run.model.bf16 and run.parallel.pp > 1:
        lines.append("pipeline parallelism with --bf16: a step's micro-batch gradients "
                     "accumulate in bf16 on each stage, then fold into the fp32 ones once")
    zero = f"ZeRO stage {stage}: optimizer state sharded over the data-parallel ranks"
    if run.deepspeed.use_distributed_optimizer:
        zero += " (--use-distributed-optimizer: this is Megatron's distributed optimizer)"
    zero += (f"; gradient reduction {'overlapped with' if engine.zero_overlap_comm() else 'after'}"
             " backward")
    if engine.zero_cpu_offload():
        zero += "; optimizer state and step on the CPU (ZeRO-Offload)"
    lines.append(zero)
    if run.deepspeed.overlap_param_gather and stage < 3:
        lines.append("--overlap-param-gather: ZeRO 1/2 all-gathers the updated parameters right "
                     "after the optimizer step; DeepSpeed has nothing to overlap it with")
    return lines

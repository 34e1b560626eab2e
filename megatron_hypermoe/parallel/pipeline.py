"""Pipeline parallelism (``--pipeline-model-parallel-size``): megatron-core's 1F1B schedule
driving the stages of megatron-core's GPTModel, DeepSpeed's ZeRO-1 engine holding the optimizer.

Why megatron-core's schedule and not DeepSpeed's PipelineEngine: the PipelineEngine trains only
a ``PipelineModule`` (the model rewritten as a flat list of layer specs, with its own tied-layer
mechanism, partitioning, data iterator and loss), so the megatron-core GPTModel every other
layout here trains would have to be forked into a second model definition, and checkpoints,
expert groups and the Hugging Face mapping with it. megatron-core's
``forward_backward_pipelining_without_interleaving`` drives any module with
``set_input_tensor``: each stage is the same GPTModel built with megatron's
``pre_process``/``post_process`` and global layer numbers, and the point-to-point transfers are
megatron's (``torch.distributed`` isend/irecv: gloo on CPU, NCCL on GPU). DeepSpeed keeps what it
does for every other layout (ZeRO optimizer, gradient reduction over data-parallel ranks,
clipping by the global norm, checkpoints). Both libraries allow ZeRO stage 1 only with
pipelining: stage 2 partitions gradients inside every backward pass, which the schedule runs
outside DeepSpeed's engine (DeepSpeed's PipelineEngine refuses stage 2 as well).

The shared hypernetwork: every stage holding HyperMoE layers holds a replica, identical from the
seed (weights are drawn per global name). After the schedule its gradient is summed over the
pipeline stages before the optimizer step, as megatron sums the tied word embeddings of the
first and last stage; every replica then takes the same step. Non-first stages mark their
replica ``ds_pipe_replicated`` so DeepSpeed's global gradient norm counts it once. The layer
embedding table stays indexed by the global layer number (megatron numbers a stage's layers
globally).
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


# The stage ----------------------------------------------------------------------------------------
def pipeline_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def stage_kwargs() -> dict:
    """GPTModel's arguments for this rank's stage: the embedding on the first, the output layer
    and loss on the last."""
    return dict(pre_process=parallel_state.is_pipeline_first_stage(),
                post_process=parallel_state.is_pipeline_last_stage())


def stage_layer_offset(num_layers: int) -> int:
    """The global index of this stage's first layer (stages hold equal shares)."""
    return parallel_state.get_pipeline_model_parallel_rank() * (num_layers // pipeline_size())


def shared_parameters(model) -> List[torch.nn.Parameter]:
    """The parameters every stage holds a replica of: the hypernetwork's."""
    hypernetwork = getattr(model, "hypernetwork", None)
    return [p for p in hypernetwork.parameters() if p.requires_grad] if hypernetwork else []


def mark_shared_replicas(model) -> None:
    """Every stage but the first marks its replica, so DeepSpeed's norm counts it once."""
    replicated = not parallel_state.is_pipeline_first_stage()
    for param in shared_parameters(model):
        param.ds_pipe_replicated = replicated


def allreduce_shared_grads(model) -> None:
    """Sum the shared hypernetwork's gradient over the pipeline stages (collective over the
    pipeline group; every stage then steps its replica identically)."""
    if pipeline_size() == 1:
        return
    params = [p for p in shared_parameters(model) if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=parallel_state.get_pipeline_model_parallel_group())
    offset = 0
    for param in params:
        count = param.grad.numel()
        param.grad.copy_(flat[offset:offset + count].view_as(param.grad))
        offset += count


def from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """``values`` as the last stage holds them, on every stage (same shape everywhere)."""
    if pipeline_size() == 1:
        return values
    group = parallel_state.get_pipeline_model_parallel_group()
    dist.broadcast(values, src=dist.get_global_rank(group, pipeline_size() - 1), group=group)
    return values


def sum_over_stages(values: torch.Tensor) -> torch.Tensor:
    """Per-layer values each stage fills for its own layers (zeros elsewhere), summed."""
    if pipeline_size() > 1:
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    return values


# The schedule -------------------------------------------------------------------------------------
def configure_schedule(config, grad_scale=None) -> None:
    """The fields megatron's schedule reads from the model's config. ``grad_scale``: the loss
    scale to multiply the last stage's loss by (fp16), a callable or None."""
    config.variable_seq_lengths = False
    # megatron's batch_isend_irecv guard calls torch.cuda.synchronize(): CUDA only.
    config.batch_p2p_sync = torch.cuda.is_available()
    config.grad_scale_func = grad_scale
    config.finalize_model_grads_func = None  # the reductions are DeepSpeed's and ours
    config.no_sync_func = None


def run_schedule(model, forward_step, micro_batches: Iterator, num_microbatches: int,
                 seq_length: int, micro_batch_size: int, forward_only: bool) -> list:
    """megatron-core's pipelined forward (and backward) over ``num_microbatches`` micro-batches.
    Returns what ``forward_step``'s loss function returned on the last stage, [] elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=micro_batches, model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)


@torch.no_grad()
def pipelined_logits(model, tokens, positions, mask) -> Optional[torch.Tensor]:
    """One forward of [b, s] tokens through every stage; the logits on the last stage (None on
    the others). Collective over the pipeline group."""

    def forward_step(iterator, stage):
        next(iterator)
        return stage(tokens, positions, mask), lambda output: (output, {"logits": output})

    stores = run_schedule(model, forward_step, iter([None]), 1, tokens.shape[1],
                          tokens.shape[0], forward_only=True)
    return stores[0]["logits"] if stores else None


def broadcast_token(value: Optional[int], device) -> int:
    """The last stage's choice of the next token, on every stage."""
    tensor = torch.tensor([value if value is not None else 0], dtype=torch.long, device=device)
    return int(from_last_stage(tensor)[0])


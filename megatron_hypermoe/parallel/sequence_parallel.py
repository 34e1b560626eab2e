"""Gradients of weights every tensor-parallel rank holds whole but feeds only its sequence slice.

With sequence parallelism each tensor-parallel (TP) rank runs the norms, the router and the whole
HyperMoE side path (selection embedding, hypernetwork, HyperExpert) on its own slice of the
sequence, so the gradient it computes for those replicated weights covers that slice only.
megatron marks such parameters ``sequence_parallel=True`` and its DDP all-reduces them over the TP
group after backward. We train under DeepSpeed, which reduces over data-parallel ranks only, so
the all-reduce happens here: a hook sums each such gradient over the TP group as soon as autograd
produces it, before DeepSpeed's hooks consume it (ZeRO-2 reduces and frees gradients during
backward, so a pass after backward would come too late). A weight used by several layers (the
shared hypernetwork) has one accumulated gradient, so its hook runs once per backward.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def mark_sequence_parallel(module: torch.nn.Module, sequence_parallel: bool) -> None:
    """Tag every parameter of ``module`` the way megatron tags its norms and router."""
    for param in module.parameters():
        param.sequence_parallel = sequence_parallel


def sequence_parallel_parameters(model: torch.nn.Module):
    return [p for p in model.parameters()
            if p.requires_grad and getattr(p, "sequence_parallel", False)]


def _sum_over_group(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()  # autograd may hand the same buffer to other consumers
    dist.all_reduce(grad, group=group)
    return grad


def allreduce_sequence_parallel_grads_in_backward(model: torch.nn.Module):
    """Register the TP all-reduce hooks; returns their handles (empty when TP == 1)."""
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return []
    hook = functools.partial(_sum_over_group, group=group)
    return [param.register_hook(hook) for param in sequence_parallel_parameters(model)]

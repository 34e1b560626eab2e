"""Grouped GEMM on torch alone: rows sorted by group, each group times its own matrix.

Used by the grouped HyperExpert (model/hyper_expert.py: one matrix per selected set) and the
grouped-GEMM experts (model/grouped_experts.py: one per local expert). ``torch._grouped_mm``
runs each product as one kernel where it can (:func:`native_grouped_mm`); elsewhere a loop over
the groups does, with the group bounds read on the host once per forward.
"""

from __future__ import annotations

from typing import Sequence

import torch


def native_grouped_mm(a: torch.Tensor, *row_lengths: int) -> bool:
    """Whether torch._grouped_mm takes operands like ``a`` (device, dtype) whose rows have these
    lengths: on the CPU in every dtype and on Hopper GPUs (sm90) in bf16, when every row starts
    on a 16-byte boundary; otherwise the loop below is used (it reads the group sizes on the
    host, once per forward). Not on later GPUs: Blackwell (sm100+) is reported to give non-zero
    weight gradients for empty groups, which ``allsets`` has many of, and no GPU of ours has
    checked it."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(length * a.element_size() % 16 for length in row_lengths):
        return False
    if a.device.type == "cpu":
        return True
    return (a.device.type == "cuda" and a.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(a.device)[0] == 9)


def group_ends(sorted_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Cumulative group sizes (int32, as torch._grouped_mm's offs) of a sorted index, without
    reading anything on the host."""
    bounds = torch.arange(1, num_groups + 1, device=sorted_index.device,
                          dtype=sorted_index.dtype)
    return torch.searchsorted(sorted_index, bounds, out_int32=True)


class GroupBounds:
    """A grouping of sorted rows: ``ends`` on the device for torch._grouped_mm, and for the
    loop that replaces it elsewhere the (start, end) pairs on the host, read once (one device
    synchronisation per forward, none in backward)."""

    def __init__(self, ends: torch.Tensor, native: bool, host_ends: Sequence[int] = None):
        self.ends = ends
        self.native = native
        self.spans = None
        if not native:
            stops = list(host_ends) if host_ends is not None else ends.tolist()
            self.spans = list(zip([0] + stops[:-1], stops))

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], device, native: bool) -> "GroupBounds":
        """From group sizes known on the host (no device read at all)."""
        stops, total = [], 0
        for size in sizes:
            total += int(size)
            stops.append(total)
        ends = torch.tensor(stops, dtype=torch.int32).to(device, non_blocking=True)
        return cls(ends, native, host_ends=stops)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, groups: GroupBounds) -> torch.Tensor:
    """Rows of group g of a [T, K] times b[g] [K, N] -> [T, N]."""
    if groups.native:
        return torch._grouped_mm(a, b, offs=groups.ends)
    return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(groups.spans)])


def grouped_weight_grad(a: torch.Tensor, grad: torch.Tensor, groups: GroupBounds) -> torch.Tensor:
    """Per group g: a[rows of g]^T @ grad[rows of g] -> [G, K, N] (zero for an empty group)."""
    if groups.native:
        return torch._grouped_mm(a.t(), grad, offs=groups.ends)
    return torch.stack([a[s:e].t() @ grad[s:e] for s, e in groups.spans])


def grouped_row_sum(values: torch.Tensor, sorted_index: torch.Tensor,
                    num_groups: int) -> torch.Tensor:
    """Per group, the sum of its rows of ``values`` [T, N] -> [G, N], accumulated in fp32 (a
    bias gradient sums thousands of tokens: bf16 accumulation would lose most of them)."""
    accumulate = torch.promote_types(values.dtype, torch.float32)
    total = values.new_zeros(num_groups, values.shape[1], dtype=accumulate)
    return total.index_add_(0, sorted_index, values.to(accumulate)).to(values.dtype)


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors as one [G, ...] tensor: a view without a copy where they already lie in one
    storage at equal distances (the grouped experts allocate their weights so, and DeepSpeed
    ZeRO's flat buffer keeps each layer's experts in order: one expert's fc1 and fc2 weights,
    then the next's), else a stacked copy."""
    first = tensors[0]
    if len(tensors) > 1 and all(t.is_contiguous() for t in tensors):
        step = tensors[1].data_ptr() - first.data_ptr()
        storage = first.untyped_storage().data_ptr()
        # (16-byte aligned, as torch._grouped_mm requires on GPUs: a copy is)
        if (step >= first.numel() * first.element_size() and step % 16 == 0
                and first.data_ptr() % 16 == 0
                and all(t.shape == first.shape and t.dtype == first.dtype
                        and t.untyped_storage().data_ptr() == storage
                        and t.data_ptr() == first.data_ptr() + i * step
                        for i, t in enumerate(tensors))):
            return first.as_strided((len(tensors), *first.shape),
                                    (step // first.element_size(), *first.stride()),
                                    first.storage_offset())
    return torch.stack(tensors)


def colocate(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Move equal-shaped parameters into one storage, in order, so that :func:`stacked` views
    them without a copy (the parameters, their names and values stay as they are)."""
    with torch.no_grad():
        storage = torch.stack([p.data for p in parameters])
        for p, view in zip(parameters, storage):
            p.data = view


class GroupedLinear(torch.autograd.Function):
    """y[rows of g] = x[rows of g] @ weights[g]^T, for G weights [N, K] held as separate
    parameters (torch.nn.Linear's layout, one per expert).

    The weights are viewed as one [G, N, K] tensor (:func:`stacked`; a copy only where they
    are not laid out for it, dropped at once): backward keeps the parameters themselves and x,
    as G separate linear layers would. Each weight's gradient is its slice of one grouped
    product.
    """

    @staticmethod
    def forward(ctx, x, groups: GroupBounds, *weights):
        ctx.save_for_backward(x, *weights)
        ctx.groups = groups
        return grouped_mm(x, stacked(weights).transpose(1, 2), groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, *weights = ctx.saved_tensors
        groups = ctx.groups
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad_y, stacked(weights), groups)
        grad_weights = (None,) * len(weights)
        if any(ctx.needs_input_grad[2:]):
            grad_weights = grouped_weight_grad(grad_y, x, groups).unbind(0)
        return (grad_x, None, *grad_weights)

"""What a run reports: a console line per --log-interval, TensorBoard scalars under the names
Megatron users know, and the same values as JSON lines in --metrics-file (rank 0 writes).

MoE visibility (megatron-core's own tracker assumes CUDA): per-layer fraction of routed tokens
per expert and the max/mean imbalance, counted by router hooks and summed over all ranks; the
load-balancing and z losses; and, for HyperMoE, the RMS of each layer's HyperExpert output.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hypermoe.hypermoe_layer import HyperMoELayer


class ExpertLoadCounter:
    """Tokens routed to each expert of each MoE layer since the last ``take``."""

    def __init__(self, model):
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.counts = [None] * len(self.layers)
        self.paused = False  # evaluation forwards are not training load
        self.handles = [layer.router.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(self.layers)]

    def _hook(self, index):
        def record(module, inputs, outputs):
            if self.paused:
                return
            per_expert = outputs[1].detach().sum(dim=0).to(torch.float64)
            previous = self.counts[index]
            self.counts[index] = per_expert if previous is None else previous + per_expert
        return record

    def take(self) -> Optional[torch.Tensor]:
        """[layers, experts] token counts summed over every rank, then reset."""
        if not self.layers or any(c is None for c in self.counts):
            return None
        counts = torch.stack(self.counts)
        if dist.is_initialized():
            dist.all_reduce(counts)
        self.counts = [None] * len(self.layers)
        return counts


def hyper_output_rms(model) -> List[float]:
    return [float(layer.last_hyper_output_rms) for layer in model.modules()
            if isinstance(layer, HyperMoELayer) and layer.last_hyper_output_rms is not None]


def _reduce_over_ranks(entry) -> torch.Tensor:
    """megatron's reduce_aux_losses_tracker_across_ranks without ReduceOp.AVG (gloo lacks it):
    sum over the entry's reduce group (the TP ranks' sequence slices), average over DP."""
    values = entry["values"].clone()
    if not dist.is_initialized():
        return values
    if entry.get("reduce_group") is not None:
        dist.all_reduce(values, group=entry["reduce_group"])
    averaged = [entry.get("avg_group")]
    if entry.get("reduce_group") is not None and not entry.get("reduce_group_has_dp", False):
        averaged.append(parallel_state.get_data_parallel_group())
    for group in averaged:
        if group is not None:
            dist.all_reduce(values, group=group)
            values /= dist.get_world_size(group)
    return values


def take_aux_losses(num_forwards: int) -> Dict[str, float]:
    """megatron's aux losses since the last call, reduced over ranks as megatron reports them,
    as the mean over MoE layers and forward passes (megatron's tracker sums them), then cleared.
    Collective: every rank calls it."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    values = {}
    for name, entry in tracker.items():
        reduced = _reduce_over_ranks(entry)
        layers = int((reduced != 0).sum()) or 1
        values[name] = float(reduced.sum()) / layers / max(num_forwards, 1)
    moe_utils.clear_aux_losses_tracker()
    return values


class AuxLossesPaused:
    """Keep forwards inside this block (evaluation) out of megatron's aux-loss tracker."""

    def __enter__(self):
        from megatron.core.transformer.moe import moe_utils

        self.tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        self.saved = {name: entry["values"].clone() for name, entry in self.tracker.items()}
        return self

    def __exit__(self, *exc):
        for name, entry in self.tracker.items():
            entry["values"].copy_(self.saved[name]) if name in self.saved else \
                entry["values"].zero_()
        return False


class MetricsWriter:
    def __init__(self, args, is_writer_rank: bool):
        self.is_writer_rank = is_writer_rank
        self.tensorboard = None
        self.file = None
        if not is_writer_rank:
            return
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=100)
        if args.metrics_file:
            directory = os.path.dirname(os.path.abspath(args.metrics_file))
            os.makedirs(directory, exist_ok=True)
            self.file = open(args.metrics_file, "a")

    def scalars(self, iteration: int, values: Dict[str, float]):
        if self.tensorboard is not None:
            for name, value in values.items():
                if value is not None and math.isfinite(value):
                    self.tensorboard.add_scalar(name, value, iteration)

    def record(self, record: dict):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.flush()
            self.tensorboard.close()
        if self.file is not None:
            self.file.close()


def expert_load_scalars(counts: torch.Tensor) -> Dict[str, float]:
    scalars = {}
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    for layer, row in enumerate(fractions):
        scalars[f"moe/layer_{layer}_max_over_mean_load"] = float(row.max() / row.mean())
        for expert, value in enumerate(row):
            scalars[f"moe/layer_{layer}_expert_{expert}_load"] = float(value)
    return scalars

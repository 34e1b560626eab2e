"""What is measured for the logs: MoE visibility (megatron-core's own tracker assumes CUDA).

Per layer: the fraction of routed tokens per expert and the max/mean imbalance, counted by
router hooks and summed over all ranks; the load-balancing and z losses from megatron's tracker,
reduced over ranks as megatron reports them; and, for HyperMoE, the RMS of each layer's
HyperExpert output. Values are keyed by their names in ``writers.LOGGED``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hypermoe.model.hypermoe_layer import HyperMoELayer
from megatron_hypermoe.model.recompute import in_recompute_replay
from megatron_hypermoe.model.side_path import SidePathMoELayer
from megatron_hypermoe.parallel.pipeline import sum_over_stages

# megatron's aux-loss tracker names -> our keys (other tracker names are logged as they are)
AUX_LOSS_KEYS = {"load_balancing_loss": "aux_loss", "seq_load_balancing_loss": "seq_aux_loss",
                 "global_load_balancing_loss": "global_aux_loss", "z_loss": "z_loss"}


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
            if self.paused or in_recompute_replay():  # a recomputed forward routes no new token
                return
            # the router's top-k choices (its output map is after capacity dropping/padding)
            per_expert = module.topk_map.detach().sum(dim=0).to(torch.float64)
            previous = self.counts[index]
            self.counts[index] = per_expert if previous is None else previous + per_expert
        return record

    def take(self) -> Optional[torch.Tensor]:
        """[layers, experts] token counts summed over every rank, then reset (rows by global
        layer: under pipeline parallelism each stage fills its own layers' rows)."""
        if not self.layers or any(c is None for c in self.counts):
            return None
        counts = torch.zeros(self.layers[0].config.num_layers, self.counts[0].numel(),
                             dtype=torch.float64, device=self.counts[0].device)
        for layer, count in zip(self.layers, self.counts):
            counts[layer.layer_number - 1] = count
        if dist.is_initialized():
            dist.all_reduce(counts)
        self.counts = [None] * len(self.layers)
        return counts


def side_path_values(model) -> dict:
    """Per layer, from the last forward: the HyperExpert's output RMS (HyperMoE), and for any
    side path (HyperMoE, the static adapter) its RMS relative to the experts' output.
    Collective under pipeline parallelism (each stage has its own layers' values)."""
    layers = [m for m in model.modules()
              if isinstance(m, SidePathMoELayer) and m.last_side_output_rms is not None]
    if not layers:
        return {}
    rows = torch.zeros(3, layers[0].config.num_layers, dtype=torch.float64)
    for m in layers:  # (row 2 marks the layers that have a side path: not the dense ones)
        rows[:, m.layer_number - 1] = torch.stack([m.last_side_over_experts_rms.double().cpu(),
                                                   m.last_side_output_rms.double().cpu(),
                                                   torch.ones((), dtype=torch.float64)])
    rows = sum_over_stages(rows.to(layers[0].last_side_output_rms.device))
    absent = rows[2] == 0
    values = {"side_over_experts_rms": _none_where(rows[0].tolist(), absent)}
    if isinstance(layers[0], HyperMoELayer):
        values["hyper_output_rms"] = _none_where(rows[1].tolist(), absent)
    return values


def _reduce_over_ranks(entry) -> torch.Tensor:
    """megatron's reduce_aux_losses_tracker_across_ranks without ReduceOp.AVG (gloo lacks it):
    sum over the entry's reduce group (the TP ranks' sequence slices), average over DP."""
    values = entry["values"].clone()
    if not dist.is_initialized():
        return values
    sum_over_stages(values)  # each pipeline stage holds its own layers' entries
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


def take_aux_losses(num_forwards: int, per_layer: bool = False) -> Dict[str, float]:
    """megatron's aux losses since the last call, reduced over ranks as megatron reports them,
    as the mean over MoE layers and forward passes (megatron's tracker sums them), then cleared;
    with ``per_layer`` (--moe-per-layer-logging) also each layer's, as "<name>_per_layer".
    Collective: every rank calls it."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    values = {}
    for name, entry in tracker.items():
        reduced = _reduce_over_ranks(entry)
        layers = int((reduced != 0).sum()) or 1
        values[name] = float(reduced.sum()) / layers / max(num_forwards, 1)
        if per_layer:
            key = f"{AUX_LOSS_KEYS.get(name, name)}_per_layer"
            values[key] = (reduced / max(num_forwards, 1)).tolist()
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


def expert_load_values(counts: torch.Tensor) -> dict:
    """Per-layer share of routed tokens per expert, and the max/mean imbalance (None for a
    layer that routed nothing: a dense layer)."""
    routed = counts.sum(dim=1, keepdim=True)
    fractions = counts / routed.clamp_min(1)
    imbalance = fractions.max(1).values / fractions.mean(1)
    return {"expert_load": _none_where(fractions.tolist(), routed[:, 0] == 0),
            "max_over_mean_load": _none_where(imbalance.tolist(), routed[:, 0] == 0)}


def _none_where(rows: list, absent: torch.Tensor) -> list:
    """Per-layer rows with None for the layers that have no such value (dense layers)."""
    return [None if skip else row for row, skip in zip(rows, absent.tolist())]

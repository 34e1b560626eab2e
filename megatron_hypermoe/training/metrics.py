"""What a run reports: a console line per --log-interval, TensorBoard (and Weights & Biases)
scalars under the names Megatron users know per --tensorboard-log-interval, and every value as
JSON lines in --metrics-file (rank 0 writes).

Every logged value is named once, in :data:`LOGGED`: its key in the JSON lines, its TensorBoard
tag and its place on the console line. The trainer hands :meth:`MetricsWriter.log` one dict
keyed by the JSON names; the writer derives the rest.

MoE visibility (megatron-core's own tracker assumes CUDA): per-layer fraction of routed tokens
per expert and the max/mean imbalance, counted by router hooks and summed over all ranks; the
load-balancing and z losses; and, for HyperMoE, the RMS of each layer's HyperExpert output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hypermoe.model.hypermoe_layer import HyperMoELayer
from megatron_hypermoe.model.recompute import in_recompute_replay
from megatron_hypermoe.model.side_path import SidePathMoELayer
from megatron_hypermoe.parallel.pipeline import sum_over_stages


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


@dataclasses.dataclass(frozen=True)
class Logged:
    """One logged value: ``key`` in --metrics-file (always written there), ``tensorboard`` tag
    (Megatron's name; with {layer} / {expert} for per-layer lists; also the Weights & Biases
    key), ``console`` format on the log line (None: not shown), ``tensorboard_scale`` if
    TensorBoard wants another unit; ``console_flags`` / ``tensorboard_flags``: the flags that
    must all be set for it to be shown there (Megatron's --log-* switches)."""
    key: str
    tensorboard: str
    console: Optional[str] = None
    tensorboard_scale: float = 1.0
    console_flags: tuple = ()
    tensorboard_flags: tuple = ()


LOGGED = (
    Logged("lm_loss", "lm loss", "lm loss {:.4f}"),
    Logged("aux_loss", "load_balancing_loss", "aux loss {:.4f}"),
    Logged("seq_aux_loss", "seq_load_balancing_loss", "seq aux loss {:.4f}"),
    Logged("global_aux_loss", "global_load_balancing_loss", "global aux loss {:.4f}"),
    Logged("z_loss", "z_loss"),
    Logged("lr", "learning-rate", "lr {:.3e}"),
    Logged("grad_norm", "grad-norm", "grad norm {:.3f}"),
    Logged("ms_per_iter", "iteration-time", "{:.1f} ms/iter", tensorboard_scale=1e-3,
           tensorboard_flags=("log_timers_to_tensorboard",)),
    Logged("tokens_per_s", "tokens-per-second", "{:,.0f} tokens/s",
           tensorboard_flags=("log_timers_to_tensorboard",)),
    Logged("tflops_per_device", "TFLOPs-per-device", "{:.4f} TFLOP/s/device",
           console_flags=("log_throughput",),
           tensorboard_flags=("log_throughput", "log_timers_to_tensorboard")),
    Logged("batch_size", "batch-size", tensorboard_flags=("log_batch_size_to_tensorboard",)),
    Logged("skipped_iterations", "skipped-iterations", "skipped {}"),
    Logged("expert_load", "moe/layer_{layer}_expert_{expert}_load"),
    Logged("max_over_mean_load", "moe/layer_{layer}_max_over_mean_load"),
    Logged("hyper_output_rms", "hypermoe/layer_{layer}_hyper_output_rms"),
    Logged("side_over_experts_rms", "moe/layer_{layer}_side_over_experts_rms"),
    Logged("val_loss", "lm loss validation", "lm loss {:.4f}"),
    Logged("val_ppl", "lm loss validation ppl", "ppl {:.2f}",
           tensorboard_flags=("log_validation_ppl_to_tensorboard",)),
)
LOGGED_BY_KEY = {entry.key: entry for entry in LOGGED}
# megatron's aux-loss tracker names -> our keys (other tracker names are logged as they are)
AUX_LOSS_KEYS = {"load_balancing_loss": "aux_loss", "seq_load_balancing_loss": "seq_aux_loss",
                 "global_load_balancing_loss": "global_aux_loss", "z_loss": "z_loss"}


def tensorboard_scalars(values: dict, args=None) -> Dict[str, float]:
    """TensorBoard tag -> value for a dict keyed by LOGGED keys (lists become one tag each);
    with ``args``, only the values their --log-* flags let through."""
    scalars = {}
    for key, value in values.items():
        entry = LOGGED_BY_KEY.get(key, Logged(key, key))
        if args is not None and not _enabled(args, entry.tensorboard_flags):
            continue
        if isinstance(value, (list, tuple)):
            for layer, row in enumerate(value):
                if row is None:  # (a dense layer)
                    continue
                if isinstance(row, (list, tuple)):
                    for expert, item in enumerate(row):
                        scalars[entry.tensorboard.format(layer=layer, expert=expert)] = item
                else:
                    scalars[entry.tensorboard.format(layer=layer)] = row
        elif value is not None:
            scalars[entry.tensorboard] = float(value) * entry.tensorboard_scale
    return scalars


def _enabled(args, flags) -> bool:
    return all(getattr(args, flag, False) for flag in flags)


def console_line(prefix: str, values: dict, args=None) -> str:
    """``prefix | lm loss 1.2345 | ...`` in LOGGED order, for the values that have a format
    (and, with ``args``, whose --log-* flags are set)."""
    parts = [entry.console.format(values[entry.key]) for entry in LOGGED
             if entry.console and values.get(entry.key) is not None
             and (args is None or _enabled(args, entry.console_flags))]
    return " | ".join([prefix] + parts)


def add_logging_args(parser) -> None:
    """Megatron-LM's (and Megatron-DeepSpeed's) logging flags beyond --log-interval."""
    g = parser.add_argument_group("TensorBoard and Weights & Biases (Megatron's flags)")
    g.add_argument("--log-throughput", action="store_true",
                   help="show TFLOP/s per device on the log line (--metrics-file always has it)")
    g.add_argument("--tensorboard-log-interval", type=int, default=1,
                   help="write training scalars to TensorBoard / W&B every this many "
                        "iterations (validation: at every evaluation)")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="events TensorBoard buffers before writing to disk")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="also write iteration-time and tokens-per-second (and TFLOPs-per-device "
                        "with --log-throughput)")
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true",
                   help="also write batch-size")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="also write 'lm loss validation ppl'")
    g.add_argument("--wandb-project", default=None,
                   help="log the TensorBoard scalars to this Weights & Biases project "
                        "(needs the wandb package; WANDB_MODE=offline works without network)")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run name (required with it)")
    g.add_argument("--wandb-save-dir", default=None,
                   help="where W&B writes its files; default --save/wandb")


TENSORBOARD_ONLY_FLAGS = ("log_timers_to_tensorboard", "log_batch_size_to_tensorboard",
                          "log_validation_ppl_to_tensorboard")


def finalize_logging_args(args) -> None:
    """One-line refusals of logging flags that could not take effect."""
    from megatron_hypermoe.errors import ArgumentError

    for name in ("tensorboard_log_interval", "tensorboard_queue_size"):
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.wandb_project:
        for name in ("wandb_exp_name", "wandb_save_dir"):
            if getattr(args, name):
                raise ArgumentError(f"--{name.replace('_', '-')} needs --wandb-project")
    else:
        if not args.wandb_exp_name:
            raise ArgumentError("--wandb-project needs --wandb-exp-name NAME (as in Megatron)")
        if not args.wandb_save_dir and not args.save:
            raise ArgumentError("--wandb-project needs --wandb-save-dir DIR (or --save, whose "
                                "wandb/ it then uses)")
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ArgumentError("--wandb-project needs the wandb package: pip install "
                                "wandb==0.31.0 (requirements.txt)")
    if not (args.tensorboard_dir or args.wandb_project):
        passed = [name for name in TENSORBOARD_ONLY_FLAGS if getattr(args, name)]
        passed += ["tensorboard_log_interval"] if args.tensorboard_log_interval != 1 else []
        if passed:
            raise ArgumentError(f"--{passed[0].replace('_', '-')} needs --tensorboard-dir or "
                                "--wandb-project (there is nothing to write to)")


def jsonable_args(args) -> dict:
    """The flags as JSON values: what a checkpoint records and a W&B run shows as its config."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, (str, int, float, bool, type(None))):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(
                isinstance(v, (str, int, float, bool)) for v in value):
            out[key] = list(value)
    return out


def start_wandb(args):
    """A Weights & Biases run as Megatron starts it (project, name, dir, the flags as config)."""
    import wandb

    directory = args.wandb_save_dir or os.path.join(args.save or ".", "wandb")
    os.makedirs(directory, exist_ok=True)
    return wandb.init(project=args.wandb_project, name=args.wandb_exp_name, dir=directory,
                      config=jsonable_args(args))


class MetricsWriter:
    """Rank 0 writes: the console line, TensorBoard and W&B scalars (one tag set, gated by the
    --log-* flags), every value to --metrics-file."""

    def __init__(self, args, is_writer_rank: bool):
        self.args = args
        self.is_writer_rank = is_writer_rank
        self.tensorboard = None
        self.wandb = None
        self.file = None
        if not is_writer_rank:
            return
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir,
                                             max_queue=args.tensorboard_queue_size)
        if args.wandb_project:
            self.wandb = start_wandb(args)
        if args.metrics_file:
            directory = os.path.dirname(os.path.abspath(args.metrics_file))
            os.makedirs(directory, exist_ok=True)
            self.file = open(args.metrics_file, "a")

    @staticmethod
    def writes_scalars(args) -> bool:
        """Whether the run has a scalar writer (the same answer on every rank)."""
        return bool(args.tensorboard_dir or args.wandb_project)

    def log(self, iteration: int, values: dict, prefix: str, console_values: dict = None,
            console: bool = True, scalars: bool = True) -> None:
        """One logging event: the console line (of ``console_values`` if given), TensorBoard and
        W&B scalars, a JSON line of ``values``."""
        if not self.is_writer_rank:
            return
        if console:
            print(console_line(prefix, console_values or values, self.args), flush=True)
        if scalars and (self.tensorboard is not None or self.wandb is not None):
            finite = {tag: value for tag, value in tensorboard_scalars(values, self.args).items()
                      if math.isfinite(value)}
            if self.tensorboard is not None:
                for tag, value in finite.items():
                    self.tensorboard.add_scalar(tag, value, iteration)
            if self.wandb is not None and finite:
                self.wandb.log(finite, step=iteration)
        self.record({"iteration": iteration, **{k: v for k, v in values.items()
                                                 if v is not None}})

    def record(self, record: dict):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.flush()
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.file is not None:
            self.file.close()


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


class ProgressBar:
    """A progress bar with ETA on a terminal; the log lines carry progress otherwise."""

    def __init__(self, total, start, enabled):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="iter", file=sys.stderr)

    def update(self, iteration):
        if self.bar is not None:
            self.bar.n = iteration
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()

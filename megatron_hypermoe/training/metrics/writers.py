"""Where the values go: a console line per --log-interval, TensorBoard (and Weights & Biases)
scalars under the names Megatron users know per --tensorboard-log-interval, and every value as
JSON lines in --metrics-file (rank 0 writes); a progress bar on a terminal; the logging flags.

Every logged value is named once, in :data:`LOGGED`: its key in the JSON lines, its TensorBoard
tag and its place on the console line. The trainer hands :meth:`MetricsWriter.log` one dict
keyed by the JSON names (``probes`` measures the MoE ones); the writer derives the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Dict, Optional


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

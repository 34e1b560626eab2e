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

from megatron_hypermoe.training.config import LoggingConfig, RunConfig


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
def tensorboard_scalars(values: dict, logging: Optional[LoggingConfig] = None) -> Dict[str, float]:
    """TensorBoard tag -> value for a dict keyed by LOGGED keys (lists become one tag each);
    with ``logging``, only the values its --log-* flags let through."""
    scalars = {}
    for key, value in values.items():
        entry = LOGGED_BY_KEY.get(key, Logged(key, key))
        if logging is not None and not _enabled(logging, entry.tensorboard_flags):
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


def _enabled(logging: LoggingConfig, flags) -> bool:
    return all(getattr(logging, flag) for flag in flags)


def console_line(prefix: str, values: dict, logging: Optional[LoggingConfig] = None) -> str:
    """``prefix | lm loss 1.2345 | ...`` in LOGGED order, for the values that have a format
    (and, with ``logging``, whose --log-* flags are set)."""
    parts = [entry.console.format(values[entry.key]) for entry in LOGGED
             if entry.console and values.get(entry.key) is not None
             and (logging is None or _enabled(logging, entry.console_flags))]
    return " | ".join([prefix] + parts)


TENSORBOARD_ONLY_FLAGS = ("log_timers_to_tensorboard", "log_batch_size_to_tensorboard",
                          "log_validation_ppl_to_tensorboard")


def start_wandb(run: RunConfig):
    """A Weights & Biases run as Megatron starts it (project, name, dir, the flags as config)."""
    import wandb

    logging = run.logging
    directory = logging.wandb_save_dir or os.path.join(run.checkpoint.save or ".", "wandb")
    os.makedirs(directory, exist_ok=True)
    return wandb.init(project=logging.wandb_project, name=logging.wandb_exp_name, dir=directory,
                      config=run.to_flags())


class MetricsWriter:
    """Rank 0 writes: the console line, TensorBoard and W&B scalars (one tag set, gated by the
    --log-* flags), every value to --metrics-file."""

    def __init__(self, run: RunConfig, is_writer_rank: bool):
        self.logging = logging = run.logging
        self.is_writer_rank = is_writer_rank
        self.tensorboard = None
        self.wandb = None
        self.file = None
        if not is_writer_rank:
            return
        if logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=logging.tensorboard_dir,
                                             max_queue=logging.tensorboard_queue_size)
        if logging.wandb_project:
            self.wandb = start_wandb(run)
        if logging.metrics_file:
            directory = os.path.dirname(os.path.abspath(logging.metrics_file))
            os.makedirs(directory, exist_ok=True)
            self.file = open(logging.metrics_file, "a")

    def log(self, iteration: int, values: dict, prefix: str, console_values: dict = None,
            console: bool = True, scalars: bool = True) -> None:
        """One logging event: the console line (of ``console_values`` if given), TensorBoard and
        W&B scalars, a JSON line of ``values``."""
        if not self.is_writer_rank:
            return
        if console:
            print(console_line(prefix, console_values or values, self.logging), flush=True)
        if scalars and (self.tensorboard is not None or self.wandb is not None):
            finite = {tag: value for tag, value in tensorboard_scalars(values, self.logging).items()
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

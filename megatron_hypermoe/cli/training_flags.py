"""Flags of the loop around the model: the learning-rate and weight-decay schedule (Megatron-LM's),
checkpoint selection and retention, TensorBoard and Weights & Biases; their checks."""

from __future__ import annotations

import argparse

from megatron_hypermoe.errors import ArgumentError
from megatron_hypermoe.training.lr_schedule import LR_WSD_DECAY_STYLES, WD_INCR_STYLES
from megatron_hypermoe.training.metrics.writers import TENSORBOARD_ONLY_FLAGS


def add_lr_schedule_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's schedule flags (--lr, --min-lr, --lr-decay-style, --lr-warmup-iters,
    --lr-decay-iters, --weight-decay are in the "batch and optimisation" group)."""
    g = parser.add_argument_group("learning-rate and weight-decay schedule (Megatron-LM's)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="train on this many samples (iterations = samples / global batch); "
                        "the schedule then counts samples: use the --lr-*-samples flags")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm up over this fraction of the decay span (instead of "
                        "--lr-warmup-iters/--lr-warmup-samples)")
    g.add_argument("--lr-warmup-init", type=float, default=0.0,
                   help="the learning rate warmup starts from")
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="default --train-samples")
    g.add_argument("--lr-wsd-decay-style", choices=LR_WSD_DECAY_STYLES, default="exponential",
                   help="the annealing phase of --lr-decay-style WSD")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="length of WSD's annealing phase (it ends at --lr-decay-iters)")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    g.add_argument("--lr-warmup-tokens", type=int, default=None,
                   help="Megatron-DeepSpeed's: warm up over this many tokens")
    g.add_argument("--lr-decay-tokens", type=int, default=None,
                   help="Megatron-DeepSpeed's: decay over this many tokens (instead of "
                        "--lr-decay-iters/--lr-decay-samples)")
    g.add_argument("--start-weight-decay", type=float, default=None,
                   help="weight decay at step 0 (with --weight-decay-incr-style linear/cosine)")
    g.add_argument("--end-weight-decay", type=float, default=None,
                   help="weight decay at the end of training")
    g.add_argument("--weight-decay-incr-style", choices=WD_INCR_STYLES, default="constant",
                   help="constant: --weight-decay throughout")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, take lr, min lr, warmup, decay span and style, weight decay "
                        "from the flags, not the checkpoint")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, take them from the checkpoint and ignore the flags "
                        "(default: they must agree)")


def finalize_lr_schedule_args(args) -> None:
    """Megatron's validate_args for the schedule flags; --train-samples -> --train-iters."""
    def passed(name, default=None):
        return getattr(args, name) not in (default, None)

    def flag(name):
        return "--" + name.replace("_", "-")

    if args.train_samples is not None:
        for other in ("train_iters", "train_tokens"):
            if passed(other):
                raise ArgumentError(f"--train-samples and {flag(other)} are exclusive: pick one")
        if args.train_samples < 1:
            raise ArgumentError("--train-samples must be at least 1")
        # Megatron's update_train_iters (no batch-size ramp-up here).
        args.train_iters = args.train_samples // args.global_batch_size
        unit, wrong = "samples", ("lr_decay_iters", "lr_warmup_iters", "lr_wsd_decay_iters")
    else:
        unit, wrong = "iterations", ("lr_decay_samples", "lr_warmup_samples",
                                     "lr_wsd_decay_samples")
    for name in wrong:
        if passed(name, 0):
            other = name.replace("_samples", "_iters") if unit == "iterations" else \
                name.replace("_iters", "_samples")
            raise ArgumentError(f"{flag(name)} does not fit a run that counts {unit} "
                                f"({'--train-samples' if unit == 'samples' else '--train-iters'}"
                                f"): use {flag(other)}")
    warmups = [n for n in ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction",
                           "lr_warmup_tokens") if passed(n, 0)]
    if len(warmups) > 1:
        raise ArgumentError(f"{' and '.join(map(flag, warmups))} are exclusive: give one warmup")
    if args.lr_decay_tokens is not None and (passed("lr_decay_iters") or
                                             passed("lr_decay_samples")):
        raise ArgumentError("--lr-decay-tokens replaces --lr-decay-iters/--lr-decay-samples: "
                            "give one")
    for name in ("lr_warmup_tokens", "lr_decay_tokens"):
        if passed(name) and getattr(args, name) < 1:
            raise ArgumentError(f"{flag(name)} must be at least 1")
    if args.lr_warmup_fraction is not None and not 0.0 <= args.lr_warmup_fraction < 1.0:
        raise ArgumentError(f"--lr-warmup-fraction {args.lr_warmup_fraction} must be in [0, 1)")
    wsd_length = [n for n in ("lr_wsd_decay_iters", "lr_wsd_decay_samples") if passed(n)]
    if args.lr_decay_style == "WSD":
        if not wsd_length:
            raise ArgumentError("--lr-decay-style WSD needs the annealing length: add "
                                + ("--lr-wsd-decay-samples" if unit == "samples"
                                   else "--lr-wsd-decay-iters"))
    elif wsd_length or args.lr_wsd_decay_style != "exponential":
        name = wsd_length[0] if wsd_length else "lr_wsd_decay_style"
        raise ArgumentError(f"{flag(name)} applies to --lr-decay-style WSD only (this run is "
                            f"{args.lr_decay_style}): drop it")
    if not 0.0 <= args.min_lr <= args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")
    if not args.lr_warmup_init <= args.lr:
        raise ArgumentError(f"--lr-warmup-init {args.lr_warmup_init} exceeds --lr {args.lr}")
    if args.weight_decay_incr_style == "constant":
        for name in ("start_weight_decay", "end_weight_decay"):
            if passed(name):
                raise ArgumentError(f"{flag(name)} needs --weight-decay-incr-style linear or "
                                    "cosine (constant uses --weight-decay)")
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
    else:
        if not (passed("start_weight_decay") and passed("end_weight_decay")):
            raise ArgumentError(f"--weight-decay-incr-style {args.weight_decay_incr_style} "
                                "needs --start-weight-decay and --end-weight-decay")
        if not 0.0 <= args.start_weight_decay <= args.end_weight_decay:
            raise ArgumentError("--start-weight-decay must be >= 0 and <= --end-weight-decay "
                                "(the schedule increases weight decay)")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ArgumentError("--override-opt_param-scheduler and "
                            "--use-checkpoint-opt_param-scheduler are exclusive: pick one")


def add_checkpoint_file_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoint selection and retention")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load this iteration's checkpoint from --load instead of the one "
                        "'latest' names (Megatron-LM's flag), e.g. the previous one when the "
                        "newest is damaged")
    g.add_argument("--save-retain", type=int, default=None,
                   help="after each complete save keep only the newest N checkpoints under "
                        "--save (and always the one 'latest' names); None: keep all")


def check_checkpoint_file_args(args) -> None:
    if args.ckpt_step is not None:
        if args.ckpt_step < 0:
            raise ArgumentError(f"--ckpt-step {args.ckpt_step} must be an iteration >= 0")
        if not args.load:
            raise ArgumentError("--ckpt-step needs --load DIR (the checkpoint directory to "
                                "load that iteration from)")
    if args.save_retain is not None:
        if args.save_retain < 1:
            raise ArgumentError(f"--save-retain {args.save_retain} must be at least 1 (the "
                                "newest checkpoint is always kept): pass N >= 1 or leave it out "
                                "to keep every checkpoint")
        if not args.save:
            raise ArgumentError("--save-retain needs --save DIR")


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

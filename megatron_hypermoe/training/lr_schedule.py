"""The learning-rate and weight-decay schedule: megatron-core's own ``OptimizerParamScheduler``,
built from Megatron-LM's flags the way Megatron-LM's ``get_optimizer_param_scheduler`` builds it,
so the learning rate matches Megatron's step for step.

As in Megatron the scheduler counts samples: it starts at step 0 (warmup from
--lr-warmup-init), and after every optimizer step that was not skipped it advances by the global
batch. Iteration flags are multiplied by the global batch; --train-samples runs count samples
directly; Megatron-DeepSpeed's --lr-warmup-tokens / --lr-decay-tokens count tokens, which with
our fixed sequence length are samples x --seq-length (its token counter differs from samples only
under curriculum learning, which this trainer does not have).

Per-group learning rates (the hypernetwork group's ``lr_mult``): megatron-core 0.16.1's
scheduler reads per-group ``max_lr``/``min_lr`` overrides (``lr_mult`` is only a legacy key
there), so a group with multiplier m gets max_lr = m x --lr and min_lr = m x --min-lr: warmup
runs from --lr-warmup-init to each group's max_lr, exactly m x the canonical lr when
--lr-warmup-init is 0 (the default). Groups without weight decay have ``wd_mult`` 0.
"""

from __future__ import annotations

import argparse

from megatron_hypermoe.errors import ArgumentError, CheckpointError

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")
SCHEDULER_STATE_KEY = "opt_param_scheduler"  # Megatron's key in its checkpoints


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


def scheduler_steps(args) -> dict:
    """The scheduler's spans in samples, as Megatron-LM's get_optimizer_param_scheduler
    computes them (plus Megatron-DeepSpeed's token spans); needs finalized args."""
    batch = args.global_batch_size
    if args.train_samples is not None:
        decay = args.lr_decay_samples if args.lr_decay_samples is not None \
            else args.train_samples
        wd_incr = args.train_samples
        wsd = args.lr_wsd_decay_samples
        warmup = args.lr_warmup_samples
    else:
        decay = args.lr_decay_iters * batch
        wd_incr = args.train_iters * batch
        wsd = args.lr_wsd_decay_iters * batch if args.lr_wsd_decay_iters is not None else None
        warmup = args.lr_warmup_iters * batch
    if args.lr_decay_tokens is not None:
        decay = args.lr_decay_tokens / args.seq_length
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay
    if args.lr_warmup_tokens is not None:
        warmup = args.lr_warmup_tokens / args.seq_length
    if not decay > 0:
        raise ArgumentError("the learning rate decays over 0 samples: set --lr-decay-iters "
                            "(or --lr-decay-samples/--lr-decay-tokens) above 0")
    if not warmup < decay:
        raise ArgumentError(f"the warmup ({warmup:g} samples) must end before the decay span "
                            f"({decay:g} samples) does: shorten the warmup or lengthen "
                            "--lr-decay-iters")
    if wsd is not None and not 0 < wsd <= decay:
        raise ArgumentError(f"WSD's annealing phase ({wsd} samples) must be within the decay "
                            f"span ({decay:g} samples): lower --lr-wsd-decay-iters/-samples")
    return {"lr_warmup_steps": warmup, "lr_decay_steps": decay, "wd_incr_steps": wd_incr,
            "wsd_decay_steps": wsd}


def set_group_schedules(param_groups, max_lr: float, min_lr: float, lr_mults, wd_mults) -> None:
    """Megatron's per-group keys from each group's multipliers: the scheduler's bounds times
    ``lr_mult`` (megatron-core reads ``max_lr``/``min_lr``), ``wd_mult``, and ``default_config``
    (which groups follow the canonical schedule, the one logged)."""
    for group, lr_mult, wd_mult in zip(param_groups, lr_mults, wd_mults):
        group.update(lr_mult=lr_mult, wd_mult=wd_mult, default_config=lr_mult == 1.0,
                     max_lr=max_lr * lr_mult, min_lr=min_lr * lr_mult)


class LRSchedule:
    """megatron-core's OptimizerParamScheduler over the optimizer's groups (DeepSpeed's ZeRO
    optimizer exposes the groups of the torch optimizer it steps, so what the scheduler writes is
    what the step uses), plus the group multipliers that must survive a checkpoint load
    (DeepSpeed restores the saved groups' keys)."""

    def __init__(self, optimizer, args):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.optimizer = optimizer
        groups = optimizer.param_groups
        self.lr_mults = [float(g.get("lr_mult", 1.0)) for g in groups]
        self.wd_mults = [float(g.get("wd_mult", 1.0)) for g in groups]
        set_group_schedules(groups, args.lr, args.min_lr, self.lr_mults, self.wd_mults)
        self.scheduler = OptimizerParamScheduler(
            optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
            lr_decay_style=args.lr_decay_style, start_wd=args.start_weight_decay,
            end_wd=args.end_weight_decay, wd_incr_style=args.weight_decay_incr_style,
            use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=args.override_opt_param_scheduler,
            lr_wsd_decay_style=args.lr_wsd_decay_style, **scheduler_steps(args))

    @property
    def lr(self) -> float:
        """The canonical learning rate (of the groups without a multiplier), as Megatron logs."""
        from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

        return get_canonical_lr_for_logging(self.optimizer.param_groups)

    def step(self, samples: int) -> None:
        self.scheduler.step(increment=samples)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Megatron's resume: the checkpoint's bounds must match the flags unless
        --override-opt_param-scheduler (flags win) or --use-checkpoint-opt_param-scheduler
        (checkpoint wins); then the group bounds follow the scheduler's."""
        scheduler = self.scheduler
        if not (scheduler.override_opt_param_scheduler or
                scheduler.use_checkpoint_opt_param_scheduler):
            mine = scheduler.state_dict()
            for key, flag in CHECKED_STATE.items():
                if key in state and state[key] != mine[key]:
                    raise CheckpointError(
                        f"the checkpoint's learning-rate schedule has {key}={state[key]!r} but "
                        f"the flags give {mine[key]!r} ({flag}): pass "
                        "--override-opt_param-scheduler to use the flags or "
                        "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")
        scheduler.load_state_dict(state)
        self.restore_groups()

    def resume_without_state(self, consumed_samples: int) -> None:
        """A checkpoint from before the scheduler was saved: its schedule was a function of the
        iteration, i.e. of the consumed samples."""
        self.scheduler.step(increment=consumed_samples)
        self.restore_groups()

    def restore_groups(self) -> None:
        """After a load: DeepSpeed put back the saved groups' keys; reapply this run's."""
        set_group_schedules(self.optimizer.param_groups, self.scheduler.max_lr,
                            self.scheduler.min_lr, self.lr_mults, self.wd_mults)
        self.scheduler.step(increment=0)


# OptimizerParamScheduler.state_dict() keys -> the flags that set them
CHECKED_STATE = {
    "max_lr": "--lr", "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-*, in samples",
    "lr_decay_steps": "--lr-decay-*, in samples", "lr_decay_style": "--lr-decay-style",
    "start_wd": "--start-weight-decay/--weight-decay",
    "end_wd": "--end-weight-decay/--weight-decay",
    "wd_incr_steps": "--train-iters/--train-samples, in samples",
    "wd_incr_style": "--weight-decay-incr-style",
}

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

from megatron_hypermoe.errors import ArgumentError, CheckpointError
from megatron_hypermoe.training.config import RunConfig

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")
SCHEDULER_STATE_KEY = "opt_param_scheduler"  # Megatron's key in its checkpoints


def scheduler_steps(run: RunConfig) -> dict:
    """The scheduler's spans in samples, as Megatron-LM's get_optimizer_param_scheduler
    computes them (plus Megatron-DeepSpeed's token spans); needs a finalized config."""
    schedule, training = run.schedule, run.training
    batch = training.global_batch_size
    if training.train_samples is not None:
        decay = schedule.lr_decay_samples if schedule.lr_decay_samples is not None \
            else training.train_samples
        wd_incr = training.train_samples
        wsd = schedule.lr_wsd_decay_samples
        warmup = schedule.lr_warmup_samples
    else:
        decay = schedule.lr_decay_iters * batch
        wd_incr = training.train_iters * batch
        wsd = schedule.lr_wsd_decay_iters * batch \
            if schedule.lr_wsd_decay_iters is not None else None
        warmup = schedule.lr_warmup_iters * batch
    if schedule.lr_decay_tokens is not None:
        decay = schedule.lr_decay_tokens / run.data.seq_length
    if schedule.lr_warmup_fraction is not None:
        warmup = schedule.lr_warmup_fraction * decay
    if schedule.lr_warmup_tokens is not None:
        warmup = schedule.lr_warmup_tokens / run.data.seq_length
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

    def __init__(self, optimizer, run: RunConfig):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.optimizer = optimizer
        groups = optimizer.param_groups
        self.lr_mults = [float(g.get("lr_mult", 1.0)) for g in groups]
        self.wd_mults = [float(g.get("wd_mult", 1.0)) for g in groups]
        schedule, lr = run.schedule, run.optimizer.lr
        set_group_schedules(groups, lr, schedule.min_lr, self.lr_mults, self.wd_mults)
        self.scheduler = OptimizerParamScheduler(
            optimizer, init_lr=schedule.lr_warmup_init, max_lr=lr, min_lr=schedule.min_lr,
            lr_decay_style=schedule.lr_decay_style, start_wd=schedule.start_weight_decay,
            end_wd=schedule.end_weight_decay, wd_incr_style=schedule.weight_decay_incr_style,
            use_checkpoint_opt_param_scheduler=schedule.use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=schedule.override_opt_param_scheduler,
            lr_wsd_decay_style=schedule.lr_wsd_decay_style, **scheduler_steps(run))

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

"""Megatron's learning-rate schedule: linear warmup, then cosine/linear/constant decay to
--min-lr at --lr-decay-iters. A pure function of the iteration, so resuming needs no state."""

import math


def learning_rate(iteration: int, args) -> float:
    if args.lr_warmup_iters and iteration < args.lr_warmup_iters:
        return args.lr * (iteration + 1) / args.lr_warmup_iters
    if args.lr_decay_style == "constant":
        return args.lr
    span = max(1, args.lr_decay_iters - args.lr_warmup_iters)
    progress = min(1.0, max(0.0, (iteration - args.lr_warmup_iters) / span))
    if args.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:  # cosine
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return args.min_lr + (args.lr - args.min_lr) * factor

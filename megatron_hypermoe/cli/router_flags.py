"""Router and capacity flags: megatron-core 0.16.1's (named and defaulted as Megatron-LM's) and
Megatron-DeepSpeed's aliases for the same concepts.

Each flag is a model config field that megatron-core's TopKRouter (or our subclass,
``model/router.py``) honours, a Megatron-DeepSpeed alias mapped onto one, or refused in one
line. Which flag sets which config field is ``training/config.py``'s ``MOE_FLAGS``;
:func:`check_router_args` is the cross-flag check (megatron's own config rules, said as flags,
plus the alias mapping).
"""

from __future__ import annotations

import argparse

from megatron_hypermoe.errors import ArgumentError

LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
# megatron-core applies capacity only with these (TransformerConfig.__post_init__)
CAPACITY_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
AUX_LOSS_COEFF_DEFAULT = 1e-2  # ours (Megatron-LM's is 0.0)
# Megatron-DeepSpeed's defaults once its capacity flags are in use (megatron/arguments.py)
DEEPSPEED_EVAL_CAPACITY_FACTOR = 1.0
DEEPSPEED_MIN_CAPACITY = 4


# Router flags that need Transformer Engine (--moe-router-fusion, --moe-router-padding-for-fp8)
# are refused with the other such flags in cli/megatron_flags.py.


def load_balancing_types(args):
    value = args.moe_router_load_balancing_type
    return list(value) if isinstance(value, (list, tuple)) else [value]


def add_router_args(parser) -> None:
    g = parser.add_argument_group("MoE router and capacity (megatron-core's meaning)")
    g.add_argument("--moe-router-load-balancing-type", nargs="+", choices=LOAD_BALANCING_TYPES,
                   default="aux_loss",
                   help="aux_loss (GShard/Switch, per micro-batch), seq_aux_loss (per sequence, "
                        "DeepSeek-V2), global_aux_loss (over the global batch), sinkhorn "
                        "(S-BASE; needs --moe-aux-loss-coeff 0), none; several with one "
                        "--moe-aux-loss-coeff each")
    g.add_argument("--moe-router-score-function", choices=("softmax", "sigmoid"),
                   default="softmax",
                   help="sigmoid: top-k of sigmoid scores, renormalised over the k for k > 1")
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None,
                   help="multiply the selected experts' weights by this (after "
                        "--moe-router-renormalize if given)")
    g.add_argument("--moe-router-dtype", choices=("fp32", "fp64"), default=None,
                   help="dtype of the router logits and of the weighted sum of expert outputs")
    g.add_argument("--moe-input-jitter-eps", type=float, default=None,
                   help="multiply the router input by U(1-eps, 1+eps) (megatron-core does so in "
                        "evaluation too)")
    g.add_argument("--moe-router-num-groups", type=int, default=None,
                   help="group-limited routing: experts in this many equal groups")
    g.add_argument("--moe-router-group-topk", type=int, default=None,
                   help="group-limited routing: groups each token may pick experts from")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the "
                        "scores for selection, updated after every step from the step's "
                        "token counts; needs --moe-router-score-function sigmoid")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--moe-router-force-load-balancing", action="store_true",
                   help="[benchmarks only] route by random logits (balanced load)")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="each expert keeps at most ceil(tokens x topk / experts x F) tokens of a "
                        "micro-batch per rank; the rest of its tokens are dropped (they pass "
                        "through the residual; HyperMoE's HyperExpert still sees their top-k "
                        "selection). Default: no dropping")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="pad every expert's input to its capacity (fixed shapes)")
    g.add_argument("--moe-token-drop-policy", choices=("probs", "position"), default="probs",
                   help="over capacity, drop the tokens with the lowest weights (probs) or the "
                        "latest in the micro-batch (position)")

    g = parser.add_argument_group("Megatron-DeepSpeed MoE aliases")
    g.add_argument("--moe-train-capacity-factor", type=float, default=None,
                   help="= --moe-expert-capacity-factor (DeepSpeed's capacity is the same "
                        "ceil(tokens / experts x F x topk)); with it the two below default to "
                        f"DeepSpeed's {DEEPSPEED_EVAL_CAPACITY_FACTOR} and "
                        f"{DEEPSPEED_MIN_CAPACITY}")
    g.add_argument("--moe-eval-capacity-factor", type=float, default=None,
                   help="the capacity factor while not training (evaluation, generation)")
    g.add_argument("--moe-min-capacity", type=int, default=None,
                   help="each expert keeps at least this many tokens (DeepSpeed's minimum)")
    g.add_argument("--disable-moe-token-dropping", action="store_true",
                   help="no capacity: DeepSpeed then ignores the capacity factors, and so do "
                        "we (= no --moe-expert-capacity-factor)")


def _deepspeed_aliases(args) -> None:
    """Map Megatron-DeepSpeed's capacity flags onto megatron-core's."""
    train = args.moe_train_capacity_factor
    if args.disable_moe_token_dropping:
        if args.moe_expert_capacity_factor is not None:
            raise ArgumentError("--disable-moe-token-dropping contradicts "
                                "--moe-expert-capacity-factor: keep one")
        # DeepSpeed without token dropping has no capacity: its capacity flags mean nothing
        args.moe_eval_capacity_factor = args.moe_min_capacity = None
        return
    if train is None:
        return
    if args.moe_expert_capacity_factor not in (None, train):
        raise ArgumentError(f"--moe-train-capacity-factor {train} and "
                            f"--moe-expert-capacity-factor {args.moe_expert_capacity_factor} "
                            "are the same setting: keep one")
    args.moe_expert_capacity_factor = train
    if args.moe_eval_capacity_factor is None:
        args.moe_eval_capacity_factor = DEEPSPEED_EVAL_CAPACITY_FACTOR
    if args.moe_min_capacity is None:
        args.moe_min_capacity = DEEPSPEED_MIN_CAPACITY


def _router_flags_set(args):
    """The router flags given a non-default value."""
    defaults = argparse.ArgumentParser()
    add_router_args(defaults)
    return [a.option_strings[0] for a in defaults._actions
            if a.dest != "help" and getattr(args, a.dest) != a.default]


def check_router_args(args) -> None:
    """Cross-flag checks of the router flags (megatron-core's config rules, as flags)."""
    coeff_given = args.moe_aux_loss_coeff is not None
    if not coeff_given:
        args.moe_aux_loss_coeff = AUX_LOSS_COEFF_DEFAULT
    if args.moe_type == "dense":
        given = _router_flags_set(args)
        if given:
            raise ArgumentError(f"{given[0]} applies to MoE layers (this run is --moe-type "
                                "dense): drop it")
        return
    # Megatron-LM's validate_args: one value is a scalar, not a list of one
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        value = getattr(args, name)
        if isinstance(value, list) and len(value) == 1:
            setattr(args, name, value[0])
    types = load_balancing_types(args)
    if len(types) > 1:
        coeffs = args.moe_aux_loss_coeff
        if not isinstance(coeffs, list) or len(coeffs) != len(types):
            raise ArgumentError(f"--moe-router-load-balancing-type has {len(types)} types: give "
                                f"--moe-aux-loss-coeff one coefficient each")
        if "sinkhorn" in types:
            raise ArgumentError("sinkhorn routing is not a loss: it does not combine with other "
                                "--moe-router-load-balancing-type values")
    elif isinstance(args.moe_aux_loss_coeff, list):
        raise ArgumentError("several --moe-aux-loss-coeff values need as many "
                            "--moe-router-load-balancing-type values")
    if types == ["sinkhorn"]:
        if coeff_given and args.moe_aux_loss_coeff != 0:
            raise ArgumentError("sinkhorn routing takes no aux loss (megatron-core asserts it): "
                                "pass --moe-aux-loss-coeff 0")
        args.moe_aux_loss_coeff = 0.0
    _deepspeed_aliases(args)
    factor = args.moe_expert_capacity_factor
    if factor is not None and factor < 0:
        factor = args.moe_expert_capacity_factor = None  # megatron's meaning: no capacity
    if factor is not None and any(t not in CAPACITY_BALANCING_TYPES for t in types):
        raise ArgumentError("--moe-expert-capacity-factor works with --moe-router-load-"
                            "balancing-type aux_loss, seq_aux_loss, global_aux_loss or none "
                            "(megatron-core), not sinkhorn")
    if args.moe_pad_expert_input_to_capacity and factor is None:
        raise ArgumentError("--moe-pad-expert-input-to-capacity needs "
                            "--moe-expert-capacity-factor (the capacity to pad to)")
    if args.moe_eval_capacity_factor is not None and factor is None:
        raise ArgumentError("--moe-eval-capacity-factor needs a training capacity: add "
                            "--moe-train-capacity-factor or --moe-expert-capacity-factor")
    if args.moe_pad_expert_input_to_capacity and \
            args.moe_eval_capacity_factor not in (None, factor):
        raise ArgumentError("--moe-pad-expert-input-to-capacity pads to the training capacity: "
                            "--moe-eval-capacity-factor must equal it or be left out")
    if args.moe_min_capacity is not None:
        if args.moe_min_capacity < 0:
            raise ArgumentError(f"--moe-min-capacity {args.moe_min_capacity} must be >= 0")
        if args.moe_pad_expert_input_to_capacity and args.moe_min_capacity:
            raise ArgumentError("--moe-min-capacity does not combine with --moe-pad-expert-"
                                "input-to-capacity (megatron's dispatcher pads to its own "
                                "capacity, without a minimum)")
    if args.moe_router_enable_expert_bias and args.moe_router_score_function != "sigmoid":
        raise ArgumentError("--moe-router-enable-expert-bias needs --moe-router-score-function "
                            "sigmoid (megatron-core)")
    groups, group_topk = args.moe_router_num_groups, args.moe_router_group_topk
    if group_topk:
        if not groups:
            raise ArgumentError("--moe-router-group-topk needs --moe-router-num-groups")
        if args.num_experts % groups or group_topk > groups:
            raise ArgumentError(f"--moe-router-num-groups {groups} must divide --num-experts "
                                f"{args.num_experts}, and --moe-router-group-topk {group_topk} "
                                "must not exceed it")
        if args.moe_router_topk > group_topk * (args.num_experts // groups):
            raise ArgumentError(f"--moe-router-topk {args.moe_router_topk} exceeds the experts "
                                f"in {group_topk} group(s) of {args.num_experts // groups}")
    elif groups:
        raise ArgumentError("--moe-router-num-groups needs --moe-router-group-topk")
    if args.moe_input_jitter_eps is not None and not 0 < args.moe_input_jitter_eps < 1:
        raise ArgumentError(f"--moe-input-jitter-eps {args.moe_input_jitter_eps} must be in "
                            "(0, 1)")

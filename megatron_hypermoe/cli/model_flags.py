"""The model's flags beyond the core sizes: activation recomputation (Megatron-LM's and
Megatron-DeepSpeed's names), --attention-backend and --moe-grouped-gemm, with their checks."""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_hypermoe.errors import ArgumentError
from megatron_hypermoe.model.attention import ATTENTION_BACKENDS
from megatron_hypermoe.model.config import moe_layer_pattern
from megatron_hypermoe.model.recompute import (
    DEFAULT_MODULES,
    GRANULARITIES,
    METHODS,
    MODULES,
    recomputes_moe_layers,
)


def add_recompute_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("activation recomputation")
    g.add_argument("--recompute-granularity", choices=GRANULARITIES, default=None,
                   help="full: recompute whole transformer layers in backward (needs "
                        "--recompute-method and --recompute-num-layers); selective: recompute "
                        "only --recompute-modules. Default: none (keep every activation)")
    g.add_argument("--recompute-method", choices=METHODS, default=None,
                   help="with full: uniform checkpoints every chunk of --recompute-num-layers "
                        "layers; block checkpoints only the first --recompute-num-layers "
                        "layers, one at a time")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="with full: layers per chunk (uniform) or layers recomputed (block)")
    g.add_argument("--recompute-modules", nargs="+", choices=MODULES, default=None,
                   help="with selective: what to recompute; here core_attn, moe (the MoE layer, "
                        "HyperMoE's side path included) and mlp (dense models) work; layernorm "
                        "needs Transformer Engine. Default: core_attn")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron-LM's shorthand for --recompute-granularity selective")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="Megatron-DeepSpeed's name for --recompute-granularity full "
                        "--recompute-method uniform --recompute-num-layers "
                        "<--checkpoint-num-layers>")
    g.add_argument("--checkpoint-num-layers", type=int, default=None,
                   help="with --checkpoint-activations: layers per checkpointed chunk (default 1)")
    g.add_argument("--moe-layer-recompute", action="store_true",
                   help="megatron-core's deprecated name for --recompute-granularity selective "
                        "with module moe added")
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true",
                   help="Megatron-DeepSpeed: checkpoint with DeepSpeed's implementation; here "
                        "megatron-core's does the same layer checkpointing. Needs a "
                        "recomputation flag")


def _module_refusal(module: str, args) -> Optional[str]:
    """Why ``module`` cannot be recomputed in this model (None: it can). megatron-core accepts
    every name in MODULES, but some do nothing with this project's local layer spec."""
    moe = args.moe_type != "dense"
    dense_layers = not all(moe_layer_pattern(args))
    if module == "moe" and not moe:
        return "--moe-type dense has no MoE layer: use mlp"
    if module == "mlp" and not dense_layers:
        return ("mlp recomputes dense MLPs and this model's MLPs are MoE layers: use moe (the "
                "whole MoE layer, HyperMoE's side path included)")
    if module == "layernorm":
        from megatron.core.tensor_parallel.random import HAVE_TE

        if not HAVE_TE:  # megatron's CheckpointWithoutOutput always takes its TE FP8 path
            return "megatron-core recomputes norms through Transformer Engine, not installed"
    if module == "moe_act":
        return ("megatron-core recomputes the activation only in Transformer Engine's grouped "
                "experts (TEGroupedMLP), not used here: use moe")
    if module == "mla_up_proj":
        return "this model has no multi-latent attention"
    if module == "shared_experts" and not (moe and args.moe_shared_expert_intermediate_size):
        return "this model has no shared experts (--moe-shared-expert-intermediate-size)"
    return None


def _resolve_aliases(args) -> None:
    if args.recompute_activations:
        if args.recompute_granularity == "full":
            raise ArgumentError("--recompute-activations means --recompute-granularity "
                                "selective, which contradicts --recompute-granularity full: "
                                "drop one")
        args.recompute_granularity = "selective"
    if args.moe_layer_recompute:  # megatron-core's own translation of the deprecated flag
        if args.recompute_granularity == "full":
            raise ArgumentError("--moe-layer-recompute is selective recomputation of the MoE "
                                "layer and contradicts --recompute-granularity full: drop one")
        args.recompute_granularity = "selective"
        args.recompute_modules = list(args.recompute_modules or DEFAULT_MODULES)
        if "moe" not in args.recompute_modules:
            args.recompute_modules.append("moe")
    if args.checkpoint_num_layers is not None and not args.checkpoint_activations:
        raise ArgumentError("--checkpoint-num-layers applies only with --checkpoint-activations: "
                            "add it, or use --recompute-num-layers")
    if args.checkpoint_activations:
        implied = {"recompute_granularity": "full", "recompute_method": "uniform",
                   "recompute_num_layers": args.checkpoint_num_layers or 1}
        for dest, value in implied.items():
            given = getattr(args, dest)
            if given not in (None, value):
                flag = "--" + dest.replace("_", "-")
                raise ArgumentError(f"--checkpoint-activations means {flag} {value}, which "
                                    f"contradicts {flag} {given}: drop one")
            setattr(args, dest, value)


def check_recompute_args(args) -> None:
    """Megatron's validate_args for recomputation, plus refusals for what would be ignored.
    Idempotent (args_for_model finalizes recorded flags again)."""
    _resolve_aliases(args)
    granularity = args.recompute_granularity
    if args.deepspeed_activation_checkpointing and granularity is None:
        raise ArgumentError("--deepspeed-activation-checkpointing recomputes nothing by itself: "
                            "add --checkpoint-activations (or --recompute-granularity)")
    method, num_layers, modules = (args.recompute_method, args.recompute_num_layers,
                                   args.recompute_modules)
    if granularity != "full":
        for flag, value in (("--recompute-method", method),
                            ("--recompute-num-layers", num_layers)):
            if value is not None:
                raise ArgumentError(f"{flag} applies only with --recompute-granularity full"
                                    + (" (selective recomputes modules, not layers)"
                                       if granularity == "selective" else "") + ": drop it")
    if granularity != "selective" and modules:
        raise ArgumentError("--recompute-modules applies only with --recompute-granularity "
                            "selective: add it, or drop --recompute-modules")
    if granularity == "full":
        if method is None:
            raise ArgumentError("--recompute-granularity full needs --recompute-method uniform "
                                "or block")
        if num_layers is None:
            raise ArgumentError("--recompute-granularity full needs --recompute-num-layers N")
        if not 1 <= num_layers <= args.num_layers:
            raise ArgumentError(f"--recompute-num-layers {num_layers} must be between 1 and "
                                f"--num-layers {args.num_layers}")
        if method == "uniform" and args.num_layers % num_layers:
            # megatron's uniform chunks would run past the last layer
            raise ArgumentError(f"--recompute-method uniform needs --num-layers "
                                f"{args.num_layers} divisible by --recompute-num-layers "
                                f"{num_layers}")
    if granularity == "selective":
        args.recompute_modules = modules = list(modules or DEFAULT_MODULES)
        for module in modules:
            reason = _module_refusal(module, args)
            if reason:
                raise ArgumentError(f"--recompute-modules {module}: {reason}")
    else:
        args.recompute_modules = []  # as a config field: nothing recomputed selectively
    if args.moe_type == "hypermoe" and getattr(args, "zero_stage", 1) >= 2 and \
            recomputes_moe_layers(args):
        # Each recomputed layer runs a backward of its own, and each adds to the shared
        # hypernetwork's gradient; ZeRO-2 reduces a gradient once per backward and stops at the
        # second ("has already been reduced"), which the GPU check found.
        raise ArgumentError("--zero-stage 2 with recomputed HyperMoE layers: every recomputed "
                            "layer adds to the shared hypernetwork's gradient and ZeRO-2 "
                            "reduces a gradient only once per backward: use --zero-stage 1, or "
                            "recompute only core_attn")


def add_attention_args(parser) -> None:
    g = parser.add_argument_group("attention")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="auto: torch's scaled_dot_product_attention, its kernel chosen by torch; "
                        "flash / fused: SDPA restricted to its flash / fused (cuDNN, "
                        "memory-efficient) kernels; unfused / local: megatron-core's "
                        "DotProductAttention (the full score matrix)")


def add_experts_args(parser) -> None:
    parser.add_argument("--moe-grouped-gemm", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="run each MoE layer's local experts as two grouped GEMMs "
                             "(torch._grouped_mm) instead of megatron-core's SequentialMLP "
                             "loop (--no-moe-grouped-gemm); same weights, same checkpoints")

"""The flags of pretrain_gpt_hypermoe.py, named as in Megatron-LM, and the config they give.

``parse_args`` also derives what Megatron derives (gradient accumulation from the batch sizes,
the data-parallel size) and rejects inconsistent combinations with one-line errors.
``run_config`` turns the finalized flags into the run's frozen config (training/config.py holds
the one flag <-> field map); ``args_for_model`` gives the flags of a run of a model built from a
config object (the Hugging Face importer), validated like parsed ones.
"""

from __future__ import annotations

import argparse
import ast

from megatron_hypermoe.cli.data_flags import add_tokenizer_args
from megatron_hypermoe.cli.deepspeed_config import (
    add_deepspeed_args,
    check_deepspeed_args,
    resolve_config,
)
from megatron_hypermoe.cli.megatron_flags import add_megatron_flags, check_megatron_flags
from megatron_hypermoe.cli.model_flags import (
    add_attention_args,
    add_experts_args,
    add_recompute_args,
    check_recompute_args,
)
from megatron_hypermoe.cli.parallel_flags import (
    add_distributed_args,
    add_pipeline_args,
    check_distributed_args,
    check_pipeline_args,
)
from megatron_hypermoe.cli.router_flags import add_router_args, check_router_args
from megatron_hypermoe.cli.training_flags import (
    add_checkpoint_file_args,
    add_logging_args,
    add_lr_schedule_args,
    check_checkpoint_file_args,
    finalize_logging_args,
    finalize_lr_schedule_args,
)
from megatron_hypermoe.errors import ArgumentError
from megatron_hypermoe.model.config import (
    HYPER_EXPERT_IMPLS,
    HYPER_INITS,
    HYPER_SIZE_NAMES,
    HYPER_SIZES,
    MOE_TYPES,
    VARIANT_HYPER_FIELDS,
    HyperMoEConfig,
    moe_layer_pattern,
)
from megatron_hypermoe.training.config import (
    HYPER_LR_MULT_RULES,
    MOE_FLAGS,
    RunConfig,
    model_flags,
)
from megatron_hypermoe.training.lr_schedule import LR_DECAY_STYLES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Pretrain a HyperMoE / MoE / dense GPT.",
                                     allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="None: 4 x --hidden-size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="key/value head groups (None: one per head, or 1 with "
                        "--group-query-attention)")
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention with --num-query-groups groups")
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="None: --seq-length")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE base (rope_theta)")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="RMSNorm epsilon")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="each attention head's width (None: --hidden-size / "
                        "--num-attention-heads)")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="RMSNorm each query and key head before RoPE (Qwen3's q/k norm)")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="biases on the query, key and value projections only (Qwen2's)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = parser.add_argument_group("mixture of experts")
    g.add_argument("--moe-type", choices=MOE_TYPES, default="hypermoe")
    g.add_argument("--num-experts", type=int, nargs="+", default=8,
                   help="experts per MoE layer (Megatron-DeepSpeed's per-layer list is "
                        "accepted when every entry is the same)")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None,
                   help="each expert's hidden size (None: --ffn-hidden-size)")
    g.add_argument("--moe-layer-freq", type=moe_layer_freq_value, default=1,
                   help="which layers are MoE layers (the others dense, of --ffn-hidden-size): "
                        "N for layers 0, N, 2N, ...; or a list of 0/1 per layer, written as "
                        "Megatron's Python list expression, e.g. \"[0]+[1]*3\"")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="add a shared expert of this hidden size to every MoE layer, which "
                        "every token uses (DeepSeek, Qwen-MoE); its output is added to the "
                        "routed experts' (and to the HyperExpert's)")
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="multiply the shared expert's output by sigmoid(x . w), a learned "
                        "vector w (Qwen2-MoE's shared_expert_gate)")
    g.add_argument("--moe-router-topk", "--topk", type=int, default=1)
    g.add_argument("--moe-aux-loss-coeff", "--moe-loss-coeff", type=float, nargs="+",
                   default=None, help="load-balancing loss coefficient(s), one per "
                   "--moe-router-load-balancing-type (--moe-loss-coeff: Megatron-DeepSpeed's "
                   "name). Default 1e-2 (0 with sinkhorn)")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-router-pre-softmax", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="softmax over all experts before the top-k (the k weights are not "
                        "renormalised); --no-moe-router-pre-softmax: top-k, then softmax over "
                        "the k (megatron-core refuses it for top-1). Default: pre-softmax for "
                        "top-1 (Switch), post-softmax for top-k > 1")
    g.add_argument("--moe-router-renormalize", action="store_true",
                   help="divide the selected experts' weights by their sum: with pre-softmax "
                        "the gates of post-softmax, for any k; a top-1 gate is exactly 1 (the "
                        "router then learns from the load-balancing loss only), as in Mixtral "
                        "and the authors' GPT-2 runs")
    g.add_argument("--moe-token-dispatcher-type", choices=("alltoall", "allgather"),
                   default="alltoall")
    add_experts_args(g)
    g.add_argument("--expert-model-parallel-size", "--moe-expert-parallel-size", type=int,
                   default=1)
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="only the default (= --tensor-model-parallel-size) is supported")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norms, router and the HyperMoE path along the sequence over "
                        "the tensor-parallel ranks (megatron-core requires it for MoE with TP)")

    add_router_args(parser)
    add_pipeline_args(parser)

    g = parser.add_argument_group("HyperMoE (paper defaults)")
    add_hyper_size_args(g)
    g.add_argument("--hyper-expert-impl", choices=HYPER_EXPERT_IMPLS, default=None,
                   help="how the HyperExpert is computed (model/hyper_expert.py; default: "
                        f"{HYPER_FLAG_DEFAULTS['hyper_expert_impl']}; hypermoe only)")
    g.add_argument("--hyper-init", choices=HYPER_INITS, default=None,
                   help="the four weight heads: the paper's hyperfanin x 1e-3 (the HyperExpert "
                        "starts near 0), or N(0, --init-method-std) as the authors' GPT-2 runs "
                        f"actually started (default: {HYPER_FLAG_DEFAULTS['hyper_init']}; "
                        "hypermoe only)")
    g.add_argument("--hyper-lr-mult", type=hyper_lr_mult_value, default=None,
                   help="learning-rate multiplier for the hypernetwork's generating weights "
                        "(its fc and the four heads' weights): a number, or 1/d_g (each "
                        "generated entry sums d_g head weights, so their effective step is d_g "
                        f"times a static weight's). Default {HYPER_LR_MULT_DEFAULT} (the paper "
                        "trained with 1: docs/HYPERMOE_VS_MOE.md); hypermoe only")

    g = parser.add_argument_group("batch and optimisation")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="None: micro-batch x data-parallel size (no accumulation)")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-tokens", type=int, default=None,
                   help="alternative to --train-iters: iterations = tokens / (global batch x seq)")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="None: --train-iters")
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 training (GPU)")
    g.add_argument("--fp16", action="store_true", help="fp16 training with loss scaling (GPU)")
    g.add_argument("--max-consecutive-skipped-iters", type=int, default=10,
                   help="stop when this many steps in a row have a non-finite loss/gradient")
    g.add_argument("--inject-nan-loss-at", type=int, nargs="+", default=None,
                   help="fault injection: make the loss NaN at these iterations (tests the "
                        "skip logic)")

    add_lr_schedule_args(parser)

    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="PREFIX... or WEIGHT PREFIX WEIGHT PREFIX...")
    g.add_argument("--split", default=None,
                   help=f"train,valid,test weights (default: {DEFAULT_SPLIT}, Megatron's)")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    add_tokenizer_args(parser)
    add_megatron_flags(parser)
    add_recompute_args(parser)
    add_attention_args(parser)

    g = parser.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=None, help="DeepSpeed JSON config; must agree with the flags")
    g.add_argument("--zero-stage", type=int, default=1, choices=(1, 2, 3),
                   help="1 or 2 for MoE; stage 0 is not offered: its optimizer has no "
                        "inf/NaN step skipping")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher (it also sets LOCAL_RANK, which wins)")
    add_deepspeed_args(parser)
    add_distributed_args(parser)

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", action="store_true",
                   help="load weights only; start at iteration 0 with fresh optimizer")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="exit (after saving) once the iteration is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=int, default=None,
                   help="exit (after saving) once this many minutes have passed since start")
    add_checkpoint_file_args(parser)

    g = parser.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--eval-only", action="store_true", help="evaluate --load and exit")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None, help="JSON lines of every logged value")
    g.add_argument("--moe-per-layer-logging", action="store_true",
                   help="also log each MoE layer's aux losses (as <loss>_per_layer)")
    g.add_argument("--generate-tokens", type=int, default=0,
                   help="at the end, print a sample of this many tokens")
    g.add_argument("--generate-prompt", default="\n")
    g.add_argument("--manual-gc", action="store_true",
                   help="disable Python's automatic garbage collection; collect every "
                        "--manual-gc-interval iterations instead (all ranks at the same step)")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: iterations between collections (0: never)")
    add_logging_args(parser)
    show_every_default(parser)
    return parser


def show_every_default(parser: argparse.ArgumentParser) -> None:
    """--help prints "(default: ...)" only for flags with a help text: give every flag one."""
    for action in parser._actions:
        if action.help is None:
            action.help = "(default: %(default)s)"


DEFAULT_SPLIT = "969,30,1"
# Chosen by the issue-13 study (docs/HYPERMOE_VS_MOE.md): with it HyperMoE beat the MoE at every
# width and corpus tried; with the paper's 1 it lost at hidden 128 on Wikipedia.
HYPER_LR_MULT_DEFAULT = "1/d_g"

def moe_layer_freq_value(text: str):
    """--moe-layer-freq: an int, or Megatron's Python list expression of 0/1 ("[0]+[1]*3",
    "([1]*3+[0])*2"), read with lists, integers, + and * only (nothing is evaluated)."""
    text = text.strip()
    if "[" not in text:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a list "
                                             "expression like [0]+[1]*3") from None

    def value(node):
        if isinstance(node, ast.List):
            return [value(item) for item in node.elts]
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add) and type(left) is type(right):
                return left + right
            if isinstance(node.op, ast.Mult) and {type(left), type(right)} <= {list, int}:
                return left * right
        raise ValueError

    try:
        pattern = value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        pattern = None
    if not isinstance(pattern, list):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list expression of 0/1 made with "
                                         "[...], + and * (e.g. \"[0]+[1]*3\")")
    return pattern


def hyper_lr_mult_value(text: str):
    """A positive number, or the rule 1/d_g."""
    if text in HYPER_LR_MULT_RULES:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor one of "
                                         f"{', '.join(HYPER_LR_MULT_RULES)}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


# The --hyper-* flags (argparse dests, the config fields of the same names but --hyper-lr-mult)
# default to None, so that one given to a variant that does not read it is refused; these are the
# values a variant that reads them gets when they are not given.
HYPER_FLAG_DEFAULTS = {**{size.name: size.default for size in HYPER_SIZES},
                       "hyper_expert_impl": "auto", "hyper_init": "hyperfanin",
                       "hyper_lr_mult": HYPER_LR_MULT_DEFAULT}


def variants_reading(dest: str) -> tuple:
    """The --moe-type values whose run reads the --hyper-* flag ``dest``."""
    if dest == "hyper_lr_mult":
        return ("hypermoe",)
    return tuple(t for t in MOE_TYPES if dest in VARIANT_HYPER_FIELDS[t])


def add_hyper_size_args(group, default_from_model: bool = False) -> None:
    """The ``--hyper-*`` size flags, from :data:`HYPER_SIZES` (default None: the paper's value
    for the variants that read the flag, or the model's where one is converted)."""
    for size in HYPER_SIZES:
        default = "the model's" if default_from_model else f"{size.default}, the paper's"
        group.add_argument(size.flag, type=int, default=None,
                           help=f"{size.symbol}: {size.meaning} (default: {default}; "
                                f"{' and '.join(variants_reading(size.name))} only)")


def resolve_hyper_flags(args) -> None:
    """Refuse a --hyper-* flag the variant does not read (it would change nothing), give the
    ones it reads their defaults, and check the sizes."""
    for dest, default in HYPER_FLAG_DEFAULTS.items():
        flag = "--" + dest.replace("_", "-")
        value = getattr(args, dest)
        if args.moe_type not in variants_reading(dest):
            if value is not None:
                raise ArgumentError(f"{flag} applies to --moe-type "
                                    f"{' and '.join(variants_reading(dest))} only (this run is "
                                    f"{args.moe_type}): drop it")
            continue
        if value is None:
            setattr(args, dest, default)
        elif dest in HYPER_SIZE_NAMES and value < 1:
            raise ArgumentError(f"{flag} {value} must be a positive integer")
    if args.moe_type != "hypermoe":
        args.hyper_lr_mult = 1.0  # no hypernetwork: nothing is scaled


def parse_args(argv=None, world_size: int = 1) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    finalize_args(args, world_size)
    return args


def _check_tensor_parallel(args) -> None:
    tp = args.tensor_model_parallel_size
    if tp < 1:
        raise ArgumentError("--tensor-model-parallel-size must be at least 1")
    if args.expert_tensor_parallel_size not in (None, tp):
        raise ArgumentError(f"--expert-tensor-parallel-size {args.expert_tensor_parallel_size} "
                            f"differs from --tensor-model-parallel-size {tp}, which is not "
                            "supported: leave it unset")
    if tp == 1:
        args.sequence_parallel = False  # nothing to split over (as Megatron does)
        return
    if args.moe_type != "dense" and not args.sequence_parallel:
        raise ArgumentError("MoE layers with --tensor-model-parallel-size > 1 need "
                            "--sequence-parallel (a megatron-core requirement): add it")
    query_groups = args.num_query_groups or args.num_attention_heads
    for flag, value in (("--num-attention-heads", args.num_attention_heads),
                        ("--num-query-groups", query_groups),
                        ("--ffn-hidden-size", args.ffn_hidden_size),
                        ("--moe-ffn-hidden-size", args.moe_ffn_hidden_size),
                        ("--moe-shared-expert-intermediate-size",
                         args.moe_shared_expert_intermediate_size)):
        if value is not None and value % tp:
            raise ArgumentError(f"{flag} {value} is not divisible by "
                                f"--tensor-model-parallel-size {tp}")
    if args.sequence_parallel and args.seq_length % tp:
        raise ArgumentError(f"--seq-length {args.seq_length} is not divisible by "
                            f"--tensor-model-parallel-size {tp} (sequence parallelism splits "
                            "the sequence over the TP ranks)")


def _resolve_expert_count_and_width(args) -> None:
    """--num-experts as one number (Megatron-DeepSpeed passes a per-layer list); the experts'
    hidden size --moe-ffn-hidden-size and the dense layers' --ffn-hidden-size, each the other's
    default; where every layer is an MoE layer, the two are one width."""
    if isinstance(args.num_experts, (list, tuple)):
        if len(set(args.num_experts)) != 1:
            raise ArgumentError(f"--num-experts {' '.join(map(str, args.num_experts))}: a "
                                "different expert count per layer (pyramid MoE) is not "
                                "supported: give one number")
        args.num_experts = args.num_experts[0]
    if args.moe_type == "dense":
        return
    if args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = args.moe_ffn_hidden_size
    if all(moe_layer_pattern(args)) and args.ffn_hidden_size != args.moe_ffn_hidden_size:
        raise ArgumentError(f"--moe-ffn-hidden-size {args.moe_ffn_hidden_size} differs from "
                            f"--ffn-hidden-size {args.ffn_hidden_size}, which only dense layers "
                            "read (every layer is an MoE layer here): give one of them")


def _refuse_moe_flags_for_dense(args) -> None:
    """A dense run has no MoE layer: an MoE flag given a value would change nothing."""
    if args.moe_type != "dense":
        return
    defaults = default_args()
    for dest in (*MOE_FLAGS, "expert_model_parallel_size"):
        if getattr(args, dest) != getattr(defaults, dest):
            raise ArgumentError(f"--{dest.replace('_', '-')} applies to MoE layers (this run is "
                                "--moe-type dense): drop it")


def finalize_args(args, world_size: int) -> None:
    """Derived values and cross-flag checks (Megatron's validate_args)."""
    check_megatron_flags(args)
    _refuse_moe_flags_for_dense(args)
    _resolve_expert_count_and_width(args)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.group_query_attention and args.num_query_groups is None:
        args.num_query_groups = 1  # Megatron's default number of groups
    if args.manual_gc_interval < 0:
        raise ArgumentError("--manual-gc-interval must be >= 0")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.max_position_embeddings < args.seq_length:
        raise ArgumentError(f"--max-position-embeddings {args.max_position_embeddings} is below "
                            f"--seq-length {args.seq_length}: raise it or leave it unset")
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 are exclusive: pick one")
    for flag, value in (("--adam-beta1", args.adam_beta1), ("--adam-beta2", args.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ArgumentError(f"{flag} {value:g} must be in [0, 1)")
    if not args.adam_eps > 0.0:
        raise ArgumentError(f"--adam-eps {args.adam_eps:g} must be > 0")
    check_router_args(args)
    check_deepspeed_args(args)
    check_distributed_args(args)
    model_parallel = args.tensor_model_parallel_size * args.expert_model_parallel_size * \
        args.pipeline_model_parallel_size
    if world_size % args.tensor_model_parallel_size:
        raise ArgumentError(f"world size {world_size} is not divisible by "
                            f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    if args.moe_type != "dense" and args.num_experts % args.expert_model_parallel_size:
        raise ArgumentError(f"--num-experts {args.num_experts} is not divisible by "
                            f"--expert-model-parallel-size {args.expert_model_parallel_size}")
    if world_size % model_parallel:
        raise ArgumentError(f"world size {world_size} is not divisible by TP x EP x PP = "
                            f"{model_parallel}")
    resolve_hyper_flags(args)
    if args.zero_stage == 3 and args.moe_type != "dense":
        raise ArgumentError("ZeRO stage 3 does not support MoE layers (DeepSpeed partitions "
                            "expert parameters only with stages 1 and 2): use --zero-stage 2")
    _check_tensor_parallel(args)
    check_pipeline_args(args, world_size)
    check_recompute_args(args)
    args.world_size = world_size
    args.data_parallel_size = world_size // (args.tensor_model_parallel_size *
                                             args.pipeline_model_parallel_size)
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                            f"--micro-batch-size {args.micro_batch_size} x data-parallel size "
                            f"{args.data_parallel_size}")
    args.gradient_accumulation_steps = args.global_batch_size // per_step
    finalize_lr_schedule_args(args)
    if args.train_iters is None and args.train_tokens is None and not args.eval_only:
        raise ArgumentError("give --train-iters, --train-samples or --train-tokens")
    if args.train_iters is not None and args.train_tokens is not None:
        raise ArgumentError("--train-iters and --train-tokens are exclusive: pick one")
    if args.train_tokens is not None:
        args.train_iters = max(1, args.train_tokens // (args.global_batch_size * args.seq_length))
    if args.train_iters is None:
        args.train_iters = 0
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.eval_only and not args.load:
        raise ArgumentError("--eval-only needs --load CHECKPOINT_DIR")
    if not args.mock_data and not args.data_path:
        raise ArgumentError("no training data: pass --data-path PREFIX... or --mock-data")
    if args.mock_data:  # megatron-core's mock dataset reads neither (and splits 1,1,1)
        for flag, value in (("--data-path", args.data_path), ("--split", args.split)):
            if value is not None:
                raise ArgumentError(f"{flag} does nothing with --mock-data: drop one of them")
    if args.split is None:
        args.split = DEFAULT_SPLIT
    if args.tokenizer_type is None:
        if not args.mock_data:
            raise ArgumentError("--tokenizer-type is required with --data-path")
        args.tokenizer_type = "NullTokenizer"
        args.vocab_size = args.vocab_size or 1024
    if args.save_interval is not None and not args.save:
        raise ArgumentError("--save-interval needs --save DIR")
    check_checkpoint_file_args(args)
    for name in ("log_interval", "eval_iters", "max_consecutive_skipped_iters"):
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be at least 1")
    finalize_logging_args(args)


def run_config(args) -> RunConfig:
    """The run's frozen config for finalized flags (the DeepSpeed config resolved against a
    --deepspeed_config file here, once)."""
    return RunConfig.from_flags(vars(args), deepspeed_config=resolve_config(args))


def parse_run_config(argv=None, world_size: int = 1) -> RunConfig:
    """parse_args, then run_config."""
    return run_config(parse_args(argv, world_size))


def model_config(args) -> HyperMoEConfig:
    """The model config finalized flags describe."""
    return RunConfig.from_flags(vars(args)).model


def default_args() -> argparse.Namespace:
    """Every flag at its default, nothing parsed (finalize_args not applied)."""
    return build_parser().parse_args([])


def args_for_model(config: HyperMoEConfig, world_size: int, **flags) -> argparse.Namespace:
    """The flags of a run of the model ``config`` describes, plus ``flags`` by dest, validated
    like parsed ones. Used to record a model built from a config object (the Hugging Face
    importer) in a checkpoint the trainer can resume."""
    args = default_args()
    # the layout the config was built for (the model config holds megatron's copy of it)
    layout = {"tensor_model_parallel_size": config.tensor_model_parallel_size,
              "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
              "sequence_parallel": config.sequence_parallel}
    if config.moe_type != "dense":
        layout["expert_model_parallel_size"] = config.expert_model_parallel_size
    for flag, value in {**model_flags(config), **layout, **flags}.items():
        if not hasattr(args, flag):
            raise ValueError(f"no flag {flag!r}")
        setattr(args, flag, value)
    finalize_args(args, world_size)
    return args


def run_config_for_model(config: HyperMoEConfig, world_size: int, **flags) -> RunConfig:
    """The config of a run of the model ``config`` describes (args_for_model's flags)."""
    return run_config(args_for_model(config, world_size, **flags))


# Flags that set no config field: the boundary turns each into others (an alias, a count in
# other units, a key of the DeepSpeed config) or checks it against them. (The Megatron-LM flags
# this architecture fixes or refuses are cli/megatron_flag_tables.py's.)
CONSUMED_AT_BOUNDARY = {
    "group_query_attention": "num_query_groups (1 unless given)",
    "train_tokens": "train_iters",
    "expert_tensor_parallel_size": "checked: only tensor_model_parallel_size's value",
    "local_rank": "the LOCAL_RANK variable (pretrain_gpt_hypermoe.py)",
    "deepspeed_config": "deepspeed.config_json, merged with the flags and checked",
    "overlap_grad_reduce": "deepspeed.config_json (zero_optimization.overlap_comm)",
    "grad_reduce_in_bf16": "deepspeed.config_json (communication and accumulation dtype)",
    "accumulate_allreduce_grads_in_fp32": "deepspeed.config_json (fp32 accumulation)",
    **{name: "deepspeed.config_json (fp16 loss scaling)" for name in (
        "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")},
    **{name: "recompute_granularity/method/num_layers/modules (Megatron-LM's and "
             "Megatron-DeepSpeed's older names)" for name in (
        "recompute_activations", "checkpoint_activations", "checkpoint_num_layers",
        "moe_layer_recompute", "deepspeed_activation_checkpointing")},
    "moe_train_capacity_factor": "moe_expert_capacity_factor (Megatron-DeepSpeed's name)",
    "disable_moe_token_dropping": "moe_expert_capacity_factor None (Megatron-DeepSpeed's)",
}
# Config fields the boundary derives rather than reads from one flag (Megatron's args has them
# too, and a checkpoint records them).
DERIVED_FIELDS = {
    "data_parallel_size": "world size / (TP x PP)",
    "gradient_accumulation_steps": "global batch / (micro-batch x data-parallel size)",
    "padded_vocab_size": "the tokenizer's vocabulary, padded (RunConfig.with_vocab)",
}

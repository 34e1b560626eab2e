"""The Megatron-LM / Megatron-DeepSpeed flag tables (data; ``megatron_flags.py`` declares and
checks them, and prints docs/coming-from-megatron.md from them): the scripts we mirror
(``SOURCES``), the flags the architecture fixes (``FIXED``) or does not offer (``REFUSED``),
and remarks on "same" flags whose use differs in a detail (``SAME_FLAG_REMARKS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

# The scripts and tables a Megatron user brings (flag names only). Launcher flags
# (--nproc_per_node, --num_gpus, ...) and the eval-harness script's flags belong to other
# programs and are left out, as is the README's "--grad-reduce-in-fp32 false", a field of
# Megatron-FSDP's mixed-precision config (the flag is --grad-reduce-in-bf16).
SOURCES = {
    "Megatron-LM examples/mixtral/train_mixtral_8x7b_distributed.sh": (
        "--use-mcore-models", "--disable-bias-linear", "--seq-length",
        "--max-position-embeddings", "--num-layers", "--hidden-size", "--ffn-hidden-size",
        "--num-attention-heads", "--init-method-std", "--attention-dropout", "--hidden-dropout",
        "--normalization", "--position-embedding-type", "--swiglu",
        "--untie-embeddings-and-output-weights", "--group-query-attention",
        "--num-query-groups", "--no-masked-softmax-fusion", "--no-position-embedding",
        "--rotary-base", "--num-experts", "--moe-router-topk",
        "--moe-router-load-balancing-type", "--moe-aux-loss-coeff", "--moe-grouped-gemm",
        "--moe-token-dispatcher-type", "--overlap-param-gather", "--overlap-grad-reduce",
        "--tokenizer-type", "--tokenizer-model", "--data-path", "--split", "--micro-batch-size",
        "--global-batch-size", "--lr", "--train-iters", "--lr-decay-iters", "--lr-decay-style",
        "--min-lr", "--weight-decay", "--lr-warmup-iters", "--clip-grad", "--bf16",
        "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
        "--expert-model-parallel-size", "--use-distributed-optimizer", "--sequence-parallel",
        "--log-interval", "--save-interval", "--eval-interval", "--eval-iters", "--save",
        "--load", "--tensorboard-dir", "--no-load-optim", "--no-load-rng", "--wandb-project",
        "--wandb-exp-name"),
    "Megatron-LM megatron/core/transformer/moe/README.md": (
        "--num-experts", "--expert-model-parallel-size", "--expert-tensor-parallel-size",
        "--moe-layer-freq", "--moe-ffn-hidden-size", "--moe-router-load-balancing-type",
        "--moe-router-topk", "--moe-router-pre-softmax", "--moe-router-num-groups",
        "--moe-router-group-topk", "--moe-router-score-function",
        "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
        "--moe-router-dtype", "--moe-router-fusion", "--moe-router-force-load-balancing",
        "--moe-router-padding-for-fp8", "--moe-aux-loss-coeff", "--moe-z-loss-coeff",
        "--moe-input-jitter-eps", "--moe-token-dispatcher-type", "--moe-enable-deepep",
        "--moe-flex-dispatcher-backend", "--moe-per-layer-logging", "--moe-expert-capacity-factor",
        "--moe-pad-expert-input-to-capacity", "--moe-token-drop-policy", "--moe-layer-recompute",
        "--moe-permute-fusion", "--moe-shared-expert-intermediate-size",
        "--moe-shared-expert-overlap", "--moe-use-upcycling", "--moe-upcycling-granularity",
        "--moe-grouped-gemm", "--overlap-moe-expert-parallel-comm", "--delay-wgrad-compute",
        "--mtp-num-layers", "--recompute-granularity", "--recompute-modules",
        "--fine-grained-activation-offloading", "--offload-modules", "--fp8", "--fp8-format",
        "--fp8-recipe", "--fp8-param-gather", "--reuse-grad-buf-for-mxfp8-param-ag",
        "--cuda-graph-impl", "--cuda-graph-scope", "--cuda-graph-modules",
        "--inference-cuda-graph-scope", "--external-cuda-graph", "--te-rng-track",
        "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "--ckpt-format",
        "--auto-detect-ckpt-format", "--context-parallel-size", "--tp-comm-overlap",
        "--overlap-p2p-comm", "--num-layers-per-virtual-pipeline-stage",
        "--pipeline-model-parallel-layout", "--use-distributed-optimizer",
        "--num-distributed-optimizer-instances", "--overlap-grad-reduce",
        "--overlap-param-gather", "--use-precision-aware-optimizer", "--exp-avg-dtype",
        "--exp-avg-sq-dtype", "--optimizer-cpu-offload", "--manual-gc", "--manual-gc-interval",
        "--fake-init-process-group"),
    "Megatron-DeepSpeed examples_deepspeed/MoE/ds_pretrain_gpt_*.sh": (
        "--override-opt_param-scheduler", "--adam-beta1", "--adam-beta2",
        "--tensor-model-parallel-size", "--moe-expert-parallel-size", "--num-experts",
        "--moe-loss-coeff", "--moe-train-capacity-factor", "--moe-eval-capacity-factor",
        "--moe-min-capacity", "--init-method-std", "--lr-decay-tokens", "--lr-warmup-tokens",
        "--micro-batch-size", "--exit-duration-in-mins", "--global-batch-size", "--num-layers",
        "--hidden-size", "--num-attention-heads", "--seq-length", "--max-position-embeddings",
        "--train-tokens", "--train-iters", "--train-samples", "--lr", "--min-lr",
        "--lr-decay-style", "--split", "--log-interval", "--eval-interval", "--eval-iters",
        "--save-interval", "--weight-decay", "--clip-grad", "--hysteresis", "--num-workers",
        "--fp16", "--load", "--save", "--tensorboard-queue-size", "--log-timers-to-tensorboard",
        "--log-batch-size-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--log-optimizer-states-to-tensorboard", "--tensorboard-dir", "--checkpoint-activations",
        "--create-moe-param-group", "--disable-moe-token-dropping", "--vocab-file",
        "--merge-file", "--data-path", "--data-impl", "--deepspeed", "--deepspeed_config",
        "--zero-stage", "--pipeline-model-parallel-size", "--no-pipeline-parallel",
        "--deepspeed-activation-checkpointing", "--mlp-type", "--no-load-optim",
        "--no-load-rng", "--rampup-batch-size", "--mos", "--kd", "--kd-beta-ce",
        "--num-layers-teacher", "--hidden-size-teacher", "--num-attention-heads-teacher",
        "--num-experts-teacher", "--load-teacher", "--tokenizer-type"),
    # What Qwen2-MoE / Qwen3-MoE recipes for Megatron-LM add to the Mixtral one (the flags
    # that describe those architectures in megatron/training/arguments.py)
    "Megatron-LM arguments.py, Qwen2-MoE / Qwen3-MoE architecture flags": (
        "--kv-channels", "--qk-layernorm", "--add-qkv-bias", "--moe-layer-freq",
        "--moe-ffn-hidden-size", "--moe-shared-expert-intermediate-size",
        "--moe-shared-expert-gate"),
}

SWITCH = "switch"  # a flag without a value (store_true)


@dataclass(frozen=True)
class FixedFlag:
    flag: str
    accepted: object  # SWITCH, or the one value the architecture has
    what_it_is: str
    type: type = str


@dataclass(frozen=True)
class RefusedFlag:
    flag: str
    why: str
    nargs: Optional[str] = None  # SWITCH, None (one value) or "+"


FIXED: Tuple[FixedFlag, ...] = (
    FixedFlag("--use-mcore-models", SWITCH, "the model is always megatron-core's GPTModel"),
    FixedFlag("--disable-bias-linear", SWITCH, "linear layers never have biases"),
    FixedFlag("--normalization", "RMSNorm", "every norm is RMSNorm"),
    FixedFlag("--position-embedding-type", "rope", "positions are always rotary (RoPE)"),
    FixedFlag("--swiglu", SWITCH, "every MLP and expert is SwiGLU"),
    FixedFlag("--untie-embeddings-and-output-weights", SWITCH,
              "input embedding and output layer are always separate"),
    FixedFlag("--no-masked-softmax-fusion", SWITCH, "attention's softmax is never fused"),
    FixedFlag("--no-position-embedding", SWITCH, "there is no learned position embedding"),
    FixedFlag("--transformer-impl", "local",
              "megatron-core's local (torch) layers; Transformer Engine layers are not used"),
    FixedFlag("--context-parallel-size", 1, "no context parallelism", int),
    FixedFlag("--num-distributed-optimizer-instances", 1,
              "one ZeRO optimizer over all data-parallel ranks", int),
    FixedFlag("--no-pipeline-parallel", SWITCH, "the model is never a DeepSpeed PipelineModule "
              "(pipeline parallelism is megatron-core's schedule: --pipeline-model-parallel-size)"),
    FixedFlag("--deepspeed", SWITCH, "the engine is always DeepSpeed"),
    FixedFlag("--create-moe-param-group", SWITCH,
              "experts always have optimizer groups of their own"),
    FixedFlag("--data-impl", "mmap", "datasets are megatron-core's mmap indexed datasets"),
    FixedFlag("--mlp-type", "standard", "standard MoE (no residual PR-MoE)"),
)

REFUSED: Tuple[RefusedFlag, ...] = (
    RefusedFlag("--moe-shared-expert-overlap", "overlapping the shared expert with the "
                "dispatch needs CUDA streams and is not offered: drop it (the shared expert "
                "runs before the dispatch)", SWITCH),
    RefusedFlag("--moe-use-upcycling", "upcycle a Hugging Face model (dense, or an MoE into "
                "HyperMoE) with tools/convert_hf_to_checkpoint.py --upcycle, or an moe checkpoint "
                "into HyperMoE with --finetune --moe-type hypermoe, instead", SWITCH),
    RefusedFlag("--moe-upcycling-granularity", "fine-grained upcycling is not offered; "
                "tools/convert_hf_to_checkpoint.py --upcycle copies the dense MLP into each "
                "expert"),
    RefusedFlag("--moe-enable-deepep", "DeepEP (the flex dispatcher) needs CUDA and DeepEP; use "
                "--moe-token-dispatcher-type alltoall", SWITCH),
    RefusedFlag("--moe-flex-dispatcher-backend", "the flex dispatcher is not supported; use "
                "--moe-token-dispatcher-type alltoall"),
    RefusedFlag("--moe-permute-fusion", "needs Transformer Engine's fused permutation", SWITCH),
    RefusedFlag("--moe-router-fusion", "needs Transformer Engine >= 2.7 (fused top-k and "
                "aux-loss kernels), which this build does not use", SWITCH),
    RefusedFlag("--moe-router-padding-for-fp8", "FP8 needs Transformer Engine", SWITCH),
    RefusedFlag("--overlap-moe-expert-parallel-comm", "needs the flex/TE MoE path", SWITCH),
    RefusedFlag("--delay-wgrad-compute", "needs Transformer Engine", SWITCH),
    RefusedFlag("--mtp-num-layers", "multi-token prediction is not supported"),
    RefusedFlag("--fine-grained-activation-offloading", "activation offloading is not "
                "supported: use --recompute-granularity", SWITCH),
    RefusedFlag("--offload-modules", "activation offloading is not supported: use "
                "--recompute-granularity", "+"),
    RefusedFlag("--fp8", "FP8 needs Transformer Engine: use --bf16"),
    RefusedFlag("--fp8-format", "FP8 needs Transformer Engine: use --bf16"),
    RefusedFlag("--fp8-recipe", "FP8 needs Transformer Engine: use --bf16"),
    RefusedFlag("--fp8-param-gather", "FP8 needs Transformer Engine: use --bf16", SWITCH),
    RefusedFlag("--reuse-grad-buf-for-mxfp8-param-ag", "MXFP8 needs Transformer Engine", SWITCH),
    RefusedFlag("--cuda-graph-impl", "CUDA graphs are not supported"),
    RefusedFlag("--cuda-graph-scope", "CUDA graphs are not supported", "+"),
    RefusedFlag("--cuda-graph-modules", "CUDA graphs are not supported", "+"),
    RefusedFlag("--inference-cuda-graph-scope", "CUDA graphs are not supported"),
    RefusedFlag("--external-cuda-graph", "CUDA graphs are not supported", SWITCH),
    RefusedFlag("--te-rng-track", "needs Transformer Engine", SWITCH),
    RefusedFlag("--cross-entropy-loss-fusion", "the fused cross entropy needs Transformer "
                "Engine or Apex; the loss is megatron-core's unfused one", SWITCH),
    RefusedFlag("--cross-entropy-fusion-impl", "the fused cross entropy needs Transformer "
                "Engine or Apex; the loss is megatron-core's unfused one"),
    RefusedFlag("--ckpt-format", "checkpoints are DeepSpeed's layout with per-rank experts "
                "(docs/checkpoints.md); convert with tools/ instead"),
    RefusedFlag("--auto-detect-ckpt-format", "checkpoints have one format (DeepSpeed's)",
                SWITCH),
    RefusedFlag("--tp-comm-overlap", "needs Transformer Engine's userbuffers", SWITCH),
    RefusedFlag("--overlap-p2p-comm", "needs the interleaved schedule, which is not implemented "
                "(megatron refuses it with the non-interleaved 1F1B schedule used here)", SWITCH),
    RefusedFlag("--num-layers-per-virtual-pipeline-stage", "the interleaved (virtual-pipeline) "
                "schedule is not implemented; stages run megatron-core's non-interleaved 1F1B "
                "schedule: drop it"),
    RefusedFlag("--pipeline-model-parallel-layout", "stages hold equal shares of the layers "
                "(--num-layers divisible by --pipeline-model-parallel-size); no custom layout"),
    RefusedFlag("--use-precision-aware-optimizer", "optimizer states are always fp32 (AdamW "
                "under DeepSpeed ZeRO)", SWITCH),
    RefusedFlag("--exp-avg-dtype", "optimizer states are always fp32"),
    RefusedFlag("--exp-avg-sq-dtype", "optimizer states are always fp32"),
    RefusedFlag("--fake-init-process-group", "a debugging aid of Megatron-LM's; not offered",
                SWITCH),
    RefusedFlag("--log-optimizer-states-to-tensorboard", "ZeRO keeps Adam's moments as padded "
                "flat per-rank partitions, which this trainer does not reduce into norms",
                SWITCH),
    RefusedFlag("--rampup-batch-size", "batch-size ramp-up is not supported: start at the "
                "final --global-batch-size", "+"),
    RefusedFlag("--mos", "mixture-of-students distillation is not supported", SWITCH),
    RefusedFlag("--kd", "knowledge distillation is not supported", SWITCH),
    RefusedFlag("--kd-beta-ce", "knowledge distillation is not supported"),
    RefusedFlag("--num-layers-teacher", "knowledge distillation is not supported"),
    RefusedFlag("--hidden-size-teacher", "knowledge distillation is not supported"),
    RefusedFlag("--num-attention-heads-teacher", "knowledge distillation is not supported"),
    RefusedFlag("--num-experts-teacher", "knowledge distillation is not supported", "+"),
    RefusedFlag("--load-teacher", "knowledge distillation is not supported"),
)


# Remarks on "same" flags whose use here differs in a detail a Megatron user should know.
SAME_FLAG_REMARKS = {
    "--num-experts": "default 8 (Megatron: none, a dense model; here --moe-type dense)",
    "--moe-router-topk": "default 1 (Megatron: 2)",
    "--moe-aux-loss-coeff": "default 1e-2 (Megatron: 0)",
    "--moe-router-pre-softmax": "default: pre-softmax for top-1, post-softmax for top-k > 1",
    "--lr-decay-style": "default cosine (Megatron: linear)",
    "--bf16": "gradients accumulate and reduce in fp32 (--grad-reduce-in-bf16: bf16)",
    "--fp16": "DeepSpeed's loss scaler; needs an accelerator with fp16 (not the CPU)",
    "--use-distributed-optimizer": "DeepSpeed ZeRO (stage 1 is Megatron's distributed "
                                   "optimizer); logged",
    "--overlap-grad-reduce": "zero_optimization.overlap_comm",
    "--overlap-param-gather": "accepted and logged: ZeRO 1/2 all-gathers right after the step",
    "--optimizer-cpu-offload": "ZeRO-Offload with DeepSpeed's CPUAdam",
    "--recompute-modules": "core_attn, moe (HyperMoE's side path included), mlp (dense)",
    "--moe-grouped-gemm": "default on (--no-moe-grouped-gemm: SequentialMLP); torch._grouped_mm, "
                          "no grouped_gemm package or Transformer Engine; checkpoints keep one "
                          "weight pair per expert",
    "--moe-layer-recompute": "= --recompute-granularity selective, modules + moe",
    "--checkpoint-activations": "= --recompute-granularity full --recompute-method uniform",
    "--deepspeed-activation-checkpointing": "megatron-core's layer checkpointing; needs a "
                                            "recompute flag",
    "--moe-train-capacity-factor": "= --moe-expert-capacity-factor",
    "--moe-eval-capacity-factor": "DeepSpeed's meaning (while not training)",
    "--moe-min-capacity": "DeepSpeed's meaning, through megatron-core's capacity formula",
    "--disable-moe-token-dropping": "no capacity factor (the default)",
    "--lr-decay-tokens": "tokens / --seq-length samples",
    "--lr-warmup-tokens": "tokens / --seq-length samples",
    "--hysteresis": "fp16.hysteresis of DeepSpeed's loss scaler",
    "--zero-stage": "1 or 2 with MoE",
    "--deepspeed_config": "every key honoured, checked against the flags or refused",
    "--num-query-groups": "also honoured without --group-query-attention",
    "--group-query-attention": "without --num-query-groups: one group (Megatron's default)",
    "--sequence-parallel": "required for MoE with TP > 1; a no-op at TP 1",
    "--pipeline-model-parallel-size": "megatron-core's 1F1B schedule; equal layers per stage, "
                                      "ZeRO stage 1, the hypernetwork replicated per stage",
    "--expert-tensor-parallel-size": "equal to --tensor-model-parallel-size only",
    "--tokenizer-type": "SentencePiece (incl. Llama2Tokenizer), HuggingFace, GPT2BPE, Null",
    "--moe-layer-freq": "a list expression is read with [...], + and * only (Megatron "
                        "evaluates it as Python); dense layers are --ffn-hidden-size wide",
    "--moe-shared-expert-intermediate-size": "added to the routed experts' and the "
                                             "HyperExpert's outputs",
    "--qk-layernorm": "RMSNorm per head (Qwen3's; OLMoE's whole-projection norm is not this)",
}

"""A Megatron-LM user's launch script runs with only the entry point swapped, and no flag is
parsed and then ignored (megatron_hypermoe/cli/megatron_flags.py)."""

import json
import subprocess
import sys

import pytest

from megatron_hypermoe.cli.arguments import build_parser, parse_args
from megatron_hypermoe.cli.megatron_flag_tables import FIXED, REFUSED
from megatron_hypermoe.cli.megatron_flags import flag_table, markdown_table
from megatron_hypermoe.errors import ArgumentError
from tests.support.processes import REPO_ROOT, environment, pretrain
from tests.support.run_outputs import read_metrics
from tests.support.tiny_model import TINY_MODEL

RUNNABLE = ["--mock-data", "--train-iters", "1"]


def test_every_flag_of_the_megatron_scripts_is_same_fixed_or_refused():
    missing = [flag for flag, kind, _ in flag_table(build_parser()) if kind == "MISSING"]
    assert not missing, f"declare these in megatron_flags.py or implement them: {missing}"


def test_docs_page_holds_the_generated_flag_table():
    page = (REPO_ROOT / "docs" / "coming-from-megatron.md").read_text()
    assert markdown_table(build_parser()) in page, \
        "regenerate it: python tools/megatron_flag_table.py"


@pytest.mark.parametrize("flags, message", [
    (["--normalization", "LayerNorm"], "--normalization LayerNorm is not supported"),
    (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine"),
    (["--context-parallel-size", "2"], "--context-parallel-size 2 is not supported"),
    (["--position-embedding-type", "learned_absolute"], "--position-embedding-type"),
    (["--fp8", "hybrid"], "--fp8 is not supported: FP8 needs Transformer Engine"),
    (["--num-experts", "64", "64", "128"], "pyramid MoE"),
    (["--moe-ffn-hidden-size", "96", "--ffn-hidden-size", "128"], "give one of them"),
])
def test_values_the_architecture_cannot_honour_stop_naming_the_flag(flags, message):
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(")):
        parse_args(flags + RUNNABLE)


def test_fixed_flags_at_their_value_and_aliases_parse_to_our_meaning():
    fixed = []
    for flag in FIXED:
        fixed += [flag.flag] if flag.accepted == "switch" else [flag.flag, str(flag.accepted)]
    args = parse_args(fixed + RUNNABLE + [
        "--num-experts", "4", "4", "--moe-expert-parallel-size", "1", "--topk", "2",
        "--group-query-attention", "--moe-ffn-hidden-size", "96"])
    assert (args.num_experts, args.expert_model_parallel_size, args.moe_router_topk) == (4, 1, 2)
    assert args.num_query_groups == 1  # Megatron's default with --group-query-attention
    assert args.ffn_hidden_size == 96
    assert {r.flag for r in REFUSED}.isdisjoint(fixed)


def test_help_shows_every_default():
    options = build_parser().format_help().split("\noptions:", 1)[1]
    for flag, default in (("--hidden-size", 256), ("--rotary-base", 10000.0),
                          ("--normalization", "RMSNorm"), ("--moe-type", "hypermoe"),
                          ("--norm-epsilon", 1e-05), ("--swiglu", False)):
        entry = " ".join(options.split("\n  " + flag, 1)[1].split("\n  --", 1)[0].split())
        assert entry.endswith(f"(default: {default})"), (flag, entry)


# The Mixtral example ------------------------------------------------------------------------------
def mixtral_example(tokenizer_model, checkpoint_dir):
    """Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh flags, in its order,
    shrunk in sizes only, on mock data. Changes: --pipeline-model-parallel-size 4 -> 1 (the
    2-layer model on 2 processes with EP=2; pipeline parallelism, which also refuses the
    script's --overlap-grad-reduce, is tested in test_pipeline_parallel.py), and mock data
    instead of the script's --data-path and --split."""
    return [
        "--use-mcore-models", "--disable-bias-linear", "--seq-length", "32",
        "--max-position-embeddings", "128", "--num-layers", "2", "--hidden-size", "64",
        "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--init-method-std", "0.01",
        "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization", "RMSNorm",
        "--position-embedding-type", "rope", "--swiglu", "--untie-embeddings-and-output-weights",
        "--group-query-attention", "--num-query-groups", "2", "--no-masked-softmax-fusion",
        "--no-position-embedding", "--rotary-base", "1000000",
        # MOE_ARGS
        "--num-experts", "4", "--moe-router-topk", "2",
        "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2",
        "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall", "--overlap-param-gather",
        "--overlap-grad-reduce",
        # DATA_ARGS (mock data instead of --data-path and the --split 99990,8,2 that goes
        # with it: megatron-core's mock dataset reads neither, so --split is refused there)
        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", tokenizer_model,
        "--mock-data",
        # TRAINING_ARGS
        "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-4",
        "--train-iters", "3", "--lr-decay-iters", "2", "--lr-decay-style", "cosine",
        "--min-lr", "1.0e-5", "--weight-decay", "0.1", "--lr-warmup-iters", "1",
        "--clip-grad", "1.0", "--bf16",
        # MODEL_PARALLEL_ARGS
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        "--expert-model-parallel-size", "2", "--use-distributed-optimizer",
        "--sequence-parallel",
        # LOGGING_ARGS
        "--log-interval", "1", "--save-interval", "2", "--eval-interval", "2",
        "--eval-iters", "1", "--save", checkpoint_dir, "--load", checkpoint_dir,
        "--tensorboard-dir", f"{checkpoint_dir}/tensorboard", "--no-load-optim",
        "--no-load-rng", "--wandb-project", "Mixtral", "--wandb-exp-name", "Mixtral_8x7B",
    ]


def tokenizer_model_of(dataset):
    return dataset[dataset.index("--tokenizer-model") + 1]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("moe_type", [None, "moe"], ids=["as_is_hypermoe", "moe"])
def test_megatron_mixtral_example_runs_on_two_processes_with_ep2(moe_type, dataset, tmp_path,
                                                                 monkeypatch):
    import importlib.util

    if importlib.util.find_spec("wandb") is None:  # (a container without it: the pins have it)
        pytest.skip("Megatron-LM's example passes --wandb-project, which needs wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    flags = mixtral_example(tokenizer_model_of(dataset), str(tmp_path / "ck"))
    flags += ["--metrics-file", str(tmp_path / "metrics.jsonl")]
    if moe_type:
        flags += ["--moe-type", moe_type]
    output = pretrain(*flags, nproc=2, timeout=300)
    assert f"model: {moe_type or 'hypermoe'}," in output
    assert "EP 2" in output and "iteration        3/       3" in output
    assert "experts: GroupedGemmExperts (grouped GEMM)" in output
    train, valid = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in train] == [1, 2, 3] and valid
    assert (tmp_path / "ck" / "iter_0000002").is_dir()


# No parsed flag is ignored ------------------------------------------------------------------------
@pytest.mark.slow
def test_no_parsed_flag_is_left_unread(dataset, tmp_path):
    """Every flag the parser accepts is read by validation, the trainer, the model or the
    checkpoints in one of three runs (train, resume and fine-tune, evaluate only)."""
    checkpoint = str(tmp_path / "ck")
    train = TINY_MODEL + dataset + ["--train-iters", "2", "--save", checkpoint,
                                    "--generate-tokens", "4"]
    runs = [train,
            TINY_MODEL + dataset + ["--train-iters", "3", "--load", checkpoint,
                                    "--no-load-optim", "--no-load-rng"],
            TINY_MODEL + dataset + ["--train-iters", "1", "--load", checkpoint, "--finetune"],
            TINY_MODEL + dataset + ["--eval-only", "--load", checkpoint]]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "workers" / "read_flags.py"),
         str(tmp_path / "unread.json"), str(tmp_path / "runs.json")],
        env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    unread = json.loads((tmp_path / "unread.json").read_text())
    assert unread == [], f"parsed but never read (implement, validate or remove): {unread}"


def test_deprecated_and_deepspeed_recompute_flags_mean_megatron_cores_settings():
    args = parse_args(RUNNABLE + ["--moe-layer-recompute"])
    assert (args.recompute_granularity, args.recompute_modules) == ("selective",
                                                                    ["core_attn", "moe"])
    args = parse_args(RUNNABLE + ["--checkpoint-activations",
                                  "--deepspeed-activation-checkpointing"])
    assert (args.recompute_granularity, args.recompute_method) == ("full", "uniform")
    with pytest.raises(ArgumentError, match="recomputes nothing by itself"):
        parse_args(RUNNABLE + ["--deepspeed-activation-checkpointing"])


def test_megatrons_loss_scale_flags_set_deepspeeds_fp16_scaler(tmp_path):
    from megatron_hypermoe.cli.deepspeed_config import resolve_config
    from megatron_hypermoe.errors import DeepSpeedConfigError

    args = parse_args(RUNNABLE + ["--fp16", "--hysteresis", "4", "--initial-loss-scale", "4096",
                                  "--loss-scale-window", "500", "--min-loss-scale", "0.5"])
    fp16 = resolve_config(args)["fp16"]
    assert (fp16["hysteresis"], fp16["initial_scale_power"], fp16["loss_scale_window"],
            fp16["min_loss_scale"], fp16["loss_scale"]) == (4, 12, 500, 0.5, 0)
    with pytest.raises(ArgumentError, match="--initial-loss-scale 3000 must be a power of 2"):
        parse_args(RUNNABLE + ["--fp16", "--initial-loss-scale", "3000"])
    with pytest.raises(ArgumentError, match="--hysteresis applies to --fp16 loss scaling only"):
        parse_args(RUNNABLE + ["--bf16", "--hysteresis", "2"])
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"fp16": {"enabled": True, "hysteresis": 2}}))
    args.deepspeed_config = str(config)
    with pytest.raises(DeepSpeedConfigError, match="fp16.hysteresis = 2 but the flags say 4"):
        resolve_config(args)

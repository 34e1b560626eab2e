"""pretrain_gpt_hypermoe.py's flags, answered in-process: derived values, one-line refusals of
inconsistent or unsupported combinations, the DeepSpeed config check, and the flag <-> model
config table."""

import json
import re

import pytest

from megatron_hypermoe.cli.arguments import parse_args
from megatron_hypermoe.errors import (
    ArgumentError,
    CheckpointError,
    ConfigError,
    DeepSpeedConfigError,
)
from megatron_hypermoe.model.config import HYPER_SIZE_NAMES, HYPER_SIZES, VARIANT_HYPER_FIELDS
from tests.support.tiny_model import TINY_MODEL, tiny_run


def test_load_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    from megatron_hypermoe.training.checkpoint.files import read_latest

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(
            "is not a checkpoint directory (no 'latest' file)")):
        read_latest(str(tmp_path / "empty"))


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON (line 1, column 2)"),
    ('{"train_micro_batch_size_per_gpu": 3}', "says --micro-batch-size = 3 but the flags say 2"),
    ('{"optimizer": {"type": "Adam"}}',
     "'optimizer' is not supported here: the trainer builds AdamW"),
])
def test_bad_deepspeed_config_is_refused(content, message, tmp_path):
    from megatron_hypermoe.cli.deepspeed_config import resolve_config

    config = tmp_path / "ds.json"
    config.write_text(content)
    args = parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1", "--deepspeed",
                       "--deepspeed_config", str(config)])
    with pytest.raises(DeepSpeedConfigError, match=re.escape(message)) as error:
        resolve_config(args)
    assert "\n" not in str(error.value)


def test_matching_deepspeed_config_file_is_used(tmp_path):
    """The file's extra settings reach the config DeepSpeed is built with; the flags fill in
    the rest."""
    from megatron_hypermoe.cli.deepspeed_config import resolve_config

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2,
                                  "zero_optimization": {"stage": 2,
                                                        "reduce_bucket_size": 500000}}))
    args = parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1", "--zero-stage", "2",
                       "--deepspeed", "--deepspeed_config", str(config)])
    resolved = resolve_config(args)
    assert resolved["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 500000}
    assert resolved["train_batch_size"] == 2 and resolved["gradient_clipping"] == 1.0


@pytest.mark.parametrize("flags,message", [
    (["--global-batch-size", "3"], "--global-batch-size 3 is not divisible by --micro-batch-size"),
    (["--zero-stage", "3"], "ZeRO stage 3 does not support MoE layers"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 are exclusive"),
    (["--adam-beta1", "1.8"], "--adam-beta1 1.8 must be in [0, 1)"),
    (["--adam-eps", "0"], "--adam-eps 0 must be > 0"),
    (["--seq-length", "64", "--max-position-embeddings", "32"],
     "--max-position-embeddings 32 is below --seq-length 64"),
])
def test_inconsistent_flags_give_one_line_errors(flags, message):
    with pytest.raises(ArgumentError, match=re.escape(message)) as error:
        parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1", *flags])
    assert "\n" not in str(error.value)


def test_a_model_config_the_flags_cannot_build_is_a_one_line_error():
    from megatron_hypermoe.cli.arguments import model_config

    args = parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1",
                       "--moe-router-topk", "5"])
    with pytest.raises(ConfigError, match="moe_router_topk=5 must be between 1 and "
                                          "num_moe_experts=4"):
        model_config(args)


@pytest.mark.parametrize("moe_type", ["hypermoe", "moe", "dense"])
def test_args_for_model_records_the_flags_model_config_reads(moe_type):
    """The importer records a model built from a config as flags: model_config must give the
    config back, and a run with the same flags must pass the checkpoint's shape check."""
    from megatron_hypermoe.cli.arguments import args_for_model, run_config
    from megatron_hypermoe.training.checkpoint.compatibility import checkpoint_shape
    from megatron_hypermoe.training.config import MODEL_FLAGS, MOE_FLAGS

    args = parse_args([*tiny_run(moe_type), "--mock-data", "--train-iters", "1"])
    run = run_config(args).with_vocab(100)
    config = run.model
    recorded = run_config(args_for_model(config, 1, seq_length=args.seq_length, seed=args.seed,
                                         mock_data=True, train_iters=1,
                                         micro_batch_size=2)).with_vocab(100)
    table = {**MODEL_FLAGS, **(MOE_FLAGS if moe_type != "dense" else {})}
    for flag, field in table.items():
        assert getattr(recorded.model, field) == getattr(config, field), flag
    assert recorded.parallel == run.parallel
    # (a dense model has no expert fields: the recorded flags keep their defaults there)
    shape, recorded_shape = checkpoint_shape(run.to_flags()), checkpoint_shape(recorded.to_flags())
    relevant = [f for f in shape if moe_type != "dense" or
                f not in MOE_FLAGS and f != "moe_router_topk"]
    assert {f: recorded_shape[f] for f in relevant} == {f: shape[f] for f in relevant}


@pytest.mark.parametrize("flags,world_size,message", [
    (["--tensor-model-parallel-size", "2"], 2,
     "MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"], 2,
     "--seq-length 33 is not divisible by --tensor-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "3", "--sequence-parallel"], 3,
     "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--expert-model-parallel-size", "2"], 2, "world size 2 is not divisible by TP x EP x PP = 4"),
    (["--expert-model-parallel-size", "3"], 3, "--num-experts 4 is not divisible by"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "3", "--zero-stage", "1"], 2,
     "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "2"], 2,
     "--zero-stage 2 does not work with pipeline parallelism"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "1", "--overlap-grad-reduce"], 2,
     "--overlap-grad-reduce overlaps ZeRO's reduction"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "1",
      "--expert-model-parallel-size", "2"], 2, "world size 2 is not divisible by TP x EP x PP"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "1",
      "--num-layers-per-virtual-pipeline-stage", "1"], 2, "interleaved"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--expert-tensor-parallel-size", "1"], 2, "--expert-tensor-parallel-size 1 differs"),
])
def test_unsupported_parallel_layouts_are_refused(flags, world_size, message):
    with pytest.raises(ArgumentError, match=re.escape(message)):
        parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1", *flags], world_size)


# Options to reproduce the authors' runs ---------------------------------------------------------
def test_hyper_lr_mult_takes_a_number_or_the_one_over_d_g_rule():
    from megatron_hypermoe.cli.arguments import run_config

    def hyper_lr_mult(args):  # resolved once, into the optimizer's config
        return run_config(args).optimizer.hyper_lr_mult

    base = [*TINY_MODEL, "--mock-data", "--train-iters", "1"]
    assert hyper_lr_mult(parse_args(base + ["--hyper-lr-mult", "1"])) == 1.0  # the paper's
    assert hyper_lr_mult(parse_args(base + ["--hyper-lr-mult", "0.25"])) == 0.25
    args = parse_args(base + ["--hyper-lr-mult", "1/d_g"])
    assert args.hyper_lr_mult == "1/d_g" and hyper_lr_mult(args) == 1 / 16  # d_g of TINY
    default = parse_args(base)  # the study's choice for hypermoe; nothing to scale elsewhere
    assert default.hyper_lr_mult == "1/d_g" and hyper_lr_mult(default) == 1 / 16
    tiny_moe = [*tiny_run("moe"), "--mock-data", "--train-iters", "1"]
    assert parse_args(tiny_moe).hyper_lr_mult == 1.0
    for bad in ("fast", "-1"):
        with pytest.raises(SystemExit):
            parse_args(base + ["--hyper-lr-mult", bad])


HYPER_FLAG_VALUES = {"hyper_init": "hyperfanin", "hyper_lr_mult": "1", "hyper_expert_impl": "auto",
                     **{size.name: str(size.default) for size in HYPER_SIZES}}


@pytest.mark.parametrize("dest", sorted(HYPER_FLAG_VALUES))
@pytest.mark.parametrize("moe_type", ["moe", "moe_adapter", "dense"])
def test_hyper_flags_are_refused_for_variants_that_do_not_read_them(dest, moe_type):
    """Even at its default value: given, it says the run differs from what it is."""
    flags = [*tiny_run(moe_type), "--mock-data", "--train-iters", "1",
             "--" + dest.replace("_", "-"), HYPER_FLAG_VALUES[dest]]
    if moe_type == "moe_adapter" and dest == "hyper_adapter_dim":  # the adapter's r
        assert parse_args(flags).hyper_adapter_dim == int(HYPER_FLAG_VALUES[dest])
        return
    readers = "hypermoe and moe_adapter" if dest == "hyper_adapter_dim" else "hypermoe"
    with pytest.raises(ArgumentError, match=re.escape(
            f"--{dest.replace('_', '-')} applies to --moe-type {readers} only (this run is "
            f"{moe_type}): drop it")):
        parse_args(flags)


@pytest.mark.parametrize("moe_type", ["hypermoe", "moe_adapter"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_hyper_sizes_must_be_positive(moe_type, value):
    for size in HYPER_SIZES:
        if size.name not in VARIANT_HYPER_FIELDS[moe_type]:
            continue
        with pytest.raises(ArgumentError, match=re.escape(
                f"{size.flag} {value} must be a positive integer")):
            parse_args([*tiny_run(moe_type), "--mock-data", "--train-iters", "1", size.flag,
                        value])


def test_a_moe_checkpoint_resumes_without_hyper_flags_and_ignores_old_recorded_ones():
    """The shape check compares the HyperMoE sizes only for the variants that read them: a
    `moe` checkpoint recorded before this rule (with --hyper-hidden-size -5 among its args)
    resumes with no --hyper-* flag, a hypermoe one still needs its sizes."""
    from megatron_hypermoe.cli.arguments import parse_run_config
    from megatron_hypermoe.training.checkpoint.compatibility import (
        check_model_shape,
        checkpoint_shape,
    )

    moe = parse_run_config([*tiny_run("moe"), "--mock-data", "--train-iters", "1"]).with_vocab(100)
    assert not any(name in checkpoint_shape(moe.to_flags()) for name in HYPER_SIZE_NAMES)
    old_moe = {**checkpoint_shape(moe.to_flags()), "hyper_hidden_size": -5, "hyper_adapter_dim": 64}
    check_model_shape({"model": old_moe}, moe)
    hyper = parse_run_config([*TINY_MODEL, "--mock-data", "--train-iters", "1"]).with_vocab(100)
    saved = {**checkpoint_shape(hyper.to_flags()), "hyper_hidden_size": 32}
    with pytest.raises(CheckpointError, match="checkpoint has hyper_hidden_size=32 but the flags "
                                              "give 16: pass --hyper-hidden-size 32"):
        check_model_shape({"model": saved}, hyper)


@pytest.mark.parametrize("flags,topk,pre_softmax,renormalize", [
    ([], 2, False, False), ([], 1, True, False),
    (["--moe-router-pre-softmax"], 2, True, False),
    (["--moe-router-renormalize"], 1, True, True),
])
def test_routing_flags_reach_the_config(flags, topk, pre_softmax, renormalize):
    from megatron_hypermoe.cli.arguments import model_config

    config = model_config(parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1",
                                      "--moe-router-topk", str(topk), *flags]))
    assert (config.moe_router_pre_softmax, config.moe_router_renormalize) == \
        (pre_softmax, renormalize)


def test_post_softmax_top1_is_a_one_line_error_pointing_at_renormalize():
    from megatron_hypermoe.cli.arguments import model_config

    args = parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1",
                       "--moe-router-topk", "1", "--no-moe-router-pre-softmax"])
    with pytest.raises(ConfigError, match="use --moe-router-renormalize") as error:
        model_config(args)
    assert "\n" not in str(error.value)


def test_optimizer_groups_give_exactly_the_generating_weights_their_multiplier(
        megatron_single_process):
    """The hypernetwork's fc and four head weights, and nothing else, get lr_mult; at 1 there
    is no extra group (checkpoints keep their optimizer layout)."""
    from megatron_hypermoe.training.setup import optimizer_param_groups
    from tests.support.tiny_model import tiny_model

    model, _ = tiny_model("hypermoe")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer_param_groups(model, 0.1, expert_parallel=False, hyper_lr_mult=1 / 16)
    hyper = [g for g in groups if g.get("lr_mult") is not None]
    assert len(hyper) == 1 and hyper[0]["lr_mult"] == 1 / 16 and hyper[0]["weight_decay"] == 0.1
    assert sorted(names[id(p)] for p in hyper[0]["params"]) == [
        f"hypernetwork.{w}.weight" for w in
        ("down_bias", "down_weight", "fc", "up_bias", "up_weight")]
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert [g["name"] for g in optimizer_param_groups(model, 0.1, False, 1.0)] == \
        ["decay", "no_decay"]
    moe, _ = tiny_model("moe")
    assert len(optimizer_param_groups(moe, 0.1, False, 0.5)) == 2


def test_resuming_with_other_optimizer_groups_is_refused_in_one_line():
    from megatron_hypermoe.cli.arguments import parse_run_config
    from megatron_hypermoe.training.checkpoint.compatibility import check_optimizer_groups

    run = parse_run_config([*TINY_MODEL, "--mock-data", "--train-iters", "1",
                            "--hyper-lr-mult", "1"])
    check_optimizer_groups({"args": {"hyper_lr_mult": 1.0}}, run)
    check_optimizer_groups({"args": {}}, run)  # written before the flag existed: it trained with 1
    scaled = parse_run_config([*TINY_MODEL, "--mock-data", "--train-iters", "1",
                               "--hyper-lr-mult", "0.5"])
    check_optimizer_groups({"args": {"hyper_lr_mult": "1/d_g", "hyper_hidden_size": 16}},
                           scaled)
    with pytest.raises(CheckpointError, match="trained with --hyper-lr-mult 1, this run has 0.5"
                                              ".*pass --hyper-lr-mult 1 to keep.*--no-load-optim"):
        check_optimizer_groups({"args": {"hyper_lr_mult": 1.0}}, scaled)
    default = parse_run_config([*TINY_MODEL, "--mock-data", "--train-iters", "1"])
    with pytest.raises(CheckpointError, match="trained with --hyper-lr-mult 1, this run has "):
        check_optimizer_groups({"args": {}}, default)  # the default changed since: said, not lost
    moe = parse_run_config([*tiny_run("moe"), "--mock-data", "--train-iters", "1"])
    check_optimizer_groups({"args": {"moe_type": "moe"}}, moe)


# Router and capacity flags ------------------------------------------------------------------------
BASE = [*TINY_MODEL, "--mock-data", "--train-iters", "1"]


@pytest.mark.parametrize("flags,fields", [
    ([], dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
              moe_expert_capacity_factor=None, moe_router_score_function="softmax")),
    (["--moe-router-load-balancing-type", "seq_aux_loss", "--moe-loss-coeff", "0.1"],
     dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.1)),
    (["--moe-router-load-balancing-type", "aux_loss", "global_aux_loss",
      "--moe-aux-loss-coeff", "0.01", "0.001"],
     dict(moe_router_load_balancing_type=["aux_loss", "global_aux_loss"],
          moe_aux_loss_coeff=[0.01, 0.001])),
    (["--moe-router-load-balancing-type", "sinkhorn"],
     dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0)),
    (["--moe-expert-capacity-factor", "1.5", "--moe-pad-expert-input-to-capacity",
      "--moe-token-drop-policy", "position"],
     dict(moe_expert_capacity_factor=1.5, moe_pad_expert_input_to_capacity=True,
          moe_token_drop_policy="position", moe_min_capacity=None)),
    (["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
      "--moe-router-bias-update-rate", "0.01", "--moe-router-topk-scaling-factor", "2",
      "--moe-router-dtype", "fp64", "--moe-input-jitter-eps", "0.01",
      "--moe-router-num-groups", "2", "--moe-router-group-topk", "1",
      "--moe-router-force-load-balancing"],
     dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
          moe_router_bias_update_rate=0.01, moe_router_topk_scaling_factor=2.0,
          moe_router_dtype="fp64", moe_input_jitter_eps=0.01, moe_router_num_groups=2,
          moe_router_group_topk=1, moe_router_force_load_balancing=True)),
    # Megatron-DeepSpeed's names, with its defaults for the eval factor and the minimum
    (["--moe-train-capacity-factor", "1.25"],
     dict(moe_expert_capacity_factor=1.25, moe_eval_capacity_factor=1.0, moe_min_capacity=4)),
    (["--moe-train-capacity-factor", "1", "--moe-eval-capacity-factor", "2",
      "--moe-min-capacity", "0"],
     dict(moe_expert_capacity_factor=1.0, moe_eval_capacity_factor=2.0, moe_min_capacity=0)),
    (["--moe-train-capacity-factor", "1", "--moe-eval-capacity-factor", "2",
      "--moe-min-capacity", "4", "--disable-moe-token-dropping"],
     dict(moe_expert_capacity_factor=None, moe_eval_capacity_factor=None,
          moe_min_capacity=None)),
])
def test_router_flags_reach_the_model_config(flags, fields):
    from megatron_hypermoe.cli.arguments import model_config

    config = model_config(parse_args(BASE + flags))
    assert {name: getattr(config, name) for name in fields} == fields


@pytest.mark.parametrize("flags,message", [
    (["--moe-pad-expert-input-to-capacity"], "--moe-pad-expert-input-to-capacity needs "
                                             "--moe-expert-capacity-factor"),
    (["--moe-router-load-balancing-type", "sinkhorn", "--moe-expert-capacity-factor", "1"],
     "--moe-expert-capacity-factor works with"),
    (["--moe-router-load-balancing-type", "sinkhorn", "--moe-aux-loss-coeff", "0.01"],
     "sinkhorn routing takes no aux loss"),
    (["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss"],
     "give --moe-aux-loss-coeff one coefficient each"),
    (["--moe-router-enable-expert-bias"], "needs --moe-router-score-function sigmoid"),
    (["--moe-router-group-topk", "1"], "--moe-router-group-topk needs --moe-router-num-groups"),
    (["--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], "must divide"),
    (["--moe-eval-capacity-factor", "1"], "--moe-eval-capacity-factor needs a training "
                                          "capacity"),
    (["--moe-expert-capacity-factor", "1", "--disable-moe-token-dropping"], "contradicts"),
    (["--moe-expert-capacity-factor", "1", "--moe-train-capacity-factor", "2"],
     "are the same setting"),
    (["--moe-expert-capacity-factor", "1", "--moe-pad-expert-input-to-capacity",
      "--moe-min-capacity", "4"], "--moe-min-capacity does not combine"),
    (["--moe-router-fusion"], "needs Transformer Engine"),
])
def test_router_flag_combinations_megatron_refuses_are_one_line_errors(flags, message):
    with pytest.raises(ArgumentError, match=re.escape(message)) as error:
        parse_args(BASE + flags)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("flags", [["--moe-expert-capacity-factor", "1"], ["--num-experts", "4"],
                                   ["--moe-router-topk", "2"], ["--no-moe-grouped-gemm"],
                                   ["--moe-ffn-hidden-size", "64"]])
def test_moe_flags_are_refused_for_a_dense_run(flags):
    with pytest.raises(ArgumentError, match=re.escape(
            f"{flags[0].replace('--no-', '--')} applies to MoE layers (this run is --moe-type "
            "dense): drop it")):
        parse_args([*tiny_run("dense"), "--mock-data", "--train-iters", "1", *flags])


def test_a_checkpoint_from_before_the_router_flags_loads_with_the_routing_it_trained_with():
    """Recorded args without the router flags (an older checkpoint): the model config is the
    one it was built with then (aux_loss hard-coded, no capacity, softmax)."""
    from megatron_hypermoe.cli.arguments import run_config
    from megatron_hypermoe.training.config import MOE_FLAGS, RunConfig

    router_flags = [flag for flag in MOE_FLAGS if flag.startswith(("moe_router_", "moe_expert_",
                                                                 "moe_pad_", "moe_token_drop",
                                                                 "moe_input_jitter"))
                    and flag not in ("moe_router_topk", "moe_router_pre_softmax",
                                     "moe_router_renormalize")]
    recorded = run_config(parse_args(BASE)).with_vocab(100).to_flags()
    old = {k: v for k, v in recorded.items() if k not in router_flags}
    config = RunConfig.from_flags(old).model
    assert (config.moe_router_load_balancing_type, config.moe_aux_loss_coeff,
            config.moe_expert_capacity_factor, config.moe_router_score_function,
            config.moe_router_enable_expert_bias) == ("aux_loss", 1e-2, None, "softmax", False)


def test_distributed_timeout_is_megatrons_minutes_or_the_environments_seconds(monkeypatch):
    from datetime import timedelta

    from megatron_hypermoe.parallel.distributed import TIMEOUT_SECONDS_VARIABLE, distributed_timeout

    monkeypatch.delenv(TIMEOUT_SECONDS_VARIABLE, raising=False)
    base = [*TINY_MODEL, "--mock-data", "--train-iters", "1"]
    assert parse_args(base).distributed_timeout_minutes == 10  # Megatron-LM's default
    args = parse_args([*base, "--distributed-timeout-minutes", "3"])
    assert distributed_timeout(args.distributed_timeout_minutes) == timedelta(minutes=3)
    with pytest.raises(ArgumentError, match="--distributed-timeout-minutes 0 must be at least 1"):
        parse_args([*base, "--distributed-timeout-minutes", "0"])
    monkeypatch.setenv(TIMEOUT_SECONDS_VARIABLE, "2.5")
    assert distributed_timeout(3) == timedelta(seconds=2.5)
    monkeypatch.setenv(TIMEOUT_SECONDS_VARIABLE, "soon")
    with pytest.raises(ArgumentError, match=f"{TIMEOUT_SECONDS_VARIABLE}='soon' must be a "
                                            "positive number of seconds"):
        parse_args(base)

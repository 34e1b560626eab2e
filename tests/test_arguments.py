"""pretrain_gpt_hypermoe.py's flags, answered in-process: derived values, one-line refusals of
inconsistent or unsupported combinations, the DeepSpeed config check, and the flag <-> model
config table."""

import json
import re

import pytest

from megatron_hypermoe.errors import (ArgumentError, CheckpointError, ConfigError,
                                      DeepSpeedConfigError)
from megatron_hypermoe.training.arguments import parse_args
from tests.helpers import TINY_MODEL


def test_load_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    from megatron_hypermoe.training.checkpointing import read_latest

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(
            "is not a checkpoint directory (no 'latest' file)")):
        read_latest(str(tmp_path / "empty"))


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON (line 1, column 2)"),
    ('{"train_micro_batch_size_per_gpu": 3}', "says --micro-batch-size = 3 but the flags say 2"),
    ('{"optimizer": {"type": "Adam"}}', "sets an optimizer/scheduler"),
])
def test_bad_deepspeed_config_is_refused(content, message, tmp_path):
    from megatron_hypermoe.training.ds_config import resolve_config

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
    from megatron_hypermoe.training.ds_config import resolve_config

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
    (["--moe-type", "moe", "--zero-stage", "3"], "ZeRO stage 3 does not support MoE layers"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 are exclusive"),
])
def test_inconsistent_flags_give_one_line_errors(flags, message):
    with pytest.raises(ArgumentError, match=re.escape(message)) as error:
        parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1", *flags])
    assert "\n" not in str(error.value)


def test_a_model_config_the_flags_cannot_build_is_a_one_line_error():
    from megatron_hypermoe.training.arguments import model_config

    args = parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1",
                       "--moe-router-topk", "5"])
    with pytest.raises(ConfigError, match="moe_router_topk=5 must be between 1 and "
                                          "num_moe_experts=4"):
        model_config(args)


@pytest.mark.parametrize("moe_type", ["hypermoe", "moe", "dense"])
def test_args_for_model_records_the_flags_model_config_reads(moe_type):
    """The importer records a model built from a config as flags: model_config must give the
    config back, and a run with the same flags must pass the checkpoint's shape check."""
    from megatron_hypermoe.training.arguments import (MODEL_CONFIG_FLAGS, MOE_CONFIG_FLAGS,
                                                      args_for_model, model_config)
    from megatron_hypermoe.training.checkpointing import checkpoint_shape

    args = parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1", "--moe-type", moe_type])
    args.padded_vocab_size = 128
    config = model_config(args)
    recorded = args_for_model(config, 1, seq_length=args.seq_length, seed=args.seed,
                              mock_data=True, train_iters=1, micro_batch_size=2)
    recorded.padded_vocab_size = 128
    table = {**MODEL_CONFIG_FLAGS, **(MOE_CONFIG_FLAGS if moe_type != "dense" else {})}
    again = model_config(recorded)
    for flag, field in table.items():
        assert getattr(again, field) == getattr(config, field), flag
    # (a dense model has no expert fields: the recorded flags keep their defaults there)
    relevant = [f for f in checkpoint_shape(args) if moe_type != "dense" or
                f not in MOE_CONFIG_FLAGS and f != "moe_router_topk"]
    assert {f: checkpoint_shape(recorded)[f] for f in relevant} == \
        {f: checkpoint_shape(args)[f] for f in relevant}


@pytest.mark.parametrize("flags,world_size,message", [
    (["--tensor-model-parallel-size", "2"], 2,
     "MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"], 2,
     "--seq-length 33 is not divisible by --tensor-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "3", "--sequence-parallel"], 3,
     "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--expert-model-parallel-size", "2"], 2, "world size 2 is not divisible by TP x EP = 4"),
    (["--expert-model-parallel-size", "3"], 3, "--num-experts 4 is not divisible by"),
    (["--pipeline-model-parallel-size", "2"], 2, "pipeline parallelism is not supported"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--expert-tensor-parallel-size", "1"], 2, "--expert-tensor-parallel-size 1 differs"),
])
def test_unsupported_parallel_layouts_are_refused(flags, world_size, message):
    with pytest.raises(ArgumentError, match=re.escape(message)):
        parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1", *flags], world_size)

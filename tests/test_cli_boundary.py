"""The command-line boundary (megatron_hypermoe/cli/): every flag is parsed, checked and turned
into the frozen run config there, and nothing below it reads flags. One flag <-> field map
(training/config.py FLAG_FIELDS) covers every flag; the recorded form round-trips; --help
shows every default."""

import ast
import dataclasses

import pytest

from megatron_hypermoe.cli.arguments import (
    CONSUMED_AT_BOUNDARY,
    DERIVED_FIELDS,
    build_parser,
    default_args,
    parse_run_config,
)
from megatron_hypermoe.cli.megatron_flag_tables import FIXED, REFUSED
from megatron_hypermoe.training.config import (
    FLAG_FIELDS,
    MODEL_FLAGS,
    MOE_FLAGS,
    SECTIONS,
    VALUES_BEFORE_FLAG,
    RunConfig,
)
from tests.support.processes import REPO_ROOT
from tests.support.tiny_model import tiny_run

PACKAGE = REPO_ROOT / "megatron_hypermoe"
BOUNDARY = PACKAGE / "cli"


def below_the_boundary():
    return sorted(path for path in PACKAGE.rglob("*.py") if BOUNDARY not in path.parents)


def test_no_module_below_the_boundary_imports_argparse_the_cli_or_takes_args():
    problems = []
    for path in below_the_boundary():
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(REPO_ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                names = []
            for name in names:
                if name == "argparse" or name.startswith("megatron_hypermoe.cli"):
                    problems.append(f"{where}:{node.lineno} imports {name}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                arguments = node.args
                for argument in [*arguments.posonlyargs, *arguments.args,
                                 *arguments.kwonlyargs]:
                    if argument.arg == "args":
                        problems.append(f"{where}:{node.lineno} takes args")
    assert len(below_the_boundary()) > 50  # (the walk found the package)
    assert problems == []


def megatron_table_dests():
    return {entry.flag.lstrip("-").replace("-", "_") for entry in (*FIXED, *REFUSED)}


def test_every_flag_sets_one_config_field_or_is_consumed_at_the_boundary():
    dests = {action.dest for action in build_parser()._actions if action.dest != "help"}
    unaccounted = dests - set(FLAG_FIELDS) - set(CONSUMED_AT_BOUNDARY) - megatron_table_dests()
    assert unaccounted == set(), "add them to training/config.py or cli/arguments.py"
    assert set(CONSUMED_AT_BOUNDARY) <= dests and not set(CONSUMED_AT_BOUNDARY) & set(FLAG_FIELDS)
    fields_without_flag = set(FLAG_FIELDS) - dests
    assert fields_without_flag == set(DERIVED_FIELDS)
    targets = list(FLAG_FIELDS.values())
    assert len(targets) == len(set(targets)), "two flags set one field"


def test_every_flag_shows_its_default_in_help():
    parser = build_parser()
    formatter = parser._get_formatter()
    missing = [action.option_strings[0] for action in parser._actions
               if action.dest != "help" and
               "(default: " not in formatter._expand_help(action)]
    assert missing == []
    shown = {action.dest: formatter._expand_help(action) for action in parser._actions}
    # (the flags added last, which once showed none)
    assert "(default: 10)" in shown["log_interval"] and "(default: None)" in shown["save"]
    assert "(default: 10)" in " ".join(parser.format_help().split())


def test_section_defaults_are_the_flags_defaults():
    """A recorded flag set lacking a newer flag takes the field's default: it must be the flag's
    (or the value trained with before the flag existed, VALUES_BEFORE_FLAG)."""
    defaults = vars(default_args())
    for flag, (section, field) in FLAG_FIELDS.items():
        if section == "model" or flag not in defaults or flag in VALUES_BEFORE_FLAG:
            continue
        default = {f.name: f.default for f in dataclasses.fields(SECTIONS[section])}[field]
        assert default == defaults[flag], flag
    # ... and a model flag missing from the recorded ones takes the model config's default,
    # which must be the flag's default too
    from megatron_hypermoe.cli.arguments import parse_args

    flags = vars(parse_args(["--mock-data", "--train-iters", "1"]))
    full = RunConfig.from_flags(flags).model
    first_recorded = ("moe_type", "num_layers", "hidden_size", "num_attention_heads",
                      "num_experts", "moe_router_topk")  # every checkpoint has these
    core = RunConfig.from_flags({flag: flags[flag] for flag in first_recorded}).model
    for flag, field in {**MODEL_FLAGS, **MOE_FLAGS}.items():
        assert getattr(core, field) == getattr(full, field), flag


@pytest.mark.parametrize("flags", [
    [*tiny_run("hypermoe"), "--hyper-lr-mult", "1/d_g"],
    [*tiny_run("moe"), "--moe-router-topk", "1", "--moe-router-renormalize"],
    [*tiny_run("moe_adapter"), "--save", "ckpt", "--log-interval", "3"],
    [*tiny_run("dense"), "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "2"],
], ids=["hypermoe", "moe", "moe_adapter", "dense"])
def test_the_recorded_flags_give_the_same_config_back(flags):
    """What a checkpoint records (to_flags) is the config: from_flags gives every section and
    every model field back, and records the same flags again."""
    run = parse_run_config([*flags, "--mock-data", "--train-iters", "4"], world_size=2)
    run = run.with_vocab(100)
    again = RunConfig.from_flags(run.to_flags())
    for section in SECTIONS:
        if section != "deepspeed":  # (resolved from a file at the boundary, not recorded)
            assert getattr(again, section) == getattr(run, section), section
    table = {**MODEL_FLAGS, **(MOE_FLAGS if run.moe_type != "dense" else {})}
    for flag, field in table.items():
        assert getattr(again.model, field) == getattr(run.model, field), flag
    assert again.to_flags() == run.to_flags()
    assert run.parallel.dp == 2 and run.embedding.padded_vocab_size == 128


def test_hyper_lr_mult_is_resolved_once_to_a_float():
    run = parse_run_config([*tiny_run("hypermoe"), "--mock-data", "--train-iters", "1"])
    assert run.optimizer.hyper_lr_mult == 1 / run.model.hyper_hidden_size
    recorded = run.to_flags()["hyper_lr_mult"]
    assert isinstance(recorded, float)
    # a checkpoint written before the value was resolved recorded the rule: read the same
    assert RunConfig.from_flags({**run.to_flags(), "hyper_lr_mult": "1/d_g"}).optimizer == \
        run.optimizer


def test_configs_are_frozen():
    run = parse_run_config([*tiny_run("moe"), "--mock-data", "--train-iters", "1"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.training.train_iters = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.parallel.tp = 2


def test_a_model_config_built_for_a_layout_records_that_layout():
    """The HF importer builds its model config for the converter's --tensor/--expert-model-
    parallel-size: the run recorded for it has that layout, not the flags' defaults."""
    from megatron_hypermoe.cli.arguments import run_config_for_model
    from tests.support.tiny_model import tiny_config

    config = tiny_config(tensor_model_parallel_size=2, sequence_parallel=True,
                         expert_model_parallel_size=2)
    run = run_config_for_model(config, 4, mock_data=True, train_iters=1)
    assert (run.parallel.tp, run.parallel.ep, run.parallel.dp) == (2, 2, 2)
    assert run.parallel.sequence_parallel and run.model.tensor_model_parallel_size == 2


def test_a_config_read_back_from_recorded_flags_builds_no_engine():
    """A checkpoint's recorded flags carry no DeepSpeed config (it is resolved against a file at
    the boundary): an engine from it would silently take DeepSpeed's defaults, so it refuses."""
    run = parse_run_config([*tiny_run("moe"), "--mock-data", "--train-iters", "1"])
    assert run.deepspeed.engine_config()["train_micro_batch_size_per_gpu"] == 2
    with pytest.raises(ValueError, match="never resolved"):
        RunConfig.from_flags(run.to_flags()).deepspeed.engine_config()


def test_checkpoints_recorded_before_the_config_still_pass_the_shape_check():
    """Before the run config, a checkpoint recorded every parser value: a dense run's MoE
    defaults (num_experts 8, ...), and --num-query-groups / --kv-channels as given (4 heads and
    64 / 4 channels, or None). Both mean the same model as today's record."""
    from megatron_hypermoe.errors import CheckpointError
    from megatron_hypermoe.training.checkpoint.compatibility import (
        check_model_shape,
        checkpoint_shape,
    )

    dense = parse_run_config([*tiny_run("dense"), "--mock-data", "--train-iters", "1"])
    dense = dense.with_vocab(100)
    old = {**checkpoint_shape(dense.to_flags()), "num_experts": 8, "moe_router_topk": 1,
           "moe_layer_freq": 1, "moe_shared_expert_gate": False}
    check_model_shape({"model": old}, dense)
    hyper = parse_run_config([*tiny_run("hypermoe"), "--mock-data", "--train-iters", "1"])
    hyper = hyper.with_vocab(100)
    explicit = {**checkpoint_shape(hyper.to_flags()), "num_query_groups": 4, "kv_channels": 16}
    check_model_shape({"model": explicit}, hyper)
    with pytest.raises(CheckpointError, match="num_query_groups=2"):
        check_model_shape({"model": {**explicit, "num_query_groups": 2}}, hyper)

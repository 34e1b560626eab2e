"""No flag is accepted and then ignored, for any variant: changing a flag that the trainer accepts
must change the run it describes. "The run" is what can be computed without training: the model
(every weight at initialisation, and the config it was built from), the optimizer's parameter
groups and settings, the learning-rate and weight-decay schedule over the run's steps, the
DeepSpeed config, and the dataset (megatron-core's dataset config and sample counts, which fix
the data order). A flag whose effect shows only while training (logging, checkpoints, stopping,
generation) is listed in RUN_TIME_FLAGS with the test that shows its effect.

A refused value also counts: the flag is not silently ignored. Reading a flag, which the older
test (tests/test_megatron_flags.py, tests/workers/read_flags.py) counts, does not: before issue 28,
--hyper-hidden-size was read by validation and the checkpoint's shape check of a `moe` run and
changed nothing in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re

import pytest
import torch

from megatron_hypermoe.cli.arguments import build_parser, parse_args, run_config
from megatron_hypermoe.cli.megatron_flag_tables import FIXED
from megatron_hypermoe.errors import UserError
from megatron_hypermoe.model.config import MOE_TYPES
from tests.support.processes import REPO_ROOT
from tests.support.tiny_model import tiny_run

pytestmark = pytest.mark.usefixtures("megatron_single_process")

BASE = ["--mock-data", "--train-iters", "8", "--lr-warmup-iters", "2", "--eval-interval", "4",
        "--eval-iters", "1", "--global-batch-size", "4"]

# Flags whose effect shows only in a training run, with a test that runs them and shows it (the
# last test below checks that each named test exists and passes the flag).
RUN_TIME_FLAGS = {
    "log_interval": "test_tensorboard_interval_log_switches_and_wandb_offline",
    "tensorboard_dir": "test_single_process_run_writes_documented_metrics",
    "tensorboard_log_interval": "test_tensorboard_interval_log_switches_and_wandb_offline",
    "log_batch_size_to_tensorboard": "test_log_switches_choose_what_console_and_tensorboard_show",
    "log_timers_to_tensorboard": "test_log_switches_choose_what_console_and_tensorboard_show",
    "log_validation_ppl_to_tensorboard":
        "test_log_switches_choose_what_console_and_tensorboard_show",
    "log_throughput": "test_log_switches_choose_what_console_and_tensorboard_show",
    "metrics_file": "test_single_process_run_writes_documented_metrics",
    "moe_per_layer_logging": "test_single_process_run_writes_documented_metrics",
    "wandb_project": "test_tensorboard_interval_log_switches_and_wandb_offline",
    "wandb_exp_name": "test_tensorboard_interval_log_switches_and_wandb_offline",
    "wandb_save_dir": "test_tensorboard_interval_log_switches_and_wandb_offline",
    "save": "test_kill_9_while_writing_a_checkpoint_resumes_from_the_previous_one_exactly",
    "save_interval": "test_kill_9_while_writing_a_checkpoint_resumes_from_the_previous_one_exactly",
    "save_retain": "test_ckpt_step_resumes_the_previous_checkpoint_exactly_and_resaves_over_a",
    "load": "test_kill_9_while_writing_a_checkpoint_resumes_from_the_previous_one_exactly",
    "ckpt_step": "test_a_resume_restores_the_rng_unless_no_load_rng",
    "no_load_optim": "test_resuming_with_other_optimizer_groups_is_refused_in_one_line",
    "no_load_rng": "test_a_resume_restores_the_rng_unless_no_load_rng",
    "finetune": "test_eval_only_and_finetune",
    "exit_interval": "test_a_full_disk_during_a_save_stops_with_one_line_and_keeps_the_previous",
    "exit_duration_in_mins": "test_exit_duration_in_mins_stops_once_the_time_is_up",
    "eval_only": "test_eval_only_and_finetune",
    "generate_tokens": "test_pipeline_checkpoint_resumes_exactly_here_and_in_one_process",
    "generate_prompt": "test_single_process_run_writes_documented_metrics",
    "max_consecutive_skipped_iters": "test_nan_loss_skips_the_step_and_too_many_stop_the_run",
    "inject_nan_loss_at": "test_nan_loss_skips_the_step_and_too_many_stop_the_run",
    "distributed_timeout_minutes":
        "test_distributed_timeout_is_megatrons_minutes_or_the_environments_seconds",
    "data_cache_path": "test_deepspeed_launchers_as_two_nodes_train_as_one_process_and_resume",
}
# Flags that change how fast a run goes, never what it computes (their contract is that the
# results stay the same).
PERFORMANCE_ONLY = {
    "num_workers": "data-loader worker processes; the batches are the sampler's",
    "manual_gc": "Python's garbage collector run by hand (Megatron's)",
    "manual_gc_interval": "how often --manual-gc collects",
    "tensorboard_queue_size": "events TensorBoard buffers before it writes",
}

# Megatron switches that state what this trainer always does (Megatron's FIXED flags in
# cli/megatron_flags.py are the same kind, accepted at that one value only): nothing to
# change, by design.
STATES_WHAT_THE_TRAINER_DOES = {
    "disable_moe_token_dropping": "Megatron-DeepSpeed's 'no capacity', the default here; refused "
                                  "with a capacity factor",
    "use_distributed_optimizer": "ZeRO always shards the optimizer state; the log says so",
    "local_rank": "the launcher's; the rank comes from the environment "
                  "(test_deepspeed_launcher_runs_expert_parallel)",
    "accumulate_allreduce_grads_in_fp32": "fp32 accumulation is the bf16 default; it wins over a "
                                          "DeepSpeed config that says otherwise (refused in "
                                          "tests/test_ds_config.py)",
    "sequence_parallel": "nothing to split at TP=1, as in Megatron; at TP=2 "
                         "test_tensor_parallel_run_matches_single_process_run",
}
# Flags that change the run only in another setting: tested against the base plus these.
IN_ANOTHER_SETTING = {"grad_reduce_in_bf16": ["--bf16"]}

# Values to try for flags that take a text.
OTHER_VALUES = {"hyper_lr_mult": ["0.5"], "split": ["90,10,0"], "moe_layer_freq": ["2", "[0]+[1]"]}


def user_value(action, default) -> list:
    """Command-line alternatives to a flag's value ``default`` in the base run, as a user would
    change it: each a list of arguments."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [["--no-" + flag[2:]]] if default else [[flag]]
    if action.nargs == 0:  # store_true (one the base gives cannot be taken back here)
        return [] if default else [[flag]]
    if action.choices:
        return [[flag, str(choice)] for choice in action.choices if choice != default]
    if action.type is int:
        return [[flag, str(2 * default if default else 2)]]
    if action.type is float:
        return [[flag, str(default / 2 if default and 0 < default < 1 else
                           default * 2 if default else 0.5)]]
    if action.dest in OTHER_VALUES:
        return [[flag, value] for value in OTHER_VALUES[action.dest]]
    return [[flag, "1"]]  # a text (the Megatron flags refused here refuse any value)


def fingerprint(args) -> str:
    """A digest of everything the flags decide before the first step."""
    from megatron_hypermoe.data.tokenizer import build_tokenizer
    from megatron_hypermoe.training.lr_schedule import LRSchedule
    from megatron_hypermoe.training.node_storage import dataset_config_and_sizes
    from megatron_hypermoe.training.setup import (
        build_model,
        build_optimizer,
        optimizer_param_groups,
    )

    run = run_config(args)
    tokenizer = build_tokenizer(run.tokenizer)
    run = run.with_vocab(tokenizer.vocab_size)
    config = run.model
    model = build_model(run)
    digest = hashlib.sha256()

    def add(*items):
        for item in items:
            digest.update(repr(item).encode())

    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor):
            add(name, tuple(tensor.shape), tensor.dtype)
            digest.update(tensor.detach().float().numpy().tobytes())
    add(sorted((k, getattr(v, "__name__", v)) for k, v in vars(config).items()
               if not k.startswith("_")))
    def fresh_optimizer():
        groups = optimizer_param_groups(model, run.optimizer.weight_decay,
                                        run.parallel.ep > 1, run.optimizer.hyper_lr_mult)
        # (the same AdamW update with --optimizer-cpu-offload, DeepSpeed's CPUAdam JIT-built on
        # first use: its offload is in the DeepSpeed config below)
        return groups, build_optimizer(groups, dataclasses.replace(
            run.optimizer, optimizer_cpu_offload=False))

    groups, optimizer = fresh_optimizer()
    add([(g["name"], len(g["params"]), g.get("lr_mult"), g.get("wd_mult")) for g in groups],
        sorted(optimizer.defaults.items()))
    schedule = LRSchedule(optimizer, run)
    for _ in range(run.training.train_iters):
        schedule.step(run.training.global_batch_size)
        add([(round(g["lr"], 12), round(g["weight_decay"], 12))
             for g in optimizer.param_groups])
    # a resume from a checkpoint whose schedule had three times the peak lr: refused, or the
    # flags' schedule (--override-opt_param-scheduler) or the checkpoint's
    # (--use-checkpoint-opt_param-scheduler)
    saved = schedule.state_dict()
    saved["max_lr"] *= 3
    resumed = LRSchedule(fresh_optimizer()[1], run)
    try:
        resumed.load_state_dict(saved)
        add(resumed.lr)
    except UserError as error:
        add(type(error).__name__)
    add(run.deepspeed.engine_config())
    data_config, sizes = dataset_config_and_sizes(run.data, run.training, run.tokenizer,
                                                  tokenizer)
    add(sorted((k, v) for k, v in vars(data_config).items()
               if k not in ("tokenizer", "path_to_cache")), sizes)
    return digest.hexdigest()


def try_run(argv):
    """(the run's fingerprint, or None where the flags are refused)."""
    try:
        return fingerprint(parse_args(argv))
    except (UserError, SystemExit):
        return None


@pytest.mark.parametrize("moe_type", MOE_TYPES)
def test_every_accepted_flag_changes_the_run(moe_type):
    parser = build_parser()
    fixed = {flag.flag for flag in FIXED}
    references = {}
    ignored = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "moe_type") or \
                action.dest in {**RUN_TIME_FLAGS, **STATES_WHAT_THE_TRAINER_DOES,
                                **PERFORMANCE_ONLY} or action.option_strings[0] in fixed:
            continue
        base = tiny_run(moe_type) + BASE + IN_ANOTHER_SETTING.get(action.dest, [])
        key = tuple(base)
        if key not in references:
            references[key] = try_run(base)
            assert references[key] is not None and try_run(base) == references[key]
        as_given = getattr(parser.parse_args(base), action.dest)
        alternatives = user_value(action, as_given)
        # one of the alternatives must be refused or change the run
        if alternatives and all(try_run(base + argv) == references[key]
                                for argv in alternatives):
            ignored.append(" ".join(alternatives[0]))
    assert not ignored, f"{moe_type}: accepted and changed nothing: {ignored}"


def test_run_time_flags_name_a_test_that_runs_them():
    import ast

    dests = {action.dest: action.option_strings[0] for action in build_parser()._actions}
    assert set(RUN_TIME_FLAGS) | set(PERFORMANCE_ONLY) | set(STATES_WHAT_THE_TRAINER_DOES) <= \
        set(dests)
    bodies = {}
    for path in (REPO_ROOT / "tests").glob("test_*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                bodies[node.name] = ast.get_source_segment(source, node)
    for dest, test in RUN_TIME_FLAGS.items():
        named = [body for name, body in bodies.items() if name.startswith(test)]
        assert named, f"{dest}: no test {test}"
        assert any(re.search(re.escape(dests[dest]) + r"(?![-\w])", body) for body in named), \
            f"{test} does not pass {dests[dest]}"

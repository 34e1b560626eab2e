"""The benchmark scripts' own logic, in-process (their runs are in test_compare_and_analyze)."""

import argparse
import importlib.util

import pytest

from tests.helpers import REPO_ROOT


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_variants_specs_become_trainer_flags():
    compare = load_script("compare_variants")
    args = compare.parse_args(["--quick", "--variants", "moe", "hypermoe:lr=1/d_g,init=normal",
                               "hypermoe:r=16,dg=32,renorm", "moe_adapter:renorm"])
    assert args.variants[1] == "hypermoe:lr=1/d_g,init=normal"
    flags = compare.variant_flags("hypermoe:lr=1/d_g,init=normal", args)
    assert flags[:2] == ["--moe-type", "hypermoe"]
    assert flags[-4:] == ["--hyper-lr-mult", "1/d_g", "--hyper-init", "normal"]
    flags = compare.variant_flags("hypermoe:r=16,dg=32,renorm", args)
    assert flags[-5:] == ["--hyper-adapter-dim", "16", "--hyper-hidden-size", "32",
                          "--moe-router-renormalize"]  # after the default r: the option wins
    wide = compare.parse_args(["--hidden-size", "128", "--hyper-adapter-dim", "64"])
    assert (wide.size["hidden_size"], wide.size["ffn_hidden_size"], wide.hyper_adapter_dim) == \
        (128, 256, 64)
    assert compare.run_name("hypermoe:lr=1/d_g,init=normal") == \
        "hypermoe__lr-1overd_g_init-normal"
    for bad in ("switch", "moe:lr=0.1", "dense:renorm", "hypermoe:renorm=1", "hypermoe:lr"):
        with pytest.raises(argparse.ArgumentTypeError):
            compare.variant_spec(bad)


def test_compare_variants_trainer_accepts_every_option():
    """Each option's flag parses in the trainer and reaches the run."""
    from megatron_hypermoe.training.arguments import hyper_lr_mult, model_config, parse_args

    compare = load_script("compare_variants")
    args = compare.parse_args(["--quick"])
    flags = compare.variant_flags("hypermoe:r=16,dg=32,init=normal,lr=1/d_g,renorm", args)
    run = parse_args(flags + ["--mock-data", "--train-iters", "1"])
    config = model_config(run)
    assert (config.hyper_adapter_dim, config.hyper_hidden_size, config.hyper_init,
            config.moe_router_renormalize, hyper_lr_mult(run)) == (16, 32, "normal", True, 1 / 32)


def test_compare_variants_run_command_does_not_depend_on_jobs():
    """--reuse-finished matches a run by its command: running the study again with another
    --jobs must find the finished runs (it once retrained and discarded them)."""
    compare = load_script("compare_variants")
    commands = []
    for jobs in ("1", "2"):
        args = compare.parse_args(["--quick", "--jobs", jobs])
        commands.append(compare.train_command("hypermoe", 1234, "data/x", "tok.model", args, 10,
                                              "runs/x/hypermoe_seed1234/metrics.jsonl"))
    assert commands[0] == commands[1]
    assert commands[0][commands[0].index("--hyper-lr-mult") + 1] == "1/d_g"  # spelled out

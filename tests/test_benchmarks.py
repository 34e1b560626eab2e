"""The benchmark scripts' own logic, in-process (their runs are in test_compare_and_analyze)."""

import argparse
import importlib.util

import pytest

from megatron_hypermoe.model.config import HYPER_SIZE_NAMES
from tests.support.processes import REPO_ROOT


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
    from megatron_hypermoe.cli.arguments import parse_run_config

    compare = load_script("compare_variants")
    args = compare.parse_args(["--quick"])
    flags = compare.variant_flags("hypermoe:r=16,dg=32,init=normal,lr=1/d_g,renorm", args)
    run = parse_run_config(flags + ["--mock-data", "--train-iters", "1"])
    config = run.model
    assert (config.hyper_adapter_dim, config.hyper_hidden_size, config.hyper_init,
            config.moe_router_renormalize, run.optimizer.hyper_lr_mult) == \
        (16, 32, "normal", True, 1 / 32)


def test_compare_variants_runs_differ_only_in_what_makes_the_variant():
    """The MoE, static-adapter and HyperMoE runs of the study get the same flags but their
    own (parsed and compared field by field: a flag one variant silently lacked would show)."""
    from megatron_hypermoe.cli.arguments import parse_args

    compare = load_script("compare_variants")
    args = compare.parse_args(["--quick"])
    parsed = {variant: vars(parse_args(compare.train_command(
        variant, 1234, "data/x", "tok.model", args, 10, "runs/metrics.jsonl")[2:]))
        for variant in ("moe", "moe_adapter", "hypermoe")}

    def differing(a, b):
        return {key for key in parsed[a] if parsed[a][key] != parsed[b][key]}

    assert differing("moe", "moe_adapter") == {"moe_type", "hyper_adapter_dim"}
    assert differing("moe", "hypermoe") == {"moe_type", "hyper_lr_mult", "hyper_expert_impl",
                                            "hyper_init", *HYPER_SIZE_NAMES}


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


def test_bench_layer_summary_has_a_key_set_per_width():
    bench = load_script("bench_layer")
    rows = [dict(shape=shape, topk=k, variant=v, ms=ms, saved_mb=mb, peak_mb=None)
            for shape, scale, topks in (("gpt2", 1.0, (1, 2)), ("wide", 4.0, (2,)),
                                        ("wide64", 8.0, (2, 8))) for k in topks
            for v, ms, mb in (("moe", 10 * scale * k, 100), ("hypermoe", 11 * scale * k + k, 104),
                              ("hypermoe-factored", 20, 150), ("hypermoe-naive", 40, 300))]
    summary = bench.summarize(rows)
    assert summary["hypermoe_over_moe_time"] == max(12 / 10, 24 / 20)
    assert summary["hypermoe_over_moe_time_wide"] == max(90 / 80, 178 / 160, 712 / 640)
    assert summary["naive_over_fast_time"] == min(40 / 12, 40 / 24)
    assert summary["cases"] == ["gpt2-top1", "gpt2-top2", "wide-top2", "wide64-top2",
                                "wide64-top8"]
    gpt2_only = bench.summarize(rows[:8])
    assert "hypermoe_over_moe_time_wide" not in gpt2_only
    without_naive = bench.summarize([r for r in rows if r["variant"] != "hypermoe-naive"])
    assert "naive_over_fast_time" not in without_naive


def test_bench_layer_median_interval_is_the_sign_test_one():
    bench = load_script("bench_layer")
    ten = [1.10, 0.94, 1.03, 1.00, 1.13, 1.07, 0.98, 1.05, 1.04, 0.99]
    low, high, coverage = bench.median_interval(ten)
    assert (low, high) == (0.98, 1.10)  # x_(2) and x_(9)
    assert coverage == pytest.approx(1 - 2 * 11 / 1024)
    assert bench.median_interval(ten[:5])[:2] == (0.94, 1.13)  # too few for 95%: min, max
    assert bench.median_interval(ten[:5])[2] == pytest.approx(1 - 2 / 32)
    many = bench.median_interval(list(range(100)))
    assert many[2] >= 0.95 and (many[0], many[1]) == (39, 60)
    rows = [dict(shape="gpt2", topk=k, variant=v, x_moe=x, x_moe_interval=interval, ms=1.0,
                 saved_mb=1.0, peak_mb=None)
            for k, x, interval in ((1, 1.04, [0.99, 1.08]), (2, 1.06, [1.01, 1.12]))
            for v in ("moe", "hypermoe")]
    for row in rows[::2]:
        row.update(x_moe=1.0, x_moe_interval=[1.0, 1.0])
    summary = bench.summarize(rows)
    assert summary["hypermoe_over_moe_time"] == 1.06
    assert summary["hypermoe_over_moe_time_interval"] == [1.01, 1.12]  # the worst case's


def test_bench_layer_times_the_side_path_inside_the_step(megatron_single_process):
    """--side-path: the profiler finds each of the HyperExpert's functions by name (a renamed
    autograd Function would read 0 ms)."""
    import torch

    bench = load_script("bench_layer")
    rows = bench.bench_case("tiny", 1, 2, torch.device("cpu"), variants=("moe", "hypermoe"),
                            side_path_steps=1)
    moe, hyper = rows
    assert moe["side_path_ms"] is None and hyper["impl"] == "allsets"
    assert set(hyper["side_path_ms"]) == set(bench.SIDE_PATH_PARTS)
    assert all(ms > 0 for ms in hyper["side_path_ms"].values()), hyper["side_path_ms"]
    low, high = hyper["x_moe_interval"]
    assert low <= hyper["x_moe"] <= high


def test_gpu_check_page_reports_every_step_and_the_targets():
    check = load_script("gpu_check")
    assert check.device_slug("NVIDIA H200") == "h200"
    assert check.device_slug("NVIDIA H100 80GB HBM3") == "h100_80gb"
    machine = dict(device="NVIDIA H200", torch="2.13.0", cuda="13.0", python="3.11.7", cpus=16,
                   date="2026-12-01 10:00 UTC")
    layer_row = dict(shape="gpt2", topk=1, variant="hypermoe", impl="allsets", ms=1.5,
                     saved_mb=10.0, peak_mb=20.0)
    results = [
        dict(name="GPU tests", command="-m pytest -m gpu", status="passed", seconds=60,
             json=None, tail=""),
        dict(name="layer, GPT-2 width", command="bench_layer.py", status="passed", seconds=50,
             json=dict(hypermoe_over_moe_time=1.10, rows=[layer_row]), tail=""),
        dict(name="layer, hidden 2048", command="bench_layer.py", status="passed", seconds=50,
             json=dict(hypermoe_over_moe_time_wide=1.03, rows=[]), tail=""),
        dict(name="layer, hidden 2048, 64 experts", command="bench_layer.py",
             status="timed out after 100 s", seconds=100, json=None, tail="# wide64 top-2 ..."),
        dict(name="fast path: SDPA and grouped experts, sequence 4096 and 8192",
             command="bench_fast_path.py", status="passed", seconds=20,
             json=dict(sdpa_over_local_step_time_seq4096=0.37, device="cuda", rows=[]),
             tail=""),
        dict(name="training step", command="bench_train.py", status="passed", seconds=40,
             json=dict(hypermoe_over_moe_step_time=1.40, hypermoe_over_moe_step_time_gpt2=1.07),
             tail=""),
    ]
    page = check.report(machine, results)
    assert "| layer fwd+bwd, GPT-2 width, worst of top-1/2 | 1.10x (meets <= 1.15) |" in page
    # a wide case that did not run leaves no verdict for the wide shapes
    assert "| layer fwd+bwd, hidden 2048, worst of 8 experts top-2, 64 experts top-2/8 | n/a |" \
        in page
    assert "| training step, small config | 1.40x (misses <= 1.15) |" in page
    assert "| training step, GPT-2 width, worst of top-1/2 | 1.07x (meets <= 1.15) |" in page
    assert "| gpt2 | 1 | hypermoe | allsets | 1.50 | 10.0 | 20.0 |" in page
    assert "| sdpa_over_local_step_time_seq4096 | 0.370 |" in page
    assert "### layer, hidden 2048, 64 experts: timed out after 100 s" in page
    assert "# wide64 top-2" in page
    assert sum(limit for _, _, limit in check.steps("python")) <= 8 * 60


def test_layer_benchmark_leaves_out_forms_that_cannot_run():
    """The GPU check's 64-expert case at top-8 ran ``allsets``: C(64, 8) HyperExperts."""
    bench = load_script("bench_layer")
    assert "hypermoe-allsets" not in bench.runnable_variants("wide64", 8)
    assert "hypermoe-allsets" in bench.runnable_variants("wide64", 2)
    assert bench.runnable_variants("gpt2", 1) == list(bench.VARIANTS)


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    import subprocess
    import sys

    from tests.support.processes import environment

    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py")],
                            env={**environment(), "CUDA_VISIBLE_DEVICES": ""},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: make gpu-check needs a CUDA GPU")


def test_fast_path_benchmark_reports_its_keys(tmp_path):
    """benchmarks/bench_fast_path.py at a short sequence: its last line is the JSON summary with
    the attention and experts ratios (the numbers themselves are measured, not tested)."""
    import json
    import subprocess
    import sys

    from tests.support.processes import REPO_ROOT, environment

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_fast_path.py"), "--json",
         "--seqs", "256", "--experts", "8", "--repeats", "1"],
        env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("sdpa_over_local_activation_bytes_seq256", "sdpa_over_local_step_time_seq256",
                "grouped_over_sequential_moe_step_time_e8_seq256",
                "grouped_over_sequential_model_step_time_e8_seq256"):
        assert summary[key] > 0, key
    assert summary["sdpa_over_local_activation_bytes_seq256"] < 1  # no s x s scores kept

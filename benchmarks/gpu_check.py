"""The prepared GPU check (`make gpu-check`): one script for a session that is lent a GPU.

    python benchmarks/gpu_check.py [--output docs/RESULTS_gpu_<device>.md]

Runs, each in its own process with its own time limit (under 8 minutes in all on one H100/H200):
the CUDA tests (`pytest -m gpu tests/test_gpu.py`: kernels and model; bf16 and fp16 training
runs; save, same-layout and layout-free resume; recompute, sampling, sequence 4096), the layer
benchmark in bf16 at GPT-2 width and at hidden 2048, the fast-path benchmark in bf16 (SDPA
against megatron's attention, grouped-GEMM experts against SequentialMLP at 8 and 64 experts,
sequence 4096 and 8192) and the training-step benchmark in bf16 (HyperMoE over MoE ratios);
then writes a results page with the machine, every step's outcome
and the numbers against the targets (HyperMoE <= 1.15x the MoE, the paper's figure). A step
that fails or runs out of time is reported as such and the page is still written, so the device
time is never lost. On an offline GPU node: `bash benchmarks/gpu_run.sh` (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.15  # HyperMoE's cost over the MoE the paper reports (layer and step)


def steps(python: str):
    """(name, command, time limit in seconds): under 8 minutes in all on one H100."""
    layer = [python, "benchmarks/bench_layer.py", "--json", "--bf16", "--repeats", "3"]
    pytest = [python, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q",
              "-p", "no:cacheprovider", "-k"]
    trainer_tests = "resume or recompute or sampling or 4096 or training_run or fp16"
    return [
        ("GPU tests: kernels and model", pytest + [f"not ({trainer_tests})"], 40),
        ("GPU tests: bf16 and fp16 training runs", pytest + ["training_run or fp16"], 65),
        ("GPU tests: save, same-layout and layout-free resume (ZeRO-2 -> ZeRO-1)",
         pytest + ["resume"], 80),
        ("GPU tests: recompute, sampling, sequence 4096",
         pytest + ["recompute or sampling or 4096"], 95),
        ("layer, GPT-2 width", layer + ["--shapes", "gpt2", "--topk", "1,2",
                                        "--tokens", "16384"], 45),
        ("layer, hidden 2048", layer + ["--shapes", "wide", "--topk", "2",
                                        "--tokens", "4096"], 25),
        ("layer, hidden 2048, 64 experts", layer + ["--shapes", "wide64", "--topk", "2,8",
                                                    "--tokens", "4096"], 45),
        ("fast path: SDPA and grouped experts, sequence 4096 and 8192",
         [python, "benchmarks/bench_fast_path.py", "--json", "--bf16", "--repeats", "5"], 25),
        ("training step", [python, "benchmarks/bench_train.py", "--json", "--bf16",
                           "--steps", "15"], 60),
    ]


def run_step(name, command, limit):
    """{"name", "command", "status": passed|failed|timed out, "seconds", "json", "tail"}."""
    print(f"# {name} (up to {limit} s) ...", file=sys.stderr, flush=True)
    start = time.time()
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=limit)
        output, status = result.stdout + result.stderr, \
            "passed" if result.returncode == 0 else f"failed (exit {result.returncode})"
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") + \
            (expired.stderr or b"").decode(errors="replace")
        status = f"timed out after {limit} s"
    summary = None
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                summary = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    return dict(name=name, command=" ".join(command[1:]), status=status,
                seconds=time.time() - start, json=summary, tail=output[-1500:])


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', for the page's file name."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w != "nvidia"]
    return "_".join(words[:2]) or "gpu"


def _verdict(value, target=TARGET):
    return "n/a" if value is None else f"{value:.2f}x ({'meets' if value <= target else 'misses'} "\
        f"<= {target})"


def report(machine: dict, results: list) -> str:
    """The results page (markdown) for a machine and the steps' results."""
    by_name = {r["name"]: r for r in results}
    def summary(name):
        return (by_name.get(name) or {}).get("json") or {}

    layer_gpt2, step = summary("layer, GPT-2 width"), summary("training step")
    wide_runs = [summary("layer, hidden 2048"), summary("layer, hidden 2048, 64 experts")]
    wide = [run["hypermoe_over_moe_time_wide"] for run in wide_runs
            if "hypermoe_over_moe_time_wide" in run]
    lines = [f"# `make gpu-check` on {machine['device']}", "",
             f"Generated by `python benchmarks/gpu_check.py` on {machine['date']}: "
             f"{machine['device']}, {machine['cpus']} CPU cores, torch {machine['torch']} "
             f"(CUDA {machine['cuda']}), Python {machine['python']}. Every number is from this "
             "GPU, bf16.", "", "## Steps", "", "| step | outcome | seconds | command |",
             "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | `{r['command']}` |"
              for r in results]
    lines += ["", "## HyperMoE over the MoE (targets: the paper's 1.15x, aim 1.05x)", "",
              "| measure | value |", "|---|---|",
              f"| layer fwd+bwd, GPT-2 width, worst of top-1/2 | "
              f"{_verdict(layer_gpt2.get('hypermoe_over_moe_time'))} |",
              f"| layer fwd+bwd, hidden 2048, worst of 8 experts top-2, 64 experts top-2/8 | "
              f"{_verdict(max(wide) if len(wide) == len(wide_runs) else None)} |",
              f"| training step, small config | "
              f"{_verdict(step.get('hypermoe_over_moe_step_time'))} |",
              f"| training step, GPT-2 width, worst of top-1/2 | "
              f"{_verdict(step.get('hypermoe_over_moe_step_time_gpt2'))} |"]
    fast = summary("fast path: SDPA and grouped experts, sequence 4096 and 8192")
    if fast:
        lines += ["", "## Fast path (bench_fast_path.py; targets from the CPU: <= 0.25 bytes, "
                  "<= 0.8 time)", "", "| measure | value |", "|---|---|"]
        lines += [f"| {key} | {value:.3f} |" for key, value in fast.items()
                  if key.endswith(tuple("0123456789")) and isinstance(value, float)]
    rows = layer_gpt2.get("rows", []) + [r for run in wide_runs for r in run.get("rows", [])]
    if rows:
        lines += ["", "## Layer benchmark rows", "",
                  "| shape | top-k | variant | form | fwd+bwd ms | saved MB | peak MB |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['topk']} | {r['variant']} | {r.get('impl') or ''} | "
                  f"{r['ms']:.2f} | "
                  f"{r['saved_mb']:.1f} | "
                  f"{'' if r.get('peak_mb') is None else format(r['peak_mb'], '.1f')} |"
                  for r in rows]
    failed = [r for r in results if r["status"] != "passed"]
    if failed:
        lines += ["", "## What did not pass", ""]
        for r in failed:
            lines += [f"### {r['name']}: {r['status']}", "", "```", r["tail"].strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def machine_description() -> dict:
    import torch

    return dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                cpus=__import__("os").cpu_count(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None,
                        help="the page to write (default docs/RESULTS_gpu_<device>.md)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: make gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the CPU benchmarks run with make bench", file=sys.stderr)
        return 1
    machine = machine_description()
    results = [run_step(name, command, limit) for name, command, limit in steps(sys.executable)]
    output = Path(args.output or REPO_ROOT / "docs" /
                  f"RESULTS_gpu_{device_slug(machine['device'])}.md")
    output.write_text(report(machine, results))
    print(f"wrote {output}")
    for r in results:
        print(f"{r['name']}: {r['status']} ({r['seconds']:.0f} s)")
    return 0 if all(r["status"] == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

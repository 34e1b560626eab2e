"""Training step time of hypermoe against moe (and dense) at two configs, in one run.

    python benchmarks/bench_train.py [--json] [--configs small,gpt2] [--steps N]

``small``: 4 layers, hidden 256, 8 experts of FFN 512, top-1, 4 x 256 tokens; there the
paper-size hypernetwork heads are 28% of the model, the worst case for HyperMoE's fixed costs.
``gpt2``: GPT-2 small's width (hidden 768, 12 heads, 8 experts of FFN 3072), 2 layers, 4 x 512
tokens, top-1 and top-2 (moe and hypermoe only).

The variants of one config are built in ONE process as the trainer builds them (megatron-core
model, DeepSpeed ZeRO-1 engine, mock data; same shape, batch and seed) and their training
iterations are interleaved, so machine drift hits every variant alike: separate processes run
one after another differed by up to 15% between rounds here. Each run (a config at one top-k)
gets a fresh process of its own (see :func:`run_in_child`). Step time is the median iteration
time after 3 warm-up iterations. Achieved training FLOP/s (the trainer's count: top-k experts
and the HyperExpert included) is compared with this machine's measured matmul FLOP/s (a 2048^3
torch.mm in the training dtype on the training device, best of 10), stated in the output.
``--bf16`` on a GPU measures the path GPU users train with.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megatron_hypermoe.cli.arguments import parse_run_config  # noqa: E402 (after DS_ACCELERATOR)
from megatron_hypermoe.training.trainer import Trainer  # noqa: E402

COMMON = ["--num-experts", "8", "--mock-data", "--vocab-size", "4096", "--lr", "3e-4", "--seed",
          "1", "--train-iters", "1000"]
CONFIG = COMMON + ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "512",
                   "--num-attention-heads", "4", "--seq-length", "256", "--micro-batch-size", "4",
                   "--moe-router-topk", "1"]
GPT2_CONFIG = COMMON + ["--num-layers", "2", "--hidden-size", "768", "--ffn-hidden-size", "3072",
                        "--num-attention-heads", "12", "--seq-length", "512",
                        "--micro-batch-size", "4"]
# (name, flags, variants, timed steps by default): each entry's variants are interleaved with
# each other. A GPT-2-width step takes 6-9 s on 2 CPU cores.
RUNS = {
    "small": [("small", CONFIG, ("moe", "hypermoe", "dense"), 20)],
    "gpt2": [(f"gpt2-top{k}", GPT2_CONFIG + ["--moe-router-topk", str(k)], ("moe", "hypermoe"), 6)
             for k in (1, 2)],
}


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_flops(dtype, n=2048, repeats=10) -> float:
    """The FLOP/s of one n^3 matmul on the training device, best of ``repeats``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def bench_run(flags, variants, steps, bf16, label):
    """{variant: {ms_per_iter, tokens_per_s, gflops, parameters}}, iterations interleaved."""
    trainers, batches = {}, {}
    for variant in variants:
        precision = ["--bf16"] if bf16 else []
        trainer = Trainer(parse_run_config(flags + ["--moe-type", variant] + precision))
        trainer.setup()
        trainers[variant], batches[variant] = trainer, iter(trainer.train_loader())
    times = {v: [] for v in variants}
    for step in range(steps + 3):
        for variant in variants:
            synchronize()
            start = time.perf_counter()
            trainers[variant].train_step(batches[variant])
            synchronize()
            if step >= 3:
                times[variant].append(time.perf_counter() - start)
        print(f"# {label}: step {step + 1}/{steps + 3}", file=sys.stderr, flush=True)
    summary = {}
    for variant, trainer in trainers.items():
        seconds = statistics.median(times[variant])
        run = trainer.run
        summary[variant] = dict(
            ms_per_iter=1000 * seconds,
            tokens_per_s=run.training.global_batch_size * run.data.seq_length / seconds,
            gflops=trainer.flops_per_iteration / seconds / 1e9,
            parameters=sum(p.numel() for p in trainer.model.parameters()),
        )
    del trainers, batches
    gc.collect()
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per config (default: 20 small, 6 gpt2)")
    parser.add_argument("--configs", default="small,gpt2", help="comma-separated: small, gpt2")
    parser.add_argument("--bf16", action="store_true", help="train (and take the matmul peak) "
                                                            "in bf16, as on GPUs")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # (one run, in a child)
    args = parser.parse_args()

    runs = {label: run for config in args.configs.split(",") for label, *run in RUNS[config]}
    if args.run is not None:
        flags, variants, steps = runs[args.run]
        print(json.dumps(bench_run(flags, variants, args.steps or steps, args.bf16, args.run)))
        return
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_flops(dtype)
    results = {label: run_in_child(label, args) for label in runs}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"machine: {os.cpu_count()} cores, {device}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; {str(dtype)[6:]} matmul (2048^3 mm): "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'config':10} {'variant':9} {'params':>8} {'ms/iter':>9} {'x moe':>6} "
          f"{'tokens/s':>10} {'GFLOP/s':>9} {'of matmul':>10}")
    for label, summary in results.items():
        for variant, row in summary.items():
            print(f"{label:10} {variant:9} {row['parameters'] / 1e6:7.2f}M "
                  f"{row['ms_per_iter']:9.1f} "
                  f"{row['ms_per_iter'] / summary['moe']['ms_per_iter']:6.2f} "
                  f"{row['tokens_per_s']:10,.0f} {row['gflops']:9.1f} "
                  f"{row['gflops'] * 1e9 / peak:10.1%}")
    if args.json:
        print(json.dumps(dict(summarize(results, peak), matmul_gflops=peak / 1e9,
                              runs=results)))


def run_in_child(label, args) -> dict:
    """One run in a fresh process: what a run before it leaves in the heap (freed, fragmented,
    trimmed back to the OS) changed the next run's step times by up to 20%, and not alike for
    every variant (a GPT-2-width top-2 run gave HyperMoE 1.04x the MoE first, 1.22x second)."""
    command = [sys.executable, os.path.abspath(__file__), "--run", label, "--configs", args.configs]
    command += (["--bf16"] if args.bf16 else []) + \
        (["--steps", str(args.steps)] if args.steps else [])
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"bench_train: run {label} failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(results, peak):
    """The JSON keys: ``hypermoe_over_moe_step_time`` (small), ``..._gpt2`` (worst of top-1 and
    top-2), ``flops_fraction_of_matmul_peak`` (hypermoe at the small config)."""
    def ratio(label):
        return results[label]["hypermoe"]["ms_per_iter"] / results[label]["moe"]["ms_per_iter"]

    summary = {}
    if "small" in results:
        summary["hypermoe_over_moe_step_time"] = ratio("small")
        summary["flops_fraction_of_matmul_peak"] = (
            results["small"]["hypermoe"]["gflops"] * 1e9 / peak)
    gpt2 = [label for label in results if label.startswith("gpt2")]
    if gpt2:
        summary["hypermoe_over_moe_step_time_gpt2"] = max(ratio(label) for label in gpt2)
    return summary


if __name__ == "__main__":
    main()

"""Training throughput of hypermoe, moe and dense at one small config, in one run.

    python benchmarks/bench_train.py [--json] [--iters 40] [--rounds 2]

Each variant trains with pretrain_gpt_hypermoe.py on mock data (one process; the same shape,
batch and seed), several rounds interleaved so drift hits every variant alike. Step time is the
median of the logged ms/iteration after the first log interval (warm-up). Achieved training
FLOP/s (the trainer's count: top-k experts and the HyperExpert included) is compared with this
machine's measured fp32 matmul FLOP/s (a 2048^3 torch.mm, best of 10), stated in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("hypermoe", "moe", "dense")
CONFIG = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "512",
          "--num-attention-heads", "4", "--seq-length", "256", "--micro-batch-size", "4",
          "--num-experts", "8", "--moe-router-topk", "1", "--mock-data", "--vocab-size", "4096",
          "--lr", "3e-4", "--seed", "1"]


def matmul_flops(n=2048, repeats=10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def run_variant(variant, iters, log_interval, scratch):
    metrics = os.path.join(scratch, f"{variant}-{time.time_ns()}.jsonl")
    command = [sys.executable, os.path.join(ROOT, "pretrain_gpt_hypermoe.py"), *CONFIG,
               "--moe-type", variant, "--train-iters", str(iters),
               "--log-interval", str(log_interval), "--metrics-file", metrics]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in open(metrics) if '"lm_loss"' in line]
    return records[1:]  # the first interval includes warm-up


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    peak = matmul_flops()
    records = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for variant in VARIANTS:
                print(f"# round {round_index + 1}: {variant}", file=sys.stderr, flush=True)
                records[variant] += run_variant(variant, args.iters, args.log_interval,
                                                scratch)
    summary = {}
    for variant, rows in records.items():
        summary[variant] = dict(
            ms_per_iter=statistics.median(r["ms_per_iter"] for r in rows),
            tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows),
            tflops=statistics.median(r["tflops_per_device"] for r in rows),
        )
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; fp32 matmul (2048^3 mm): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'variant':9} {'ms/iter':>9} {'tokens/s':>10} {'GFLOP/s':>9} {'of matmul':>10}")
    for variant, row in summary.items():
        print(f"{variant:9} {row['ms_per_iter']:9.1f} {row['tokens_per_s']:10,.0f} "
              f"{row['tflops'] * 1e3:9.1f} {row['tflops'] * 1e12 / peak:10.1%}")
    if args.json:
        print(json.dumps(dict(
            hypermoe_over_moe_step_time=summary["hypermoe"]["ms_per_iter"]
            / summary["moe"]["ms_per_iter"],
            flops_fraction_of_matmul_peak=summary["hypermoe"]["tflops"] * 1e12 / peak,
            matmul_gflops=peak / 1e9,
            variants=summary,
        )))


if __name__ == "__main__":
    main()

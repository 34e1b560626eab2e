"""Training throughput of hypermoe, moe and dense at one small config, in one run.

    python benchmarks/bench_train.py [--json] [--steps 20]

The three variants are built in ONE process as the trainer builds them (megatron-core model,
DeepSpeed ZeRO-1 engine, mock data; same shape, batch and seed) and their training iterations
are interleaved, so machine drift hits every variant alike: separate processes run one after
another differed by up to 15% between rounds here. Step time is the median iteration time after
3 warm-up iterations. Achieved training FLOP/s (the trainer's count: top-k experts and the
HyperExpert included) is compared with this machine's measured matmul FLOP/s (a 2048^3 torch.mm
in the training dtype on the training device, best of 10), stated in the output. ``--bf16`` on a
GPU measures the path GPU users train with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megatron_hypermoe.training.arguments import parse_args  # noqa: E402 (after DS_ACCELERATOR)
from megatron_hypermoe.training.trainer import Trainer  # noqa: E402

VARIANTS = ("moe", "hypermoe", "dense")
CONFIG = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "512",
          "--num-attention-heads", "4", "--seq-length", "256", "--micro-batch-size", "4",
          "--num-experts", "8", "--moe-router-topk", "1", "--mock-data", "--vocab-size", "4096",
          "--lr", "3e-4", "--seed", "1", "--train-iters", "1000"]


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="train (and take the matmul peak) "
                                                            "in bf16, as on GPUs")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_flops(dtype)
    trainers, batches = {}, {}
    for variant in VARIANTS:
        trainer = Trainer(parse_args(CONFIG + ["--moe-type", variant]
                                     + (["--bf16"] if args.bf16 else [])))
        trainer.setup()
        trainers[variant], batches[variant] = trainer, iter(trainer.train_loader())
    times = {v: [] for v in VARIANTS}
    for step in range(args.steps + 3):
        for variant in VARIANTS:
            synchronize()
            start = time.perf_counter()
            trainers[variant].train_step(batches[variant])
            synchronize()
            if step >= 3:
                times[variant].append(time.perf_counter() - start)
        print(f"# step {step + 1}/{args.steps + 3}", file=sys.stderr, flush=True)
    summary = {}
    for variant, trainer in trainers.items():
        seconds = statistics.median(times[variant])
        run = trainer.args
        summary[variant] = dict(
            ms_per_iter=1000 * seconds,
            tokens_per_s=run.global_batch_size * run.seq_length / seconds,
            gflops=trainer.flops_per_iteration / seconds / 1e9,
            parameters=sum(p.numel() for p in trainer.model.parameters()),
        )
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"machine: {os.cpu_count()} cores, {device}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; {str(dtype)[6:]} matmul (2048^3 mm): "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'variant':9} {'params':>8} {'ms/iter':>9} {'tokens/s':>10} {'GFLOP/s':>9} "
          f"{'of matmul':>10}")
    for variant, row in summary.items():
        print(f"{variant:9} {row['parameters'] / 1e6:7.2f}M {row['ms_per_iter']:9.1f} "
              f"{row['tokens_per_s']:10,.0f} {row['gflops']:9.1f} "
              f"{row['gflops'] * 1e9 / peak:10.1%}")
    if args.json:
        print(json.dumps(dict(
            hypermoe_over_moe_step_time=summary["hypermoe"]["ms_per_iter"]
            / summary["moe"]["ms_per_iter"],
            flops_fraction_of_matmul_peak=summary["hypermoe"]["gflops"] * 1e9 / peak,
            matmul_gflops=peak / 1e9,
            variants=summary,
        )))


if __name__ == "__main__":
    main()

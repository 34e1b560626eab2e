"""Step time of expert, tensor and pipeline parallelism and ZeRO stages, same global batch,
2 processes.

    python benchmarks/bench_parallel.py [--json] [--iters 30] [--rounds 2]

Layouts (all torchrun with 2 processes, gloo on CPU / NCCL on GPU, HyperMoE, mock data):
EP=1 ZeRO-1, EP=2 ZeRO-1, EP=1 ZeRO-2, EP=2 ZeRO-2, TP=2 (sequence parallel, so one
data-parallel rank accumulating 2 micro-batches) ZeRO-1, PP=2 (megatron-core's 1F1B schedule,
2 layers per stage, one data-parallel rank running 2 micro-batches through the pipeline) ZeRO-1.
With m micro-batches on p stages each stage idles (p - 1) of the m + p - 1 slots of a step (the
bubble, 1/3 here); the bench prints that fraction next to the measured step time. Rounds are
interleaved so drift hits
every layout alike; step time is the median logged ms/iteration after the first interval.
On 2 CPU cores the all-to-all of EP=2 is cheap and each rank computes half the experts, so the
ratio says more about overheads than about a cluster; run it on GPUs for those numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from megatron_hypermoe.parallel.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = ["--moe-type", "hypermoe", "--num-layers", "4", "--hidden-size", "256",
          "--ffn-hidden-size", "512", "--num-attention-heads", "4", "--seq-length", "128",
          "--micro-batch-size", "4", "--global-batch-size", "8", "--num-experts", "8",
          "--moe-router-topk", "2", "--mock-data", "--vocab-size", "4096", "--seed", "1"]
LAYOUTS = {
    "ep1_zero1": ["--expert-model-parallel-size", "1", "--zero-stage", "1"],
    "ep2_zero1": ["--expert-model-parallel-size", "2", "--zero-stage", "1"],
    "ep1_zero2": ["--expert-model-parallel-size", "1", "--zero-stage", "2"],
    "ep2_zero2": ["--expert-model-parallel-size", "2", "--zero-stage", "2"],
    "tp2_zero1": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                  "--zero-stage", "1"],
    "pp2_zero1": ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"],
}
PIPELINE_STAGES = 2
MICRO_BATCHES_PER_PIPELINE = 2  # global batch 8 / micro-batch 4 / one data-parallel rank


def run_layout(name, flags, iters, log_interval, scratch):
    metrics = os.path.join(scratch, f"{name}_{free_port()}.jsonl")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", os.path.join(ROOT, "pretrain_gpt_hypermoe.py"),
               *CONFIG, *flags, "--train-iters", str(iters), "--log-interval", str(log_interval),
               "--metrics-file", metrics]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(metrics) if '"lm_loss"' in line]
    return [r["ms_per_iter"] for r in rows[1:]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    times = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for name, flags in LAYOUTS.items():
                print(f"# round {round_index + 1}: {name}", file=sys.stderr, flush=True)
                times[name] += run_layout(name, flags, args.iters, args.log_interval, scratch)
    ms = {name: statistics.median(values) for name, values in times.items()}
    print(f"2 processes, {os.cpu_count()} cores; global batch 8 x seq 128; HyperMoE 8 experts "
          "top-2, 4 layers, hidden 256")
    print(f"{'layout':10} {'ms/iter':>9}")
    for name, value in ms.items():
        print(f"{name:10} {value:9.1f}")
    summary = dict(
        ep2_over_ep1_step_time=ms["ep2_zero1"] / ms["ep1_zero1"],
        ep2_over_ep1_step_time_zero2=ms["ep2_zero2"] / ms["ep1_zero2"],
        zero2_over_zero1_step_time=ms["ep1_zero2"] / ms["ep1_zero1"],
        tp2_over_tp1_step_time=ms["tp2_zero1"] / ms["ep1_zero1"],
        pp2_over_ep2_step_time=ms["pp2_zero1"] / ms["ep2_zero1"],
        pp2_over_tp2_step_time=ms["pp2_zero1"] / ms["tp2_zero1"],
        pp2_bubble_fraction=(PIPELINE_STAGES - 1) / (MICRO_BATCHES_PER_PIPELINE
                                                     + PIPELINE_STAGES - 1),
        ms_per_iter=ms,
    )
    print(f"EP=2 / EP=1: {summary['ep2_over_ep1_step_time']:.3f} (ZeRO-1), "
          f"{summary['ep2_over_ep1_step_time_zero2']:.3f} (ZeRO-2); "
          f"ZeRO-2 / ZeRO-1: {summary['zero2_over_zero1_step_time']:.3f}; "
          f"TP=2 / TP=1 (DP=2): {summary['tp2_over_tp1_step_time']:.3f}")
    print(f"PP=2: {ms['pp2_zero1']:.1f} ms/iter = {summary['pp2_over_ep2_step_time']:.3f} x EP=2, "
          f"{summary['pp2_over_tp2_step_time']:.3f} x TP=2; its 1F1B bubble idles each stage "
          f"{summary['pp2_bubble_fraction']:.0%} of a step ({MICRO_BATCHES_PER_PIPELINE} "
          f"micro-batches on {PIPELINE_STAGES} stages)")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

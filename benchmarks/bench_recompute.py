"""Activation memory and step time of activation recomputation: none / selective / full, for a
HyperMoE and a plain MoE GPT built from the trainer's own flags.

    python benchmarks/bench_recompute.py            # table
    python benchmarks/bench_recompute.py --json     # table, then one JSON line (last line)

"saved MB" is what the forward keeps for backward (parameters excluded), counted with
saved-tensor hooks: exact, the same on CPU and GPU. Under full recomputation a layer keeps only
its input; the rest is rebuilt in backward, which is what the step-time ratio pays for. Times are
the fastest of --repeats forward+backward steps, after one warm-up step: noisy on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from megatron_hypermoe.cli.arguments import model_config, parse_args
from megatron_hypermoe.model.gpt import build_gpt_model, causal_attention_mask
from megatron_hypermoe.model.memory import SavedActivationBytes
from megatron_hypermoe.parallel.distributed import destroy_distributed, initialize_distributed

MODES = {
    "none": [],
    "selective": ["--recompute-granularity", "selective"],  # core_attn, megatron's default
    "selective+moe": ["--recompute-granularity", "selective",
                      "--recompute-modules", "core_attn", "moe"],
    "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
             "--recompute-num-layers", "1"],
}


def model_flags(args, moe_type):
    return ["--moe-type", moe_type, "--num-layers", str(args.num_layers),
            "--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.heads),
            "--ffn-hidden-size", str(args.ffn_hidden_size), "--num-experts", str(args.experts),
            "--moe-router-topk", str(args.topk), "--seq-length", str(args.seq_length),
            "--micro-batch-size", str(args.micro_batch_size), "--mock-data",
            "--train-iters", "1"]


def step(model, tokens, mask):
    """One forward+backward: (seconds, saved activation bytes)."""
    counter = SavedActivationBytes(model.parameters())
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    start = time.perf_counter()
    with counter.counting():
        loss = model(tokens, positions, mask, labels=tokens).float().mean()
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed, counter.total


def bench(args, moe_type, modes):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length),
                           generator=generator)
    mask = causal_attention_mask(args.seq_length)
    rows = []
    for mode in modes:
        config = model_config(parse_args(model_flags(args, moe_type) + MODES[mode]))
        torch.manual_seed(0)
        model = build_gpt_model(config, vocab_size=args.vocab_size,
                                max_sequence_length=args.seq_length).train()
        if not rows:
            step(model, tokens, mask)  # warm-up (allocator, first-call costs), not timed
        runs = [step(model, tokens, mask) for _ in range(args.repeats)]
        seconds, saved = min(runs)
        rows.append(dict(moe_type=moe_type, mode=mode, step_s=seconds, saved_mb=saved / 2**20))
        print(f"# {moe_type} {mode}: {seconds:.1f} s", file=sys.stderr, flush=True)
        del model
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON summary as last line")
    parser.add_argument("--moe-types", default="hypermoe,moe")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=2, help="steps per mode; the fastest counts")
    # GPT-2 small's attention and depth; experts of the hidden size keep the weights (not what
    # is measured) small enough for a CPU machine.
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn-hidden-size", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()

    initialize_distributed(seed=0)
    modes = args.modes.split(",")
    rows = [row for moe_type in args.moe_types.split(",") for row in bench(args, moe_type, modes)]
    destroy_distributed()
    print(f"layers {args.num_layers}, hidden {args.hidden_size}, heads {args.heads}, "
          f"{args.experts} experts of FFN {args.ffn_hidden_size}, top-{args.topk}, "
          f"{args.micro_batch_size} x {args.seq_length} tokens, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'model':9} {'recompute':14} {'saved MB':>9} {'x none':>7} {'step s':>7} "
          f"{'x none':>7}")
    for r in rows:
        none = next(n for n in rows if n["moe_type"] == r["moe_type"] and n["mode"] == modes[0])
        r["saved_over_none"] = r["saved_mb"] / none["saved_mb"]
        r["time_over_none"] = r["step_s"] / none["step_s"]
        print(f"{r['moe_type']:9} {r['mode']:14} {r['saved_mb']:9.1f} "
              f"{r['saved_over_none']:7.3f} {r['step_s']:7.2f} {r['time_over_none']:7.2f}")
    if args.json:
        print(json.dumps(dict(shape=vars(args), rows=rows)))


if __name__ == "__main__":
    main()

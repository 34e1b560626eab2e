"""Forward+backward time and activation memory of one MoE layer: HyperMoE (auto and each form)
against megatron-core's own MoE layer, measured in one run with the same router and experts.

    python benchmarks/bench_layer.py            # table
    python benchmarks/bench_layer.py --json     # table, then one JSON line (last line)

Activation memory is the bytes autograd saves for backward (parameters excluded), measured with
saved-tensor hooks, so it is exact and the same on CPU and GPU; on CUDA the peak allocated memory
is reported as well. Timings are medians over interleaved repetitions: ratios from one run are what
to compare, these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch

from megatron_hypermoe.model.config import MAX_ALLSETS, make_config
from megatron_hypermoe.model.gpt import build_gpt_model
from megatron_hypermoe.model.hyper_expert import choose_impl
from megatron_hypermoe.model.memory import SavedActivationBytes
from megatron_hypermoe.parallel.distributed import destroy_distributed, initialize_distributed
from megatron_hypermoe.training.cpu_allocator import keep_freed_memory

SHAPES = {
    "tiny": dict(hidden_size=64, ffn_hidden_size=128, num_moe_experts=4, tokens=256,
                 hyper=dict(hyper_adapter_dim=8, hyper_hidden_size=16,
                            hyper_expert_embedding_dim=16, hyper_selection_hidden_size=16,
                            hyper_selection_output_size=16, hyper_layer_embedding_dim=4)),
    # GPT-2 small's MLP as 8 experts, paper-default hyper sizes (64/128/128/128,128/10).
    "gpt2": dict(hidden_size=768, ffn_hidden_size=3072, num_moe_experts=8, tokens=2048,
                 hyper=dict()),
    # The widths users train at: a Llama-like MLP (hidden 2048, FFN 5632) as 8 experts, and 64
    # fine-grained experts of a quarter of that FFN (top-2 and top-8: C(64, 8) sets is 4.4e9).
    "wide": dict(hidden_size=2048, ffn_hidden_size=5632, num_moe_experts=8, tokens=2048,
                 hyper=dict()),
    "wide64": dict(hidden_size=2048, ffn_hidden_size=1408, num_moe_experts=64, tokens=2048,
                   hyper=dict()),
}
VARIANTS = ("moe", "hypermoe", "hypermoe-allsets", "hypermoe-grouped", "hypermoe-factored",
            "hypermoe-naive")
# Interleaved with each other only: a run after one with large buffers (factored, naive) pays
# for fresh pages, which would bias the ratio that matters.
INTERLEAVED = (VARIANTS[:4], VARIANTS[4:])


def build_layers(shape: dict, topk: int, device: torch.device, dtype: torch.dtype):
    """The MoE layer and a HyperMoE layer with the same router and expert weights."""
    common = dict(num_layers=1, hidden_size=shape["hidden_size"],
                  ffn_hidden_size=shape["ffn_hidden_size"], num_attention_heads=4,
                  num_moe_experts=shape["num_moe_experts"], moe_router_topk=topk,
                  moe_aux_loss_coeff=1e-2)
    moe_model = build_gpt_model(make_config("moe", **common), vocab_size=128,
                                max_sequence_length=16)
    hyper_model = build_gpt_model(make_config("hypermoe", **common, **shape["hyper"]),
                                  vocab_size=128, max_sequence_length=16)
    hyper_model.load_state_dict(moe_model.state_dict(), strict=False)
    moe_layer = moe_model.decoder.layers[0].mlp.to(device, dtype)
    hyper_model.hypernetwork.to(device, dtype)
    hyper_layer = hyper_model.decoder.layers[0].mlp.to(device, dtype)
    return moe_layer, hyper_layer, hyper_model


def run_once(layer, x, grad_out, params):
    counter = SavedActivationBytes(params)
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        out, _ = layer(x)
    out.backward(grad_out)
    if x.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if x.is_cuda else None
    for p in params:  # (the shared hypernetwork is not a submodule of the layer)
        p.grad = None
    x.grad = None
    return elapsed, counter.total, peak


def runnable_variants(shape_name: str, topk: int, variants=VARIANTS) -> list:
    """The variants that can run at a shape: ``allsets`` generates C(E, k) HyperExperts and is
    refused past MAX_ALLSETS (top-8 of 64 experts: 4.4e9 sets, hundreds of GB)."""
    sets = math.comb(SHAPES[shape_name]["num_moe_experts"], topk)
    return [v for v in variants if not (v == "hypermoe-allsets" and sets > MAX_ALLSETS)]


def bench_case(shape_name, topk, repeats, device, dtype=torch.float32, tokens=None,
               variants=VARIANTS):
    shape = SHAPES[shape_name]
    moe_layer, hyper_layer, hyper_model = build_layers(shape, topk, device, dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens or shape["tokens"], 1, shape["hidden_size"],
                    generator=generator).to(device, dtype)
    x.requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=generator).to(device, dtype)
    impl_of = {"hypermoe": "auto", **{v: v.split("-")[1] for v in VARIANTS[2:]}}
    hyper_params = list(hyper_layer.parameters()) + list(hyper_model.hypernetwork.parameters())

    def run(variant):
        if variant == "moe":
            return run_once(moe_layer, x, grad_out, list(moe_layer.parameters()))
        hyper_layer.config.hyper_expert_impl = impl_of[variant]
        return run_once(hyper_layer, x, grad_out, hyper_params)

    variants = runnable_variants(shape_name, topk, variants)
    times = {v: [] for v in variants}
    memory = {}
    for group in INTERLEAVED:
        group = [v for v in group if v in variants]
        for variant in group:
            run(variant)  # warm-up
        for _ in range(repeats):
            for variant in group:
                elapsed, saved, peak = run(variant)
                times[variant].append(elapsed)
                memory[variant] = (saved, peak)
    rows = []
    for variant in variants:
        rows.append(dict(shape=shape_name, topk=topk, variant=variant,
                         impl=None if variant == "moe" else choose_impl(
                             impl_of[variant], x.shape[0], shape["num_moe_experts"], topk,
                             device, shape["hidden_size"], hyper_model.hypernetwork.fc.out_features),
                         ms=1000 * statistics.median(times[variant]),
                         saved_mb=memory[variant][0] / 2**20,
                         peak_mb=None if memory[variant][1] is None
                         else memory[variant][1] / 2**20))
    return rows


def summarize(rows):
    """The JSON keys: GPT-2 width keeps the original names, the wide shapes (worst over every
    wide case run) add the suffix ``_wide``."""
    def row(case, variant):
        return next((r for r in rows if (r["shape"], r["topk"], r["variant"]) == case + (variant,)),
                    None)

    summary, names = {}, []
    for suffix, shapes in (("", ("gpt2",)), ("_wide", ("wide", "wide64"))):
        cases = sorted({(r["shape"], r["topk"]) for r in rows if r["shape"] in shapes})
        if not cases:
            continue
        over_moe, naive_over_fast, extra_mem = [], [], []
        for case in cases:
            moe, fast, naive = row(case, "moe"), row(case, "hypermoe"), row(case, "hypermoe-naive")
            over_moe.append(fast["ms"] / moe["ms"])
            extra_mem.append(fast["saved_mb"] / moe["saved_mb"] - 1.0)
            if naive is not None:
                naive_over_fast.append(naive["ms"] / fast["ms"])
        summary[f"hypermoe_over_moe_time{suffix}"] = max(over_moe)
        summary[f"hypermoe_extra_memory_fraction{suffix}"] = max(extra_mem)
        if naive_over_fast:
            summary[f"naive_over_fast_time{suffix}"] = min(naive_over_fast)
        names += [f"{shape}-top{k}" for shape, k in cases]
    return dict(summary, cases=names)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON summary as last line")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="tiny,gpt2")
    parser.add_argument("--topk", default="1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="subset of " + ",".join(VARIANTS) + " (moe and hypermoe always run)")
    parser.add_argument("--bf16", action="store_true", help="weights and activations in bf16")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per batch (default: the shape's; GPUs want more)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    initialize_distributed(seed=0)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does on the CPU (training/cpu_allocator.py)
    variants = [v for v in VARIANTS if v in {"moe", "hypermoe", *args.variants.split(",")}]
    rows = []
    for shape_name in args.shapes.split(","):
        for topk in (int(k) for k in args.topk.split(",")):
            print(f"# {shape_name} top-{topk} ...", file=sys.stderr, flush=True)
            rows.extend(bench_case(shape_name, topk, args.repeats, device, dtype, args.tokens,
                                   variants))

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else \
        platform.processor() or platform.machine()
    print(f"device: {device} ({name}, {torch.get_num_threads()} threads), {str(dtype)[6:]}, "
          f"torch {torch.__version__}")
    print(f"{'shape':6} {'top':>3} {'variant':18} {'form':8} {'fwd+bwd ms':>11} {'x moe':>6} "
          f"{'saved MB':>9} {'x moe':>6}" + (" peak MB" if device.type == "cuda" else ""))
    for r in rows:
        moe = next(m for m in rows if (m["shape"], m["topk"], m["variant"])
                   == (r["shape"], r["topk"], "moe"))
        line = (f"{r['shape']:6} {r['topk']:>3} {r['variant']:18} {r['impl'] or '':8} "
                f"{r['ms']:11.1f} "
                f"{r['ms'] / moe['ms']:6.2f} {r['saved_mb']:9.1f} "
                f"{r['saved_mb'] / moe['saved_mb']:6.2f}")
        if r["peak_mb"] is not None:
            line += f" {r['peak_mb']:8.1f}"
        print(line)
    destroy_distributed()
    if args.json and any(r["shape"] != "tiny" for r in rows):
        summary = summarize(rows)
        summary["device"] = str(device)
        summary["dtype"] = str(dtype)[6:]
        summary["rows"] = rows
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Forward+backward time and activation memory of an MoE layer: HyperMoE (auto and each form)
against megatron-core's own MoE layer, measured in one run with the same router and experts.

    python benchmarks/bench_layer.py            # table
    python benchmarks/bench_layer.py --json     # table, then one JSON line (last line)
    python benchmarks/bench_layer.py --side-path 5   # + the HyperExpert's own time in the step

Each step runs ``--layers`` layers on the same tokens (by default 4 at GPT-2 width, 1 at hidden
2048, where four would hold 2-18 GB of expert weights), as one model step runs its layers:
HyperMoE layers share one hypernetwork, whose heads a model reads once per forward and whose
gradient it writes once per backward for all its layers (``allsets`` generates all layers'
HyperExperts together); times and memory are per layer. ``--layers 1`` measures a lone layer,
which pays the whole hypernetwork itself.

Activation memory is the bytes autograd saves for backward (parameters excluded), measured with
saved-tensor hooks, so it is exact and the same on CPU and GPU; on CUDA the peak allocated memory
is reported as well. Variants run interleaved, in an order rotated every repetition; a variant's
"x moe" is the median over repetitions of its time over the MoE's in the same repetition (both
share the machine's state), its "ms" the median time, and "median CI" the sign-test interval
for that median ratio (:func:`median_interval`, no assumption on the noise's shape): on a busy
machine one repetition's ratio can swing by 10%, and the interval says how far a run's median can
be trusted. Ratios from one run are what to compare: these machines are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time

import torch

from megatron_hypermoe.model.config import MAX_ALLSETS, make_config
from megatron_hypermoe.model.gpt import build_gpt_model
from megatron_hypermoe.model.hyper_expert import choose_impl, shared_generation
from megatron_hypermoe.model.memory import SavedActivationBytes
from megatron_hypermoe.parallel.distributed import destroy_distributed
from megatron_hypermoe.training.cpu_allocator import benchmark_device

SHAPES = {
    "tiny": dict(hidden_size=64, ffn_hidden_size=128, num_moe_experts=4, tokens=256, layers=4,
                 hyper=dict(hyper_adapter_dim=8, hyper_hidden_size=16,
                            hyper_expert_embedding_dim=16, hyper_selection_hidden_size=16,
                            hyper_selection_output_size=16, hyper_layer_embedding_dim=4)),
    # GPT-2 small's MLP as 8 experts, paper-default hyper sizes (64/128/128/128,128/10).
    "gpt2": dict(hidden_size=768, ffn_hidden_size=3072, num_moe_experts=8, tokens=2048,
                 layers=4, hyper=dict()),
    # The widths users train at: a Llama-like MLP (hidden 2048, FFN 5632) as 8 experts, and 64
    # fine-grained experts of a quarter of that FFN (top-2 and top-8: C(64, 8) sets is 4.4e9).
    # (one layer per step by default: four of them would hold 2-18 GB of expert weights)
    "wide": dict(hidden_size=2048, ffn_hidden_size=5632, num_moe_experts=8, tokens=2048,
                 layers=1, hyper=dict()),
    "wide64": dict(hidden_size=2048, ffn_hidden_size=1408, num_moe_experts=64, tokens=2048,
                   layers=1, hyper=dict()),
}
VARIANTS = ("moe", "hypermoe", "hypermoe-allsets", "hypermoe-grouped", "hypermoe-factored",
            "hypermoe-naive")
# Interleaved with each other only: a run after one with large buffers (factored, naive) pays
# for fresh pages, which would bias the ratio that matters.
INTERLEAVED = (VARIANTS[:4], VARIANTS[4:])


def build_layers(shape: dict, topk: int, device: torch.device, dtype: torch.dtype,
                 num_layers: int = 1):
    """``num_layers`` MoE layers and as many HyperMoE layers with the same router and expert
    weights, and the HyperMoE model (its shared hypernetwork)."""
    common = dict(num_layers=num_layers, hidden_size=shape["hidden_size"],
                  ffn_hidden_size=shape["ffn_hidden_size"], num_attention_heads=4,
                  num_moe_experts=shape["num_moe_experts"], moe_router_topk=topk,
                  moe_aux_loss_coeff=1e-2)
    moe_model = build_gpt_model(make_config("moe", **common), vocab_size=128,
                                max_sequence_length=16)
    hyper_model = build_gpt_model(make_config("hypermoe", **common, **shape["hyper"]),
                                  vocab_size=128, max_sequence_length=16)
    hyper_model.load_state_dict(moe_model.state_dict(), strict=False)
    moe_layers = [layer.mlp.to(device, dtype) for layer in moe_model.decoder.layers]
    hyper_model.hypernetwork.to(device, dtype)
    hyper_layers = [layer.mlp.to(device, dtype) for layer in hyper_model.decoder.layers]
    for layer in hyper_layers:  # as the trainer runs steps it does not log
        layer.record_statistics = False
    return moe_layers, hyper_layers, hyper_model


def run_once(layers, x, grad_out, params, hypernetwork=None):
    """Forward and backward of the layers, each on x, as one model step runs them: HyperMoE
    layers generate their HyperExperts together (``shared_generation``, as HyperMoEGPTModel
    does), so the hypernetwork's heads are read once per forward and their gradient written
    once per backward for all layers. Returns (seconds, saved bytes, peak bytes) per layer."""
    counter = SavedActivationBytes(params)
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    shared = contextlib.nullcontext() if hypernetwork is None else shared_generation(
        hypernetwork, [(layer.selection, layer.layer_index) for layer in layers])
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), shared:
        out = sum(layer(x)[0] for layer in layers)
    out.backward(grad_out)
    if x.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if x.is_cuda else None
    for p in params:  # (the shared hypernetwork is not a submodule of the layer)
        p.grad = None
    x.grad = None
    per_layer = len(layers)
    return elapsed / per_layer, counter.total / per_layer, \
        None if peak is None else peak / per_layer


def runnable_variants(shape_name: str, topk: int, variants=VARIANTS) -> list:
    """The variants that can run at a shape: ``allsets`` generates C(E, k) HyperExperts and is
    refused past MAX_ALLSETS (top-8 of 64 experts: 4.4e9 sets, hundreds of GB)."""
    sets = math.comb(SHAPES[shape_name]["num_moe_experts"], topk)
    return [v for v in variants if not (v == "hypermoe-allsets" and sets > MAX_ALLSETS)]


# The HyperExpert's autograd functions, as torch's profiler names them: the hypernetwork's heads
# (model/few_row_gemm.py) and the grouped application (model/hyper_expert.py).
SIDE_PATH_PARTS = {"heads forward": "HeadProduct", "heads backward": "HeadProductBackward",
                   "application forward": "GroupedHyperExpert",
                   "application backward": "GroupedHyperExpertBackward"}


def side_path_times(run, steps: int, num_layers: int) -> dict:
    """ms per layer of each SIDE_PATH_PARTS function inside ``steps`` HyperMoE steps (CPU time
    of the calling thread, torch's profiler): what the side path costs where it runs, after
    the experts' GEMMs, rather than alone."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in range(steps):
            run()
    totals = {event.key: event.cpu_time_total for event in profiled.key_averages()}
    return {part: totals.get(name, 0.0) / 1000 / steps / num_layers
            for part, name in SIDE_PATH_PARTS.items()}


def bench_case(shape_name, topk, repeats, device, dtype=torch.float32, tokens=None,
               variants=VARIANTS, num_layers=None, side_path_steps=0):
    shape = SHAPES[shape_name]
    num_layers = num_layers or shape["layers"]
    moe_layers, hyper_layers, hyper_model = build_layers(shape, topk, device, dtype, num_layers)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens or shape["tokens"], 1, shape["hidden_size"],
                    generator=generator).to(device, dtype)
    x.requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=generator).to(device, dtype)
    impl_of = {"hypermoe": "auto", **{v: v.split("-")[1] for v in VARIANTS[2:]}}
    hyper_params = [p for layer in hyper_layers for p in layer.parameters()] + \
        list(hyper_model.hypernetwork.parameters())
    moe_params = [p for layer in moe_layers for p in layer.parameters()]

    def run(variant):
        if variant == "moe":
            return run_once(moe_layers, x, grad_out, moe_params)
        hyper_layers[0].config.hyper_expert_impl = impl_of[variant]  # (one config object)
        return run_once(hyper_layers, x, grad_out, hyper_params, hyper_model.hypernetwork)

    variants = runnable_variants(shape_name, topk, variants)
    times = {v: [] for v in variants}
    memory = {}
    for group in INTERLEAVED:
        group = [v for v in group if v in variants]
        if not group:
            continue
        for variant in group:
            run(variant)  # warm-up
        for repeat in range(repeats):
            # rotated each repetition: no variant always runs right after the same other one
            for variant in group[repeat % len(group):] + group[:repeat % len(group)]:
                elapsed, saved, peak = run(variant)
                times[variant].append(elapsed)
                memory[variant] = (saved, peak)
    side_path = None
    if side_path_steps:
        # after the timed repetitions: the profiler slows the steps it records
        hyper_layers[0].config.hyper_expert_impl = "auto"
        side_path = side_path_times(
            lambda: run_once(hyper_layers, x, grad_out, hyper_params, hyper_model.hypernetwork),
            side_path_steps, num_layers)
    rows = []
    for variant in variants:
        # the median of per-repetition ratios: both runs of a pair share the machine's state
        paired = [t / m for t, m in zip(times[variant], times["moe"])]
        low, high, coverage = median_interval(paired)
        rows.append(dict(shape=shape_name, topk=topk, variant=variant, layers=num_layers,
                         x_moe=statistics.median(paired), x_moe_interval=[low, high],
                         interval_coverage=coverage,
                         impl=None if variant == "moe" else choose_impl(
                             impl_of[variant], x.shape[0], shape["num_moe_experts"], topk,
                             device, shape["hidden_size"],
                             hyper_model.hypernetwork.fc.out_features),
                         ms=1000 * statistics.median(times[variant]),
                         saved_mb=memory[variant][0] / 2**20,
                         side_path_ms=side_path if variant == "hypermoe" else None,
                         peak_mb=None if memory[variant][1] is None
                         else memory[variant][1] / 2**20))
    return rows


def median_interval(values, coverage: float = 0.95):
    """A distribution-free interval for the median of the distribution ``values`` were drawn
    from (the sign test's): order statistics x_(j) <= x_(n+1-j) with the largest j whose
    coverage P(j <= Binomial(n, 1/2) <= n - j) is at least ``coverage``; with too few values
    for that, (min, max). Returns (low, high, its coverage): 10 values give x_(2), x_(9), 97.9%;
    5 give min and max, 93.8%."""
    ordered = sorted(values)
    n = len(ordered)

    def covered(j):
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2**n

    j = 1
    while j + 1 <= n // 2 and covered(j + 1) >= coverage:
        j += 1
    return ordered[j - 1], ordered[n - j], covered(j)


def x_moe(row, moe_row) -> float:
    """A variant's time over the MoE's: the median of per-repetition ratios where measured."""
    return row.get("x_moe", row["ms"] / moe_row["ms"])


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
        over_moe, naive_over_fast, extra_mem, intervals = [], [], [], []
        for case in cases:
            moe, fast, naive = row(case, "moe"), row(case, "hypermoe"), row(case, "hypermoe-naive")
            over_moe.append(x_moe(fast, moe))
            intervals.append(fast.get("x_moe_interval"))
            extra_mem.append(fast["saved_mb"] / moe["saved_mb"] - 1.0)
            if naive is not None:
                naive_over_fast.append(x_moe(naive, moe) / x_moe(fast, moe))
        summary[f"hypermoe_over_moe_time{suffix}"] = max(over_moe)
        if intervals[over_moe.index(max(over_moe))] is not None:  # (the worst case's)
            summary[f"hypermoe_over_moe_time{suffix}_interval"] = \
                intervals[over_moe.index(max(over_moe))]
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
    parser.add_argument("--layers", type=int, default=None,
                        help="layers per step, sharing the hypernetwork as in a model "
                             "(default: the shape's, 4 at GPT-2 width, 1 at hidden 2048)")
    parser.add_argument("--bf16", action="store_true", help="weights and activations in bf16")
    parser.add_argument("--side-path", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many HyperMoE steps (auto's form) and "
                             "report what its HyperExpert functions cost per layer inside the "
                             "step (CPU only; default: 0, off)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per batch (default: the shape's; GPUs want more)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.side_path < 0:
        parser.error(f"--side-path {args.side_path}: give a number of steps (0: off)")

    device, device_name = benchmark_device()
    if args.side_path and device.type != "cpu":
        parser.error("--side-path times the HyperExpert's functions on the host: on a GPU "
                     "that is kernel launches, not their cost; run with CUDA_VISIBLE_DEVICES= "
                     "or drop it")
    variants = [v for v in VARIANTS if v in {"moe", "hypermoe", *args.variants.split(",")}]
    rows = []
    for shape_name in args.shapes.split(","):
        for topk in (int(k) for k in args.topk.split(",")):
            print(f"# {shape_name} top-{topk} ...", file=sys.stderr, flush=True)
            rows.extend(bench_case(shape_name, topk, args.repeats, device, dtype, args.tokens,
                                   variants, args.layers, args.side_path))

    print(f"device: {device} ({device_name}, {torch.get_num_threads()} threads), {str(dtype)[6:]}, "
          f"torch {torch.__version__}; per-layer figures")
    print(f"{'shape':6} {'L':>2} {'top':>3} {'variant':18} {'form':8} {'fwd+bwd ms':>11} "
          f"{'x moe':>6} {'median CI':>14} "
          f"{'saved MB':>9} {'x moe':>6}" + (" peak MB" if device.type == "cuda" else ""))
    for r in rows:
        moe = next(m for m in rows if (m["shape"], m["topk"], m["variant"])
                   == (r["shape"], r["topk"], "moe"))
        line = (f"{r['shape']:6} {r['layers']:>2} {r['topk']:>3} {r['variant']:18} "
                f"{r['impl'] or '':8} "
                f"{r['ms']:11.1f} "
                f"{x_moe(r, moe):6.2f} "
                f"{'{:.2f}-{:.2f}'.format(*r['x_moe_interval']):>14} {r['saved_mb']:9.1f} "
                f"{r['saved_mb'] / moe['saved_mb']:6.2f}")
        if r["peak_mb"] is not None:
            line += f" {r['peak_mb']:8.1f}"
        print(line)
    for r in rows:
        if r.get("side_path_ms"):
            moe = next(m for m in rows if (m["shape"], m["topk"], m["variant"])
                       == (r["shape"], r["topk"], "moe"))
            total = sum(r["side_path_ms"].values())
            print(f"side path inside the step, {r['shape']} top-{r['topk']} ({r['impl']}, "
                  f"{args.side_path} profiled steps): {total:.1f} ms per layer, "
                  f"{100 * total / moe['ms']:.1f}% of the MoE layer: " + ", ".join(
                      f"{part} {ms:.1f}" for part, ms in r["side_path_ms"].items())
                  + ("" if r["side_path_ms"]["application forward"] else
                     " (the application ran as plain operators, not the grouped function: "
                     "not counted)"))
    coverage = next((r["interval_coverage"] for r in rows if r["variant"] != "moe"), None)
    if coverage is not None:
        print(f"median CI: the sign-test interval of each median ratio, {coverage:.1%} coverage "
              f"with {args.repeats} repetitions")
    destroy_distributed()
    if args.json and any(r["shape"] != "tiny" for r in rows):
        summary = summarize(rows)
        summary["device"] = str(device)
        summary["dtype"] = str(dtype)[6:]
        summary["rows"] = rows
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Long sequences without Transformer Engine: core attention on torch's SDPA against megatron's
local DotProductAttention, and grouped-GEMM experts against megatron's SequentialMLP, each as
one training micro-batch (forward + backward of the whole model) at sequence 4096 and 8192.

    python benchmarks/bench_fast_path.py            # table
    python benchmarks/bench_fast_path.py --json     # table, then one JSON line (last line)

Reported per case: the bytes autograd saves for backward (parameters excluded: exact, the same
on CPU and GPU) and the median step time over interleaved repetitions (the two sides of a
comparison alternate, so machine noise hits both alike). The optimizer step is the same for
both sides of every comparison and is left out. Ratios from one run are what to compare.

Attention is compared in a dense model (the MLP is the same on both sides). Experts are
compared in a ``moe`` model with SDPA attention, at 8 experts (top-2) and 64 fine-grained
experts (top-2, a quarter of the FFN each, as in bench_layer's ``wide64``), two ways: the MoE
layer alone (router, dispatch, experts, combine: forward + backward on the sequence's tokens;
the ``..._moe_step_time_e*`` keys) and the whole model's micro-batch (``..._model_step_time``:
the attention at these lengths costs the same on both sides and dilutes the difference). The MoE
layer also runs as ``grouped-loop``: the grouped experts with the per-expert loop that replaces
``torch._grouped_mm`` where torch cannot run it (``grouped_loop_over_sequential_moe_...``), so
each device measures what its fallback costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from unittest import mock

import torch

from megatron_hypermoe.model import grouped_gemm
from megatron_hypermoe.model.config import make_config
from megatron_hypermoe.model.gpt import build_gpt_model, causal_attention_mask
from megatron_hypermoe.model.memory import SavedActivationBytes
from megatron_hypermoe.parallel.distributed import destroy_distributed
from megatron_hypermoe.training.cpu_allocator import benchmark_device

VOCAB = 256
# Small enough for 2 CPU cores at 8192 tokens; head size 32 as in small GPTs.
MODEL = dict(num_layers=2, hidden_size=128, num_attention_heads=4, init_method_std=0.02)
ATTENTION = {"local": dict(core_attention_backend="local"),
             "sdpa": dict(core_attention_backend="auto")}
EXPERTS = {"sequential": dict(moe_grouped_gemm=False), "grouped": dict(moe_grouped_gemm=True)}
EXPERT_SHAPES = {8: dict(num_moe_experts=8, ffn_hidden_size=512, moe_router_topk=2),
                 64: dict(num_moe_experts=64, ffn_hidden_size=128, moe_router_topk=2)}


def build(moe_type, seq, device, dtype, **fields):
    torch.manual_seed(0)
    config = make_config(moe_type, **{**MODEL, "ffn_hidden_size": 512, **fields})
    model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=seq)
    return model.to(device, dtype)


def step(model, batch):
    """One micro-batch: forward and backward; returns (seconds, saved bytes)."""
    tokens, positions, mask, labels = batch
    counter = SavedActivationBytes(model.parameters())
    synchronize(tokens.device)
    start = time.perf_counter()
    with counter.counting():
        loss = model(tokens, positions, mask, labels=labels).float().mean()
    loss.backward()
    synchronize(tokens.device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed, counter.total


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def moe_layer_step(layer, inputs):
    """Forward and backward of one MoE layer on [s, 1, h] hidden states."""
    x, grad = inputs
    synchronize(x.device)
    start = time.perf_counter()
    out, _ = layer(x)
    out.backward(grad)
    synchronize(x.device)
    elapsed = time.perf_counter() - start
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return elapsed, 0


class LoopInsteadOfGroupedMM:
    """A grouped-experts layer run with the per-expert loop that replaces torch._grouped_mm
    where torch cannot run it: what that fallback costs here, measured."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        with mock.patch.object(grouped_gemm, "native_grouped_mm", lambda *args: False):
            return self.layer(x)

    def zero_grad(self, set_to_none=True):
        self.layer.zero_grad(set_to_none=set_to_none)


def make_batch(seq, device):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=generator).to(device)
    positions = torch.arange(seq, device=device).unsqueeze(0)
    return tokens[:, :-1], positions, causal_attention_mask(seq, device), tokens[:, 1:]


def compare(models: dict, batch, repeats: int, run=step) -> dict:
    """{name: (median seconds, saved bytes)} for models run alternately on one batch."""
    times = {name: [] for name in models}
    saved = {}
    for model in models.values():
        run(model, batch)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            elapsed, saved[name] = run(model, batch)
            times[name].append(elapsed)
    return {name: (statistics.median(times[name]), saved[name]) for name in models}


def plot(rows, path, machine):
    """Each comparison's time and saved-bytes ratio (new over megatron's), one bar per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"attention": "SDPA / local attention", "moe layer": "/ sequential, MoE layer",
             "model": "/ sequential, micro-batch"}
    cases = [r for r in rows if r["variant"] in ("sdpa", "grouped", "grouped-loop")]
    labels = [("" if r["what"] == "attention" else r["variant"] + " ") + names[r["what"]] +
              f"\nseq {r['seq']}" + (f", {r['experts']} experts" if r["experts"] else "")
              for r in cases]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(cases) + 1.5), sharey=True)
    for axis, key, title in ((axes[0], "time_ratio", "step time ratio"),
                             (axes[1], "saved_ratio", "saved-for-backward bytes ratio")):
        values = [r.get(key) or 0.0 for r in cases]  # (no bytes for the MoE layer alone)
        axis.barh(range(len(cases)), values, color=[
            "tab:green" if v < 0.99 else "tab:red" if v > 1.01 else "tab:gray" for v in values])
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_title(title)
        axis.set_yticks(range(len(cases)), labels, fontsize=8)
    axes[0].invert_yaxis()  # (shared by both panels)
    fig.suptitle(f"bench_fast_path.py: new over megatron's (< 1 is better), {machine}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON summary as last line")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seqs", default="4096,8192")
    parser.add_argument("--experts", default="8,64")
    parser.add_argument("--bf16", action="store_true", help="weights and activations in bf16")
    parser.add_argument("--plot", default=None, help="also draw the ratios into this PNG")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    device, device_name = benchmark_device()
    rows = []
    for seq in (int(s) for s in args.seqs.split(",")):
        batch = make_batch(seq, device)
        print(f"# attention at sequence {seq} ...", file=sys.stderr, flush=True)
        models = {name: build("dense", seq, device, dtype, **fields)
                  for name, fields in ATTENTION.items()}
        for name, (seconds, saved) in compare(models, batch, args.repeats).items():
            rows.append(dict(what="attention", seq=seq, experts=None, variant=name,
                             ms=1000 * seconds, saved_mb=saved / 2**20))
        del models
        for num_experts in (int(e) for e in args.experts.split(",")):
            print(f"# {num_experts} experts at sequence {seq} ...", file=sys.stderr, flush=True)
            models = {name: build("moe", seq, device, dtype, **EXPERT_SHAPES[num_experts],
                                  **fields) for name, fields in EXPERTS.items()}
            for name, (seconds, saved) in compare(models, batch, args.repeats).items():
                rows.append(dict(what="model", seq=seq, experts=num_experts, variant=name,
                                 ms=1000 * seconds, saved_mb=saved / 2**20))
            generator = torch.Generator().manual_seed(2)
            hidden = [torch.randn(seq, 1, MODEL["hidden_size"], generator=generator)
                      .to(device, dtype) for _ in range(2)]
            hidden[0].requires_grad_(True)
            layers = {name: model.decoder.layers[0].mlp for name, model in models.items()}
            layers["grouped-loop"] = LoopInsteadOfGroupedMM(layers["grouped"])
            for name, (seconds, _) in compare(layers, hidden, args.repeats,
                                              moe_layer_step).items():
                rows.append(dict(what="moe layer", seq=seq, experts=num_experts, variant=name,
                                 ms=1000 * seconds, saved_mb=None))
            del models, layers

    print(f"device: {device} ({device_name}, {torch.get_num_threads()} threads), {str(dtype)[6:]}, "
          f"torch {torch.__version__}")
    print(f"{'what':9} {'seq':>5} {'experts':>7} {'variant':10} {'step ms':>9} {'ratio':>6} "
          f"{'saved MB':>9} {'ratio':>6}")
    baseline = {"attention": "local", "model": "sequential", "moe layer": "sequential"}
    summary = {}
    for r in rows:
        base = next(b for b in rows if (b["what"], b["seq"], b["experts"], b["variant"]) ==
                    (r["what"], r["seq"], r["experts"], baseline[r["what"]]))
        r["time_ratio"] = r["ms"] / base["ms"]
        line = (f"{r['what']:9} {r['seq']:5d} {r['experts'] or '':>7} {r['variant']:10} "
                f"{r['ms']:9.1f} {r['time_ratio']:6.2f}")
        if r["saved_mb"] is not None:
            r["saved_ratio"] = r["saved_mb"] / base["saved_mb"]
            line += f" {r['saved_mb']:9.1f} {r['saved_ratio']:6.2f}"
        print(line)
        if r["variant"] == "sdpa":
            summary[f"sdpa_over_local_activation_bytes_seq{r['seq']}"] = r["saved_ratio"]
            summary[f"sdpa_over_local_step_time_seq{r['seq']}"] = r["time_ratio"]
        elif r["variant"] in ("grouped", "grouped-loop"):
            key = "{}_over_sequential_{}_step_time_e{}".format(
                r["variant"].replace("-", "_"), "moe" if r["what"] == "moe layer" else "model",
                r["experts"])
            if r["seq"] != 4096:
                key += f"_seq{r['seq']}"
            summary[key] = r["time_ratio"]
    destroy_distributed()
    if args.plot:
        plot(rows, args.plot, f"{device_name}, {str(dtype)[6:]}")
    if args.json:
        summary.update(device=str(device), dtype=str(dtype)[6:], rows=rows)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

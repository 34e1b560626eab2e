"""Does HyperMoE beat an MoE with the same experts in pretraining, and at what cost? Re-runnable.

    python benchmarks/compare_variants.py            # default: about an hour on 2 CPU cores
    python benchmarks/compare_variants.py --quick    # a few minutes
    python benchmarks/compare_variants.py --topk 2 --results docs/RESULTS_top2.md  # variations

Trains, on the default corpus (Shakespeare, fetched pinned and checksum-verified) with identical
data order, tokens and seeds:
- ``hypermoe``: MoE + the HyperExpert generated from the unselected experts' embeddings;
- ``moe``: the same experts and top-k, no side path;
- ``moe_adapter``: the MoE plus a static (learned, not generated) bottleneck adapter of the same
  size r: the ablation that isolates the hypernetwork;
- ``dense``: a SwiGLU MLP with the active parameters of top-k experts (ffn = k x expert ffn).
Each variant runs with every seed; the same seed gives every variant the same data order and the
same initial weights for the parts they share. Reports validation perplexity mean and standard
deviation, parameters (total and active per token), tokens/s and wall time per variant, writes
``--results`` (a markdown table, the exact command, the machine) and a PNG of the validation
curves with seed bands. Nothing here is a test; the numbers are what this machine measured.
Runs go one after another (interleaved by seed) so machine drift hits every variant alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("hypermoe", "moe", "moe_adapter", "dense")

DEFAULT = dict(num_layers=4, hidden_size=192, ffn_hidden_size=384, heads=4, seq_length=128,
               micro_batch_size=8, num_experts=8, train_iters=600, eval_interval=100,
               eval_iters=20, lr=1e-3, warmup=30, vocab=4096, seeds=3)
QUICK = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, heads=4, seq_length=64,
             micro_batch_size=4, num_experts=4, train_iters=40, eval_interval=10,
             eval_iters=4, lr=2e-3, warmup=4, vocab=1024, seeds=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration, minutes")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--train-iters", type=int, default=None)
    parser.add_argument("--hyper-adapter-dim", type=int, default=None, help="r (default d/4)")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "compare_variants"))
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    parser.add_argument("--results", default=os.path.join(ROOT, "docs", "RESULTS.md"))
    parser.add_argument("--plot", default=None, help="PNG (default: next to --results)")
    parser.add_argument("--data-path", default=None,
                        help="a preprocessed dataset prefix instead of the default corpus "
                             "(then also --tokenizer-model, a SentencePiece model)")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--json", action="store_true", help="last line: a JSON summary")
    args = parser.parse_args(argv)
    args.size = dict(QUICK if args.quick else DEFAULT)
    if args.train_iters:
        args.size["train_iters"] = args.train_iters
    args.seeds = args.seeds or args.size["seeds"]
    args.hyper_adapter_dim = args.hyper_adapter_dim or args.size["hidden_size"] // 4
    args.plot = args.plot or os.path.splitext(args.results)[0] + ".png"
    if bool(args.data_path) != bool(args.tokenizer_model):
        parser.error("--data-path and --tokenizer-model go together")
    return args


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"failed: {shlex.join(command)}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def prepare_default_corpus(args):
    """Default corpus -> SentencePiece -> indexed dataset (each step skipped when done)."""
    python, data = sys.executable, os.path.join(args.data_dir, "shakespeare")
    vocab = args.size["vocab"]
    tokenizer = os.path.join(data, f"tok{vocab}")
    prefix = os.path.join(data, f"shk{vocab}")
    run([python, os.path.join(ROOT, "tools", "get_default_corpus.py"), "--data-dir",
         args.data_dir])
    corpus = os.path.join(data, "shakespeare.jsonl")
    if not os.path.isfile(tokenizer + ".model"):
        run([python, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", corpus,
             "--vocab-size", str(vocab), "--model-prefix", tokenizer])
    if not os.path.isfile(prefix + "_text_document.idx"):
        run([python, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
             "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", tokenizer + ".model", "--append-eod", "--workers", "2"])
    return prefix + "_text_document", tokenizer + ".model"


def variant_flags(variant, args):
    size, k = args.size, args.topk
    flags = ["--moe-type", "dense" if variant == "dense" else variant,
             "--num-layers", str(size["num_layers"]), "--hidden-size", str(size["hidden_size"]),
             "--num-attention-heads", str(size["heads"])]
    if variant == "dense":  # the active parameters of k experts
        flags += ["--ffn-hidden-size", str(k * size["ffn_hidden_size"])]
    else:
        flags += ["--ffn-hidden-size", str(size["ffn_hidden_size"]),
                  "--num-experts", str(size["num_experts"]), "--moe-router-topk", str(k),
                  "--hyper-adapter-dim", str(args.hyper_adapter_dim)]
    return flags


def train(variant, seed, data_path, tokenizer_model, args):
    size = args.size
    run_dir = os.path.join(args.work_dir, f"{variant}_seed{seed}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    if os.path.exists(metrics):
        os.remove(metrics)
    command = [
        sys.executable, os.path.join(ROOT, "pretrain_gpt_hypermoe.py"),
        *variant_flags(variant, args),
        "--seq-length", str(size["seq_length"]), "--micro-batch-size",
        str(size["micro_batch_size"]), "--train-iters", str(size["train_iters"]),
        "--lr", str(size["lr"]), "--min-lr", str(size["lr"] / 10),
        "--lr-warmup-iters", str(size["warmup"]), "--lr-decay-style", "cosine",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", str(seed),
        "--data-path", data_path, "--split", "95,5,0",
        "--data-cache-path", os.path.join(args.work_dir, "index-cache"),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
        "--log-interval", str(size["eval_interval"]), "--eval-interval",
        str(size["eval_interval"]), "--eval-iters", str(size["eval_iters"]),
        "--metrics-file", metrics,
    ]
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment.setdefault("DS_ACCELERATOR", "cpu")
    start = time.time()
    run(command, env=environment)
    wall = time.time() - start
    rows = [json.loads(line) for line in open(metrics)]
    train_rows = [r for r in rows if "lm_loss" in r]
    evals = [(r["iteration"], r["val_ppl"]) for r in rows if "val_ppl" in r]
    sizes = next(r for r in rows if "parameters" in r)
    return dict(variant=variant, seed=seed, wall_s=wall, evals=evals, final_ppl=evals[-1][1],
                tokens_per_s=statistics.median(r["tokens_per_s"] for r in train_rows[1:] or
                                               train_rows),
                total_params=sizes["parameters"], active_params=sizes["active_parameters"],
                command=shlex.join(command))


def summarise(results):
    table = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        ppl = [r["final_ppl"] for r in runs]
        table[variant] = dict(
            ppl_mean=statistics.mean(ppl),
            ppl_std=statistics.stdev(ppl) if len(ppl) > 1 else float("nan"),
            seeds=len(runs), total_params=runs[0]["total_params"],
            active_params=runs[0]["active_params"],
            tokens_per_s=statistics.mean(r["tokens_per_s"] for r in runs),
            wall_s=statistics.mean(r["wall_s"] for r in runs))
    if "moe" in table:
        for row in table.values():
            row["time_over_moe"] = row["wall_s"] / table["moe"]["wall_s"]
    return table


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in results):
        curves = [r["evals"] for r in results if r["variant"] == variant]
        iterations = [i for i, _ in curves[0]]
        values = [[ppl for _, ppl in curve] for curve in curves]
        mean = [statistics.mean(column) for column in zip(*values)]
        low = [min(column) for column in zip(*values)]
        high = [max(column) for column in zip(*values)]
        axis.plot(iterations, mean, label=f"{variant} ({len(curves)} seeds)")
        axis.fill_between(iterations, low, high, alpha=0.2)
    axis.set_xlabel("iteration")
    axis.set_ylabel("validation perplexity")
    axis.set_yscale("log")
    axis.set_title("validation perplexity: mean over seeds, band = min..max")
    axis.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {device}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def write_report(args, table, results, path):
    size = args.size
    lines = [
        "# HyperMoE vs MoE vs static adapter vs dense: small-scale pretraining",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {machine()}.",
        "",
        "Command:",
        "",
        "```bash",
        "python " + shlex.join(["benchmarks/compare_variants.py", *sys.argv[1:]]),
        "```",
        "",
        f"Model: {size['num_layers']} layers, hidden {size['hidden_size']}, "
        f"{size['num_experts']} experts of ffn {size['ffn_hidden_size']}, top-{args.topk}, "
        f"r = {args.hyper_adapter_dim}; sequence {size['seq_length']}, batch "
        f"{size['micro_batch_size']}, {size['train_iters']} iterations "
        f"({size['train_iters'] * size['micro_batch_size'] * size['seq_length']:,} tokens), "
        f"{args.seeds} seed(s) per variant. Perplexity: final validation, token level.",
        "",
        "| variant | val ppl (mean ± std) | params total | active / token | tokens/s | "
        "wall s / run | time vs moe |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, row in table.items():
        lines.append(
            f"| {variant} | {row['ppl_mean']:.2f} ± {row['ppl_std']:.2f} | "
            f"{row['total_params'] / 1e6:.2f}M | {row['active_params'] / 1e6:.2f}M | "
            f"{row['tokens_per_s']:,.0f} | {row['wall_s']:.0f} | "
            f"{row.get('time_over_moe', float('nan')):.2f} |")
    lines += ["", f"![validation curves]({os.path.basename(args.plot)})", "",
              "Per run (final validation perplexity):", ""]
    for r in results:
        lines.append(f"- {r['variant']} seed {r['seed']}: {r['final_ppl']:.2f} "
                     f"({r['wall_s']:.0f} s)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data_path:
        data_path, tokenizer_model = args.data_path, args.tokenizer_model
    else:
        data_path, tokenizer_model = prepare_default_corpus(args)
    results = []
    total = args.seeds * len(args.variants)
    for seed_index in range(args.seeds):
        for variant in args.variants:
            seed = 1234 + seed_index
            print(f"[{len(results) + 1}/{total}] {variant} seed {seed}", file=sys.stderr,
                  flush=True)
            results.append(train(variant, seed, data_path, tokenizer_model, args))
            print(f"    val ppl {results[-1]['final_ppl']:.2f}, {results[-1]['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
    table = summarise(results)
    plot(results, args.plot)
    write_report(args, table, results, args.results)
    for variant, row in table.items():
        print(f"{variant:12} ppl {row['ppl_mean']:8.2f} ± {row['ppl_std']:.2f}  "
              f"{row['tokens_per_s']:9,.0f} tokens/s  {row['wall_s']:6.0f} s/run")
    print(f"wrote {args.results} and {args.plot}")
    if args.json:
        print(json.dumps({variant: {k: v for k, v in row.items()} for variant, row in
                          table.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

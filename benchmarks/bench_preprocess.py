"""Preprocessing throughput and memory on a corpus 10x the default one.

    python benchmarks/bench_preprocess.py [--json] [--copies 10] [--data-dir data]

Builds the corpus by repeating the default Shakespeare jsonl, trains an 8k SentencePiece model,
then runs tools/preprocess_data.py with 1 and 2 workers. Tokens/s is the tool's own count over
its own wall time; peak RSS is sampled every 50 ms over the tool's whole process tree (summed
over processes, so pages shared between the pool's forked workers count once per process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import psutil

from megatron_hypermoe.data.pinned_corpora import prepare_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_peak_rss(command):
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    parent = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [parent] + parent.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-2000:]}")
    return out, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    args = parser.parse_args()

    source = prepare_corpus(args.data_dir)
    with tempfile.TemporaryDirectory() as scratch:
        corpus = os.path.join(scratch, "corpus.jsonl")
        with open(source) as handle:
            text = handle.read()
        with open(corpus, "w") as handle:
            for _ in range(args.copies):
                handle.write(text)
        size_mb = os.path.getsize(corpus) / 2**20
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"),
                        "--input", source, "--vocab-size", "8000",
                        "--model-prefix", os.path.join(scratch, "tok")],
                       check=True, capture_output=True)
        results = {}
        for workers in (1, 2):
            command = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                       "--input", corpus, "--output-prefix", os.path.join(scratch, f"w{workers}"),
                       "--tokenizer-type", "SentencePieceTokenizer",
                       "--tokenizer-model", os.path.join(scratch, "tok.model"),
                       "--append-eod", "--workers", str(workers)]
            print(f"# preprocessing {size_mb:.0f} MB with {workers} worker(s) ...",
                  file=sys.stderr, flush=True)
            out, peak = run_with_peak_rss(command)
            match = re.search(r"([\d,]+) tokens in ([\d.]+) s", out)
            tokens, seconds = int(match.group(1).replace(",", "")), float(match.group(2))
            results[workers] = dict(tokens=tokens, seconds=seconds,
                                    tokens_per_second=tokens / seconds, peak_rss_mb=peak / 2**20)

    print(f"corpus: {size_mb:.0f} MB ({args.copies} x default), {os.cpu_count()} cores")
    print(f"{'workers':>7} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'peak RSS MB':>12}")
    for workers, r in results.items():
        print(f"{workers:>7} {r['tokens']:>12,} {r['seconds']:>8.1f} "
              f"{r['tokens_per_second']:>12,.0f} {r['peak_rss_mb']:>12.0f}")
    if args.json:
        print(json.dumps(dict(
            corpus_mb=size_mb,
            tokens_per_second_1_worker=results[1]["tokens_per_second"],
            tokens_per_second_2_workers=results[2]["tokens_per_second"],
            peak_rss_mb=max(r["peak_rss_mb"] for r in results.values()),
            peak_rss_mb_by_workers={str(k): r["peak_rss_mb"] for k, r in results.items()},
        )))


if __name__ == "__main__":
    main()

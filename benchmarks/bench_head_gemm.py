"""The hypernetwork heads' few-row products, one GEMM against blocks (``model/few_row_gemm.py``).

    python benchmarks/bench_head_gemm.py            # table
    python benchmarks/bench_head_gemm.py --json     # table, then one JSON line (last line)

For each output width (the heads' d*r: 16,384 at hidden 256, 49,152 at GPT-2 width, 131,072 at
hidden 2048, r = 64) and number of code rows, each of the three products a head takes (forward
``bias + h @ W``, input gradient ``grad @ W^T``, weight gradient ``h^T @ grad``) is timed as one
GEMM and in the blocks ``few_row_gemm`` uses, interleaved, median of --repeats. The rule in
``few_row_gemm.BLOCKED_BELOW_ROWS`` should block exactly where "blocks" is faster: the "rule"
column says what it does, the "agrees" column whether that is the faster choice. fp32 on the CPU
(with the trainer's allocator settings) is where the rule applies; on a GPU both columns take one
GEMM's time and the rule never blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from megatron_hypermoe.model import few_row_gemm
from megatron_hypermoe.training.cpu_allocator import keep_freed_memory

PRODUCTS = ("forward", "input_grad", "weight_grad")


@contextlib.contextmanager
def forced(always_block: bool):
    """Every product blocked (where its width allows) or none, whatever the rule says."""
    saved = dict(few_row_gemm.BLOCKED_BELOW_ROWS)
    for product in PRODUCTS:
        few_row_gemm.BLOCKED_BELOW_ROWS[product] = 2**62 if always_block else 0
    try:
        yield
    finally:
        few_row_gemm.BLOCKED_BELOW_ROWS.update(saved)


def product_call(product, h, weight, bias, grad):
    if product == "forward":
        return lambda: few_row_gemm.head_product(h, weight, bias)
    if product == "input_grad":
        return lambda: few_row_gemm.head_input_grad(grad, weight)
    return lambda: few_row_gemm.head_weight_grad(h, grad)


def median_ms(call, always_block, repeats):
    with forced(always_block):
        call()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outputs", type=int, nargs="+", default=[16384, 49152, 131072])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128, 336, 1024])
    parser.add_argument("--code-size", type=int, default=128, help="d_g")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    generator = torch.Generator().manual_seed(0)
    rows_out, disagreements = [], 0
    print(f"device {device}, {torch.get_num_threads()} threads, d_g {args.code_size}, "
          f"torch {torch.__version__}")
    print("| outputs | rows | product | one GEMM ms | blocks ms | rule | agrees |")
    print("|---|---|---|---|---|---|---|")
    for outputs in args.outputs:
        weight = torch.randn(args.code_size, outputs, generator=generator).to(device)
        bias = torch.randn(outputs, generator=generator).to(device)
        for rows in args.rows:
            h = torch.randn(rows, args.code_size, generator=generator).to(device)
            grad = torch.randn(rows, outputs, generator=generator).to(device)
            for product in PRODUCTS:
                call = product_call(product, h, weight, bias, grad)
                one, blocks = [], []
                for _ in range(3):  # alternate, so drift hits both alike
                    one.append(median_ms(call, False, args.repeats))
                    blocks.append(median_ms(call, True, args.repeats))
                one_ms, blocks_ms = statistics.median(one), statistics.median(blocks)
                columns = None if product == "weight_grad" else outputs
                rule = few_row_gemm.blocked(product, h if product != "input_grad" else grad,
                                            columns)
                agrees = rule == (blocks_ms < one_ms) or abs(blocks_ms / one_ms - 1) < 0.05
                disagreements += not agrees
                rows_out.append(dict(outputs=outputs, rows=rows, product=product,
                                     one_gemm_ms=one_ms, blocks_ms=blocks_ms, rule_blocks=rule,
                                     agrees=agrees))
                print(f"| {outputs:,} | {rows} | {product} | {one_ms:.2f} | {blocks_ms:.2f} | "
                      f"{'blocks' if rule else 'one'} | {'yes' if agrees else 'NO'} |",
                      flush=True)
    print(f"the rule picks the faster form (or one within 5%) in "
          f"{len(rows_out) - disagreements} of {len(rows_out)} cases")
    if args.json:
        print(json.dumps({"device": str(device), "rule_disagreements": disagreements,
                          "cases": rows_out}))


if __name__ == "__main__":
    main()

"""``h @ weight + bias`` for few rows and a very wide weight, as the hypernetwork's heads take it.

The heads multiply few codes (one row per generated HyperExpert: 8 at top-1 of 8, times the
layers when the model generates them together) with a weight [d_g, d*r] of tens of thousands of
columns. On the CPU, MKL runs such few-row fp32 GEMMs at a fraction of its rate; split into
blocks they run up to 2x faster. Each product has its own limit below which blocks pay
(``BLOCKED_BELOW_ROWS``), measured by ``benchmarks/bench_head_gemm.py`` (numbers in
benchmarks/README.md). GPUs take one GEMM, and so do other dtypes: they do not run MKL's sgemm,
and the input gradient's sum over blocks would round each block in bf16.
"""

from __future__ import annotations

import torch

BLOCKED_BELOW_ROWS = {"forward": 1024, "input_grad": 128, "weight_grad": 32}
BLOCK_COLUMNS = {"forward": 256, "input_grad": 512}
WEIGHT_GRAD_BLOCK_ROWS = 16


def blocked(product: str, rows: torch.Tensor, columns: int = None) -> bool:
    """Whether ``product`` is taken in blocks for ``rows`` (the codes or their gradient) on this
    device and with this many outputs."""
    if rows.device.type != "cpu" or rows.dtype != torch.float32 \
            or rows.shape[0] >= BLOCKED_BELOW_ROWS[product]:
        return False
    block = BLOCK_COLUMNS.get(product)
    return block is None or (columns % block == 0 and columns > block)


def _column_blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    """[d_g, N] viewed as N/block matrices [d_g, block] (no copy)."""
    return weight.view(weight.shape[0], -1, block).transpose(0, 1)


def head_product(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """bias + h @ weight: [K, d_g] x [d_g, N] -> [K, N]; blocked, one batched GEMM over column
    blocks."""
    if not blocked("forward", h, weight.shape[1]):
        return torch.addmm(bias, h, weight)
    blocks = _column_blocks(weight, BLOCK_COLUMNS["forward"])
    out = torch.baddbmm(bias.view(blocks.shape[0], 1, -1), h.expand(blocks.shape[0], *h.shape),
                        blocks)
    return out.transpose(0, 1).reshape(h.shape[0], weight.shape[1])


def head_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight^T: [K, N] x [N, d_g] -> [K, d_g]; blocked, the sum over column blocks of
    one batched GEMM."""
    if not blocked("input_grad", grad, weight.shape[1]):
        return grad @ weight.t()
    blocks = _column_blocks(weight, BLOCK_COLUMNS["input_grad"])  # [B, d_g, block]
    grad_blocks = grad.reshape(grad.shape[0], blocks.shape[0], -1).transpose(0, 1)
    return torch.bmm(grad_blocks, blocks.transpose(1, 2)).sum(0)


def head_weight_grad(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """h^T @ grad: [d_g, K] x [K, N] -> [d_g, N]; blocked, in blocks of 16 output rows. h^T is
    made contiguous: autograd's product on the transposed view ran 2-4x slower on the CPU."""
    h_t = h.t().contiguous()
    if not blocked("weight_grad", h):
        return h_t @ grad
    out = grad.new_empty(h_t.shape[0], grad.shape[1])
    for start in range(0, h_t.shape[0], WEIGHT_GRAD_BLOCK_ROWS):
        end = start + WEIGHT_GRAD_BLOCK_ROWS
        torch.mm(h_t[start:end], grad, out=out[start:end])
    return out


class HeadProduct(torch.autograd.Function):
    """h @ weight + bias with the few-row products above."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return head_product(h, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad_h = head_input_grad(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = head_weight_grad(h, grad) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_h, grad_weight, grad_bias

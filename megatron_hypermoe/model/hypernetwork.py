"""The two learned pieces of HyperMoE's side path.

``ExpertSelectionEmbedding`` (one per HyperMoE layer): expert embeddings Emb_l [E, d_e] and the
selection MLP d_e -> d_p -> d_h. It turns "which experts did this token NOT select" into z.

``HyperNetwork`` (ONE per model, shared by every HyperMoE layer): the layer embedding table and the
network that maps concat(z, LayerEmb[l]) to a hidden code h [d_g]; four linear heads read the
HyperExpert's weights off h. The heads are exposed as modules, not only as a "generate" call,
because the fast forms in :mod:`megatron_hypermoe.model.hyper_expert` contract with their weights
directly instead of generating per-token matrices.

Initialisation: the four heads use the paper's "hyperfanin" uniform init scaled by 1e-3 with zero
biases, so the HyperExpert output starts near zero and HyperMoE starts as the plain MoE
(``hyper_init="normal"``: N(0, init_method_std) instead, as the authors' GPT-2 runs started).
Every other weight uses megatron's ``config.init_method`` (normal, std ``init_method_std``),
biases zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_hypermoe.model.config import HyperMoEConfig
from megatron_hypermoe.parallel.sequence_parallel import mark_sequence_parallel

HYPERFANIN_SCALE = 1e-3


def _linear(in_features: int, out_features: int, config: HyperMoEConfig) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=True, dtype=config.params_dtype)
    with torch.no_grad():
        config.init_method(layer.weight)
        layer.bias.zero_()
    return layer


def head_fan_in(head: str, config: HyperMoEConfig) -> int:
    """The fan-in of the paper's hyperfanin bound for one of the four heads: the generating
    code's size times the generated weight's input size."""
    d_g = config.hyper_hidden_size
    return {"down_weight": d_g * config.hidden_size, "up_weight": d_g * config.hyper_adapter_dim,
            "down_bias": d_g, "up_bias": d_g}[head]


def init_head_weight_(weight: torch.Tensor, head: str, config: HyperMoEConfig,
                      generator=None) -> torch.Tensor:
    """In place, by ``config.hyper_init``: hyperfanin (uniform, scaled by HYPERFANIN_SCALE) or
    normal(0, init_method_std)."""
    if config.hyper_init == "normal":
        return weight.normal_(0.0, config.init_method_std, generator=generator)
    bound = HYPERFANIN_SCALE * math.sqrt(3.0 / head_fan_in(head, config))
    return weight.uniform_(-bound, bound, generator=generator)


# The heads multiply few codes (one row per generated HyperExpert: 8 at top-1 of 8, times the
# layers when the model generates them together) with a very wide weight [d_g, d*r]. On the CPU
# MKL runs such few-row GEMMs at a fraction of its rate; split into blocks they run up to 2x
# faster. Measured on 2 cores (AMD EPYC, torch 2.13 + MKL, the trainer's allocator settings),
# d_g 128, median ms as one GEMM -> in blocks, for 8 / 32 / 128 rows:
#   49,152 outputs (GPT-2 width): forward 2.22 -> 1.40 / 4.30 -> 3.45 / 13.9 -> 10.8,
#     input gradient 1.71 -> 1.35 / 3.57 -> 3.16 / 10.45 -> 10.04,
#     weight gradient 2.99 -> 1.52 / 6.05 -> 4.08 / 12.0 -> 25.1;
#   16,384 outputs: forward 0.48 -> 0.33 / 1.11 -> 0.84, input gradient 0.33 -> 0.26 / 0.83 ->
#     0.76, weight gradient 0.68 -> 0.32 / 0.75 -> 1.19;
#   131,072 outputs (hidden 2048): forward 8.84 -> 6.37 / 13.9 -> 11.1, input gradient 4.80 ->
#     4.06 / 9.29 -> 8.39, weight gradient 6.28 -> 4.04 / 13.8 -> 17.9.
# Blocks stop paying at 1,024 rows (forward), 128 (input gradient; 336 rows: 23.8 -> 24.0) and
# 32 (weight gradient), the limits below. GPUs need none of this, and other dtypes do not take
# MKL's sgemm (the input gradient's sum over blocks would also round each block in bf16).
BLOCKED_BELOW_ROWS = {"forward": 1024, "input_grad": 128, "weight_grad": 32}
BLOCK_COLUMNS = {"forward": 256, "input_grad": 512}


def _blocked(product: str, rows: torch.Tensor, columns: int = None) -> bool:
    """Whether ``product`` of the heads is taken in blocks for ``rows`` (the codes or their
    gradient) on this device and with this many outputs."""
    if rows.device.type != "cpu" or rows.dtype != torch.float32 \
            or rows.shape[0] >= BLOCKED_BELOW_ROWS[product]:
        return False
    block = BLOCK_COLUMNS.get(product)
    return block is None or (columns % block == 0 and columns > block)


def _column_blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    """[d_g, N] viewed as N/block matrices [d_g, block] (no copy)."""
    return weight.view(weight.shape[0], -1, block).transpose(0, 1)


def _head_product(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """bias + h @ weight: [K, d_g] x [d_g, N] -> [K, N]; blocked, one batched GEMM over column
    blocks."""
    if not _blocked("forward", h, weight.shape[1]):
        return torch.addmm(bias, h, weight)
    blocks = _column_blocks(weight, BLOCK_COLUMNS["forward"])
    out = torch.baddbmm(bias.view(blocks.shape[0], 1, -1), h.expand(blocks.shape[0], *h.shape),
                        blocks)
    return out.transpose(0, 1).reshape(h.shape[0], weight.shape[1])


def _head_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight^T: [K, N] x [N, d_g] -> [K, d_g]; blocked, the sum over column blocks of
    one batched GEMM."""
    if not _blocked("input_grad", grad, weight.shape[1]):
        return grad @ weight.t()
    blocks = _column_blocks(weight, BLOCK_COLUMNS["input_grad"])  # [B, d_g, block]
    grad_blocks = grad.reshape(grad.shape[0], blocks.shape[0], -1).transpose(0, 1)
    return torch.bmm(grad_blocks, blocks.transpose(1, 2)).sum(0)


def _head_weight_grad(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """h^T @ grad: [d_g, K] x [K, N] -> [d_g, N]; blocked, in blocks of 16 output rows. h^T is
    made contiguous: autograd's product on the transposed view ran 2-4x slower on the CPU."""
    h_t = h.t().contiguous()
    if not _blocked("weight_grad", h):
        return h_t @ grad
    out = grad.new_empty(h_t.shape[0], grad.shape[1])
    for start in range(0, h_t.shape[0], 16):
        torch.mm(h_t[start:start + 16], grad, out=out[start:start + 16])
    return out


class _HeadProduct(torch.autograd.Function):
    """h @ weight + bias with the few-row products above."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return _head_product(h, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad_h = _head_input_grad(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = _head_weight_grad(h, grad) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_h, grad_weight, grad_bias


class HyperHead(nn.Module):
    """A linear head h -> h @ weight + bias whose weight is stored [in, out], not nn.Linear's
    [out, in]: out is huge (d*r) and the batch tiny (one row per selected set), and this layout
    makes the generated HyperExperts plain row-major views of the product."""

    def __init__(self, head: str, in_features: int, out_features: int, config: HyperMoEConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features,
                                               dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=config.params_dtype))
        with torch.no_grad():
            init_head_weight_(self.weight, head, config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _HeadProduct.apply(h, self.weight, self.bias)


class ExpertSelectionEmbedding(nn.Module):
    """Per-layer: z = fc2(relu(fc1(s))), s = sum of the unselected experts' embeddings."""

    def __init__(self, config: HyperMoEConfig):
        super().__init__()
        self.embedding = nn.Embedding(
            config.num_moe_experts, config.hyper_expert_embedding_dim, dtype=config.params_dtype
        )
        with torch.no_grad():
            config.init_method(self.embedding.weight)
        self.fc1 = _linear(
            config.hyper_expert_embedding_dim, config.hyper_selection_hidden_size, config
        )
        self.fc2 = _linear(
            config.hyper_selection_hidden_size, config.hyper_selection_output_size, config
        )
        # Runs on each rank's sequence slice (like megatron's router).
        mark_sequence_parallel(self, config.sequence_parallel)

    def selection_embedding(self, routing_map: torch.Tensor) -> torch.Tensor:
        """s = (1 - routing_map) @ Emb_l for a [N, E] boolean map of selected experts."""
        unselected = (~routing_map).to(self.embedding.weight.dtype)
        return unselected @ self.embedding.weight

    def forward(self, routing_map: torch.Tensor) -> torch.Tensor:
        s = self.selection_embedding(routing_map)
        return self.fc2(torch.relu(self.fc1(s)))


class HyperNetwork(nn.Module):
    """Shared by all HyperMoE layers: (z, layer index) -> hidden code h, plus four weight heads.

    Head layout: ``down_weight`` has d*r outputs viewed as W_down [d, r] (output i*r+j is entry
    (i, j)); ``up_weight`` has r*d outputs viewed as W_up [r, d]; ``down_bias`` [r]; ``up_bias``
    [d]. Head weights are stored [d_g, outputs] (see HyperHead); the Hugging Face export
    transposes them to nn.Linear's [outputs, d_g].
    """

    def __init__(self, config: HyperMoEConfig):
        super().__init__()
        d = config.hidden_size
        r = config.hyper_adapter_dim
        d_g = config.hyper_hidden_size
        d_h = config.hyper_selection_output_size
        d_l = config.hyper_layer_embedding_dim
        self.hidden_size = d
        self.adapter_dim = r

        self.layer_embedding = nn.Embedding(config.num_layers, d_l, dtype=config.params_dtype)
        with torch.no_grad():
            config.init_method(self.layer_embedding.weight)
        self.fc = _linear(d_h + d_l, d_g, config)

        self.down_weight = HyperHead("down_weight", d_g, d * r, config)
        self.down_bias = HyperHead("down_bias", d_g, r, config)
        self.up_weight = HyperHead("up_weight", d_g, r * d, config)
        self.up_bias = HyperHead("up_bias", d_g, d, config)
        mark_sequence_parallel(self, config.sequence_parallel)

    def generating_weights(self):
        """The weights that generate the HyperExpert (fc and the four heads; not biases or the
        layer embedding): each generated entry sums d_g of the heads' weights, so under Adam
        they move the HyperExpert about d_g times as fast as a static weight would move
        (``--hyper-lr-mult`` scales their learning rate)."""
        return [self.fc.weight] + [head.weight for head in
                                   (self.down_weight, self.down_bias, self.up_weight,
                                    self.up_bias)]

    def hidden(self, z: torch.Tensor, layer_index) -> torch.Tensor:
        """h = relu(fc(concat(z, LayerEmb[layer_index]))) for z [N, d_h] -> [N, d_g];
        ``layer_index`` an int, or a long tensor [N] (one layer per row)."""
        layer = self.layer_embedding.weight[layer_index]
        if layer.dim() == 1:
            layer = layer.expand(z.shape[0], -1)
        return torch.relu(self.fc(torch.cat([z, layer], dim=-1)))

    def generate(self, h: torch.Tensor):
        """Materialise HyperExperts for codes h [N, d_g]: W_down [N,d,r], b_down [N,r],
        W_up [N,r,d], b_up [N,d]. Only for few codes (distinct sets) or the naive reference."""
        n, d, r = h.shape[0], self.hidden_size, self.adapter_dim
        return (
            self.down_weight(h).view(n, d, r),
            self.down_bias(h),
            self.up_weight(h).view(n, r, d),
            self.up_bias(h),
        )

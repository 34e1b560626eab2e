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
from megatron_hypermoe.model.few_row_gemm import HeadProduct
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


class HyperHead(nn.Module):
    """A linear head h -> h @ weight + bias whose weight is stored [in, out], not nn.Linear's
    [out, in]: out is huge (d*r) and the batch tiny (one row per selected set), and this layout
    makes the generated HyperExperts plain row-major views of the product. The product is
    :mod:`megatron_hypermoe.model.few_row_gemm`'s (blocked on the CPU)."""

    def __init__(self, head: str, in_features: int, out_features: int, config: HyperMoEConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features,
                                               dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=config.params_dtype))
        with torch.no_grad():
            init_head_weight_(self.weight, head, config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return HeadProduct.apply(h, self.weight, self.bias)


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

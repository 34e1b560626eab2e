"""Hugging Face model of a HyperMoE causal LM: Mixtral's layers plus the HyperExpert side path.

Self-contained (imports only torch and transformers): the exporter copies this file next to the
weights, and ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it. The
experts are one module per expert with Mixtral's names (``block_sparse_moe.experts.{i}.w1/w2/w3``)
so the same keys load on transformers 4.x and 5.x without weight conversion.

Per MoE layer l, for a token x (the post-attention-norm hidden state) with selected experts S:
    s = sum of Emb_l[e] over the experts e NOT in S                 (selection.embedding)
    z = fc2(relu(fc1(s)))                                            (selection.fc1/fc2)
    h = relu(fc(concat(z, LayerEmb[l])))                             (hypernet, shared)
    W_down = down_weight(h).view(d, r), b_down = down_bias(h), W_up = up_weight(h).view(r, d),
    b_up = up_bias(h)
    y = sparse_moe(x) [+ shared(x)] + relu(x W_down + b_down) W_up + b_up
h depends on the token only through S, so one HyperExpert is generated per distinct set.
Optional, each off by default (Qwen-MoE's parts, megatron's flags): a shared expert in every
MoE layer, gated or not by sigmoid(shared_expert_gate(x)) (``shared_expert_intermediate_size``,
``shared_expert_gate``); q/k/v biases (``qkv_bias``); an RMSNorm of each query and key head
(``qk_norm``); dense SwiGLU layers between the MoE layers (``mlp_only_layers``: no HyperExpert
there, the hypernetwork's layer embedding is still indexed by the global layer).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hypermoe import HyperMoeConfig

HYPERFANIN_SCALE = 1e-3  # the paper's scale of the heads' uniform "hyperfanin" init


class HyperMoeRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class HyperMoeRotaryEmbedding(nn.Module):
    # Frequencies are computed per call, not kept in a buffer: transformers may build the model
    # on the meta device and only fills buffers that are saved.
    def __init__(self, head_dim, base):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, position_ids):
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32,
                             device=position_ids.device)
        inv_freq = 1.0 / (self.base ** (steps / self.head_dim))
        freqs = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, hd]


class HyperMoeAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        bias = getattr(config, "qkv_bias", False)
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        if getattr(config, "qk_norm", False):
            self.q_norm = HyperMoeRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = HyperMoeRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out)


def _expert_size(config):
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


class HyperMoeExpert(nn.Module):
    """SwiGLU expert with Mixtral's names: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config):
        super().__init__()
        size = _expert_size(config)
        self.w1 = nn.Linear(config.hidden_size, size, bias=False)
        self.w2 = nn.Linear(size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class HyperMoeMLP(nn.Module):
    """SwiGLU MLP with Llama's names (dense layers, the shared expert)."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HyperMoeSelection(nn.Module):
    """Per layer: z = fc2(relu(fc1(sum of the unselected experts' embeddings)))."""

    def __init__(self, config):
        super().__init__()
        self.embedding = nn.Embedding(config.num_local_experts, config.hyper_expert_embedding_dim)
        self.fc1 = nn.Linear(config.hyper_expert_embedding_dim, config.hyper_selection_hidden_size)
        self.fc2 = nn.Linear(config.hyper_selection_hidden_size,
                             config.hyper_selection_output_size)

    def forward(self, selected):
        unselected = (~selected).to(self.embedding.weight.dtype)
        return self.fc2(torch.relu(self.fc1(unselected @ self.embedding.weight)))


class HyperMoeHead(nn.Linear):
    """A linear head of the hypernetwork; ``fan_in`` is the fan-in of its hyperfanin init:
    d_g times the input size of the weight it generates (1 for a generated bias)."""

    def __init__(self, hyper_hidden_size, outputs, generated_input_size):
        super().__init__(hyper_hidden_size, outputs)
        self.fan_in = hyper_hidden_size * generated_input_size


class HyperMoeHyperNetwork(nn.Module):
    """Shared by every layer: (z, layer) -> h -> the HyperExpert's weights."""

    def __init__(self, config):
        super().__init__()
        d, r, d_g = config.hidden_size, config.hyper_adapter_dim, config.hyper_hidden_size
        self.hidden_size, self.adapter_dim = d, r
        self.layer_embedding = nn.Embedding(config.num_hidden_layers,
                                            config.hyper_layer_embedding_dim)
        self.fc = nn.Linear(config.hyper_selection_output_size + config.hyper_layer_embedding_dim,
                            d_g)
        self.down_weight = HyperMoeHead(d_g, d * r, d)
        self.down_bias = HyperMoeHead(d_g, r, 1)
        self.up_weight = HyperMoeHead(d_g, r * d, r)
        self.up_bias = HyperMoeHead(d_g, d, 1)

    def forward(self, x, selected, selection, layer_idx):
        """y_hyper [T, d] for x [T, d] and the [T, E] boolean map of selected experts."""
        sets, inverse = torch.unique(selected, dim=0, return_inverse=True)
        z = selection(sets)
        layer = self.layer_embedding.weight[layer_idx].expand(z.shape[0], -1)
        h = torch.relu(self.fc(torch.cat([z, layer], dim=-1)))
        d, r = self.hidden_size, self.adapter_dim
        w_down = self.down_weight(h).view(-1, d, r)
        b_down = self.down_bias(h)
        w_up = self.up_weight(h).view(-1, r, d)
        b_up = self.up_bias(h)
        out = torch.zeros_like(x)
        for g in range(sets.shape[0]):
            rows = (inverse == g).nonzero(as_tuple=True)[0]
            a = torch.relu(x[rows] @ w_down[g] + b_down[g])
            out[rows] = a @ w_up[g] + b_up[g]
        return out


class HyperMoeSparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(HyperMoeExpert(config)
                                     for _ in range(config.num_local_experts))
        self.selection = HyperMoeSelection(config)
        shared = getattr(config, "shared_expert_intermediate_size", 0)
        self.shared_expert = HyperMoeMLP(config.hidden_size, shared) if shared else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) \
            if shared and getattr(config, "shared_expert_gate", False) else None

    def forward(self, hidden_states, hypernet, layer_idx):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(x)
        if self.norm_topk_prob:
            top_logits, chosen = logits.topk(self.top_k, dim=-1)
            weights = torch.softmax(top_logits.float(), dim=-1)
        else:
            weights, chosen = torch.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(x))
            out = out + shared
        selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, chosen, True)
        out = out + hypernet(x, selected, self.selection, layer_idx)
        return out.view(shape)


class HyperMoeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = HyperMoeAttention(config, layer_idx)
        if layer_idx in getattr(config, "mlp_only_layers", ()):
            self.mlp = HyperMoeMLP(config.hidden_size, config.intermediate_size)
        else:
            self.block_sparse_moe = HyperMoeSparseMoeBlock(config)
        self.input_layernorm = HyperMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = HyperMoeRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, hypernet):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        hidden = self.post_attention_layernorm(x)
        if hasattr(self, "mlp"):
            return x + self.mlp(hidden)
        return x + self.block_sparse_moe(hidden, hypernet, self.layer_idx)


class HyperMoePreTrainedModel(PreTrainedModel):
    config_class = HyperMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["HyperMoeDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, HyperMoeHead) and \
                getattr(self.config, "hyper_init", "hyperfanin") == "hyperfanin":
            bound = HYPERFANIN_SCALE * math.sqrt(3.0 / module.fan_in)  # the paper's init
            module.weight.data.uniform_(-bound, bound)
            module.bias.data.zero_()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, HyperMoeRMSNorm):
            module.weight.data.fill_(1.0)


class HyperMoeModel(HyperMoePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HyperMoeDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = HyperMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hypernet = HyperMoeHyperNetwork(config)
        self.rotary = HyperMoeRotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False):
        x = self.embed_tokens(input_ids)
        batch, length = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=x.device).expand(batch, -1)
        cos, sin = self.rotary(position_ids)
        total = past + length
        causal = torch.ones(length, total, dtype=torch.bool, device=x.device).tril(past)
        allowed = causal[None, None]
        if attention_mask is not None:  # [B, total], 0 marks padding
            allowed = allowed & attention_mask[:, None, None, :total].bool()
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, past_key_values if use_cache else None, self.hypernet)
        return self.norm(x)


class HyperMoeForCausalLM(HyperMoePreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = HyperMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, labels=None, use_cache=None, cache=None, **kwargs):
        # transformers 5 calls the KV cache ``cache``, 4.x ``past_key_values``: take either.
        past_key_values = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=past_key_values if use_cache else None)

"""Megatron-core names and layouts <-> Hugging Face Llama / Mixtral / HyperMoE ones, both ways.

A full (unsharded, global expert ids) megatron state dict maps to exactly one HF state dict and
back; :func:`to_hf` and :func:`from_hf` are inverses (tested). Layout differences:
- megatron's fused ``linear_qkv`` interleaves per query group [q heads of the group, k, v];
  HF keeps ``q_proj``, ``k_proj``, ``v_proj`` apart. Both use rotate-half RoPE, so no permutation.
- SwiGLU ``linear_fc1`` is [gate; up]: Llama ``gate_proj``/``up_proj``, Mixtral ``w1``/``w3``.
- the hypernetwork's four heads are stored [d_g, out] here and [out, d_g] (nn.Linear) in HF.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import torch

HYPERNET_HEADS = ("down_weight", "down_bias", "up_weight", "up_bias")


class NameMapShape(NamedTuple):
    """What the name map needs to know of a model."""
    moe_type: str
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    hidden_size: int
    num_experts: int  # 0 for dense

    @classmethod
    def of(cls, config) -> "NameMapShape":
        """From a megatron config (``HyperMoEConfig``)."""
        return cls(config.moe_type, config.num_layers, config.num_attention_heads,
                   config.num_query_groups or config.num_attention_heads, config.hidden_size,
                   config.num_moe_experts or 0)


def _split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    hidden = qkv.shape[-1]
    per_group = qkv.view(groups, heads // groups + 2, head_dim, hidden)
    q = per_group[:, : heads // groups].reshape(heads * head_dim, hidden)
    k = per_group[:, heads // groups].reshape(groups * head_dim, hidden)
    v = per_group[:, heads // groups + 1].reshape(groups * head_dim, hidden)
    return q, k, v


def _fuse_qkv(q, k, v, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    hidden = q.shape[-1]
    per_group = torch.cat([q.view(groups, heads // groups, head_dim, hidden),
                           k.view(groups, 1, head_dim, hidden),
                           v.view(groups, 1, head_dim, hidden)], dim=1)
    return per_group.reshape(-1, hidden)


def _renames(shape: NameMapShape):
    """(megatron name, HF name) pairs copied unchanged, in both directions."""
    pairs = [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             ("decoder.final_layernorm.weight", "model.norm.weight"),
             ("output_layer.weight", "lm_head.weight")]
    for layer in range(shape.num_layers):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        pairs += [(src + "input_layernorm.weight", dst + "input_layernorm.weight"),
                  (src + "pre_mlp_layernorm.weight", dst + "post_attention_layernorm.weight"),
                  (src + "self_attention.linear_proj.weight", dst + "self_attn.o_proj.weight")]
        if shape.moe_type == "dense":
            pairs.append((src + "mlp.linear_fc2.weight", dst + "mlp.down_proj.weight"))
            continue
        moe = dst + "block_sparse_moe."
        pairs.append((src + "mlp.router.weight", moe + "gate.weight"))
        pairs += [(f"{src}mlp.experts.local_experts.{e}.linear_fc2.weight",
                   f"{moe}experts.{e}.w2.weight") for e in range(shape.num_experts)]
        if shape.moe_type == "hypermoe":
            pairs += [(src + "mlp.selection." + name, moe + "selection." + name)
                      for name in ("embedding.weight", "fc1.weight", "fc1.bias", "fc2.weight",
                                   "fc2.bias")]
    if shape.moe_type == "hypermoe":
        pairs += [("hypernetwork." + name, "model.hypernet." + name)
                  for name in ("layer_embedding.weight", "fc.weight", "fc.bias")]
        pairs += [(f"hypernetwork.{head}.bias", f"model.hypernet.{head}.bias")
                  for head in HYPERNET_HEADS]
    return pairs


def _swiglu_pairs(shape: NameMapShape):
    """(megatron fc1 [gate; up], HF gate name, HF up name) for every MLP."""
    for layer in range(shape.num_layers):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        if shape.moe_type == "dense":
            yield src + "mlp.linear_fc1.weight", dst + "mlp.gate_proj.weight", \
                dst + "mlp.up_proj.weight"
            continue
        for e in range(shape.num_experts):
            yield (f"{src}mlp.experts.local_experts.{e}.linear_fc1.weight",
                   f"{dst}block_sparse_moe.experts.{e}.w1.weight",
                   f"{dst}block_sparse_moe.experts.{e}.w3.weight")


def _attention_names(shape: NameMapShape):
    for layer in range(shape.num_layers):
        dst = f"model.layers.{layer}.self_attn."
        yield (f"decoder.layers.{layer}.self_attention.linear_qkv.weight",
               dst + "q_proj.weight", dst + "k_proj.weight", dst + "v_proj.weight")


def _head_names(shape: NameMapShape):
    if shape.moe_type != "hypermoe":
        return []
    return [(f"hypernetwork.{head}.weight", f"model.hypernet.{head}.weight")
            for head in HYPERNET_HEADS]


def to_hf(state: Dict[str, torch.Tensor], shape: NameMapShape) -> Dict[str, torch.Tensor]:
    """megatron -> HF."""
    heads, groups = shape.num_attention_heads, shape.num_query_groups
    head_dim = shape.hidden_size // heads
    out = {hf: state[megatron] for megatron, hf in _renames(shape)}
    for qkv, q, k, v in _attention_names(shape):
        out[q], out[k], out[v] = _split_qkv(state[qkv], heads, groups, head_dim)
    for fc1, gate, up in _swiglu_pairs(shape):
        out[gate], out[up] = state[fc1].chunk(2, dim=0)
    for megatron, hf in _head_names(shape):
        out[hf] = state[megatron].t()  # stored [d_g, out] here, nn.Linear's [out, d_g] there
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_hf(hf: Dict[str, torch.Tensor], shape: NameMapShape) -> Dict[str, torch.Tensor]:
    """HF -> megatron (inverse of :func:`to_hf`)."""
    heads, groups = shape.num_attention_heads, shape.num_query_groups
    head_dim = shape.hidden_size // heads
    out = {megatron: hf[name] for megatron, name in _renames(shape)}
    for qkv, q, k, v in _attention_names(shape):
        out[qkv] = _fuse_qkv(hf[q], hf[k], hf[v], heads, groups, head_dim)
    for fc1, gate, up in _swiglu_pairs(shape):
        out[fc1] = torch.cat([hf[gate], hf[up]])
    for megatron, name in _head_names(shape):
        out[megatron] = hf[name].t()
    return {name: tensor.contiguous() for name, tensor in out.items()}

"""Megatron-core names and layouts <-> Hugging Face Llama / Mixtral / HyperMoE ones, both ways.

A full (unsharded, global expert ids) megatron state dict maps to exactly one HF state dict and
back; :func:`to_hf` and :func:`from_hf` are inverses (tested). Layout differences:
- megatron's fused ``linear_qkv`` interleaves per query group [q heads of the group, k, v];
  HF keeps ``q_proj``, ``k_proj``, ``v_proj`` apart. Both use rotate-half RoPE, so no permutation.
- SwiGLU ``linear_fc1`` is [gate; up]: Llama ``gate_proj``/``up_proj``, Mixtral ``w1``/``w3``.
- the hypernetwork's four heads are stored [d_g, out] here and [out, d_g] (nn.Linear) in HF.
"""

from __future__ import annotations

from typing import Dict

import torch

HYPERNET_HEADS = ("down_weight", "down_bias", "up_weight", "up_bias")


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


def to_hf(state: Dict[str, torch.Tensor], shape: dict) -> Dict[str, torch.Tensor]:
    """megatron -> HF. ``shape``: moe_type, num_layers, num_attention_heads, num_query_groups,
    hidden_size, num_experts."""
    heads, groups = shape["num_attention_heads"], shape["num_query_groups"]
    head_dim = shape["hidden_size"] // heads
    moe_type = shape["moe_type"]
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"],
           "lm_head.weight": state["output_layer.weight"]}
    for layer in range(shape["num_layers"]):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "pre_mlp_layernorm.weight"]
        q, k, v = _split_qkv(state[src + "self_attention.linear_qkv.weight"], heads, groups,
                             head_dim)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.linear_proj.weight"]
        if moe_type == "dense":
            gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[dst + "mlp.gate_proj.weight"] = gate
            out[dst + "mlp.up_proj.weight"] = up
            out[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
            continue
        moe = dst + "block_sparse_moe."
        out[moe + "gate.weight"] = state[src + "mlp.router.weight"]
        for e in range(shape["num_experts"]):
            expert = f"{src}mlp.experts.local_experts.{e}."
            w1, w3 = state[expert + "linear_fc1.weight"].chunk(2, dim=0)
            out[f"{moe}experts.{e}.w1.weight"] = w1
            out[f"{moe}experts.{e}.w3.weight"] = w3
            out[f"{moe}experts.{e}.w2.weight"] = state[expert + "linear_fc2.weight"]
        if moe_type == "hypermoe":
            for name in ("embedding.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                out[moe + "selection." + name] = state[src + "mlp.selection." + name]
    if moe_type == "hypermoe":
        out["model.hypernet.layer_embedding.weight"] = state["hypernetwork.layer_embedding.weight"]
        out["model.hypernet.fc.weight"] = state["hypernetwork.fc.weight"]
        out["model.hypernet.fc.bias"] = state["hypernetwork.fc.bias"]
        for head in HYPERNET_HEADS:
            out[f"model.hypernet.{head}.weight"] = state[f"hypernetwork.{head}.weight"].t()
            out[f"model.hypernet.{head}.bias"] = state[f"hypernetwork.{head}.bias"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_hf(hf: Dict[str, torch.Tensor], shape: dict) -> Dict[str, torch.Tensor]:
    """HF -> megatron (inverse of :func:`to_hf`)."""
    heads, groups = shape["num_attention_heads"], shape["num_query_groups"]
    head_dim = shape["hidden_size"] // heads
    moe_type = shape["moe_type"]
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"],
           "output_layer.weight": hf["lm_head.weight"]}
    for layer in range(shape["num_layers"]):
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        out[dst + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], heads, groups, head_dim)
        out[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        if moe_type == "dense":
            out[dst + "mlp.linear_fc1.weight"] = torch.cat(
                [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
            out[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
            continue
        moe = src + "block_sparse_moe."
        out[dst + "mlp.router.weight"] = hf[moe + "gate.weight"]
        for e in range(shape["num_experts"]):
            expert = f"{dst}mlp.experts.local_experts.{e}."
            out[expert + "linear_fc1.weight"] = torch.cat(
                [hf[f"{moe}experts.{e}.w1.weight"], hf[f"{moe}experts.{e}.w3.weight"]])
            out[expert + "linear_fc2.weight"] = hf[f"{moe}experts.{e}.w2.weight"]
        if moe_type == "hypermoe":
            for name in ("embedding.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                out[dst + "mlp.selection." + name] = hf[moe + "selection." + name]
    if moe_type == "hypermoe":
        out["hypernetwork.layer_embedding.weight"] = hf["model.hypernet.layer_embedding.weight"]
        out["hypernetwork.fc.weight"] = hf["model.hypernet.fc.weight"]
        out["hypernetwork.fc.bias"] = hf["model.hypernet.fc.bias"]
        for head in HYPERNET_HEADS:
            out[f"hypernetwork.{head}.weight"] = hf[f"model.hypernet.{head}.weight"].t()
            out[f"hypernetwork.{head}.bias"] = hf[f"model.hypernet.{head}.bias"]
    return {name: tensor.contiguous() for name, tensor in out.items()}

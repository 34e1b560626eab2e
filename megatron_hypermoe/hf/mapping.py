"""Megatron-core names and layouts <-> Hugging Face ones, both ways, for the HF families
Llama (dense), Mixtral, Qwen2-MoE, Qwen3-MoE (MoE) and our HyperMoE class.

A full (unsharded, global expert ids) megatron state dict maps to exactly one HF state dict and
back; :func:`to_hf` and :func:`from_hf` are inverses (tested). Layout differences:
- megatron's fused ``linear_qkv`` (and its bias) interleaves per query group [q heads of the
  group, k, v]; HF keeps ``q_proj``, ``k_proj``, ``v_proj`` apart. Both use rotate-half RoPE, so
  no permutation. The heads are ``head_dim`` wide (megatron's ``kv_channels``).
- SwiGLU ``linear_fc1`` is [gate; up]: ``gate_proj``/``up_proj`` (Llama, Qwen, dense layers and
  shared experts everywhere), Mixtral's and HyperMoE's experts ``w1``/``w3``.
- the hypernetwork's four heads are stored [d_g, out] here and [out, d_g] (nn.Linear) in HF.
- an MoE layer is ``block_sparse_moe`` in Mixtral/HyperMoE and ``mlp`` in Qwen; a dense layer of
  an MoE model (megatron's ``moe_layer_freq``) is ``mlp.gate_proj/up_proj/down_proj``.
Some HF tensors have no megatron counterpart and are exactly zero in what the megatron model
computes (:func:`hf_only_tensors`): the ``o_proj`` bias of families whose ``attention_bias``
covers all four projections (Llama, Qwen3-MoE) when megatron has only ``--add-qkv-bias``, and a
Qwen2-MoE shared expert of width 0 (Qwen2-MoE always has one) for a model without one.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

HYPERNET_HEADS = ("down_weight", "down_bias", "up_weight", "up_bias")
HF_FAMILIES = ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "hypermoe")
# The family each variant exports to when it has nothing Mixtral lacks (export picks Qwen
# otherwise: conversion/export.py).
DEFAULT_FAMILY = {"dense": "llama", "moe": "mixtral", "hypermoe": "hypermoe"}
# Where a family keeps an MoE layer, and its experts' (gate, up, down) names.
_MOE_BLOCK = {"mixtral": "block_sparse_moe.", "hypermoe": "block_sparse_moe.",
              "qwen2_moe": "mlp.", "qwen3_moe": "mlp."}
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "hypermoe": ("w1", "w3", "w2"),
                 "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                 "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
# Families whose attention bias is on q, k, v and o alike (Qwen2-MoE's is on q, k, v only).
_BIAS_ON_O_PROJ = ("llama", "qwen3_moe")


class NameMapShape(NamedTuple):
    """What the name map needs to know of a model."""
    moe_type: str
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    hidden_size: int
    num_experts: int  # 0 for dense
    head_dim: Optional[int] = None  # megatron's kv_channels; None: hidden_size / heads
    moe_layers: Optional[Tuple[bool, ...]] = None  # per layer, True = MoE; None: all of them
    shared_expert_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    family: Optional[str] = None  # the HF naming; None: DEFAULT_FAMILY[moe_type]

    @classmethod
    def of(cls, config, family: Optional[str] = None) -> "NameMapShape":
        """From a megatron config (``HyperMoEConfig``)."""
        from megatron_hypermoe.model.config import moe_layer_pattern

        return cls(config.moe_type, config.num_layers, config.num_attention_heads,
                   config.num_query_groups or config.num_attention_heads, config.hidden_size,
                   config.num_moe_experts or 0, head_dim=config.kv_channels,
                   moe_layers=tuple(moe_layer_pattern(config)),
                   shared_expert_size=config.moe_shared_expert_intermediate_size or 0,
                   shared_expert_gate=bool(config.moe_shared_expert_gate),
                   qkv_bias=bool(config.add_qkv_bias), qk_layernorm=bool(config.qk_layernorm),
                   family=family)

    @property
    def hf_family(self) -> str:
        return self.family or DEFAULT_FAMILY[self.moe_type]

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer: int) -> bool:
        if self.moe_type == "dense":
            return False
        return True if self.moe_layers is None else bool(self.moe_layers[layer])

    @property
    def has_dense_layers(self) -> bool:
        return self.moe_type != "dense" and not all(map(self.is_moe_layer,
                                                        range(self.num_layers)))


def unrepresentable(shape: NameMapShape) -> Optional[str]:
    """What of the model the HF family of ``shape`` cannot hold, or None."""
    family = shape.hf_family
    problems = []
    if shape.qk_layernorm and family not in ("qwen3_moe", "hypermoe"):
        problems.append("q/k norm")
    if shape.qkv_bias and family == "mixtral":
        problems.append("qkv bias")
    if shape.shared_expert_size and family not in ("qwen2_moe", "hypermoe"):
        problems.append("a shared expert")
    if shape.shared_expert_size and not shape.shared_expert_gate and family == "qwen2_moe":
        problems.append("a shared expert without gate (Qwen2-MoE's is always gated by "
                        "sigmoid(shared_expert_gate(x)))")
    if shape.has_dense_layers and family == "mixtral":
        problems.append("dense layers between the MoE layers")
    return ", ".join(problems) or None


def _split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """q, k, v of a fused [rows, ...] weight or [rows] bias."""
    rest = qkv.shape[1:]
    per_group = qkv.view(groups, heads // groups + 2, head_dim, *rest)
    q = per_group[:, : heads // groups].reshape(heads * head_dim, *rest)
    k = per_group[:, heads // groups].reshape(groups * head_dim, *rest)
    v = per_group[:, heads // groups + 1].reshape(groups * head_dim, *rest)
    return q, k, v


def _fuse_qkv(q, k, v, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    rest = q.shape[1:]
    per_group = torch.cat([q.reshape(groups, heads // groups, head_dim, *rest),
                           k.reshape(groups, 1, head_dim, *rest),
                           v.reshape(groups, 1, head_dim, *rest)], dim=1)
    return per_group.reshape(-1, *rest)


def _renames(shape: NameMapShape) -> List[Tuple[str, str]]:
    """(megatron name, HF name) pairs copied unchanged, in both directions."""
    family = shape.hf_family
    pairs = [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             ("decoder.final_layernorm.weight", "model.norm.weight"),
             ("output_layer.weight", "lm_head.weight")]
    for layer in range(shape.num_layers):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        pairs += [(src + "input_layernorm.weight", dst + "input_layernorm.weight"),
                  (src + "pre_mlp_layernorm.weight", dst + "post_attention_layernorm.weight"),
                  (src + "self_attention.linear_proj.weight", dst + "self_attn.o_proj.weight")]
        if shape.qk_layernorm:
            pairs += [(src + "self_attention.q_layernorm.weight", dst + "self_attn.q_norm.weight"),
                      (src + "self_attention.k_layernorm.weight", dst + "self_attn.k_norm.weight")]
        if not shape.is_moe_layer(layer):
            pairs.append((src + "mlp.linear_fc2.weight", dst + "mlp.down_proj.weight"))
            continue
        block = dst + _MOE_BLOCK[family]
        down = _EXPERT_NAMES[family][2]
        pairs.append((src + "mlp.router.weight", block + "gate.weight"))
        pairs += [(f"{src}mlp.experts.local_experts.{e}.linear_fc2.weight",
                   f"{block}experts.{e}.{down}.weight") for e in range(shape.num_experts)]
        if shape.shared_expert_size:
            pairs.append((src + "mlp.shared_experts.linear_fc2.weight",
                          block + "shared_expert.down_proj.weight"))
            if shape.shared_expert_gate:
                pairs.append((src + "mlp.shared_experts.gate_weight",
                              block + "shared_expert_gate.weight"))
        if shape.moe_type == "hypermoe":
            pairs += [(src + "mlp.selection." + name, block + "selection." + name)
                      for name in ("embedding.weight", "fc1.weight", "fc1.bias", "fc2.weight",
                                   "fc2.bias")]
    if shape.moe_type == "hypermoe":
        pairs += [("hypernetwork." + name, "model.hypernet." + name)
                  for name in ("layer_embedding.weight", "fc.weight", "fc.bias")]
        pairs += [(f"hypernetwork.{head}.bias", f"model.hypernet.{head}.bias")
                  for head in HYPERNET_HEADS]
    return pairs


def _swiglu_names(shape: NameMapShape) -> Iterator[Tuple[str, str, str]]:
    """(megatron fc1 [gate; up], HF gate name, HF up name) for every SwiGLU MLP."""
    gate, up, _ = _EXPERT_NAMES.get(shape.hf_family, ("gate_proj", "up_proj", None))
    for layer in range(shape.num_layers):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        if not shape.is_moe_layer(layer):
            yield src + "mlp.linear_fc1.weight", dst + "mlp.gate_proj.weight", \
                dst + "mlp.up_proj.weight"
            continue
        block = dst + _MOE_BLOCK[shape.hf_family]
        for e in range(shape.num_experts):
            yield (f"{src}mlp.experts.local_experts.{e}.linear_fc1.weight",
                   f"{block}experts.{e}.{gate}.weight", f"{block}experts.{e}.{up}.weight")
        if shape.shared_expert_size:
            yield (src + "mlp.shared_experts.linear_fc1.weight",
                   block + "shared_expert.gate_proj.weight", block + "shared_expert.up_proj.weight")


def _attention_names(shape: NameMapShape) -> Iterator[Tuple[str, str, str, str]]:
    """(megatron fused qkv, HF q, k, v) for every weight, and bias with ``qkv_bias``."""
    kinds = ("weight", "bias") if shape.qkv_bias else ("weight",)
    for layer in range(shape.num_layers):
        dst = f"model.layers.{layer}.self_attn."
        for kind in kinds:
            yield (f"decoder.layers.{layer}.self_attention.linear_qkv.{kind}",
                   f"{dst}q_proj.{kind}", f"{dst}k_proj.{kind}", f"{dst}v_proj.{kind}")


def _head_names(shape: NameMapShape) -> List[Tuple[str, str]]:
    if shape.moe_type != "hypermoe":
        return []
    return [(f"hypernetwork.{head}.weight", f"model.hypernet.{head}.weight")
            for head in HYPERNET_HEADS]


def hf_only_tensors(shape: NameMapShape) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """HF name -> (shape, whether its value matters) of the HF tensors without a megatron
    counterpart: written as zeros by :func:`to_hf`; :func:`from_hf` leaves them out, and an
    importer must check that those whose value matters are zero (:func:`nonzero_hf_only`)."""
    out = {}
    hidden = shape.hidden_size
    for layer in range(shape.num_layers):
        dst = f"model.layers.{layer}."
        if shape.qkv_bias and shape.hf_family in _BIAS_ON_O_PROJ:
            out[dst + "self_attn.o_proj.bias"] = ((hidden,), True)
        if shape.hf_family == "qwen2_moe" and shape.is_moe_layer(layer) and \
                not shape.shared_expert_size:  # a shared expert of width 0: its output is 0
            block = dst + "mlp."
            out.update({block + "shared_expert.gate_proj.weight": ((0, hidden), False),
                        block + "shared_expert.up_proj.weight": ((0, hidden), False),
                        block + "shared_expert.down_proj.weight": ((hidden, 0), False),
                        block + "shared_expert_gate.weight": ((1, hidden), False)})
    return out


def hf_names(shape: NameMapShape) -> set:
    """Every name :func:`to_hf` writes (what a complete HF state dict of the model holds)."""
    names = {hf for _, hf in _renames(shape)} | set(hf_only_tensors(shape))
    names |= {hf for _, hf in _head_names(shape)}
    for _, *parts in (*_attention_names(shape), *_swiglu_names(shape)):
        names.update(parts)
    return names


def nonzero_hf_only(hf: Dict[str, torch.Tensor], shape: NameMapShape) -> List[str]:
    """The HF-only tensors whose value matters and is not zero (the model cannot hold them)."""
    return [name for name, (_, matters) in hf_only_tensors(shape).items()
            if matters and name in hf and bool(hf[name].count_nonzero())]


def to_hf(state: Dict[str, torch.Tensor], shape: NameMapShape) -> Dict[str, torch.Tensor]:
    """megatron -> HF."""
    heads, groups, head_dim = shape.num_attention_heads, shape.num_query_groups, \
        shape.kv_channels
    out = {hf: state[megatron] for megatron, hf in _renames(shape)}
    for qkv, q, k, v in _attention_names(shape):
        out[q], out[k], out[v] = _split_qkv(state[qkv], heads, groups, head_dim)
    for fc1, gate, up in _swiglu_names(shape):
        out[gate], out[up] = state[fc1].chunk(2, dim=0)
    for megatron, hf in _head_names(shape):
        out[hf] = state[megatron].t()  # stored [d_g, out] here, nn.Linear's [out, d_g] there
    dtype = state["embedding.word_embeddings.weight"].dtype
    for name, (size, _) in hf_only_tensors(shape).items():
        out[name] = torch.zeros(size, dtype=dtype)
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_hf(hf: Dict[str, torch.Tensor], shape: NameMapShape) -> Dict[str, torch.Tensor]:
    """HF -> megatron (inverse of :func:`to_hf`; a missing HF name is a KeyError)."""
    heads, groups, head_dim = shape.num_attention_heads, shape.num_query_groups, \
        shape.kv_channels
    out = {megatron: hf[name] for megatron, name in _renames(shape)}
    for qkv, q, k, v in _attention_names(shape):
        out[qkv] = _fuse_qkv(hf[q], hf[k], hf[v], heads, groups, head_dim)
    for fc1, gate, up in _swiglu_names(shape):
        out[fc1] = torch.cat([hf[gate], hf[up]])
    for megatron, name in _head_names(shape):
        out[megatron] = hf[name].t()
    return {name: tensor.contiguous() for name, tensor in out.items()}

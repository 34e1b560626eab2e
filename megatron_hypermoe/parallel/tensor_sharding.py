"""Where megatron-core splits each weight over tensor-parallel ranks, by parameter name.

Column-parallel layers split their output dimension (dim 0), row-parallel layers their input
dimension (dim 1); everything else is replicated. SwiGLU's fc1 holds [gate; up], and each rank
holds [gate shard; up shard], so it is split and merged half by half. The name rules serve code
that has only tensors (checkpoint conversion); a test checks them against the ``partition_dim``
megatron attaches to live parameters.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

_COLUMN_PARALLEL = re.compile(
    r"(^|\.)(embedding\.word_embeddings|output_layer|linear_qkv|linear_fc1)\.(weight|bias)$")
_ROW_PARALLEL = re.compile(r"(^|\.)(linear_proj|linear_fc2)\.weight$")
_GATED = re.compile(r"(^|\.)linear_fc1\.(weight|bias)$")


def partition_dim(name: str) -> Optional[int]:
    """0 for column-parallel weights, 1 for row-parallel ones, None if replicated."""
    if _COLUMN_PARALLEL.search(name):
        return 0
    if _ROW_PARALLEL.search(name):
        return 1
    return None


def shard(full: torch.Tensor, name: str, dim: Optional[int], tp_size: int, tp_rank: int,
          gated: bool) -> torch.Tensor:
    """This rank's slice of the full tensor."""
    if dim is None or tp_size == 1:
        return full
    if gated and _GATED.search(name):
        halves = torch.chunk(full, 2, dim=dim)
        return torch.cat([torch.chunk(h, tp_size, dim=dim)[tp_rank] for h in halves], dim=dim)
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


def merge(shards: Sequence[torch.Tensor], name: str, dim: Optional[int],
          gated: bool) -> torch.Tensor:
    """The full tensor from every rank's slice (inverse of :func:`shard`)."""
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated and _GATED.search(name):
        pairs = [torch.chunk(s, 2, dim=dim) for s in shards]
        return torch.cat([torch.cat([p[0] for p in pairs], dim=dim),
                          torch.cat([p[1] for p in pairs], dim=dim)], dim=dim)
    return torch.cat(list(shards), dim=dim)

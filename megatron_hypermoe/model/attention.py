"""Core attention on torch's ``scaled_dot_product_attention``: megatron-core's core-attention
submodule without the [b, heads, s, s] score matrix.

megatron-core's local ``DotProductAttention`` materialises the scores and the softmax in fp32
(and a dropout mask of that size) and keeps them for backward; without Transformer Engine that
is the only attention it has. SDPA runs a flash, memory-efficient or cuDNN kernel on GPUs and a
flash kernel on CPUs, causal without a mask tensor, grouped-query attention without repeating
the keys. :class:`SDPAttention` takes DotProductAttention's place in the layer spec (same
arguments, same [s, b, heads, d] inputs and [s, b, hidden] output) and keeps its configuration:
heads per tensor-parallel rank, softmax scale, attention dropout under megatron's RNG tracker.

``--attention-backend`` (Megatron-LM's flag and meanings, as far as SDPA has them): ``auto``
lets torch pick SDPA's kernel, ``flash`` asks for its FlashAttention kernel, ``fused`` for its
fused (cuDNN, else memory-efficient) kernels; ``unfused`` and ``local`` keep megatron's
``DotProductAttention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType

from megatron_hypermoe.errors import ConfigError

ATTENTION_BACKENDS = tuple(backend.name for backend in AttnBackend)


def attention_backend(value) -> AttnBackend:
    """megatron's enum for a flag value (or the enum itself)."""
    if isinstance(value, AttnBackend):
        return value
    if value not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend={value!r} is not one of "
                          f"{', '.join(ATTENTION_BACKENDS)}")
    return AttnBackend[value]


def uses_sdpa(config) -> bool:
    return attention_backend(config.core_attention_backend) not in (AttnBackend.unfused,
                                                                    AttnBackend.local)


def core_attention_class(config):
    """The core-attention submodule the layer spec takes for --attention-backend."""
    return SDPAttention if uses_sdpa(config) else DotProductAttention


def _kernels(backend: AttnBackend):
    from torch.nn.attention import SDPBackend

    if backend == AttnBackend.flash:
        return [SDPBackend.FLASH_ATTENTION]
    if backend == AttnBackend.fused:
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    return None  # auto: torch chooses


class SDPAttention(DotProductAttention):
    """megatron-core's DotProductAttention computed by torch's scaled_dot_product_attention."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None:
            raise ConfigError("--attention-backend auto/flash/fused (torch's SDPA) has no "
                              "softmax offset or sliding window: use --attention-backend local")
        # megatron divides the scores by the layer number before the softmax and multiplies
        # them back inside it (fp16 range); SDPA keeps fp32 statistics: the net scale
        self.sdpa_scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        backend = attention_backend(config.core_attention_backend)
        if backend == AttnBackend.fused and not torch.cuda.is_available():
            raise ConfigError("--attention-backend fused: SDPA's fused kernels (cuDNN, "
                              "memory-efficient) run on GPUs only: on the CPU use auto or flash")
        self.kernels = _kernels(backend)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ConfigError("packed sequences and attention biases need --attention-backend "
                              "local")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, batch = query.shape[0], query.shape[1]
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal and sq == key.shape[0]
        # megatron's mask is True where attention is not allowed; SDPA's where it is
        mask = None if causal or attention_mask is None else ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.sdpa_scale, enable_gqa=k.shape[1] != q.shape[1])

        def attend_with_kernels():
            if self.kernels is None:
                return attend()
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(self.kernels):
                return attend()

        # dropout draws from megatron's tensor-parallel RNG stream, as DotProductAttention's
        if dropout and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend_with_kernels()
        else:
            context = attend_with_kernels()
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)

"""Model configuration: megatron-core's TransformerConfig plus the HyperMoE sizes.

One dataclass drives the whole model. ``moe_type`` picks the MLP of every layer:

- ``hypermoe``: megatron-core's MoE layer plus the HyperExpert (this project);
- ``moe``: megatron-core's own MoE layer, the same model without the hyper path;
- ``moe_adapter``: the MoE plus a static bottleneck adapter of size r (the ablation that isolates
  the hypernetwork);
- ``dense``: megatron-core's dense MLP.

The six HyperMoE sizes are defined once, in :data:`HYPER_SIZES`: the config fields, the
``--hyper-*`` flags, the checkpoint's shape fields and the Hugging Face config fields are all
generated from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hypermoe.errors import ConfigError
from megatron_hypermoe.model.attention import attention_backend

MOE_TYPES = ("hypermoe", "moe", "moe_adapter", "dense")
# The variants that add a side path to megatron's MoE layer (model/side_path.py)
SIDE_PATH_VARIANTS = ("hypermoe", "moe_adapter")
HYPER_EXPERT_IMPLS = ("auto", "allsets", "grouped", "factored", "naive")
# "allsets" generates C(E, k) HyperExperts per layer: past this many, refuse it when asked for
# by name (auto never picks it there: see model/hyper_expert.py).
MAX_ALLSETS = 65536
# How the hypernetwork's four weight heads start: the paper's "hyperfanin" uniform scaled by
# 1e-3 (the HyperExpert starts near zero), or N(0, init_method_std) like every other weight,
# which is how the authors' GPT-2 runs actually started (post_init re-initialised the heads).
HYPER_INITS = ("hyperfanin", "normal")


@dataclass(frozen=True)
class HyperSize:
    name: str  # config field, flag (--hyper-...), checkpoint and Hugging Face config field
    symbol: str  # the paper's name
    default: int  # the paper's value
    meaning: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


HYPER_SIZES = (
    HyperSize("hyper_adapter_dim", "r", 64, "HyperExpert bottleneck"),
    HyperSize("hyper_hidden_size", "d_g", 128, "hypernetwork hidden size"),
    HyperSize("hyper_expert_embedding_dim", "d_e", 128, "per-layer expert embedding"),
    HyperSize("hyper_selection_hidden_size", "d_p", 128, "selection MLP hidden size"),
    HyperSize("hyper_selection_output_size", "d_h", 128, "selection MLP output size"),
    HyperSize("hyper_layer_embedding_dim", "d_l", 10,
              "layer embedding in the shared hypernetwork"),
)
HYPER_SIZE_NAMES = tuple(size.name for size in HYPER_SIZES)
# The HyperMoE fields each variant's model reads. A flag for any other is refused, and a
# checkpoint's shape check compares only these (a `moe` checkpoint resumes without --hyper-*).
VARIANT_HYPER_FIELDS = {
    "hypermoe": (*HYPER_SIZE_NAMES, "hyper_expert_impl", "hyper_init"),
    "moe_adapter": ("hyper_adapter_dim",),  # the static adapter's bottleneck r
    "moe": (),
    "dense": (),
}

# The size fields as a dataclass of their own, mixed into HyperMoEConfig below.
HyperSizes = dataclasses.make_dataclass(
    "HyperSizes", [(size.name, int, dataclasses.field(default=size.default))
                   for size in HYPER_SIZES])


@dataclass
class HyperMoEConfig(TransformerConfig, HyperSizes):
    moe_type: str = "hypermoe"
    # --attention-backend (model/attention.py). Not megatron's attention_backend field, which
    # steers Transformer Engine (unused here) through process-wide environment variables.
    core_attention_backend: str = "auto"

    # How the HyperExpert is computed (model/hyper_expert.py): "auto" picks "allsets" (every
    # possible selected set generated, no host sync) when C(E, k) <= tokens, else "grouped" on
    # the CPU (distinct sets present; "factored" once they exceed
    # hyper_factored_min_sets_fraction of the tokens) and "factored" on a GPU. "naive" is the
    # paper's per-token form, kept as the reference the fast forms are tested against.
    hyper_expert_impl: str = "auto"
    hyper_factored_min_sets_fraction: float = 0.5
    hyper_init: str = "hyperfanin"  # one of HYPER_INITS
    # Divide the selected experts' routing weights by their sum (a top-1 gate is then exactly
    # 1, as in Mixtral and the authors' GPT-2 code). megatron-core's post-softmax routing does
    # this for top-k > 1 but refuses top-1; pre-softmax + this gives the same gates for any k.
    moe_router_renormalize: bool = False
    # RoPE's base (Megatron's --rotary-base, Hugging Face's rope_theta). A GPTModel argument in
    # megatron-core, kept here so that one config object describes the whole model.
    rotary_base: float = 10000.0
    # Megatron-DeepSpeed's capacity options (megatron-core has one factor and no minimum):
    # another factor while not training, and a minimum capacity per expert (DeepSpeed's
    # max(ceil(T k / E x factor), min_capacity)). Applied by model/router.py.
    moe_eval_capacity_factor: Optional[float] = None
    moe_min_capacity: Optional[int] = None

    def __post_init__(self):
        self._validate_hypermoe_fields()
        attention_backend(self.core_attention_backend)  # a bad name fails here
        super().__post_init__()

    def _validate_hypermoe_fields(self):
        if self.moe_type not in MOE_TYPES:
            raise ConfigError(f"moe_type={self.moe_type!r} is not one of {', '.join(MOE_TYPES)}")
        if self.moe_type == "dense":
            if self.num_moe_experts is not None:
                raise ConfigError(
                    "moe_type='dense' takes no experts: drop num_moe_experts or use moe_type='moe'"
                )
            if self.moe_shared_expert_intermediate_size is not None or self.moe_layer_freq != 1:
                raise ConfigError("moe_type='dense' has no MoE layers: drop "
                                  "moe_shared_expert_intermediate_size and moe_layer_freq")
            return
        self._validate_layer_pattern()
        if self.num_moe_experts is None or self.num_moe_experts < 1:
            raise ConfigError(
                f"moe_type={self.moe_type!r} needs num_moe_experts >= 1 "
                f"(got {self.num_moe_experts})"
            )
        if not 1 <= self.moe_router_topk <= self.num_moe_experts:
            raise ConfigError(
                f"moe_router_topk={self.moe_router_topk} must be between 1 and "
                f"num_moe_experts={self.num_moe_experts}"
            )
        if self.moe_router_topk == 1 and self.moe_router_pre_softmax is False and \
                self.moe_router_score_function == "softmax" and \
                self.moe_router_load_balancing_type != "sinkhorn":
            raise ConfigError("post-softmax routing with top-1 (moe_router_pre_softmax=False) is "
                              "refused by megatron-core (a softmax over one logit has no "
                              "gradient): for a top-1 gate of exactly 1 use "
                              "--moe-router-renormalize")
        self._validate_capacity_options()
        if self.moe_type == "moe_adapter" and (not isinstance(self.hyper_adapter_dim, int)
                                               or self.hyper_adapter_dim < 1):
            raise ConfigError(f"hyper_adapter_dim={self.hyper_adapter_dim!r} must be a positive "
                              "integer")
        if self.moe_type != "hypermoe":
            return
        for name in HYPER_SIZE_NAMES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.hyper_expert_impl not in HYPER_EXPERT_IMPLS:
            raise ConfigError(
                f"hyper_expert_impl={self.hyper_expert_impl!r} is not one of "
                f"{', '.join(HYPER_EXPERT_IMPLS)}"
            )
        num_sets = math.comb(self.num_moe_experts, self.moe_router_topk)
        if self.hyper_expert_impl == "allsets" and num_sets > MAX_ALLSETS:
            raise ConfigError(
                f"hyper_expert_impl='allsets' would generate C({self.num_moe_experts}, "
                f"{self.moe_router_topk}) = {num_sets:,} HyperExperts per layer (at most "
                f"{MAX_ALLSETS:,}): use auto or factored")
        if self.hyper_init not in HYPER_INITS:
            raise ConfigError(f"hyper_init={self.hyper_init!r} is not one of "
                              f"{', '.join(HYPER_INITS)}")
        if not 0.0 < self.hyper_factored_min_sets_fraction <= 1.0:
            raise ConfigError(
                f"hyper_factored_min_sets_fraction={self.hyper_factored_min_sets_fraction} "
                "must be in (0, 1]"
            )

    def _validate_layer_pattern(self):
        freq = self.moe_layer_freq
        if isinstance(freq, bool) or not isinstance(freq, (int, list)):
            raise ConfigError(f"moe_layer_freq={freq!r} must be an integer or a list of 0/1 per "
                              "layer")
        if isinstance(freq, int) and freq < 1:
            raise ConfigError(f"moe_layer_freq={freq} must be >= 1")
        if isinstance(freq, list):
            if len(freq) != self.num_layers or any(v not in (0, 1) or isinstance(v, bool)
                                                   for v in freq):
                raise ConfigError(f"moe_layer_freq {freq} must list 0 (dense) or 1 (MoE) for "
                                  f"each of the {self.num_layers} layers")
        if not any(moe_layer_pattern(self)):
            raise ConfigError(f"moe_layer_freq {freq} makes no layer an MoE layer: use "
                              "moe_type='dense'")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise ConfigError("moe_shared_expert_gate gates a shared expert: set "
                              "moe_shared_expert_intermediate_size too")

    def _validate_capacity_options(self):
        factor = self.moe_expert_capacity_factor
        if factor is not None and factor < 0:
            factor = None  # megatron's meaning of a negative factor: no capacity
        if self.moe_eval_capacity_factor is not None:
            if factor is None:
                raise ConfigError("moe_eval_capacity_factor needs moe_expert_capacity_factor "
                                  "(a capacity while training)")
            if self.moe_pad_expert_input_to_capacity and self.moe_eval_capacity_factor != factor:
                raise ConfigError("moe_pad_expert_input_to_capacity pads every expert to the "
                                  "training capacity, so moe_eval_capacity_factor must equal "
                                  "moe_expert_capacity_factor")
        if self.moe_min_capacity:
            if self.moe_min_capacity < 0:
                raise ConfigError(f"moe_min_capacity={self.moe_min_capacity} must be >= 0")
            if self.moe_pad_expert_input_to_capacity:
                raise ConfigError("moe_min_capacity does not combine with "
                                  "moe_pad_expert_input_to_capacity (megatron's dispatcher pads "
                                  "to its own capacity, without a minimum)")


def moe_layer_pattern(config) -> list:
    """For each global layer, whether it is an MoE layer (else a dense MLP): megatron's
    ``moe_layer_freq``, an int N (layers 0, N, 2N, ... are MoE) or a list of 0/1 per layer.
    Reads ``moe_type``, ``num_layers`` and ``moe_layer_freq``: a config or the parsed flags."""
    if config.moe_type == "dense":
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [layer % freq == 0 for layer in range(config.num_layers)]
    return [bool(value) for value in freq]


def default_architecture() -> dict:
    """RMSNorm, SwiGLU, no linear biases: a `moe` model maps one-to-one onto Mixtral.

    RoPE is a GPTModel argument, not a TransformerConfig field; see ``build_gpt_model``.
    """
    return dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=True,  # model/grouped_experts.py (torch only), not megatron's GroupedMLP
        use_cpu_initialization=not torch.cuda.is_available(),
    )


def make_config(moe_type: str = "hypermoe", **overrides) -> HyperMoEConfig:
    """Build a validated config with this project's default architecture.

    ``moe_ffn_hidden_size`` defaults to ``ffn_hidden_size``; the expert count is dropped for
    ``dense`` so one set of overrides builds all three variants.
    """
    fields = default_architecture()
    fields.update(overrides)
    # Top-1 gates need softmax over all experts before top-k (Switch style): a softmax over the
    # single selected logit would be 1 and give the router no gradient. (megatron-core checks
    # this even for dense models.)
    fields.setdefault("moe_router_pre_softmax", fields.get("moe_router_topk", 2) == 1)
    if fields.get("pipeline_model_parallel_size", 1) > 1:
        # what the stages send each other (megatron requires it be named)
        fields.setdefault("pipeline_dtype", fields.get("params_dtype", torch.float32))
    if moe_type == "dense":
        fields.pop("num_moe_experts", None)
        fields.pop("moe_ffn_hidden_size", None)
    else:
        fields.setdefault("moe_ffn_hidden_size", fields.get("ffn_hidden_size"))
    return HyperMoEConfig(moe_type=moe_type, **fields)


def gates_renormalised(config) -> bool:
    """Whether the selected experts' weights sum to 1 (Hugging Face's ``norm_topk_prob``)."""
    return not config.moe_router_pre_softmax or config.moe_router_renormalize


def routing_fields(topk: int, renormalised: bool) -> dict:
    """The config fields that give renormalised (or unrenormalised) top-k gates: megatron's own
    post-softmax routing where it allows it, pre-softmax + renormalisation for top-1."""
    if not renormalised:
        return dict(moe_router_pre_softmax=True, moe_router_renormalize=False)
    if topk == 1:
        return dict(moe_router_pre_softmax=True, moe_router_renormalize=True)
    return dict(moe_router_pre_softmax=False, moe_router_renormalize=False)


def num_hypermoe_parameters(config: HyperMoEConfig, num_hypermoe_layers: Optional[int] = None):
    """Parameters HyperMoE adds on top of the plain MoE model, from the sizes alone.

    Returns (per_layer, shared): per_layer is the selection path each HyperMoE layer owns
    (expert embeddings and selection MLP); shared is the one hypernetwork.
    """
    E = config.num_moe_experts
    d = config.hidden_size
    r = config.hyper_adapter_dim
    d_g = config.hyper_hidden_size
    d_e = config.hyper_expert_embedding_dim
    d_p = config.hyper_selection_hidden_size
    d_h = config.hyper_selection_output_size
    d_l = config.hyper_layer_embedding_dim
    L = config.num_layers if num_hypermoe_layers is None else num_hypermoe_layers
    per_layer = E * d_e + (d_e * d_p + d_p) + (d_p * d_h + d_h)
    shared = (
        L * d_l  # layer embedding
        + (d_h + d_l) * d_g + d_g  # fc
        + d_g * d * r + d * r  # down-weight head
        + d_g * r + r  # down-bias head
        + d_g * r * d + r * d  # up-weight head
        + d_g * d + d  # up-bias head
    )
    return per_layer, shared

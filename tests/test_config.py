"""HyperMoEConfig validates on construction with one-line errors."""

import pytest

from megatron_hypermoe.errors import ConfigError
from megatron_hypermoe.model.config import HyperMoEConfig, make_config
from tests.support.tiny_model import TINY


@pytest.mark.parametrize("overrides,message", [
    (dict(moe_router_topk=5), r"moe_router_topk=5 must be between 1 and num_moe_experts=4"),
    (dict(moe_router_topk=0), r"moe_router_topk=0 must be between 1"),
    (dict(hyper_adapter_dim=0), r"hyper_adapter_dim=0 must be a positive integer"),
    (dict(hyper_hidden_size=-3), r"hyper_hidden_size=-3 must be a positive integer"),
    (dict(hyper_layer_embedding_dim=2.5), r"hyper_layer_embedding_dim=2.5 must be a positive"),
    (dict(hyper_expert_impl="fast"),
     r"hyper_expert_impl='fast' is not one of auto, allsets, grouped"),
    (dict(hyper_expert_impl="allsets", num_moe_experts=64, moe_router_topk=8),
     r"'allsets' would generate C\(64, 8\) = 4,426,165,368 HyperExperts .*: use auto or factored"),
    (dict(hyper_factored_min_sets_fraction=0), r"must be in \(0, 1\]"),
])
def test_bad_hypermoe_values_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_config("hypermoe", **{**TINY, **overrides})
    assert "\n" not in str(info.value)


def test_unknown_moe_type_and_missing_experts():
    with pytest.raises(ConfigError,
                       match="moe_type='switch' is not one of hypermoe, moe, moe_adapter, dense"):
        make_config("switch", **TINY)
    with pytest.raises(ConfigError, match="needs num_moe_experts >= 1"):
        HyperMoEConfig(moe_type="moe", num_layers=2, hidden_size=32, num_attention_heads=4)
    with pytest.raises(ConfigError, match="dense' takes no experts"):
        HyperMoEConfig(moe_type="dense", num_layers=2, hidden_size=32, num_attention_heads=4,
                       num_moe_experts=4)


def test_paper_defaults_and_variants():
    config = make_config("hypermoe", num_layers=2, hidden_size=32, num_attention_heads=4,
                         ffn_hidden_size=64, num_moe_experts=8, moe_router_topk=1)
    sizes = (config.hyper_adapter_dim, config.hyper_hidden_size,
             config.hyper_expert_embedding_dim, config.hyper_selection_hidden_size,
             config.hyper_selection_output_size, config.hyper_layer_embedding_dim)
    assert sizes == (64, 128, 128, 128, 128, 10)
    assert config.moe_router_pre_softmax  # top-1 routes Switch-style
    assert config.moe_ffn_hidden_size == 64
    # The config does not check the hyper sizes of the variants that do not read them (their
    # flags are refused: tests/test_arguments.py).
    assert make_config("moe", **{**TINY, "hyper_adapter_dim": 0}).moe_type == "moe"
    dense = make_config("dense", **TINY)
    assert dense.num_moe_experts is None and dense.moe_ffn_hidden_size is None


def test_the_hyper_sizes_are_defined_once():
    """HYPER_SIZES generates the config fields, the flags and the checkpoint's shape fields; the
    shipped Hugging Face configuration keeps its own defaults, which must be the same."""
    import inspect

    from megatron_hypermoe.cli.arguments import HYPER_FLAG_DEFAULTS, parse_args
    from megatron_hypermoe.hf.configuration_hypermoe import HyperMoeConfig
    from megatron_hypermoe.model.config import HYPER_SIZE_NAMES, HYPER_SIZES
    from megatron_hypermoe.training.checkpoint.compatibility import SHAPE_FIELDS

    paper = {size.name: size.default for size in HYPER_SIZES}
    assert paper == {"hyper_adapter_dim": 64, "hyper_hidden_size": 128,
                     "hyper_expert_embedding_dim": 128, "hyper_selection_hidden_size": 128,
                     "hyper_selection_output_size": 128, "hyper_layer_embedding_dim": 10}
    model_only = {k: v for k, v in TINY.items() if k not in HYPER_SIZE_NAMES}
    config = make_config("hypermoe", **model_only)
    assert {name: getattr(config, name) for name in HYPER_SIZE_NAMES} == paper
    args = parse_args(["--mock-data", "--train-iters", "1"])  # a hypermoe run's flags
    assert {name: getattr(args, name) for name in HYPER_SIZE_NAMES} == paper
    assert {name: HYPER_FLAG_DEFAULTS[name] for name in HYPER_SIZE_NAMES} == paper
    assert [f for f in SHAPE_FIELDS if f.startswith("hyper_")] == list(HYPER_SIZE_NAMES)
    hf_defaults = inspect.signature(HyperMoeConfig.__init__).parameters
    assert {name: hf_defaults[name].default for name in HYPER_SIZE_NAMES} == paper

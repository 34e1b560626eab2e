"""The open MoE families through Hugging Face, both ways (issue 29, items 2 and 3):
Qwen2-MoE (qkv bias, a gated shared expert, unrenormalised top-k), Qwen3-MoE (per-head q/k
norm, head_dim != hidden / heads, renormalised top-k), Mixtral, each with grouped-query
attention and (Qwen) a dense layer between MoE layers; OLMoE refused; an MoE upcycled to
HyperMoE or the static adapter.

Every source is a tiny model of transformers' own class, all its weights random (norms and
biases included), saved with save_pretrained. The checks: our model's logits equal
transformers' (fp32, 1e-5); the export is the source bit for bit and loads with transformers
alone to the same logits; TP=2 and EP=2 imports hold the same weights; an upcycled MoE computes
what the source computed until it trains, then trains and exports to the HyperMoE class.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_hypermoe.errors import ArgumentError, CheckpointError
from tests.support.processes import REPO_ROOT, environment, free_port, pretrain
from tests.support.tiny_model import hf_logits, megatron_logits, random_tokens

pytestmark = pytest.mark.usefixtures("megatron_single_process")

TOLERANCE = 1e-5
VOCAB = 512  # the dataset fixture's 400-piece tokenizer, padded to a multiple of 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
              initializer_range=0.1, rms_norm_eps=1e-6, rope_theta=5000.0)
# family -> (config class, model class, fields); each with a dense layer where it can have one
FAMILIES = {
    # q/k norm, head_dim 12 != 32 / 4, renormalised top-2, attention_bias (q, k, v; o_proj's
    # bias is zero: megatron has none)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=24, head_dim=12, num_experts=4,
                       num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                       attention_bias=True)),
    # qkv bias, gated shared expert, unrenormalised top-2
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                       mlp_only_layers=[1])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2)),
}
ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM", "hypermoe": "HyperMoeForCausalLM"}


def randomise_(model, seed=0):
    """Every weight random: matrices as initialised, norm weights around 1 and biases around 0
    (not exactly 1 and 0, so that one mapped to the wrong place shows), o_proj's bias zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("o_proj.bias"):
                param.zero_()
            elif "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            elif "shared_expert_gate" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def make_hf_model(family, seed=0, **overrides):
    import transformers

    config_class, model_class, fields = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **fields, **overrides})
    torch.manual_seed(seed)
    return randomise_(getattr(transformers, model_class)(config), seed).eval()


def save_hf_model(model, directory, tokenizer_model=None):
    model.save_pretrained(str(directory))
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, directory / "tokenizer.model")
    return directory


def read_config(directory):
    return json.loads((directory / "config.json").read_text())


# In process: the name map and the config translation against transformers' modules ----------
VARIANTS = {
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe_no_bias_every_layer_moe": ("qwen3_moe", dict(attention_bias=False,
                                                            mlp_only_layers=[])),
    "qwen2_moe": ("qwen2_moe", {}),
    # Qwen2-MoE's other layer rule: every second layer sparse (layers 1 and 3 of 4)
    "qwen2_moe_sparse_step_2": ("qwen2_moe", dict(decoder_sparse_step=2, mlp_only_layers=[],
                                                  num_hidden_layers=4, norm_topk_prob=True)),
    # no shared expert (width 0) and no qkv bias: a plain MoE with a dense layer
    "qwen2_moe_no_shared_expert": ("qwen2_moe", dict(shared_expert_intermediate_size=0,
                                                     qkv_bias=False)),
    "mixtral": ("mixtral", {}),
}


def megatron_model_of(directory):
    """Our model built from an HF directory's config and weights, in this process (what
    import_hf does, without the checkpoint)."""
    from megatron_hypermoe.conversion.import_hf import (
        SOURCE_TYPES,
        check_representable,
        megatron_config,
        read_hf_weights,
    )
    from megatron_hypermoe.hf.mapping import NameMapShape, from_hf, hf_names
    from megatron_hypermoe.model.gpt import build_gpt_model
    from megatron_hypermoe.model.initialization import load_global_state

    hf_config = read_config(directory)
    check_representable(hf_config)
    config = megatron_config(hf_config, SOURCE_TYPES[hf_config["model_type"]])
    shape = NameMapShape.of(config, family=hf_config["model_type"])
    weights = read_hf_weights(str(directory))
    assert set(weights) == hf_names(shape)
    state = from_hf(weights, shape)
    model = build_gpt_model(config, hf_config["vocab_size"],
                            hf_config["max_position_embeddings"])
    load_global_state(model, config, state)
    return model.eval(), config, shape, weights, state


# transformers' nn.Linear init of the width-0 shared expert
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")
@pytest.mark.parametrize("variant", VARIANTS)
def test_family_computes_what_transformers_computes(variant, tmp_path):
    from megatron_hypermoe.conversion.export import hf_family
    from megatron_hypermoe.hf.mapping import hf_only_tensors, to_hf
    from megatron_hypermoe.model.config import moe_layer_pattern

    family, overrides = VARIANTS[variant]
    hf = make_hf_model(family, **overrides)
    directory = save_hf_model(hf, tmp_path / "hf")
    model, config, shape, weights, state = megatron_model_of(directory)
    assert moe_layer_pattern(config) == [hasattr(layer.mlp, "experts")
                                         for layer in hf.model.layers]
    ids = random_tokens(2, 16, vocab=VOCAB)
    difference = (megatron_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert difference <= TOLERANCE, difference
    back = to_hf(state, shape)
    assert set(back) == set(weights)
    ignored = [name for name, (_, matters) in hf_only_tensors(shape).items() if not matters]
    for name in weights:  # (a width-0 shared expert's gate multiplies nothing: written as 0)
        if name not in ignored:
            assert torch.equal(back[name], weights[name]), name
    assert hf_family(config) == family  # and exports to the same family


def test_olmoe_is_refused_in_one_line_with_the_reason(tmp_path):
    """OLMoE normalises q and k over the whole projection (its q_norm has hidden_size weights,
    one per channel of all heads together: modeling_olmoe.py OlmoeAttention), before the split
    into heads; megatron's qk_layernorm normalises each head_dim-wide head on its own. The two
    differ unless every head has the same RMS, so the import is refused before any work."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from megatron_hypermoe.cli.arguments import run_config_for_model
    from megatron_hypermoe.conversion.import_hf import import_hf

    config = OlmoeConfig(**{k: v for k, v in COMMON.items() if k != "rope_theta"},
                         num_experts=4, num_experts_per_tok=2)
    hf = OlmoeForCausalLM(config)
    assert tuple(hf.model.layers[0].self_attn.q_norm.weight.shape) == (32,)  # not head_dim 8
    directory = save_hf_model(hf, tmp_path / "olmoe")
    with pytest.raises(CheckpointError) as error:
        import_hf(str(directory), str(tmp_path / "out"), run_config_for_model=run_config_for_model)
    message = str(error.value)
    assert "\n" not in message and "OLMoE" in message
    assert "normalises the whole q and k projections" in message
    assert "each head on its own" in message and "cannot be represented exactly" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    (dict(num_moe_experts=8), "--num-experts 8 differs from the qwen2_moe model's 4: upcycling an "
                          "MoE keeps its experts and router; drop it"),
    (dict(moe_router_topk=1), "--moe-router-topk 1 differs from the qwen2_moe model's 2"),
    (dict(moe_router_renormalize=True), "--moe-router-renormalize: upcycling an MoE keeps its "
                                        "routing (norm_topk_prob=False); drop it"),
])
def test_upcycling_an_moe_refuses_to_change_its_experts_or_routing(change, message, tmp_path):
    from megatron_hypermoe.cli.arguments import run_config_for_model
    from megatron_hypermoe.conversion.import_hf import import_hf

    directory = save_hf_model(make_hf_model("qwen2_moe"), tmp_path / "hf")
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_hf(str(directory), str(tmp_path / "out"), upcycle=True, moe_type="hypermoe",
                  upcycle_fields=change, run_config_for_model=run_config_for_model)
    # the same expert count and top-k as the source's are no change
    with pytest.raises(CheckpointError, match="adds nothing"):
        import_hf(str(directory), str(tmp_path / "out"), upcycle=True, moe_type="moe",
                  upcycle_fields=dict(num_moe_experts=4, moe_router_topk=2),
                  run_config_for_model=run_config_for_model)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem,message", [
    ("o_proj_bias", "self_attn.o_proj.bias is not zero, and megatron's attention output "
                    "projection has no bias"),
    ("extra_weight", "has 1 weights that a qwen3_moe model as its config.json describes does "
                     "not have (the first: model.layers.1.mlp.gate.weight)"),
    ("sliding_window", "sliding-window attention"),
])
def test_import_refuses_what_it_cannot_hold(problem, message, tmp_path):
    from safetensors.torch import save_file

    from megatron_hypermoe.cli.arguments import run_config_for_model
    from megatron_hypermoe.conversion.import_hf import import_hf

    hf = make_hf_model("qwen3_moe")
    directory = save_hf_model(hf, tmp_path / "hf")
    weights = load_file(str(directory / "model.safetensors"))
    if problem == "o_proj_bias":
        weights["model.layers.2.self_attn.o_proj.bias"][0] = 0.5
    elif problem == "extra_weight":  # a router in the dense layer
        weights["model.layers.1.mlp.gate.weight"] = weights["model.layers.0.mlp.gate.weight"] + 0
    else:
        config = read_config(directory)
        config.update(use_sliding_window=True, sliding_window=8)
        (directory / "config.json").write_text(json.dumps(config))
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(make_tokenizer_model(tmp_path), directory / "tokenizer.model")
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_hf(str(directory), str(tmp_path / "out"), run_config_for_model=run_config_for_model)
    assert not (tmp_path / "out").exists()


def make_tokenizer_model(tmp_path):
    """A SentencePiece model of 400 pieces (padded to the models' 512)."""
    from tests.support.corpus import make_documents, write_jsonl
    from tools import train_tokenizer

    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(100, seed=1))
    assert train_tokenizer.main(["--input", corpus, "--vocab-size", "400",
                                 "--model-prefix", str(tmp_path / "sp")]) == 0
    return tmp_path / "sp.model"


EXPORT_CASES = {
    # (megatron config fields) -> the family it exports to, or the refusal
    "plain": ({}, "mixtral"),
    "head_dim": (dict(kv_channels=24), "mixtral"),
    "gated_shared_expert": (dict(moe_shared_expert_intermediate_size=32,
                                 moe_shared_expert_gate=True), "qwen2_moe"),
    "qkv_bias": (dict(add_qkv_bias=True), "qwen2_moe"),
    "dense_layer": (dict(num_layers=3, moe_layer_freq=[1, 0, 1]), "qwen2_moe"),
    "qk_norm": (dict(qk_layernorm=True), "qwen3_moe"),
    "qk_norm_qkv_bias_dense_layer": (dict(qk_layernorm=True, add_qkv_bias=True, num_layers=3,
                                          moe_layer_freq=[0, 1, 1]), "qwen3_moe"),
    "ungated_shared_expert": (
        dict(moe_shared_expert_intermediate_size=32),
        "Qwen2-MoE cannot hold a shared expert without gate (Qwen2-MoE's is always gated by "
        "sigmoid(shared_expert_gate(x))); Qwen3-MoE cannot hold a shared expert"),
    "qk_norm_shared_expert": (
        dict(qk_layernorm=True, moe_shared_expert_intermediate_size=32,
             moe_shared_expert_gate=True),
        "Qwen2-MoE cannot hold q/k norm; Qwen3-MoE cannot hold a shared expert"),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_picks_the_family_that_holds_the_model_exactly(case):
    from megatron_hypermoe.conversion.export import hf_family
    from tests.support.tiny_model import tiny_config

    fields, expected = EXPORT_CASES[case]
    config = tiny_config("moe", **fields)
    if expected in ARCHITECTURES:
        assert hf_family(config) == expected
        assert hf_family(tiny_config("hypermoe", **fields)) == "hypermoe"
    else:
        with pytest.raises(CheckpointError) as error:
            hf_family(config)
        assert str(error.value) == "this moe model cannot be exported exactly: " + expected
        assert hf_family(tiny_config("hypermoe", **fields)) == "hypermoe"  # ours holds it


def test_a_dense_model_with_qk_norm_is_refused_as_llama():
    from megatron_hypermoe.conversion.export import hf_family
    from tests.support.tiny_model import tiny_config

    assert hf_family(tiny_config("dense", add_qkv_bias=True)) == "llama"
    with pytest.raises(CheckpointError, match="this dense model has q/k norm, which llama "
                                              "cannot hold: not exported"):
        hf_family(tiny_config("dense", qk_layernorm=True))


# End to end: the tools on tiny transformers models ------------------------------------------
LAYOUTS = {"one": (1, []), "tp2": (2, ["--tensor-model-parallel-size", "2"]),
           "ep2": (2, ["--expert-model-parallel-size", "2"])}
EXPECTED_LAYOUT = {"one": (1, 1, 1), "tp2": (2, 1, 1), "ep2": (1, 2, 2)}  # (TP, EP, DP)


def recorded_layout(save):
    """(TP, EP, DP) of the checkpoint the converter wrote."""
    from megatron_hypermoe.training.checkpoint.reader import read_checkpoint

    layout = read_checkpoint(str(save)).run.parallel
    return layout.tp, layout.ep, layout.dp


def convert(hf_dir, save, *flags, nproc=1, expect=0):
    """tools/convert_hf_to_checkpoint.py, under torchrun for several ranks."""
    tool = str(REPO_ROOT / "tools" / "convert_hf_to_checkpoint.py")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}"]
    result = subprocess.run([*launcher, tool, "--hf", str(hf_dir), "--save", str(save),
                             *map(str, flags)], env=environment(), capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == expect, output[-4000:]
    return output


@pytest.fixture(scope="module")
def hf_source(dataset, tmp_path_factory):
    """hf_source(family) -> a save_pretrained directory of a random tiny model of the family,
    with the dataset fixture's tokenizer."""
    tokenizer_model = dataset[dataset.index("--tokenizer-model") + 1]
    root = tmp_path_factory.mktemp("hf_sources")
    made = {}

    def make(family):
        if family not in made:
            made[family] = save_hf_model(make_hf_model(family), root / family, tokenizer_model)
        return made[family]
    return make


@pytest.fixture(scope="module")
def imported(hf_source, tmp_path_factory):
    """imported(family, layout) -> the checkpoint tools/convert_hf_to_checkpoint.py wrote."""
    root = tmp_path_factory.mktemp("hf_imports")
    made = {}

    def make(family, layout="one"):
        if (family, layout) not in made:
            nproc, flags = LAYOUTS[layout]
            save = root / f"{family}_{layout}"
            convert(hf_source(family), save, *flags, nproc=nproc)
            assert recorded_layout(save) == EXPECTED_LAYOUT[layout]  # the layout asked for
            made[family, layout] = save
        return made[family, layout]
    return make


def checkpoint_logits(save, ids):
    from megatron_hypermoe.inference.model_source import build_megatron_model
    from megatron_hypermoe.training.checkpoint.reader import read_checkpoint

    model, _ = build_megatron_model(read_checkpoint(str(save)))
    return megatron_logits(model, ids)


def transformers_alone(directories, tmp_path):
    """{directory: (class name, logits of record_ids())} as a user with only transformers gets
    them: tests/hf_compat_check.py with our package hidden, in a bare environment."""
    out = tmp_path / "alone.pt"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "hf_compat_check.py"),
                             str(out), *map(str, directories)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(out)
    return {directory: (loaded[str(directory)]["class"], loaded[str(directory)]["logits"])
            for directory in directories}


def assert_same_weights(a, b):
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_import_and_export_are_exact(family, hf_source, imported, tmp_path):
    """HF -> ours: the same logits as transformers (1e-5). Ours -> HF: the source's weights bit
    for bit and its layer pattern, loading with transformers alone to the same logits."""
    from megatron_hypermoe.conversion.export import export_checkpoint
    from megatron_hypermoe.inference.model_source import load_hf_model
    from tests.hf_compat_check import record_ids

    source = hf_source(family)
    ids = random_tokens(2, 32, vocab=VOCAB, seed=3)
    ours = checkpoint_logits(imported(family), ids)
    difference = (ours - hf_logits(load_hf_model(str(source)), ids)).abs().max().item()
    print(f"{family}: import, max logit difference {difference:.2e}")
    assert difference <= TOLERANCE
    export = tmp_path / "export"
    config = export_checkpoint(str(imported(family)), str(export))
    assert config["architectures"] == [ARCHITECTURES[family]]
    assert_same_weights(load_file(str(export / "model.safetensors")),
                        load_file(str(source / "model.safetensors")))
    written, original = read_config(export), read_config(source)
    if family != "mixtral":
        assert written["mlp_only_layers"] == [1] and written["decoder_sparse_step"] == 1
    for field in ("head_dim", "norm_topk_prob", "attention_bias", "qkv_bias",
                  "shared_expert_intermediate_size", "moe_intermediate_size", "rms_norm_eps",
                  "num_key_value_heads"):
        if field in original and original[field] is not None:
            assert written[field] == original[field], field
    assert not list(export.glob("*.py"))  # native: no custom code
    (name, logits), = transformers_alone([export], tmp_path).values()
    assert name == ARCHITECTURES[family]
    alone = checkpoint_logits(imported(family), record_ids())
    difference = (logits - alone).abs().max().item()
    print(f"{family}: export with transformers alone, max logit difference {difference:.2e}")
    assert difference <= TOLERANCE


# Each layout once, on the family that exercises it most (TP splits Qwen2-MoE's shared expert
# and q/k/v biases; EP moves Qwen3-MoE's experts); Mixtral's: tests/test_hf_conversion.py. (The
# CI budget: each case is two torchrun launches.)
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("family,layout", [("qwen2_moe", "tp2"), ("qwen3_moe", "ep2")])
def test_every_layout_imports_the_same_weights(family, layout, hf_source, imported, tmp_path):
    """Imported under TP=2 (sequence parallel) or EP=2: the checkpoint holds the one-process
    import's weights bit for bit, computes the same logits and exports the source again."""
    from megatron_hypermoe.conversion.export import export_checkpoint
    from megatron_hypermoe.training.checkpoint.reader import read_checkpoint

    one = read_checkpoint(str(imported(family))).state
    other = read_checkpoint(str(imported(family, layout))).state
    assert_same_weights(one, other)
    ids = random_tokens(2, 32, vocab=VOCAB, seed=3)
    assert torch.equal(checkpoint_logits(imported(family), ids),
                       checkpoint_logits(imported(family, layout), ids))
    export_checkpoint(str(imported(family, layout)), str(tmp_path / "export"))
    assert_same_weights(load_file(str(tmp_path / "export" / "model.safetensors")),
                        load_file(str(hf_source(family) / "model.safetensors")))


# Upcycling an MoE: the side path added with an output of exactly zero ------------------------
UPCYCLE_TARGETS = {"hypermoe_hyperfanin": ("hypermoe", ["--hyper-init", "hyperfanin"]),
                   "hypermoe_normal": ("hypermoe", ["--hyper-init", "normal"]),
                   "moe_adapter": ("moe_adapter", [])}
HYPER_SIZES = ["--hyper-adapter-dim", "8", "--hyper-hidden-size", "16",
               "--hyper-expert-embedding-dim", "12", "--hyper-selection-hidden-size", "10",
               "--hyper-selection-output-size", "14", "--hyper-layer-embedding-dim", "6"]


def upcycle_flags(target):
    moe_type, extra = UPCYCLE_TARGETS[target]
    flags = ["--upcycle", "--moe-type", moe_type, *extra]
    if moe_type == "hypermoe":
        return flags + HYPER_SIZES
    return flags + ["--hyper-adapter-dim", "8"]


# Every family and every target once (9 pairs would be 9 converter launches for the same code)
@pytest.mark.slow
@pytest.mark.parametrize("family,target", [("mixtral", "hypermoe_hyperfanin"),
                                           ("qwen2_moe", "hypermoe_normal"),
                                           ("qwen3_moe", "moe_adapter")])
def test_upcycled_moe_computes_what_the_source_computes(family, target, hf_source, tmp_path):
    """The experts, router (norm_topk_prob), shared expert, norms and biases are the source's;
    the side path is there, with its other parts initialised (--hyper-init), and adds exactly 0
    until it trains."""
    from megatron_hypermoe.inference.model_source import load_hf_model
    from megatron_hypermoe.training.checkpoint.reader import read_checkpoint

    convert(hf_source(family), tmp_path / "up", *upcycle_flags(target))
    checkpoint = read_checkpoint(str(tmp_path / "up"))
    assert checkpoint.meta["args"]["moe_type"] == UPCYCLE_TARGETS[target][0]
    state = checkpoint.state
    side = [name for name in state if "hypernetwork." in name or ".selection." in name
            or ".adapter." in name]
    zero = [name for name in side if "up_weight" in name or "up_bias" in name
            or ".adapter.up." in name]
    assert zero and all(not state[name].count_nonzero() for name in zero)
    assert all(state[name].count_nonzero() for name in side
               if name not in zero and name.endswith("weight"))
    if family != "mixtral":  # no side path on the dense layer
        assert not [name for name in side if name.startswith("decoder.layers.1.")]
    ids = random_tokens(2, 32, vocab=VOCAB, seed=3)
    difference = (checkpoint_logits(tmp_path / "up", ids)
                  - hf_logits(load_hf_model(str(hf_source(family))), ids)).abs().max().item()
    print(f"{family} -> {target}: max logit difference {difference:.2e}")
    assert difference <= TOLERANCE


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp2"])
def test_upcycling_in_every_layout_gives_the_same_checkpoint(layout, hf_source, tmp_path):
    """The added side path is drawn by global name and the rest is the source's: a TP=2 or
    EP=2 upcycle holds the one-process upcycle's weights bit for bit."""
    from megatron_hypermoe.training.checkpoint.reader import read_checkpoint

    nproc, flags = LAYOUTS[layout]
    convert(hf_source("qwen2_moe"), tmp_path / "one", *upcycle_flags("hypermoe_normal"))
    convert(hf_source("qwen2_moe"), tmp_path / layout, *upcycle_flags("hypermoe_normal"),
            *flags, nproc=nproc)
    assert_same_weights(read_checkpoint(str(tmp_path / "one")).state,
                        read_checkpoint(str(tmp_path / layout)).state)
    assert recorded_layout(tmp_path / layout) == EXPECTED_LAYOUT[layout]


def model_flags(save):
    """The trainer's model flags of a checkpoint (what a run that --loads it must give)."""
    from megatron_hypermoe.training.checkpoint.reader import read_checkpoint

    args = read_checkpoint(str(save)).meta["args"]
    flags = ["--moe-type", args["moe_type"]]
    for dest in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels", "num_experts", "moe_router_topk",
                 "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                 "max_position_embeddings", "init_method_std", "rotary_base", "norm_epsilon",
                 "hyper_adapter_dim", "hyper_hidden_size", "hyper_expert_embedding_dim",
                 "hyper_selection_hidden_size", "hyper_selection_output_size",
                 "hyper_layer_embedding_dim", "hyper_init"):
        if args.get(dest) is not None and (dest in ("hyper_adapter_dim",) or
                                           args["moe_type"] == "hypermoe" or
                                           not dest.startswith("hyper_")):
            flags += ["--" + dest.replace("_", "-"), str(args[dest])]
    flags += ["--moe-layer-freq", json.dumps(args["moe_layer_freq"])]
    if args["moe_type"] == "hypermoe":
        flags += ["--hyper-lr-mult", str(args["hyper_lr_mult"])]
    flags.append("--moe-router-pre-softmax" if args["moe_router_pre_softmax"]
                 else "--no-moe-router-pre-softmax")
    for dest in ("qk_layernorm", "add_qkv_bias", "moe_shared_expert_gate",
                 "moe_router_renormalize", "group_query_attention"):
        if args.get(dest):
            flags.append("--" + dest.replace("_", "-"))
    return flags


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe"])  # (Qwen2-MoE's parts: the in-process
# test_hf_hypermoe_with_every_option_matches_megatron and test_a_trained_moe_exports_to_qwen)
def test_upcycled_moe_trains_on_and_exports_to_the_hypermoe_class(family, hf_source, dataset,
                                                                   tmp_path):
    """From the upcycled Qwen model (shared expert or q/k norm, a dense layer, head_dim), a short
    run; its checkpoint exports to the HyperMoE class (transformers alone, trust_remote_code),
    which computes our logits, the HyperExpert's part of them included, and converts back to
    the same weights."""
    from megatron_hypermoe.conversion.export import export_checkpoint
    from megatron_hypermoe.inference.model_source import build_megatron_model
    from megatron_hypermoe.training.checkpoint.reader import read_checkpoint
    from tests.hf_compat_check import record_ids

    convert(hf_source(family), tmp_path / "up", *upcycle_flags("hypermoe_normal"),
            "--hyper-lr-mult", "1")
    output = pretrain(*model_flags(tmp_path / "up"), *dataset, "--seq-length", "32",
                      "--micro-batch-size", "2", "--global-batch-size", "4",
                      "--train-iters", "3", "--lr", "1e-2", "--min-lr", "1e-2",
                      "--load", str(tmp_path / "up"), "--finetune",
                      "--save", str(tmp_path / "trained"))
    assert "trained/iter_0000003" in output
    export = tmp_path / "export"
    config = export_checkpoint(str(tmp_path / "trained"), str(export))
    assert config["model_type"] == "hypermoe" and config["mlp_only_layers"] == [1]
    assert (config["qk_norm"], config["shared_expert_intermediate_size"]) == \
        ((True, 0) if family == "qwen3_moe" else (False, 40))
    (name, logits), = transformers_alone([export], tmp_path).values()
    assert name == "HyperMoeForCausalLM"
    ids = record_ids()
    model, _ = build_megatron_model(read_checkpoint(str(tmp_path / "trained")))
    ours = megatron_logits(model, ids)
    difference = (logits - ours).abs().max().item()
    print(f"{family} upcycled, trained: export max logit difference {difference:.2e}")
    assert difference <= TOLERANCE
    convert(export, tmp_path / "back")  # and the HyperMoE class with its options imports back
    assert_same_weights(read_checkpoint(str(tmp_path / "trained")).state,
                        read_checkpoint(str(tmp_path / "back")).state)
    with torch.no_grad():  # the HyperExpert trained away from zero: its part is far above that
        for head in ("up_weight", "up_bias"):
            getattr(model.hypernetwork, head).weight.zero_()
            getattr(model.hypernetwork, head).bias.zero_()
    moved = (ours - megatron_logits(model, ids)).abs().max().item()
    assert moved >= 100 * TOLERANCE, moved


TRAINED_EXPORTS = {
    # trainer flags of a moe model -> the family it exports to
    "qwen2_moe": ["--moe-shared-expert-intermediate-size", "32", "--moe-shared-expert-gate",
                  "--add-qkv-bias", "--moe-layer-freq", "[1,0]", "--moe-ffn-hidden-size", "64"],
    "qwen3_moe": ["--qk-layernorm", "--kv-channels", "24", "--num-query-groups", "2",
                  "--moe-layer-freq", "[0,1]", "--moe-ffn-hidden-size", "64"],
}


@pytest.mark.slow
@pytest.mark.parametrize("family", TRAINED_EXPORTS)
def test_a_trained_moe_exports_to_qwen_and_back(family, dataset, tmp_path):
    """A moe model trained with the Qwen parts exports to the native Qwen class that holds it
    (our logits, 1e-5), and converts back to the same weights."""
    from megatron_hypermoe.conversion.export import export_checkpoint
    from megatron_hypermoe.inference.model_source import load_hf_model
    from megatron_hypermoe.training.checkpoint.reader import read_checkpoint
    from tests.support.tiny_model import tiny_run

    pretrain(*tiny_run("moe"), *dataset, *TRAINED_EXPORTS[family], "--train-iters", "2",
             "--global-batch-size", "4", "--lr", "1e-2", "--save", str(tmp_path / "trained"))
    config = export_checkpoint(str(tmp_path / "trained"), str(tmp_path / "export"))
    assert config["architectures"] == [ARCHITECTURES[family]]
    assert config["mlp_only_layers"] == ([1] if family == "qwen2_moe" else [0])
    ids = random_tokens(2, 32, vocab=400, seed=3)
    difference = (checkpoint_logits(tmp_path / "trained", ids)
                  - hf_logits(load_hf_model(str(tmp_path / "export")), ids)).abs().max().item()
    print(f"trained moe -> {family}: max logit difference {difference:.2e}")
    assert difference <= TOLERANCE
    convert(tmp_path / "export", tmp_path / "back")
    assert_same_weights(read_checkpoint(str(tmp_path / "trained")).state,
                        read_checkpoint(str(tmp_path / "back")).state)

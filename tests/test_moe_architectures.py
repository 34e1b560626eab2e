"""The open MoE families' architecture (Qwen2-MoE, Qwen3-MoE, DeepSeek-style): shared experts
(--moe-shared-expert-intermediate-size, --moe-shared-expert-gate), dense layers between MoE
layers (--moe-layer-freq), per-head q/k norms (--qk-layernorm), q/k/v biases (--add-qkv-bias)
and a head width of its own (--kv-channels): how they compose with HyperMoE, and that every
parallel layout, recomputation and checkpoint gives what one process gives."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from megatron_hypermoe.cli.arguments import moe_layer_freq_value, parse_args
from megatron_hypermoe.errors import ArgumentError, CheckpointError, ConfigError
from megatron_hypermoe.model.config import moe_layer_pattern
from megatron_hypermoe.model.hypermoe_layer import HyperMoELayer
from megatron_hypermoe.model.initialization import (
    initialize_from_global_names,
    zero_side_path_output_,
)
from tests.support.processes import pretrain
from tests.support.run_outputs import read_metrics, relative
from tests.support.tiny_model import (
    MEGATRON_KERNELS,
    batch,
    lm_loss,
    tiny_config,
    tiny_model,
    tiny_run,
)
from tests.test_training import assert_resumed_like, generated_sample

# A Qwen-MoE-like tiny model: a dense first layer wider than the experts, a gated shared
# expert, per-head q/k norms, q/k/v biases and heads of 24 (not 64 / 4 = 16).
ARCHITECTURE = dict(num_layers=4, moe_layer_freq=[0, 1, 1, 1], ffn_hidden_size=160,
                    moe_ffn_hidden_size=96, moe_shared_expert_intermediate_size=48,
                    moe_shared_expert_gate=True, qk_layernorm=True, add_qkv_bias=True,
                    kv_channels=24)
ARCHITECTURE_FLAGS = ["--num-layers", "4", "--moe-layer-freq", "[0]+[1]*3",
                      "--ffn-hidden-size", "160", "--moe-ffn-hidden-size", "96",
                      "--moe-shared-expert-intermediate-size", "48", "--moe-shared-expert-gate",
                      "--qk-layernorm", "--add-qkv-bias", "--kv-channels", "24"]


# The flags -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,pattern", [
    ("2", 2), ("[0]+[1]*3", [0, 1, 1, 1]), ("([1]*3+[0]*1)*2", [1, 1, 1, 0] * 2),
    ("[1, 0, 1]", [1, 0, 1])])
def test_moe_layer_freq_reads_megatrons_forms(text, pattern):
    assert moe_layer_freq_value(text) == pattern


@pytest.mark.parametrize("text", ["__import__('os').getcwd()", "[1]*'a'", "[1]+2", "two"])
def test_moe_layer_freq_evaluates_nothing_else(text):
    with pytest.raises(argparse.ArgumentTypeError):
        moe_layer_freq_value(text)


@pytest.mark.parametrize("fields,message", [
    (dict(moe_layer_freq=[1, 0, 1]), "must list 0 (dense) or 1 (MoE) for each of the 4 layers"),
    (dict(moe_layer_freq=[0, 0, 0, 0]), "makes no layer an MoE layer"),
    (dict(moe_layer_freq=0), "must be >= 1"),
    (dict(moe_shared_expert_gate=True), "set moe_shared_expert_intermediate_size too"),
])
def test_bad_patterns_and_a_gate_without_shared_expert_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config("moe", num_layers=4, **fields)


def test_dense_runs_refuse_the_moe_architecture_flags():
    for flags in (["--moe-layer-freq", "2"], ["--moe-shared-expert-intermediate-size", "8"]):
        with pytest.raises(ArgumentError, match="applies to MoE layers"):
            parse_args(["--moe-type", "dense", "--mock-data", "--train-iters", "1", *flags])


def test_expert_and_dense_widths_are_one_unless_there_are_dense_layers():
    base = ["--mock-data", "--train-iters", "1", "--num-layers", "2"]
    with pytest.raises(ArgumentError, match="only dense layers read"):
        parse_args([*base, "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32"])
    args = parse_args([*base, "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32",
                       "--moe-layer-freq", "2"])
    assert (args.ffn_hidden_size, args.moe_ffn_hidden_size) == (64, 32)
    assert moe_layer_pattern(args) == [True, False]


# The model ---------------------------------------------------------------------------------------
@pytest.fixture
def fresh_aux_loss_tracker():
    """megatron's aux-loss tracker is process-wide and sized by the first model's layer count:
    these 4-layer models must not index one sized by another test's 2 layers."""
    from megatron.core.transformer.moe import moe_utils

    moe_utils.get_moe_layer_wise_logging_tracker().clear()
    yield
    moe_utils.get_moe_layer_wise_logging_tracker().clear()


pytestmark_model = pytest.mark.usefixtures("megatron_single_process", "fresh_aux_loss_tracker")


@pytestmark_model
@pytest.mark.parametrize("freq,pattern", [(2, [True, False, True, False]),
                                          ([0, 1, 1, 0], [False, True, True, False])])
def test_the_layer_pattern_builds_dense_and_moe_layers_of_their_own_widths(freq, pattern):
    model, config = tiny_model("hypermoe", num_layers=4, moe_layer_freq=freq, ffn_hidden_size=160,
                               moe_ffn_hidden_size=96)
    assert moe_layer_pattern(config) == pattern
    for layer, moe in zip(model.decoder.layers, pattern):
        assert isinstance(layer.mlp, HyperMoELayer if moe else MLP)
        if moe:
            assert layer.mlp.experts.local_experts[0].linear_fc2.weight.shape == (64, 96)
        else:
            assert layer.mlp.linear_fc2.weight.shape == (64, 160)
    assert [layer.layer_index for layer in model.hypermoe_layers()] == \
        [i for i, moe in enumerate(pattern) if moe]


def _swiglu(x, fc1, fc2):
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


@pytestmark_model
@pytest.mark.parametrize("moe_type", ["hypermoe", "moe_adapter"])
def test_routed_shared_and_side_path_outputs_add_up(moe_type):
    """y = routed experts + sigmoid(x . w) * shared expert(x) + side path(x): the HyperExpert
    (generated from the routed experts this token did NOT select; the shared expert is every
    token's and takes no part in the selection) is a third term, as the static adapter is."""
    fields = dict(num_layers=2, moe_shared_expert_intermediate_size=48,
                  moe_shared_expert_gate=True)
    side, _ = tiny_model(moe_type, **fields)
    plain, _ = tiny_model("moe", **fields)
    initialize_from_global_names(side, side.config, 3)
    initialize_from_global_names(plain, plain.config, 3)
    plain_names = dict(plain.named_parameters())
    with torch.no_grad():  # a side path about as large as the experts' output
        for name, param in side.named_parameters():
            if name not in plain_names:
                param.normal_(0, 0.3)
    x = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer, plain_layer = side.decoder.layers[1].mlp, plain.decoder.layers[1].mlp
        shared = layer.shared_experts
        by_hand_shared = _swiglu(x, shared.linear_fc1.weight, shared.linear_fc2.weight) * \
            torch.sigmoid(x @ shared.gate_weight.t())
        assert torch.allclose(shared(x), by_hand_shared, atol=1e-6)
        recorded = {}
        layer.output_recorder = lambda _, hidden, routing_map, experts, side_output: \
            recorded.update(experts=experts, side=side_output)
        total = layer(x)[0]
        routed_and_shared = plain_layer(x)[0]
    assert recorded["side"].abs().max() > 1e-3 * routed_and_shared.abs().max()
    assert torch.allclose(recorded["experts"], routed_and_shared, atol=1e-6)
    assert torch.allclose(total, routed_and_shared + recorded["side"].view_as(total), atol=1e-6)
    # what upcycling an MoE relies on: with the side path's output zeroed, the MoE itself
    zero_side_path_output_(side)
    with torch.no_grad():
        assert torch.equal(layer(x)[0], routed_and_shared)


@pytestmark_model
def test_recomputing_the_shared_expert_and_dense_mlps_changes_no_gradient():
    """--recompute-modules shared_experts mlp moe: megatron re-runs the shared expert, the
    dense layers' MLPs and the MoE layers in backward; loss and every gradient as without."""
    results = []
    for recompute in ({}, dict(recompute_granularity="selective",
                               recompute_modules=["shared_experts", "mlp", "moe"])):
        model, config = tiny_model("hypermoe", **ARCHITECTURE, **recompute)
        initialize_from_global_names(model, config, 5)
        model.train()
        loss = lm_loss(model, *batch())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_again, grads_again) = results
    assert torch.equal(loss, loss_again)
    assert grads.keys() == grads_again.keys()
    for name in grads:
        assert grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads_again[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_recompute_modules_name_what_the_model_has():
    base = ["--mock-data", "--train-iters", "1", "--recompute-activations"]
    with pytest.raises(ArgumentError, match="no shared experts"):
        parse_args([*base, "--recompute-modules", "shared_experts"])
    with pytest.raises(ArgumentError, match="this model's MLPs are MoE layers"):
        parse_args([*base, "--recompute-modules", "mlp"])
    parse_args([*base, "--recompute-modules", "shared_experts", "mlp",
                "--moe-shared-expert-intermediate-size", "64", "--moe-layer-freq", "2"])


# Parallel layouts and checkpoints, through the trainer -----------------------------------------
COMMON = ["--train-iters", "4", "--zero-stage", "1", "--clip-grad", "0.5",
          "--global-batch-size", "8", "--generate-tokens", "8"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
EP2 = ["--expert-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    """The reference: one process, megatron's own attention and SequentialMLP, 4 steps."""
    metrics = tmp_path_factory.mktemp("architecture_reference") / "one.jsonl"
    output = pretrain(*tiny_run("hypermoe"), *ARCHITECTURE_FLAGS, *dataset, *COMMON,
                      *MEGATRON_KERNELS, "--metrics-file", str(metrics))
    return read_metrics(metrics)[0], generated_sample(output)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [TP2 + EP2, PP2 + EP2], ids=["tp2xep2", "pp2xep2"])
def test_every_layout_trains_the_architecture_like_one_process_and_resumes_in_one(
        layout, dataset, one_process, tmp_path):
    """4 ranks: loss, aux loss and clipped gradient norm at 4 steps and the sampled text equal
    one process's. TP=2 splits the shared expert, the q/k/v biases and the dense MLP and sums
    the q/k norms' and the shared-expert gate's gradients over the sequence slices; PP=2 (with
    EP=2 in each stage) puts the dense layer and an MoE layer on stage 0, two MoE layers on
    stage 1. Its step-2 checkpoint (the defaults: SDPA, grouped experts) resumes in one process
    with megatron's kernels through the layout-free path: steps 3 and 4 equal the uninterrupted
    run's (weights; Adam's moments, step and schedule). These are the suite's TP=2 x EP=2 and
    PP=2 x EP=2 equivalence runs (the plain architecture's 2-rank layouts:
    tests/test_training.py and tests/test_pipeline_parallel.py)."""
    reference, sample = one_process
    metrics = tmp_path / "run.jsonl"
    output = pretrain(*tiny_run("hypermoe"), *ARCHITECTURE_FLAGS, *dataset, *COMMON, *layout,
                      "--save", str(tmp_path / "saved"), "--save-interval", "2",
                      "--metrics-file", str(metrics), nproc=4)
    assert generated_sample(output) == sample
    records, _ = read_metrics(metrics)
    assert len(records) == len(reference) == 4
    for got, want in zip(records, reference):
        for key in ("lm_loss", "aux_loss", "grad_norm"):
            assert relative(got[key], want[key]) < 1e-5, (key, got, want)
        assert got["grad_norm"] > 0.5  # clipping was active
        assert got["expert_load"][0] is None and None not in got["expert_load"][1:]
    resumed_metrics = tmp_path / "resumed.jsonl"
    output = pretrain(*tiny_run("hypermoe"), *ARCHITECTURE_FLAGS, *dataset, *COMMON,
                      *MEGATRON_KERNELS, "--load", str(tmp_path / "saved"), "--ckpt-step", "2",
                      "--metrics-file", str(resumed_metrics))
    assert "resharding from" in output
    resumed, _ = read_metrics(resumed_metrics)
    assert_resumed_like(resumed, reference, first=3)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_q_and_k_norm_gradients_are_summed_over_tp_without_sequence_parallelism(dataset,
                                                                                tmp_path):
    """A dense model at TP=2 without sequence parallelism: each rank's q/k norm gradient covers
    its own heads only, and megatron sums it over TP only under sequence parallelism. The
    weights would drift apart between the ranks, and steps 2-4 would differ from one process."""
    flags = [*tiny_run("dense"), "--num-layers", "2", "--qk-layernorm", *dataset, *COMMON,
             "--lr", "1e-2"]  # (a step large enough that drifted norms show in the loss)
    metrics = {}
    for nproc, layout in ((1, ["--attention-backend", "local"]),
                          (2, ["--tensor-model-parallel-size", "2"])):
        metrics[nproc] = tmp_path / f"{nproc}.jsonl"
        pretrain(*flags, *layout, "--metrics-file", str(metrics[nproc]), nproc=nproc)
    one, two = read_metrics(metrics[1])[0], read_metrics(metrics[2])[0]
    assert len(one) == len(two) == 4
    for got, want in zip(two, one):
        for key in ("lm_loss", "grad_norm"):
            assert relative(got[key], want[key]) < 1e-5, (key, got, want)


def test_a_checkpoint_does_not_resume_with_another_architecture():
    """The new fields are part of the checkpoint's shape; an MoE checkpoint loaded as HyperMoE
    without --finetune says how to start one from it. (Older checkpoints, which recorded none
    of them, are compared on the fields they have.)"""
    from megatron_hypermoe.cli.arguments import parse_run_config
    from megatron_hypermoe.training.checkpoint.compatibility import (
        check_model_shape,
        checkpoint_shape,
    )

    def run(flags):
        return parse_run_config(flags).with_vocab(1024)

    base = ["--mock-data", "--train-iters", "1", "--moe-type", "moe"]
    saved = {"model": checkpoint_shape(run(base).to_flags())}
    with pytest.raises(CheckpointError,
                       match="has qk_layernorm=False but the flags give True: drop --qk-layernorm"):
        check_model_shape(saved, run([*base, "--qk-layernorm"]))
    with pytest.raises(CheckpointError, match=r"has moe_layer_freq=1 .* give \[1, 0, 1, 0\]"):
        check_model_shape(saved, run([*base, "--num-layers", "4",
                                      "--moe-layer-freq", "[1, 0, 1, 0]"]))
    with pytest.raises(CheckpointError, match="add --finetune to start one from it"):
        check_model_shape(saved, run([*base, "--moe-type", "hypermoe"]))
    old = {"model": {k: v for k, v in saved["model"].items() if k != "qk_layernorm"}}
    check_model_shape(old, run(base))


@pytest.mark.slow
def test_an_moe_checkpoint_finetuned_as_hypermoe_computes_what_it_did_at_step_0(dataset,
                                                                               tmp_path):
    """The paper's setting from our own checkpoint: --finetune --moe-type hypermoe (or
    moe_adapter) on a moe checkpoint keeps every MoE weight and adds a side path whose output
    starts at zero. The validation loss at step 0 equals the MoE's (with --hyper-init normal,
    whose heads are not small); training then moves the side path."""
    moe = [*tiny_run("moe"), *ARCHITECTURE_FLAGS, *dataset, "--eval-iters", "2"]
    pretrain(*moe, "--train-iters", "3", "--save", str(tmp_path / "moe"))
    metrics = tmp_path / "moe.jsonl"
    pretrain(*moe, "--load", str(tmp_path / "moe"), "--eval-only", "--metrics-file", str(metrics))
    moe_loss = read_metrics(metrics)[1][-1]["val_loss"]
    # (the static adapter's zero output: test_routed_shared_and_side_path_outputs_add_up)
    # (hyperfanin heads: the HF upcycling tests; both: test_routed_shared_and_side_path_...)
    for variant, extra in (("hypermoe", ["--hyper-init", "normal"]),):
        metrics = tmp_path / f"{variant}{extra}.jsonl"
        output = pretrain(*tiny_run(variant), *ARCHITECTURE_FLAGS, *dataset, *extra,
                          "--eval-iters", "2", "--load", str(tmp_path / "moe"), "--finetune",
                          "--eval-only", "--metrics-file", str(metrics))
        assert f"adding a {variant} side path to the moe checkpoint" in output
        assert relative(read_metrics(metrics)[1][-1]["val_loss"], moe_loss) < 1e-6, variant
    metrics = tmp_path / "finetuned.jsonl"
    pretrain(*tiny_run("hypermoe"), *ARCHITECTURE_FLAGS, *dataset, "--load",
             str(tmp_path / "moe"), "--finetune", "--train-iters", "2",
             "--metrics-file", str(metrics))
    records, _ = read_metrics(metrics)
    assert records[0]["hyper_output_rms"][0] is None  # the dense layer
    assert records[0]["hyper_output_rms"][1] == 0.0 < records[1]["hyper_output_rms"][1]

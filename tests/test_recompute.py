"""Activation recomputation (--recompute-*, --checkpoint-activations): the flags reach
megatron-core's config, every mode gives the same loss and gradients as none while saving less
for backward, HyperMoE's side path is among what is recomputed, and bad combinations are
one-line errors."""

import re

import pytest
import torch

from megatron_hypermoe.cli.arguments import model_config, parse_args, run_config
from megatron_hypermoe.errors import ArgumentError
from megatron_hypermoe.model.gpt import build_gpt_model
from megatron_hypermoe.model.hypermoe_layer import HyperMoELayer
from megatron_hypermoe.model.memory import SavedActivationBytes
from tests.support.tiny_model import SEQ, TINY_MODEL, VOCAB, batch, lm_loss, tiny_run

pytestmark = pytest.mark.usefixtures("megatron_single_process")

MODES = {
    "full-uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "1"],
    # the first of the two layers only
    "full-block": ["--recompute-granularity", "full", "--recompute-method", "block",
                   "--recompute-num-layers", "1"],
    "selective": ["--recompute-granularity", "selective"],  # megatron's default: core_attn
    "selective-moe": ["--recompute-granularity", "selective", "--recompute-modules", "moe"],
    "selective-both": ["--recompute-activations", "--recompute-modules", "core_attn", "moe"],
}


def flags_args(*flags, moe_type="hypermoe"):
    return parse_args([*tiny_run(moe_type), "--mock-data", "--train-iters", "1",
                       *flags])


def build(moe_type, flags=()):
    """The tiny model as the flags configure it, same weights whatever the recompute flags.
    Megatron's own attention: ``core_attn`` recomputation drops its [b, heads, s, s] scores;
    SDPA keeps no scores, so recomputing it saves next to nothing (its softmax statistics, while
    the checkpoint keeps the mask: tests/test_attention.py checks SDPA recomputed gives the same
    gradients)."""
    config = model_config(flags_args(*flags, "--attention-backend", "local", moe_type=moe_type))
    torch.manual_seed(0)
    model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    if moe_type == "hypermoe":
        with torch.no_grad():  # a HyperExpert large enough that a wrong gradient would show
            for head in ("down_weight", "up_weight"):
                getattr(model.hypernetwork, head).weight.mul_(1000)
    return model.train(), config


def step(model, rng_seed=0):
    """Loss, every parameter's gradient, and the activation bytes the forward saved."""
    from megatron.core import tensor_parallel

    torch.manual_seed(rng_seed)  # dropout: the same draws in both runs
    tensor_parallel.model_parallel_cuda_manual_seed(rng_seed)
    model.zero_grad(set_to_none=True)
    counter = SavedActivationBytes(model.parameters())
    with counter.counting():
        loss = lm_loss(model, *batch(seed=3, batch_size=4))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, counter.total


def assert_same_step(actual, expected):
    loss, grads, _ = actual
    torch.testing.assert_close(loss, expected[0], rtol=0, atol=0)
    assert grads.keys() == expected[1].keys()
    for name, grad in grads.items():
        # full recompute sums the shared hypernetwork's per-layer gradients in another order
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("moe_type", ["hypermoe", "moe"])
def test_every_mode_gives_the_same_loss_and_gradients_and_saves_less(moe_type):
    model, _ = build(moe_type)
    reference = step(model)
    for mode, flags in MODES.items():
        model, _ = build(moe_type, flags)
        result = step(model)
        assert_same_step(result, reference)
        assert result[2] < reference[2], f"{mode}: saved {result[2]} >= {reference[2]} bytes"
    # uniform recomputes both layers, block only the first: it keeps more
    saved = {mode: step(build(moe_type, MODES[mode])[0])[2] for mode in ("full-uniform",
                                                                         "full-block")}
    assert saved["full-uniform"] < saved["full-block"]


def test_dense_model_recomputes_its_mlp():
    model, _ = build("dense")
    reference = step(model)
    model, _ = build("dense", ["--recompute-granularity", "selective",
                                    "--recompute-modules", "mlp"])
    result = step(model)
    assert_same_step(result, reference)
    assert result[2] < reference[2]


@pytest.mark.parametrize("mode", ["full-uniform", "selective-both"])
def test_dropout_draws_are_replayed(mode):
    """megatron's checkpoint restores the CPU generator and the model-parallel RNG tracker
    (compat's CPU tracker) before recomputing, so dropout masks match the first forward."""
    dropout = ["--hidden-dropout", "0.2", "--attention-dropout", "0.2"]
    model, _ = build("hypermoe", dropout)
    reference = step(model)
    assert not torch.equal(step(model, rng_seed=1)[0], reference[0])  # dropout is active
    model, _ = build("hypermoe", dropout + MODES[mode])
    assert_same_step(step(model), reference)


@pytest.mark.parametrize("mode,recomputed", [(None, False), ("full-uniform", True),
                                             ("full-block", True), ("selective-moe", True),
                                             ("selective", False)])
def test_hypermoe_side_path_is_recomputed(mode, recomputed, monkeypatch):
    """Under a full-layer checkpoint and the moe module the HyperExpert saves nothing in
    forward and runs again in backward (full-block: in the first layer only)."""
    calls, saved = [], {}
    original = HyperMoELayer.side_output

    def side_output(layer, hidden_states, routing_map):
        counter = SavedActivationBytes(list(layer.parameters())
                                       + list(layer.hypernetwork.parameters()))
        with counter.counting():
            out = original(layer, hidden_states, routing_map)
        calls.append(layer.layer_number)
        saved.setdefault(layer.layer_number, counter.total)  # the first pass: forward
        return out

    monkeypatch.setattr(HyperMoELayer, "side_output", side_output)
    model, _ = build("hypermoe", MODES[mode] if mode else ())
    step(model)
    forward, backward = calls[:2], calls[2:]
    assert forward == [1, 2]
    replayed = [1] if mode == "full-block" else [1, 2] if recomputed else []
    assert sorted(backward) == replayed
    for layer in (1, 2):
        assert (saved[layer] == 0) == (layer in replayed), (layer, saved)


def test_expert_loads_and_aux_loss_are_counted_once():
    """A recomputed forward re-runs the router: the logged expert loads and load-balancing loss
    must still count each routed token once."""
    from megatron_hypermoe.training.metrics.probes import ExpertLoadCounter, take_aux_losses

    logged = []
    for flags in ((), MODES["full-uniform"], MODES["selective-moe"]):
        model, _ = build("hypermoe", flags)
        counter = ExpertLoadCounter(model)
        take_aux_losses(1)  # clear what earlier forwards left
        step(model)
        logged.append((counter.take(), take_aux_losses(1)))
    (loads, aux), *recomputed = logged
    assert loads.sum() == 2 * 4 * SEQ * 2  # layers x tokens x top-2
    for other_loads, other_aux in recomputed:
        torch.testing.assert_close(other_loads, loads)
        assert other_aux.keys() == aux.keys() and aux
        for name in aux:
            assert other_aux[name] == pytest.approx(aux[name], rel=1e-6), name


# The flags ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,expected", [
    ([], (None, None, None, [])),
    (["--recompute-activations"], ("selective", None, None, ["core_attn"])),
    (["--recompute-granularity", "selective", "--recompute-modules", "moe", "core_attn"],
     ("selective", None, None, ["moe", "core_attn"])),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "2"], ("full", "block", 2, [])),
    (["--checkpoint-activations"], ("full", "uniform", 1, [])),
    (["--checkpoint-activations", "--checkpoint-num-layers", "2"], ("full", "uniform", 2, [])),
    # an alias repeated by its own meaning is not a contradiction
    (["--checkpoint-activations", "--recompute-granularity", "full"], ("full", "uniform", 1, [])),
    (["--recompute-activations", "--recompute-granularity", "selective"],
     ("selective", None, None, ["core_attn"])),
])
def test_flags_set_megatron_core_config(flags, expected):
    config = model_config(flags_args(*flags))
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers,
            config.recompute_modules) == expected


@pytest.mark.parametrize("flags,moe_type,message", [
    (["--recompute-granularity", "full"], "hypermoe",
     "--recompute-granularity full needs --recompute-method uniform or block"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform"], "hypermoe",
     "--recompute-granularity full needs --recompute-num-layers N"),
    (["--recompute-granularity", "selective", "--recompute-method", "uniform"], "hypermoe",
     "--recompute-method applies only with --recompute-granularity full (selective"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"], "moe",
     "--recompute-num-layers applies only with --recompute-granularity full"),
    (["--recompute-method", "block"], "moe",
     "--recompute-method applies only with --recompute-granularity full: drop it"),
    (["--recompute-modules", "moe"], "moe", "--recompute-modules applies only with "
                                            "--recompute-granularity selective"),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "3"], "moe", "--recompute-num-layers 3 must be between 1 and "
                                             "--num-layers 2"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "2", "--num-layers", "3"], "moe",
     "--recompute-method uniform needs --num-layers 3 divisible by --recompute-num-layers 2"),
    (["--recompute-activations", "--recompute-granularity", "full"], "moe",
     "--recompute-activations means --recompute-granularity selective"),
    (["--checkpoint-activations", "--recompute-method", "block"], "moe",
     "--checkpoint-activations means --recompute-method uniform, which contradicts "
     "--recompute-method block"),
    (["--checkpoint-activations", "--recompute-activations"], "moe",
     "--checkpoint-activations means --recompute-granularity full, which contradicts "
     "--recompute-granularity selective"),
    (["--checkpoint-num-layers", "2"], "moe",
     "--checkpoint-num-layers applies only with --checkpoint-activations"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "1", "--zero-stage", "2"], "hypermoe",
     "--zero-stage 2 with recomputed HyperMoE layers"),
    (["--recompute-granularity", "selective", "--recompute-modules", "moe", "--zero-stage", "2"],
     "hypermoe", "--zero-stage 2 with recomputed HyperMoE layers"),
    (["--recompute-activations", "--recompute-modules", "mlp"], "hypermoe",
     "--recompute-modules mlp: mlp recomputes dense MLPs"),
    (["--recompute-activations", "--recompute-modules", "moe"], "dense",
     "--recompute-modules moe: --moe-type dense has no MoE layer"),
    (["--recompute-activations", "--recompute-modules", "moe_act"], "moe",
     "--recompute-modules moe_act: megatron-core recomputes the activation only in Transformer"),
    (["--recompute-activations", "--recompute-modules", "shared_experts"], "moe",
     "--recompute-modules shared_experts: this model has no shared experts"),
    (["--recompute-activations", "--recompute-modules", "mla_up_proj"], "moe",
     "--recompute-modules mla_up_proj: this model has no multi-latent attention"),
])
def test_bad_combinations_are_one_line_errors(flags, moe_type, message):
    with pytest.raises(ArgumentError, match=re.escape(message)) as error:
        flags_args(*flags, moe_type=moe_type)
    assert "\n" not in str(error.value)


def test_layernorm_module_needs_transformer_engine():
    from megatron.core.tensor_parallel.random import HAVE_TE

    flags = ["--recompute-activations", "--recompute-modules", "layernorm"]
    if HAVE_TE:
        assert model_config(flags_args(*flags)).recompute_modules == ["layernorm"]
    else:
        with pytest.raises(ArgumentError, match="Transformer Engine, not installed"):
            flags_args(*flags)


def recompute_fields(config):
    return (config.recompute_granularity, config.recompute_method, config.recompute_num_layers,
            config.recompute_modules if config.recompute_granularity == "selective" else None)


def test_recompute_is_not_part_of_a_checkpoint_and_round_trips():
    """A run may resume with another recompute setting (the weights are the same), and the
    importer's flags-from-config give the recompute fields back, also from a config object that
    did not come from flags (megatron-core's own default fills recompute_modules)."""
    from megatron_hypermoe.cli.arguments import args_for_model
    from megatron_hypermoe.training.checkpoint.compatibility import (
        check_model_shape,
        checkpoint_shape,
    )
    from tests.support.ep_cases import EP_RECOMPUTE_CASES
    from tests.support.tiny_model import tiny_config

    plain = run_config(flags_args()).with_vocab(64)
    configs = [tiny_config(), *(tiny_config(**fields)
                                for _, _, fields in EP_RECOMPUTE_CASES.values())]
    for mode in MODES.values():
        run = run_config(flags_args(*mode)).with_vocab(64)
        check_model_shape({"model": checkpoint_shape(plain.to_flags())}, run)  # no error
        configs.append(run.model)
    for config in configs:
        again = model_config(args_for_model(config, 1, mock_data=True, train_iters=1))
        assert recompute_fields(again) == recompute_fields(config)


@pytest.mark.slow
def test_run_resumes_under_recompute_and_matches_the_run_without(tmp_path):
    """Through the trainer and DeepSpeed: a checkpoint saved without recomputation resumes
    under Megatron-DeepSpeed's --checkpoint-activations, and the iterations after it match the
    run that went on without (loss, aux loss, gradient norm, expert loads)."""
    from tests.support.processes import pretrain
    from tests.support.run_outputs import read_metrics

    common = [*TINY_MODEL, "--mock-data", "--train-iters", "4", "--save", str(tmp_path / "ckpt")]
    pretrain(*common, "--save-interval", "2", "--metrics-file", str(tmp_path / "plain.jsonl"))
    (tmp_path / "ckpt" / "latest").write_text("iter_0000002")
    pretrain(*common, "--load", str(tmp_path / "ckpt"), "--checkpoint-activations",
             "--metrics-file", str(tmp_path / "recomputed.jsonl"))
    plain, _ = read_metrics(tmp_path / "plain.jsonl")
    recomputed, _ = read_metrics(tmp_path / "recomputed.jsonl")
    assert [r["iteration"] for r in recomputed] == [3, 4]
    for a, b in zip(recomputed, plain[2:]):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-6), (a, b)
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a, b)
        assert a["expert_load"] == b["expert_load"]

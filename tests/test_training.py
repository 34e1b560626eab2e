"""pretrain_gpt_hypermoe.py end to end on CPU, in subprocesses: runs, resume exactness,
checkpoints, logging, parallel layouts against one process."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_hypermoe.parallel.distributed import free_port
from tests.support.processes import REPO_ROOT, environment, error_line, pretrain, pretrain_command
from tests.support.run_outputs import read_metrics, relative, tensorboard_tags
from tests.support.tiny_model import MEGATRON_KERNELS, TINY_MODEL, tiny_flags, tiny_run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("moe_type", ["hypermoe", "moe", "dense"])
def test_single_process_run_writes_documented_metrics(moe_type, dataset, tmp_path):
    metrics, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    per_layer = ["--moe-per-layer-logging"] if moe_type != "dense" else []
    output = pretrain(*tiny_run(moe_type), *dataset, "--train-iters", "4",
                      "--eval-interval", "2", "--eval-iters", "2", "--metrics-file", str(metrics),
                      "--tensorboard-dir", str(tb), "--log-throughput",
                      "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
                      "--log-batch-size-to-tensorboard", *per_layer,
                      "--generate-prompt", "First Citizen", "--generate-tokens", "3")
    assert "lm loss" in output and "tokens/s" in output and "TFLOP/s/device" in output
    sample = output.split("---- generated sample ----\n", 1)[1]
    assert sample.startswith("First Citizen"), sample[:80]  # --generate-prompt
    train, valid = read_metrics(metrics)
    if per_layer:  # one value per layer
        assert len(train[0]["aux_loss_per_layer"]) == 2, sorted(train[0])
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["lm_loss"])) for r in train)
    assert [r["iteration"] for r in valid] == [2, 4]
    assert all(abs(r["val_ppl"] - math.exp(r["val_loss"])) < 1e-6 * r["val_ppl"]
               for r in valid)
    tags = tensorboard_tags(tb)
    expected = {"lm loss", "learning-rate", "grad-norm", "iteration-time", "tokens-per-second",
                "TFLOPs-per-device", "lm loss validation", "lm loss validation ppl", "batch-size"}
    if moe_type != "dense":
        expected |= {"load_balancing_loss", "moe/layer_0_max_over_mean_load",
                     "moe/layer_1_expert_3_load"}
        assert len(train[0]["expert_load"]) == 2 and len(train[0]["expert_load"][0]) == 4
        assert abs(sum(train[0]["expert_load"][0]) - 1.0) < 1e-6
        assert "aux_loss" in train[0]
    if moe_type == "hypermoe":
        expected |= {"hypermoe/layer_0_hyper_output_rms", "moe/layer_1_side_over_experts_rms"}
        assert len(train[0]["hyper_output_rms"]) == 2
        assert all(0 < r < math.inf for r in train[-1]["side_over_experts_rms"])
    assert expected <= tags, expected - tags


@pytest.mark.multiprocess
@pytest.mark.parametrize("moe_type", ["hypermoe", "moe", "dense"])
def test_two_process_data_parallel_run(moe_type, dataset, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    output = pretrain(*tiny_run(moe_type), *dataset, "--train-iters", "3",
                      "--global-batch-size", "8", "--zero-stage", "2",
                      "--metrics-file", str(metrics), nproc=2)
    assert ("2 rank(s), TP 1, EP 1, DP 2, global batch 8 (2 micro-batch(es) of 2 per rank)"
            in output)
    train, _ = read_metrics(metrics)
    assert [r["iteration"] for r in train] == [1, 2, 3]  # rank 0 alone writes


@pytest.mark.parametrize("zero_stage", ["1", "2"])
def test_resumed_run_matches_uninterrupted_run_exactly(zero_stage, dataset, tmp_path):
    common = [*TINY_MODEL, *dataset, "--train-iters", "6", "--global-batch-size", "4",
              "--zero-stage", zero_stage, "--lr-warmup-iters", "2"]
    pretrain(*common, "--metrics-file", str(tmp_path / "full.jsonl"))
    pretrain(*common, "--save", str(tmp_path / "ckpt"), "--exit-interval", "3",
             "--metrics-file", str(tmp_path / "resumed.jsonl"))
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000003"
    output = pretrain(*common, "--load", str(tmp_path / "ckpt"),
                      "--metrics-file", str(tmp_path / "resumed.jsonl"))
    assert "loaded" in output and "at iteration 3" in output
    full, _ = read_metrics(tmp_path / "full.jsonl")
    resumed, _ = read_metrics(tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        assert a["lm_loss"] == b["lm_loss"], (a["iteration"], a["lm_loss"], b["lm_loss"])
        assert a["grad_norm"] == b["grad_norm"]
        assert a["lr"] == b["lr"]
    if zero_stage == "1":
        # A checkpoint from before the scheduler's state was saved resumes the same way (its
        # schedule was a function of the consumed samples).
        meta_file = tmp_path / "ckpt" / "iter_0000003" / "hypermoe_checkpoint.json"
        meta = json.loads(meta_file.read_text())
        assert meta.pop("opt_param_scheduler")["num_steps"] == 3 * 4
        meta_file.write_text(json.dumps(meta))
        pretrain(*common, "--load", str(tmp_path / "ckpt"),
                 "--metrics-file", str(tmp_path / "old.jsonl"))
        old, _ = read_metrics(tmp_path / "old.jsonl")
        assert [(r["lm_loss"], r["lr"]) for r in old] == [(r["lm_loss"], r["lr"])
                                                         for r in full[3:]]


def test_tensorboard_interval_log_switches_and_wandb_offline(dataset, tmp_path):
    """--tensorboard-log-interval sets when TensorBoard and W&B (offline, no network) get the
    training scalars, the same tags in both; without the --log-* switches the timers, ppl and
    throughput stay out of them and off the console, and stay in --metrics-file."""
    from tests.support.run_outputs import wandb_history

    metrics, tb, wandb_dir = tmp_path / "metrics.jsonl", tmp_path / "tb", tmp_path / "wandb"
    output = pretrain(*TINY_MODEL, *dataset, "--train-iters", "6", "--log-interval", "3",
                      "--tensorboard-log-interval", "2", "--eval-interval", "6",
                      "--eval-iters", "1", "--metrics-file", str(metrics),
                      "--tensorboard-dir", str(tb), "--wandb-project", "test",
                      "--wandb-exp-name", "tiny", "--wandb-save-dir", str(wandb_dir),
                      env={"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                           "WANDB_DIR": str(wandb_dir)})
    lines = [line for line in output.splitlines() if line.startswith(" iteration ")]
    assert [line.split()[1] for line in lines] == ["3/", "6/"], lines
    assert "TFLOP/s" not in output and "ms/iter" in output
    train, valid = read_metrics(metrics)
    assert [r["iteration"] for r in train] == [2, 3, 4, 6]  # every event: TB or console
    assert all("tflops_per_device" in r for r in train) and "val_ppl" in valid[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    assert [e.step for e in events.Scalars("lm loss")] == [2, 4, 6]
    tags = set(events.Tags()["scalars"])
    assert {"iteration-time", "TFLOPs-per-device", "lm loss validation ppl",
            "batch-size"}.isdisjoint(tags)
    history = wandb_history(wandb_dir)
    assert sorted(history) == [2, 4, 6]
    for step, record in history.items():
        for tag in tags & set(record):
            logged = {e.step: e.value for e in events.Scalars(tag)}
            assert record[tag] == pytest.approx(logged[step], rel=1e-6), (step, tag)
    assert tags == {key for record in history.values() for key in record
                    if not key.startswith("_")}


def test_sigterm_saves_a_checkpoint_and_exits_zero(dataset, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    # Long enough to be mid-training when the signal comes, short enough that building the
    # sample index stays quick on a loaded machine.
    command = pretrain_command(1) + [*TINY_MODEL, *dataset, "--train-iters", "3000",
                                     "--save", str(tmp_path / "ckpt"),
                                     "--metrics-file", str(metrics)]
    log = tmp_path / "run.log"  # a file, not a pipe: nothing can block, and a hang shows why
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=environment(), stdout=handle,
                                   stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and
                                              metrics.read_text().count("\n") >= 2):
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be signalled"
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=240)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError("no exit within 240 s of SIGTERM:\n" + log.read_text()[-3000:])
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    assert "exiting at iteration" in output and "SIGTERM" in output
    iteration = int((tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert iteration >= 2
    assert (tmp_path / "ckpt" / f"iter_{iteration:07d}" / "hypermoe_checkpoint.json").exists()
    assert not [p for p in os.listdir(tmp_path / "ckpt") if p.endswith(".partial")]


def test_checkpoint_with_other_shape_is_refused_naming_the_field(dataset, tmp_path):
    pretrain(*TINY_MODEL, *dataset, "--train-iters", "1", "--save", str(tmp_path / "ckpt"))
    flags = TINY_MODEL + tiny_flags(hidden_size=32)  # the later --hidden-size wins
    output = pretrain(*flags, *dataset, "--train-iters", "2", "--load", str(tmp_path / "ckpt"),
                      expect=1)
    assert error_line(output) == ["error: checkpoint has hidden_size=64 but the flags give 32: "
                                  "pass --hidden-size 64 or load another checkpoint"]


def test_tampered_checkpoint_file_is_not_unpickled(dataset, tmp_path):
    pretrain(*TINY_MODEL, *dataset, "--train-iters", "1", "--save", str(tmp_path / "ckpt"))
    model_file = tmp_path / "ckpt" / "iter_0000001" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "pwned"
    # A pickle that would create a file if unpickled without weights_only.
    torch.save({"module": _Exploit(str(marker))}, model_file)
    output = pretrain(*TINY_MODEL, *dataset, "--train-iters", "2", "--load",
                      str(tmp_path / "ckpt"), expect=1)
    assert "refusing to load" in error_line(output)[0]
    assert not marker.exists()


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_nan_loss_skips_the_step_and_too_many_stop_the_run(dataset, tmp_path):
    common = [*TINY_MODEL, *dataset, "--train-iters", "1", "--weight-decay", "0.1"]
    pretrain(*common, "--inject-nan-loss-at", "1", "--save", str(tmp_path / "skipped"),
             "--metrics-file", str(tmp_path / "m.jsonl"))
    train, _ = read_metrics(tmp_path / "m.jsonl")
    assert train[0]["skipped_iterations"] == 1
    # A skipped step leaves the weights as a zero learning rate does (AdamW moves nothing).
    pretrain(*common, "--lr", "0", "--save", str(tmp_path / "lr0"))
    skipped = _load_module(tmp_path / "skipped")
    reference = _load_module(tmp_path / "lr0")
    assert skipped.keys() == reference.keys()
    assert all(torch.equal(skipped[k], reference[k]) for k in reference)

    output = pretrain(*TINY_MODEL, *dataset, "--train-iters", "10", "--inject-nan-loss-at",
                      "2", "3", "4", "--max-consecutive-skipped-iters", "3", expect=1)
    assert "3 iterations in a row had a non-finite loss or gradient (last at iteration 4)" \
        in error_line(output)[0]


def _load_module(checkpoint_dir):
    from megatron_hypermoe.compat.deepspeed import load_deepspeed_file

    states = load_deepspeed_file(str(checkpoint_dir / "iter_0000001" /
                                     "mp_rank_00_model_states.pt"))
    return {k: v for k, v in states["module"].items() if torch.is_tensor(v)}


def test_eval_only_and_finetune(dataset, tmp_path):
    pretrain(*TINY_MODEL, *dataset, "--train-iters", "2", "--save", str(tmp_path / "ckpt"))
    output = pretrain(*TINY_MODEL, *dataset, "--eval-only", "--load", str(tmp_path / "ckpt"),
                      "--eval-iters", "2", "--metrics-file", str(tmp_path / "eval.jsonl"))
    assert "validation at iteration 2" in output
    _, valid = read_metrics(tmp_path / "eval.jsonl")
    assert len(valid) == 1 and valid[0]["iteration"] == 2
    output = pretrain(*TINY_MODEL, *dataset, "--train-iters", "1", "--finetune", "--load",
                      str(tmp_path / "ckpt"), "--metrics-file", str(tmp_path / "ft.jsonl"))
    train, _ = read_metrics(tmp_path / "ft.jsonl")
    assert [r["iteration"] for r in train] == [1]


def test_a_resume_restores_the_rng_unless_no_load_rng(dataset, tmp_path):
    """With dropout the RNG state shows in the loss: resumed at iteration 2, iteration 3 equals
    the uninterrupted run's; with --no-load-rng (Megatron's meaning) it draws other masks."""
    common = [*TINY_MODEL, *dataset, "--hidden-dropout", "0.2", "--train-iters", "3"]
    save = str(tmp_path / "ck")
    pretrain(*common, "--save", save, "--save-interval", "2",
             "--metrics-file", str(tmp_path / "whole.jsonl"))
    losses = {}
    for name, flags in (("rng", []), ("no_rng", ["--no-load-rng"])):
        pretrain(*common, "--load", save, "--ckpt-step", "2", *flags,
                 "--metrics-file", str(tmp_path / f"{name}.jsonl"))
        losses[name] = read_metrics(tmp_path / f"{name}.jsonl")[0][-1]
    whole = read_metrics(tmp_path / "whole.jsonl")[0][-1]
    assert whole["iteration"] == losses["rng"]["iteration"] == 3
    assert losses["rng"]["lm_loss"] == whole["lm_loss"]
    assert losses["no_rng"]["lm_loss"] != whole["lm_loss"]


TP_COMMON = ["--train-iters", "3", "--zero-stage", "2", "--clip-grad", "0.5",
             "--global-batch-size", "4", "--generate-tokens", "12"]


def generated_sample(output):
    lines = output.splitlines()
    start = lines.index("---- generated sample ----")
    return "\n".join(lines[start + 1:lines.index("--------------------------", start)])


@pytest.fixture(scope="module")
def single_process_reference(dataset, tmp_path_factory):
    """The layout every tensor-parallel run must reproduce: one process, global batch 4, with
    megatron-core's DotProductAttention and SequentialMLP (the parallel runs take SDPA and the
    grouped-GEMM experts)."""
    metrics = tmp_path_factory.mktemp("tp_reference") / "one.jsonl"
    output = pretrain(*TINY_MODEL, *dataset, *TP_COMMON, *MEGATRON_KERNELS,
                      "--metrics-file", str(metrics))
    return read_metrics(metrics)[0], generated_sample(output)


@pytest.mark.multiprocess
def test_tensor_parallel_run_matches_single_process_run(dataset, single_process_reference,
                                                        tmp_path):
    """TP=2 (sequence parallel) trains exactly like one process: same weights from the same
    seed, same loss, aux loss and clipped global gradient norm at each of 3 optimizer steps,
    and the same sampled text (generation is collective). Fails if the norms, router or
    HyperMoE path lose the other sequence slice's gradient, or if the gradient norm
    double-counts replicated weights. (TP=2 x EP=2 on 4 ranks: tests/test_moe_architectures.py,
    on a model that also has a shared expert, q/k norm, qkv bias and a dense layer.)"""
    reference, reference_sample = single_process_reference
    metrics = tmp_path / "tp.jsonl"
    output = pretrain(*TINY_MODEL, *dataset, *TP_COMMON, "--tensor-model-parallel-size", "2",
                      "--sequence-parallel", "--metrics-file", str(metrics), nproc=2)
    assert "TP 2 (sequence parallel)" in output
    assert generated_sample(output) == reference_sample
    parallel, _ = read_metrics(metrics)
    assert len(parallel) == len(reference) == 3
    for a, b in zip(parallel, reference):
        assert relative(a["lm_loss"], b["lm_loss"]) < 1e-5, (a, b)
        assert relative(a["aux_loss"], b["aux_loss"]) < 1e-5, (a, b)
        assert relative(a["grad_norm"], b["grad_norm"]) < 1e-5, (a, b)
        assert a["grad_norm"] > 0.5  # clipping was active


@pytest.mark.multiprocess
@pytest.mark.parametrize("moe_type,dispatcher", [("hypermoe", "alltoall"), ("moe", "allgather")])
def test_expert_parallel_run_matches_single_expert_rank_run(moe_type, dispatcher, dataset,
                                                           tmp_path):
    """EP=2 under DeepSpeed ZeRO-2 == EP=1, same weights (global-name init) and data, with
    clipping active, so the global gradient norm over ranks owning different experts is checked
    too."""
    metrics = {}
    for ep in ("1", "2"):
        metrics[ep] = tmp_path / f"ep{ep}.jsonl"
        pretrain(*tiny_run(moe_type), *dataset, "--train-iters", "4",
                 "--moe-token-dispatcher-type", dispatcher, "--zero-stage", "2",
                 "--clip-grad", "0.5", "--global-batch-size", "4",
                 "--expert-model-parallel-size", ep, "--metrics-file", str(metrics[ep]), nproc=2)
    ep1, _ = read_metrics(metrics["1"])
    ep2, _ = read_metrics(metrics["2"])
    assert len(ep1) == len(ep2) == 4
    for a, b in zip(ep2, ep1):
        assert relative(a["lm_loss"], b["lm_loss"]) < 1e-6, (a, b)
        assert relative(a["grad_norm"], b["grad_norm"]) < 1e-5, (a, b)
        assert a["grad_norm"] > 0.5  # clipping was active
    assert ep1[-1]["lm_loss"] != ep1[0]["lm_loss"]


@pytest.mark.multiprocess
def test_expert_parallel_checkpoint_resumes_exactly(dataset, tmp_path):
    layout = [*TINY_MODEL, *dataset, "--train-iters", "5", "--zero-stage", "2",
              "--global-batch-size", "4"]
    common = [*layout, "--expert-model-parallel-size", "2"]
    pretrain(*common, "--metrics-file", str(tmp_path / "full.jsonl"), nproc=2)
    pretrain(*common, "--save", str(tmp_path / "ckpt"), "--exit-interval", "3",
             "--metrics-file", str(tmp_path / "resumed.jsonl"), nproc=2)
    saved = tmp_path / "ckpt" / "iter_0000003"
    assert sorted(p.name for p in saved.glob("experts_ep_rank_*.safetensors")) == [
        "experts_ep_rank_00000_tp_rank_00.safetensors",
        "experts_ep_rank_00001_tp_rank_00.safetensors"]
    pretrain(*common, "--load", str(tmp_path / "ckpt"),
             "--metrics-file", str(tmp_path / "resumed.jsonl"), nproc=2)
    full, _ = read_metrics(tmp_path / "full.jsonl")
    resumed, _ = read_metrics(tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(full, resumed):  # (bit for bit, steps 4 and 5 resumed)
        assert (a["lm_loss"], a["grad_norm"], a["lr"]) == (b["lm_loss"], b["grad_norm"],
                                                           b["lr"]), (a, b)
    # Another EP size resumes too (from the layout-free files): test_layout_free_checkpoint.py


@pytest.mark.multiprocess
def test_deepspeed_launcher_runs_expert_parallel(tmp_path):
    """`deepspeed pretrain_gpt_hypermoe.py --deepspeed ...` (the launcher adds --local_rank)."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    metrics = tmp_path / "metrics.jsonl"
    result = subprocess.run(
        [launcher, "--num_gpus", "2", "--master_port", str(free_port()),
         str(REPO_ROOT / "pretrain_gpt_hypermoe.py"), "--deepspeed", "--mock-data",
         *TINY_MODEL, "--train-iters", "2", "--zero-stage", "2",
         "--expert-model-parallel-size", "2", "--metrics-file", str(metrics)],
        env=environment(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "2 rank(s), TP 1, EP 2, DP 2" in result.stdout + result.stderr
    train, _ = read_metrics(metrics)
    assert [r["iteration"] for r in train] == [1, 2]


@pytest.mark.multiprocess
@pytest.mark.parametrize("zero_stage", ["1", "2"])
def test_data_parallel_two_ranks_match_one_process_with_accumulation(zero_stage, dataset,
                                                                     tmp_path):
    """Global batch 4: one process accumulating 2 micro-batches == 2 data-parallel ranks."""
    common = [*TINY_MODEL, *dataset, "--train-iters", "5", "--global-batch-size", "4",
              "--zero-stage", zero_stage, "--clip-grad", "0.5"]
    pretrain(*common, "--metrics-file", str(tmp_path / "one.jsonl"))
    pretrain(*common, "--metrics-file", str(tmp_path / "two.jsonl"), nproc=2)
    one, _ = read_metrics(tmp_path / "one.jsonl")
    two, _ = read_metrics(tmp_path / "two.jsonl")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert relative(b["lm_loss"], a["lm_loss"]) < 1e-6, (a, b)
        assert relative(b["grad_norm"], a["grad_norm"]) < 1e-5, (a, b)


def assert_resumed_like(resumed, uninterrupted, first, tol=1e-5,
                        keys=("lm_loss", "grad_norm", "lr")):
    """A resumed run's records (iterations ``first`` to the end, at least 2 of them) against
    the uninterrupted run's: the first resumed step depends only on the weights, the later ones
    on Adam's moments, its step count and the learning-rate schedule too. Returns the worst
    relative difference."""
    assert [r["iteration"] for r in resumed] == list(range(first, len(uninterrupted) + 1))
    assert len(resumed) >= 2, "one resumed step checks the weights only"
    worst = 0.0
    for got in resumed:
        want = uninterrupted[got["iteration"] - 1]
        assert want["iteration"] == got["iteration"]
        for key in keys:
            worst = max(worst, relative(got[key], want[key]))
            assert relative(got[key], want[key]) < tol, (key, got, want)
    return worst


@pytest.mark.multiprocess
def test_tensor_and_expert_parallel_checkpoint_resumes(dataset, tmp_path):
    """TP=2 x EP=2 trains 4 steps, saving at step 2 (every rank's shard: DeepSpeed's mp_rank
    files, our expert files per EP x TP rank); a fresh 4-rank run loads it and its steps 3 and 4
    equal the uninterrupted run's (loss, aux loss, clipped gradient norm, learning rate): step 3
    checks the weights (a wrong shard or expert file put back would change the loss), step 4
    Adam's moments, step count and the schedule. The run saves with the grouped-GEMM experts
    and SDPA (the defaults) and resumes with megatron's SequentialMLP and attention: the
    checkpoint is the same for both. (That TP=2 x EP=2 trains like one process:
    test_tensor_parallel_run_matches_single_process_run; 4 steps decay the learning rate
    otherwise than its 3.)"""
    layout = [*TINY_MODEL, *dataset, *TP_COMMON, "--train-iters", "4", "--generate-tokens", "0",
              "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
              "--sequence-parallel"]
    save = str(tmp_path / "ckpt")
    pretrain(*layout, "--save", save, "--save-interval", "2",
             "--metrics-file", str(tmp_path / "whole.jsonl"), nproc=4)
    saved = tmp_path / "ckpt" / "iter_0000002"
    assert sorted(p.name for p in saved.glob("experts_*.safetensors")) == [
        f"experts_ep_rank_{ep:05d}_tp_rank_{tp:02d}.safetensors" for ep in (0, 1) for tp in (0, 1)]
    assert sorted(p.name for p in saved.glob("mp_rank_*_model_states.pt")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    output = pretrain(*layout, *MEGATRON_KERNELS, "--load", save, "--ckpt-step", "2",
                      "--metrics-file", str(tmp_path / "resumed.jsonl"), nproc=4)
    assert "experts: SequentialMLP" in output and "resuming with the same layout" in output
    whole, _ = read_metrics(tmp_path / "whole.jsonl")
    resumed, _ = read_metrics(tmp_path / "resumed.jsonl")
    assert resumed[-1]["grad_norm"] > 0.5  # clipping was active
    assert_resumed_like(resumed, whole, first=3, keys=("lm_loss", "aux_loss", "grad_norm", "lr"))


# Options to reproduce the authors' runs ---------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [
    ["--expert-model-parallel-size", "2", "--zero-stage", "2"],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--zero-stage", "1"],
], ids=["ep2-zero2", "tp2-zero1"])
def test_hyper_lr_mult_reaches_its_group_at_every_step_and_after_resume(layout, tmp_path):
    from tests.support.processes import run_torchrun

    run_torchrun(2, "lr_groups.py", "--save", str(tmp_path / "ckpt"), "--", *layout,
                 timeout=240)


def test_hyper_lr_mult_zero_freezes_exactly_the_generating_weights(dataset, tmp_path):
    """--hyper-lr-mult 0 under ZeRO: the hypernetwork's fc and head weights stay as a zero
    learning rate leaves them; everything else trains."""
    common = [*TINY_MODEL, *dataset, "--train-iters", "1", "--weight-decay", "0.1",
              "--zero-stage", "2"]
    pretrain(*common, "--hyper-lr-mult", "0", "--save", str(tmp_path / "frozen"))
    pretrain(*common, "--lr", "0", "--save", str(tmp_path / "lr0"))
    frozen, reference = _load_module(tmp_path / "frozen"), _load_module(tmp_path / "lr0")
    generating = {f"hypernetwork.{w}.weight" for w in
                  ("fc", "down_weight", "down_bias", "up_weight", "up_bias")}
    for name in reference:
        same = torch.equal(frozen[name], reference[name])
        assert same == (name in generating), name


def test_router_options_train_through_the_entry_point(dataset, tmp_path):
    """Megatron-DeepSpeed's capacity aliases and Megatron-LM's router flags together in one
    HyperMoE run: the sequence aux loss is logged under its name, the expert bias moves every
    step and is saved with the checkpoint."""
    from megatron_hypermoe.training.checkpoint.reader import read_checkpoint

    metrics, save = tmp_path / "metrics.jsonl", tmp_path / "ckpt"
    pretrain(*TINY_MODEL, *dataset, "--train-iters", "3", "--global-batch-size", "4",
             "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-loss-coeff", "0.01",
             "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
             "--moe-router-bias-update-rate", "0.25", "--moe-train-capacity-factor", "0.5",
             "--moe-eval-capacity-factor", "2", "--moe-min-capacity", "2",
             "--eval-interval", "3", "--eval-iters", "1", "--metrics-file", str(metrics),
             "--save", str(save))
    train, valid = read_metrics(metrics)
    assert len(train) == 3 and len(valid) == 1
    assert all(0 < r["seq_aux_loss"] < 10 and "aux_loss" not in r for r in train)
    state = read_checkpoint(str(save)).state
    bias = state["decoder.layers.0.mlp.router.expert_bias"]
    # three steps of -0.25, 0 or +0.25 per expert (0: the expert got the mean load, as every
    # expert does once capacity caps them all)
    assert torch.equal(bias * 4, (bias * 4).round()) and 0 < bias.abs().max() <= 0.75


def test_cpu_optimizer_is_torchs_fused_adamw_with_the_same_update():
    """On the CPU the trainer's AdamW is torch's fused kernel (no temporaries the size of ZeRO's
    flat partition) and makes the same update as the one-tensor-at-a-time AdamW."""
    from types import SimpleNamespace

    from megatron_hypermoe.training.setup import build_optimizer

    args = SimpleNamespace(lr=1e-2, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                           optimizer_cpu_offload=False)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(2, 301, generator=generator)
    fused_params = [torch.nn.Parameter(row.clone()) for row in start]
    plain_params = [torch.nn.Parameter(row.clone()) for row in start]
    groups = lambda params: [{"params": params[:1], "weight_decay": 0.1},  # noqa: E731
                             {"params": params[1:], "weight_decay": 0.0}]
    fused = build_optimizer(groups(fused_params), args)
    plain = torch.optim.AdamW(groups(plain_params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                              foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        grads = torch.randn(2, 301, generator=generator)
        for params, optimizer in ((fused_params, fused), (plain_params, plain)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for fused_param, plain_param, initial in zip(fused_params, plain_params, start):
        torch.testing.assert_close(fused_param, plain_param, rtol=1e-6, atol=1e-6)
        assert (fused_param - initial).abs().max() > 1e-3  # (it did move)


def test_steps_that_do_not_log_read_nothing_on_the_host(tmp_path):
    """On a GPU a host read of a device tensor waits for every kernel queued before it: between
    two logging steps our code reads none (the loss was read every step, and the stop flags
    twice). tests/workers/host_reads.py records the reads made from megatron_hypermoe/."""
    if not hasattr(torch, "_grouped_mm"):  # the HyperExpert's loop then reads once per forward
        pytest.skip("this torch has no torch._grouped_mm (tests/test_hyper_expert.py counts "
                    "the loop's reads)")
    out = tmp_path / "reads.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "workers" / "host_reads.py"), str(out),
         *TINY_MODEL, "--mock-data", "--train-iters", "6", "--log-interval", "3",
         "--global-batch-size", "4"],
        env=environment(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    reads = json.loads(out.read_text())
    assert set(reads) <= {"0", "3", "6"}, {k: v for k, v in reads.items()
                                           if k not in ("0", "3", "6")}
    assert reads["3"], "the logging step reads its values (the recorder works)"

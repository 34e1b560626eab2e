"""CUDA paths: run with `make test-gpu` on a machine with a GPU; skipped without CUDA."""

import pytest
import torch

from tests.support.hyper_expert_cases import (
    HYPER_EXPERT_CASES,
    assert_close_relative,
    hyper_parts,
    output_and_grads,
    random_routing_map,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", sorted(HYPER_EXPERT_CASES))
def test_fast_forms_equal_naive_on_cuda(case, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    num_experts, topk, tokens, patterns = HYPER_EXPERT_CASES[case]
    _, selection, hypernet = hyper_parts(num_experts, topk)
    selection, hypernet = selection.cuda(), hypernet.cuda()
    generator = torch.Generator().manual_seed(11)
    routing_map = random_routing_map(tokens, num_experts, topk, generator, patterns).cuda()
    x = torch.randn(tokens, 24, generator=generator).cuda()
    y_ref, grads_ref = output_and_grads("naive", x, routing_map, selection, hypernet)
    # Relative to each tensor's scale: cuBLAS sums in other orders than the naive form, and an
    # element-wise rtol failed on an H200 for one near-zero gradient entry (1.7e-5 absolute).
    for impl in ("allsets", "grouped", "factored"):
        y, grads = output_and_grads(impl, x, routing_map, selection, hypernet)
        assert_close_relative(y, y_ref, rtol=1e-4, what=f"{impl} output")
        for name in grads_ref:
            assert_close_relative(grads[name], grads_ref[name], rtol=1e-4,
                                  what=f"{impl} grad {name}")


def test_allsets_in_bf16_never_waits_for_the_gpu_and_equals_the_loop(monkeypatch):
    """The GPU form: torch._grouped_mm in bf16 (Hopper) or the loop elsewhere, no host
    synchronisation in forward or backward, and the same result as the per-set loop."""
    import megatron_hypermoe.model.grouped_gemm as gg
    import megatron_hypermoe.model.hyper_expert as he

    _, selection, hypernet = hyper_parts(8, 2, hidden=64)
    selection, hypernet = selection.cuda().bfloat16(), hypernet.cuda().bfloat16()
    generator = torch.Generator().manual_seed(3)
    routing_map = random_routing_map(512, 8, 2, generator).cuda()
    x = torch.randn(512, 64, generator=generator).cuda().bfloat16()
    he.hyper_expert_output(x, routing_map, selection, hypernet, 0, impl="allsets", topk=2)
    results = {}
    for native in (True, False) if gg.native_grouped_mm(x, 512, 64, 8) else (False,):
        monkeypatch.setattr(gg, "native_grouped_mm", lambda *args, native=native: native)
        xg = x.clone().requires_grad_(True)
        torch.cuda.synchronize()
        if native:
            torch.cuda.set_sync_debug_mode("error")
        try:
            y = he.hyper_expert_output(xg, routing_map, selection, hypernet, 0, impl="allsets",
                                       topk=2)
            y.float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results[native] = (y.float(), xg.grad.float())
    if len(results) == 2:
        for fast, loop in zip(results[True], results[False]):
            assert_close_relative(fast, loop, rtol=2e-2)


@pytest.mark.parametrize("form", ["as the device decides", "loop"])
def test_grouped_hyper_expert_in_bf16_equals_fp64_on_cuda(form, monkeypatch):
    """On the GPU: torch._grouped_mm (Hopper) or the per-group loop, in bf16, against the
    per-token form in fp64: output, input gradient, the weight gradients of the 2-D x 2-D
    grouped product (zero for empty groups) and the fp32-summed bias gradients."""
    import megatron_hypermoe.model.grouped_gemm as gg
    from tests.support.hyper_expert_cases import check_grouped_hyper_expert_against_fp64

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    if form == "loop":
        monkeypatch.setattr(gg, "native_grouped_mm", lambda *args: False)
    check_grouped_hyper_expert_against_fp64(torch.bfloat16, "cuda")


def test_bf16_hypermoe_gpt_forward_backward_on_cuda(megatron_single_process):
    from tests.support.tiny_model import batch, lm_loss, tiny_model

    model, _ = tiny_model("hypermoe", moe_router_topk=2, bf16=True,
                          params_dtype=torch.bfloat16)
    model = model.cuda()
    tokens, position_ids, labels = (t.cuda() for t in batch())
    loss = lm_loss(model, tokens, position_ids, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.hypernetwork.fc.weight.grad.abs().sum() > 0
    assert model.hypernetwork.fc.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("form", ["as the device decides", "loop"])
def test_grouped_experts_in_bf16_equal_sequential_mlp_on_cuda(form, megatron_single_process,
                                                              monkeypatch):
    """--moe-grouped-gemm on the GPU in bf16 (torch._grouped_mm on Hopper, the loop elsewhere,
    or the loop forced) against megatron's SequentialMLP with the same weights, on a batch of
    3 x 15 tokens (rows padded for torch._grouped_mm): loss and every gradient within bf16
    rounding."""
    import megatron_hypermoe.model.grouped_gemm as gg
    from tests.support.tiny_model import batch, lm_loss, tiny_model

    if form == "loop":
        monkeypatch.setattr(gg, "native_grouped_mm", lambda *args: False)
    models = {}
    for grouped in (False, True):
        model, _ = tiny_model("moe", num_moe_experts=8, moe_grouped_gemm=grouped, bf16=True,
                              params_dtype=torch.bfloat16)
        models[grouped] = model.cuda()
    models[True].load_state_dict(models[False].state_dict())
    tokens, position_ids, labels = (t.cuda() for t in batch(batch_size=3, seq=15))
    results = {}
    for grouped, model in models.items():
        loss = lm_loss(model, tokens, position_ids, labels)
        loss.backward()
        results[grouped] = (loss.detach().float(), {n: p.grad.float() for n, p in
                                                    model.named_parameters()})
    loss, grads = results[True]
    loss_ref, grads_ref = results[False]
    assert_close_relative(loss, loss_ref, rtol=1e-2, what="loss")
    for name, grad in grads_ref.items():
        assert_close_relative(grads[name], grad, rtol=3e-2, what=name)


def test_bf16_training_run_on_cuda(tmp_path):
    """The trainer end to end on one GPU in bf16 (NCCL, DeepSpeed's CUDA accelerator)."""
    import json
    import subprocess
    import sys

    from tests.support.processes import REPO_ROOT
    from tests.support.tiny_model import TINY_MODEL

    metrics = tmp_path / "metrics.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "pretrain_gpt_hypermoe.py"), *TINY_MODEL, "--mock-data",
         "--train-iters", "5", "--bf16", "--zero-stage", "2", "--metrics-file", str(metrics)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # ZeRO-2 with bf16 weights accumulates and reduces gradients in fp32 by default.
    assert "fp32 gradient accumulation, fp32 reduction (DeepSpeedZeroOptimizer)" in result.stdout
    losses = [json.loads(line)["lm_loss"] for line in open(metrics) if "lm_loss" in line]
    assert len(losses) == 5 and all(loss == loss for loss in losses)  # finite, not NaN


@pytest.mark.gpu
@pytest.mark.parametrize("zero_stage", ["1", "2"])
def test_fp16_run_accumulates_and_reduces_gradients_in_fp32_on_cuda(zero_stage, tmp_path):
    """fp16 cannot run on DeepSpeed's CPU accelerator, so its fp32-gradient default is checked
    here: the engine says what it does, and the loss-scaled run trains."""
    import json
    import subprocess
    import sys

    from tests.support.processes import REPO_ROOT
    from tests.support.tiny_model import TINY_MODEL

    metrics = tmp_path / "metrics.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "pretrain_gpt_hypermoe.py"), *TINY_MODEL, "--mock-data",
         "--train-iters", "5", "--fp16", "--zero-stage", zero_stage, "--global-batch-size", "4",
         "--metrics-file", str(metrics)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert ("fp16 weights/activations, fp32 master weights, fp32 gradient accumulation, fp32 "
            "reduction (DeepSpeedZeroOptimizer)") in result.stdout
    losses = [json.loads(line)["lm_loss"] for line in open(metrics) if "lm_loss" in line]
    assert len(losses) == 5 and all(loss == loss for loss in losses)


# The trainer on CUDA ------------------------------------------------------------------------------
def gpu_pretrain(*flags, nproc=1, timeout=300):
    """The trainer on this machine's GPU(s) (NCCL, DeepSpeed's CUDA accelerator); its output."""
    import subprocess

    from tests.support.processes import child_environment, pretrain_command

    result = subprocess.run(pretrain_command(nproc) + list(flags), env=child_environment(),
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def bf16_run(dataset, *flags):
    from tests.support.tiny_model import TINY_MODEL

    return [*TINY_MODEL, *dataset, "--bf16", "--global-batch-size", "4", *flags]


def test_save_same_layout_and_layout_free_resume_on_cuda(dataset, tmp_path):
    """ZeRO-2 bf16 on the GPU: an interrupted run resumes in its own layout (DeepSpeed's files)
    and in another (ZeRO-1, from the layout-free files) where the uninterrupted one went."""
    from tests.support.run_outputs import read_metrics

    run = bf16_run(dataset, "--train-iters", "4", "--lr-warmup-iters", "1")
    gpu_pretrain(*run, "--zero-stage", "2", "--metrics-file", str(tmp_path / "full.jsonl"))
    gpu_pretrain(*run, "--zero-stage", "2", "--save", str(tmp_path / "ckpt"),
                 "--exit-interval", "2")
    full, _ = read_metrics(tmp_path / "full.jsonl")
    for stage, layout in (("2", "resuming with the same layout"), ("1", "resharding from")):
        metrics = tmp_path / f"zero{stage}.jsonl"
        output = gpu_pretrain(*run, "--zero-stage", stage, "--load", str(tmp_path / "ckpt"),
                              "--metrics-file", str(metrics))
        assert layout in output
        resumed, _ = read_metrics(metrics)
        assert [r["iteration"] for r in resumed] == [3, 4]
        for a, b in zip(full[2:], resumed):
            assert abs(a["lm_loss"] - b["lm_loss"]) <= 1e-2 * abs(a["lm_loss"]), (stage, a, b)
            assert a["lr"] == b["lr"]


def test_recompute_trains_as_without_on_cuda(dataset, tmp_path):
    """Full-layer and selective (moe) recomputation give the losses of a run without."""
    from tests.support.run_outputs import read_metrics

    # (ZeRO-1: ZeRO-2 refuses recomputed HyperMoE layers, see cli/model_flags.py)
    run = bf16_run(dataset, "--train-iters", "3", "--zero-stage", "1")
    gpu_pretrain(*run, "--metrics-file", str(tmp_path / "plain.jsonl"))
    plain, _ = read_metrics(tmp_path / "plain.jsonl")
    for name, recompute in (("full", ["--recompute-granularity", "full", "--recompute-method",
                                      "uniform", "--recompute-num-layers", "1"]),
                            ("selective", ["--recompute-granularity", "selective",
                                           "--recompute-modules", "moe"])):
        gpu_pretrain(*run, *recompute, "--metrics-file", str(tmp_path / f"{name}.jsonl"))
        recomputed, _ = read_metrics(tmp_path / f"{name}.jsonl")
        for a, b in zip(plain, recomputed):
            assert abs(a["lm_loss"] - b["lm_loss"]) <= 1e-2 * abs(a["lm_loss"]), (name, a, b)


def test_sampling_after_training_on_cuda(dataset, tmp_path):
    """--generate-tokens after the last save: CUDA logits, a sample printed."""
    output = gpu_pretrain(*bf16_run(dataset, "--train-iters", "2", "--generate-tokens", "8",
                                    "--save", str(tmp_path / "ckpt")))
    assert "---- generated sample ----" in output


def test_bf16_run_at_sequence_4096_on_cuda(tmp_path):
    """The sequence length of Megatron-LM's Mixtral recipe, one micro-batch per step."""
    from tests.support.run_outputs import read_metrics
    from tests.support.tiny_model import tiny_flags

    metrics = tmp_path / "metrics.jsonl"
    gpu_pretrain(*tiny_flags(hidden_size=256, ffn_hidden_size=512, num_attention_heads=8),
                 "--mock-data", "--seq-length", "4096", "--max-position-embeddings", "4096",
                 "--micro-batch-size", "1", "--train-iters", "3", "--bf16", "--zero-stage", "2",
                 "--log-interval", "1", "--metrics-file", str(metrics))
    train, _ = read_metrics(metrics)
    assert len(train) == 3 and all(r["lm_loss"] == r["lm_loss"] for r in train)


# Two GPUs (skipped on one): the layouts a node runs ---------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2", "--zero-stage", "1"],
                                    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--expert-model-parallel-size", "2"]],
                         ids=["PP2", "TP2_SP", "EP2"])
def test_two_gpus_train_like_one(layout, dataset, tmp_path):
    """torchrun on 2 GPUs (NCCL): PP=2, TP=2 with sequence parallelism, EP=2 give the losses of
    one GPU (bf16 tolerance)."""
    from tests.support.run_outputs import read_metrics

    run = bf16_run(dataset, "--train-iters", "3", "--global-batch-size", "4")
    gpu_pretrain(*run, "--zero-stage", "1", "--metrics-file", str(tmp_path / "one.jsonl"))
    gpu_pretrain(*run, *layout, "--metrics-file", str(tmp_path / "two.jsonl"), nproc=2)
    one, _ = read_metrics(tmp_path / "one.jsonl")
    two, _ = read_metrics(tmp_path / "two.jsonl")
    for a, b in zip(one, two):
        assert abs(a["lm_loss"] - b["lm_loss"]) <= 2e-2 * abs(a["lm_loss"]), (a, b)


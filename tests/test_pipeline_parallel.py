"""Pipeline parallelism (parallel/pipeline.py) against one process: PP=2 and PP=2 x EP=2 train
like one process with the same global batch; a checkpoint resumes exactly, in its own layout and
in one process. (The Hugging Face export of a PP=2 checkpoint: tests/test_hf_conversion.py.)"""

import pytest
from safetensors import safe_open

from tests.support.processes import pretrain, run_torchrun
from tests.support.run_outputs import read_metrics, relative
from tests.support.tiny_model import MEGATRON_KERNELS, TINY_MODEL, tiny_run
from tests.test_training import assert_resumed_like, generated_sample

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# 4 micro-batches of 2 per data-parallel rank: the schedule's warm-up, steady and cool-down
# phases all run; clipping (0.5) is active, so the global norm itself is compared.
PP_COMMON = ["--train-iters", "3", "--zero-stage", "1", "--clip-grad", "0.5",
             "--global-batch-size", "8", "--eval-interval", "3", "--eval-iters", "1",
             "--generate-tokens", "8"]
PP2 = ["--pipeline-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """reference(moe_type) -> (training records, validation records, sample) of one process,
    with megatron-core's DotProductAttention and SequentialMLP (the pipeline runs take SDPA and
    the grouped-GEMM experts)."""
    made = {}

    def make(moe_type):
        if moe_type not in made:
            metrics = tmp_path_factory.mktemp(f"pp_reference_{moe_type}") / "one.jsonl"
            output = pretrain(*tiny_run(moe_type), *dataset, *PP_COMMON,
                              *MEGATRON_KERNELS, "--metrics-file", str(metrics))
            made[moe_type] = (*read_metrics(metrics), generated_sample(output))
        return made[moe_type]
    return make


def flat(values):
    return [x for row in values for x in (row if isinstance(row, list) else [row])]


def assert_same_run(metrics, output, expected, last_forward_too, tol=1e-5):
    train, validation = read_metrics(metrics)
    ref_train, ref_validation, ref_sample = expected
    assert len(train) == len(ref_train) == 3
    for a, b in zip(train, ref_train):
        for key in ("lm_loss", "aux_loss", "grad_norm"):
            assert relative(a[key], b[key]) < tol, (key, a, b)
        assert a["grad_norm"] > 0.5  # clipping was active
        # every layer's, from both stages; the HyperExpert RMS is rank 0's last micro-batch's,
        # the same micro-batch as one process's only without data parallelism
        for key in ("expert_load", "hyper_output_rms")[:2 if last_forward_too else 1]:
            assert (key in a) == (key in b)
            got, want = flat(a.get(key, [])), flat(b.get(key, []))
            assert len(got) == len(want) and all(
                relative(x, y) < tol for x, y in zip(got, want)), (key, got, want)
    assert relative(validation[-1]["val_loss"], ref_validation[-1]["val_loss"]) < tol
    assert generated_sample(output) == ref_sample


@pytest.mark.parametrize("moe_type", ["hypermoe", "moe"])
def test_pipeline_parallel_run_matches_single_process_run(moe_type, dataset, reference,
                                                          tmp_path):
    """Loss, aux loss, clipped global gradient norm, expert loads and HyperExpert RMS of every
    layer at each of 3 steps, the validation loss and the sampled text equal one process's.
    (PP=2 x EP=2 on 4 ranks, 2 stages each with 2 expert-parallel ranks:
    tests/test_moe_architectures.py, on a model with a dense layer and a shared expert.)"""
    metrics = tmp_path / "pp.jsonl"
    output = pretrain(*tiny_run(moe_type), *dataset, *PP_COMMON, *PP2,
                      "--metrics-file", str(metrics), nproc=2)
    assert "PP 2 (1 layers per stage)" in output
    assert_same_run(metrics, output, reference(moe_type), last_forward_too=True)


# PP=2 against one process, both --bf16: the stages accumulate a step's micro-batch gradients
# in bf16 and fold them into the fp32 ones once, one process accumulates in fp32 (bf16: 8
# significant bits, 3.9e-3 relative per rounding). Measured on the tiny model (3 steps, CPU),
# the worst relative differences were 2.6e-6 (loss, step 1 equal), 1.2e-4 (aux loss) and
# 3.4e-4 (gradient norm); each tolerance is about 4x that. The wrong fold (DeepSpeed's
# immediate_grad_update, refused in ds_config._check_pipeline_fit) was 18% off.
BF16_TOLERANCES = {"lm_loss": 1e-5, "aux_loss": 5e-4, "grad_norm": 1.5e-3, "lr": 0.0}


def test_pipeline_parallel_bf16_run_matches_single_process_bf16_run(dataset, tmp_path):
    """PP=2 with --bf16 (its own gradient fold: parallel/pipeline.py, compat/deepspeed.py g)
    against one process with --bf16 and the same global batch: loss, aux loss, clipped gradient
    norm and learning rate at each of 3 steps within BF16_TOLERANCES."""
    common = [*TINY_MODEL, *dataset, *PP_COMMON, "--bf16", "--generate-tokens", "0"]
    runs = {}
    for name, nproc, layout in (("one", 1, []), ("pp", 2, PP2)):
        runs[name] = tmp_path / f"{name}.jsonl"
        output = pretrain(*common, *layout, "--metrics-file", str(runs[name]), nproc=nproc)
        assert "precision: bf16 weights/activations, fp32 master weights" in output
    assert "pipeline parallelism with --bf16" in output
    pp, _ = read_metrics(runs["pp"])
    one, _ = read_metrics(runs["one"])
    assert [r["iteration"] for r in pp] == [r["iteration"] for r in one] == [1, 2, 3]
    worst = dict.fromkeys(BF16_TOLERANCES, 0.0)
    for a, b in zip(pp, one):
        for key in BF16_TOLERANCES:
            worst[key] = max(worst[key], relative(a[key], b[key]))
        assert b["grad_norm"] > 0.5  # clipping was active
    print(f"bf16 PP=2 vs one process: worst relative differences {worst}")
    assert all(worst[key] <= tol for key, tol in BF16_TOLERANCES.items()), worst
    assert one[-1]["lm_loss"] != one[0]["lm_loss"]


def test_skipping_the_hypernetwork_gradient_sum_is_caught(dataset, reference, tmp_path):
    """The mutation the equivalence test must catch: each stage steps its hypernetwork replica
    with its own layers' gradient only (tests/workers/pipeline_without_shared_grad_sum.py)."""
    metrics = tmp_path / "mutant.jsonl"
    run_torchrun(2, "pipeline_without_shared_grad_sum.py", *TINY_MODEL, *dataset, *PP_COMMON,
                 *PP2, "--metrics-file", str(metrics), timeout=240)
    train, _ = read_metrics(metrics)
    ref_train = reference("hypermoe")[0]
    worst = max(relative(a["grad_norm"], b["grad_norm"]) for a, b in zip(train, ref_train))
    assert worst > 1e-4, worst


def test_pipeline_checkpoint_resumes_exactly_here_and_in_one_process(dataset, tmp_path):
    """PP=2 trains 4 steps, saving at step 2 (DeepSpeed's files per stage, layout-free files per
    stage with the hypernetwork once); PP=2 and one process both resume it and their steps 3 and
    4 equal the uninterrupted run's (loss, aux loss, clipped gradient norm, learning rate):
    step 3 checks the weights, step 4 Adam's moments, step count and the schedule. (That PP=2
    trains like one process: the test above; 4 steps decay the learning rate otherwise than
    its 3.)"""
    common = [*TINY_MODEL, *dataset, *PP_COMMON, "--train-iters", "4", "--generate-tokens", "0"]
    pretrain(*common, *PP2, "--save", str(tmp_path / "ckpt"), "--save-interval", "2",
             "--metrics-file", str(tmp_path / "whole.jsonl"), nproc=2)
    whole, _ = read_metrics(tmp_path / "whole.jsonl")
    saved = tmp_path / "ckpt" / "iter_0000002"
    assert sorted(p.name for p in saved.glob("mp_rank_*_model_states.pt")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    stages = [saved / "layout_free" / f"dense_pp_rank_{s:02d}_tp_rank_00.safetensors"
              for s in (0, 1)]
    keys = [set(safe_open(str(path), "pt").keys()) for path in stages]
    assert any("hypernetwork" in key for key in keys[0])
    assert not any("hypernetwork" in key for key in keys[1])  # stored once
    assert any("decoder.layers.1." in key for key in keys[1])  # global layer numbers
    assert not keys[0] & keys[1]
    for nproc, layout, line in ((2, PP2, "resuming with the same layout"),
                                (1, [], "resharding from TP 1 EP 1 PP 2 DP 1")):
        metrics = tmp_path / f"resumed_{nproc}.jsonl"
        output = pretrain(*common, *layout, "--load", str(tmp_path / "ckpt"), "--ckpt-step", "2",
                          "--metrics-file", str(metrics), nproc=nproc)
        assert line in output
        resumed, _ = read_metrics(metrics)
        assert resumed[-1]["grad_norm"] > 0.5  # clipping was active
        assert_resumed_like(resumed, whole, first=3,
                            keys=("lm_loss", "aux_loss", "grad_norm", "lr"))

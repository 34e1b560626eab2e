"""Non-finite steps beyond one iteration (issue 28, item 5): what a skipped step leaves behind,
a non-finite gradient under a finite loss, and a fault that only one data-parallel rank sees.

The contract, read from ``training/trainer.py`` and DeepSpeed's ZeRO stage 1/2 optimizer it
relies on (fp32 runs: ``check_grad_overflow`` is off, and the step is skipped because the
all-reduced global gradient norm is not finite; the optimizer returns before AdamW runs):

* a skipped step changes neither the weights, nor AdamW's state (exp_avg, exp_avg_sq, step), nor
  ZeRO's fp32 master partition, nor the lr schedule (``train_step`` steps the schedule only when
  DeepSpeed's ``skipped_steps`` did not grow), so the next step uses the lr the skipped one had;
* it still consumes its batch and counts as an iteration: ``iteration`` and
  ``consumed_train_samples`` advance, ``skipped_iterations`` grows by one, and the next iteration
  reads the next batch;
* hence the iterations after it are bit for bit those of a run whose same step was never taken
  (its batch read and dropped, the schedule left where it was);
* the decision is the data-parallel group's: a non-finite gradient on one rank skips the step on
  every rank (the gradients are averaged before the check, and the norm is all-reduced).

The runs are in-process trainers under torchrun: this file is also the worker script
(``python -m torch.distributed.run ... tests/test_nonfinite_steps.py OUT SCENARIO``), which wraps
``Trainer.train_step`` to snapshot the state after every iteration of the real ``Trainer.train``
loop. The non-finite gradient is injected by a tensor hook the worker puts on one parameter
(test-only, no production flag); a fault on one rank only sets ``--inject-nan-loss-at`` /
registers the hook in that rank's process alone.
"""

import dataclasses
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.support.processes import REPO_ROOT, child_environment
from tests.support.tiny_model import TINY_MODEL

SKIPPED = 2  # the iteration whose step is skipped in the one-process runs
ITERS = 4
# warmup over every step taken (it must end before the last iteration): each step's lr differs,
# so a schedule that moved on a skipped step shows; from 1e-4, so the first step moves weights
RUN = ["--mock-data", "--weight-decay", "0.1", "--lr-warmup-init", "1e-4"]


def _run_flags(iterations):
    return ["--train-iters", str(iterations), "--lr-warmup-iters", str(iterations - 1)]


# The worker (run under torchrun) ------------------------------------------------------------------
def _snapshot(trainer):
    """Everything a step could change: weights, AdamW's state, ZeRO's fp32 partition, lrs."""
    zero = trainer.optimizer
    adam = zero.optimizer
    state = {}
    for i, group in enumerate(adam.param_groups):
        for j, param in enumerate(group["params"]):
            for key, value in adam.state.get(param, {}).items():
                state[f"group{i}.param{j}.{key}"] = torch.as_tensor(value).detach().clone()
    return {
        "weights": {name: value.detach().clone()
                    for name, value in trainer.model.state_dict().items()
                    if torch.is_tensor(value)},
        "adam": state,
        "master": [part.detach().clone() for part in zero.single_partition_of_fp32_groups],
        "group_lrs": [group["lr"] for group in adam.param_groups],
        "schedule_lr": trainer.schedule.lr,
    }


def _record(trainer, records, step):
    """Wrap ``trainer.train_step`` (``step``: the real one or a stand-in) to snapshot the state
    after each iteration."""
    def recorded(batches):
        loss, lr, skipped = step(batches)
        records.append({"iteration": trainer.state.iteration + 1, "loss": float(loss), "lr": lr,
                        "skipped": skipped, **_snapshot(trainer)})
        return loss, lr, skipped
    trainer.train_step = recorded


def _owned_parameters(trainer):
    """(a parameter wholly in this rank's ZeRO partition, one wholly in another rank's), of the
    first optimizer group; names by identity."""
    zero = trainer.optimizer
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    own = zero.params_in_partition[0][-1]  # the straddling one, if any, is the first
    others = zero.params_not_in_partition[0]
    return own, (others[0] if others else None), names


def _inject_inf_gradient(trainer, param, at_iterations):
    """A test-only fault: one element of ``param``'s gradient is +inf at these iterations (the
    loss stays finite)."""
    def hook(grad):
        if trainer.state.iteration + 1 in at_iterations:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad
    param.register_hook(hook)


def _train(flags, prepare=None):
    from megatron_hypermoe.cli.arguments import parse_run_config
    from megatron_hypermoe.training.trainer import Trainer

    trainer = Trainer(parse_run_config(flags, int(os.environ["WORLD_SIZE"])))
    trainer.setup()
    records = [{"iteration": 0, **_snapshot(trainer)}]
    step = trainer.train_step
    if prepare is not None:
        step = prepare(trainer) or step
    _record(trainer, records, step)
    assert trainer.train() is True
    final = {key: getattr(trainer.state, key)
             for key in ("iteration", "consumed_train_samples", "skipped_iterations")}
    if trainer.peers is not None:  # as pretrain_gpt_hypermoe.py leaves
        trainer.peers.stop()
    trainer.close()
    return {"records": records, "final": final}


def _drop_batch_at(iteration):
    """The reference: the step of ``iteration`` is never taken; its batch is read and dropped and
    the loop is told the step was skipped (so it counts it as the real skip path does)."""
    def prepare(trainer):
        real = trainer.train_step

        def step(batches):
            if trainer.state.iteration + 1 != iteration:
                return real(batches)
            for _ in range(trainer.run.training.gradient_accumulation_steps):
                next(batches)
            return torch.tensor(float("nan")), trainer.schedule.lr, True
        return step
    return prepare


def _worker(out_dir, scenario):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megatron_hypermoe.parallel.distributed import destroy_distributed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    flags = [*TINY_MODEL, *RUN, "--global-batch-size", str(2 * world)]
    results = {}
    if scenario == "one_rank":
        results["reference"] = _train(flags + _run_flags(ITERS),
                                      _drop_batch_at(SKIPPED))
        results["nan_loss"] = _train(flags + _run_flags(ITERS) + [
            "--inject-nan-loss-at", str(SKIPPED)])

        def inf_gradient(trainer):
            own, _, names = _owned_parameters(trainer)
            results["inf_parameter"] = names[id(own)]
            _inject_inf_gradient(trainer, own, {SKIPPED})
        results["inf_gradient"] = _train(flags + _run_flags(ITERS), inf_gradient)
    elif scenario == "rank1_only":
        # 2: NaN loss on rank 1 (the production flag, given to rank 1's process only);
        # 4: +inf in a gradient of a parameter rank 0's ZeRO partition holds, on rank 1;
        # 6: +inf in a gradient of a parameter rank 1's partition holds, on rank 1.
        def faults_on_rank1(trainer):
            own, other, names = _owned_parameters(trainer)
            if rank == 1:
                assert other is not None, "rank 1 holds every parameter: no cross-rank case"
                run = trainer.run  # --inject-nan-loss-at 2 on this rank only
                trainer.run = dataclasses.replace(run, training=dataclasses.replace(
                    run.training, inject_nan_loss_at=(2,)))
                _inject_inf_gradient(trainer, other, {4})
                _inject_inf_gradient(trainer, own, {6})
                results["inf_parameters"] = (names[id(other)], names[id(own)])
        results["faulty"] = _train(flags + _run_flags(7), faults_on_rank1)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()  # leave together (a peer inside a gloo collective aborts)
    destroy_distributed()


# The tests ----------------------------------------------------------------------------------------
def _launch(out_dir, scenario, nproc):
    from megatron_hypermoe.parallel.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(REPO_ROOT / "tests" / "test_nonfinite_steps.py"),
           str(out_dir), scenario]
    # A rank that stepped while another skipped waits in a collective the other never joins:
    # a short collective timeout makes that an error, and a hung job is killed whole.
    env = child_environment(DS_ACCELERATOR="cpu", HYPERMOE_DISTRIBUTED_TIMEOUT_SECONDS="90")
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as job:
        try:
            output, _ = job.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            output, _ = job.communicate()
            raise AssertionError(f"{scenario} hung:\n{output[-6000:]}") from None
    assert job.returncode == 0, f"{scenario} failed (exit {job.returncode}):\n{output[-6000:]}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(nproc)]


def _differences(a, b):
    """Names of the state entries in which snapshots ``a`` and ``b`` differ (bit for bit)."""
    diff = []
    for part in ("weights", "adam"):
        assert a[part].keys() == b[part].keys(), part
        diff += [f"{part}:{name}" for name in a[part] if not torch.equal(a[part][name],
                                                                        b[part][name])]
    diff += [f"master:{i}" for i, (x, y) in enumerate(zip(a["master"], b["master"]))
             if not torch.equal(x, y)]
    diff += [key for key in ("group_lrs", "schedule_lr") if a[key] != b[key]]
    return diff


def _check_skipped_step(records, skipped_at):
    """The step at ``skipped_at`` changed nothing, every other step moved every weight and had a
    finite loss, and the schedule advanced on exactly the steps that were applied."""
    assert [r["iteration"] for r in records] == list(range(len(records)))
    for before, after in zip(records, records[1:]):
        skipped = after["iteration"] in skipped_at
        assert after["skipped"] is skipped, after["iteration"]
        if skipped:
            assert _differences(before, after) == [], f"iteration {after['iteration']}"
        else:
            assert math.isfinite(after["loss"]), after["iteration"]
            assert any(not torch.equal(before["weights"][name], after["weights"][name])
                       for name in after["weights"]), f"iteration {after['iteration']}: unmoved"
            assert after["schedule_lr"] > before["schedule_lr"]  # warmup: the schedule moved
        # the lr the step used is the one the schedule held before it
        assert after["lr"] == before["schedule_lr"]
        for value in (*after["weights"].values(), *after["master"]):
            assert torch.isfinite(value).all(), f"iteration {after['iteration']}"
    for name, value in records[-1]["adam"].items():
        assert torch.isfinite(value).all(), name
    applied = len(records) - 1 - len(skipped_at)
    steps = {int(v) for name, v in records[-1]["adam"].items() if name.endswith(".step")}
    assert steps == {applied}, f"AdamW stepped {steps} times, {applied} steps were applied"


@pytest.fixture(scope="module")
def one_rank_runs(tmp_path_factory):
    (results,) = _launch(tmp_path_factory.mktemp("nonfinite_one_rank"), "one_rank", nproc=1)
    return results


def _check_as_if_never_taken(run, reference):
    """Every iteration's state equals the reference's, whose skipped step was never taken."""
    skipped = {SKIPPED}
    _check_skipped_step(run["records"], skipped)
    _check_skipped_step(reference["records"], skipped)
    for ours, theirs in zip(run["records"], reference["records"], strict=True):
        assert _differences(ours, theirs) == [], f"iteration {ours['iteration']}"
        if ours["iteration"] not in (0, SKIPPED):
            assert ours["loss"] == theirs["loss"], f"iteration {ours['iteration']}"
    # consumed its batch and counted as an iteration
    assert run["final"] == reference["final"] == {
        "iteration": ITERS, "consumed_train_samples": ITERS * 2, "skipped_iterations": 1}
    lrs = [r["lr"] for r in run["records"][1:]]
    assert lrs[SKIPPED] == lrs[SKIPPED - 1] < lrs[SKIPPED + 1], lrs  # the schedule held still


def test_training_after_a_nan_loss_step_is_as_if_the_step_was_never_taken(one_rank_runs):
    """--inject-nan-loss-at 2 of 4: iteration 2 leaves weights, AdamW state (exp_avg, exp_avg_sq,
    step), the fp32 master partition and the lr schedule as iteration 1 left them, yet consumes
    its batch and counts (iteration 4, 4 global batches consumed, 1 skipped). Iterations 3 and 4
    are bit for bit those of a run that read and dropped batch 2 without a step: finite losses,
    iteration 3 at the lr iteration 2 would have used."""
    _check_as_if_never_taken(one_rank_runs["nan_loss"], one_rank_runs["reference"])


def test_a_non_finite_gradient_under_a_finite_loss_skips_the_step(one_rank_runs):
    """+inf in one element of one parameter's gradient at iteration 2 (a test-only hook; the loss
    is finite): the step is skipped, not applied (no inf or NaN reaches the weights or AdamW's
    state) and not a crash, and the run goes on as if it was never taken (as the NaN loss)."""
    run = one_rank_runs["inf_gradient"]
    assert one_rank_runs["inf_parameter"] in run["records"][0]["weights"]
    assert math.isfinite(run["records"][SKIPPED]["loss"])  # a finite loss, a non-finite gradient
    _check_as_if_never_taken(run, one_rank_runs["reference"])


@pytest.mark.multiprocess
def test_a_fault_on_one_rank_of_two_skips_the_step_on_both(tmp_path):
    """Two data-parallel ranks (ZeRO 1), 7 iterations; faults on rank 1 only: a NaN loss at 2
    (--inject-nan-loss-at in rank 1's process alone), +inf in the gradient of a parameter that
    rank 0's ZeRO partition holds at 4, and of one that rank 1's holds at 6 (so each rank must
    learn of a fault in the other's partition). Both ranks skip exactly 2, 4 and 6, each keeps its
    weights, AdamW state and fp32 partition through them, both schedules hold still, and the
    weights stay identical across the ranks after every iteration."""
    ranks = _launch(tmp_path, "rank1_only", nproc=2)
    other, own = ranks[1]["inf_parameters"]
    assert other != own
    for rank, results in enumerate(ranks):
        run = results["faulty"]
        _check_skipped_step(run["records"], {2, 4, 6})
        assert run["final"] == {"iteration": 7, "consumed_train_samples": 7 * 4,
                                "skipped_iterations": 3}, rank
    for first, second in zip(ranks[0]["faulty"]["records"], ranks[1]["faulty"]["records"],
                             strict=True):
        iteration = first["iteration"]
        assert first["weights"].keys() == second["weights"].keys()
        differ = [name for name in first["weights"]
                  if not torch.equal(first["weights"][name], second["weights"][name])]
        assert differ == [], f"iteration {iteration}: the ranks' weights differ: {differ[:5]}"
        assert first["schedule_lr"] == second["schedule_lr"], iteration
        assert first["group_lrs"] == second["group_lrs"], iteration
        if iteration:
            assert first["skipped"] == second["skipped"], iteration


if __name__ == "__main__":
    _worker(*sys.argv[1:])

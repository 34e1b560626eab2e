"""Checkpoint faults lose nothing: a crash or a full disk during a save leaves the previous
checkpoint loadable, a damaged or missing newest checkpoint is named in one line with the
iteration to load instead (--ckpt-step), re-saving an iteration never leaves 'latest' on a
missing directory, --save-retain keeps the newest N."""

import dataclasses
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_hypermoe.cli.arguments import parse_args
from megatron_hypermoe.errors import ArgumentError, CheckpointError
from megatron_hypermoe.parallel.distributed import free_port
from megatron_hypermoe.training.checkpoint import files as checkpoint_files
from megatron_hypermoe.training.checkpoint.files import (
    META_FILE,
    complete_iterations,
    publish,
    read_latest_tag,
    remove_leftovers,
    retain_newest,
    tag_for,
)
from tests.support.processes import REPO_ROOT, environment, error_line, pretrain, pretrain_command
from tests.support.run_outputs import read_metrics
from tests.support.tiny_model import TINY_MODEL

RUN = [*TINY_MODEL, "--mock-data"]
WORKER = REPO_ROOT / "tests" / "workers" / "checkpoint_write_fault.py"


# Directories under --save, in process --------------------------------------------------------
def _write_checkpoint(directory, name, content):
    """A stand-in checkpoint: a data file and, last, the metadata file."""
    path = directory / name
    path.mkdir()
    (path / "data").write_text(content)
    (path / META_FILE).write_text("{}")


def _latest_is_complete(directory):
    tag = read_latest_tag(directory)
    return tag is not None and (directory / tag / META_FILE).is_file() and \
        (directory / tag / "data").read_text() in ("old", "new")


class _Crash(BaseException):
    """A process death at one file-system call (BaseException: no cleanup code catches it)."""


FILE_SYSTEM_CALLS = ("replace", "rename", "link", "unlink", "rmdir")


def _instrument(monkeypatch, directory, crash_at=None):
    """Check after every file-system call that 'latest' names a complete checkpoint; raise
    _Crash at call number ``crash_at``. Returns the list of calls made."""
    calls = []
    for name in FILE_SYSTEM_CALLS:
        original = getattr(os, name)

        def call(*args, _original=original, _name=name, **kwargs):
            if len(calls) == crash_at:
                raise _Crash()
            calls.append(_name)
            result = _original(*args, **kwargs)
            assert _latest_is_complete(directory), (calls, os.listdir(directory))
            return result

        monkeypatch.setattr(os, name, call)
    return calls


def _resave_setup(directory):
    _write_checkpoint(directory, tag_for(3), "old")
    (directory / "latest").write_text(tag_for(3))
    _write_checkpoint(directory, tag_for(3) + ".partial", "new")


def test_resaving_an_iteration_never_leaves_latest_on_a_missing_directory(tmp_path,
                                                                         monkeypatch):
    """Iteration 3 saved again while 'latest' names it (a run resumed from 3 that saves at 3):
    after every single file-system call 'latest' names a complete checkpoint; and a crash at any
    of those calls, followed by the next run's save, ends with the new checkpoint published."""
    _resave_setup(tmp_path)
    with monkeypatch.context() as patch:
        calls = _instrument(patch, tmp_path)
        publish(str(tmp_path), tag_for(3), 3)
    assert len(calls) > 5
    for crash_at in range(len(calls)):
        directory = tmp_path / f"crash_{crash_at}"
        directory.mkdir()
        _resave_setup(directory)
        with monkeypatch.context() as patch:
            _instrument(patch, directory, crash_at=crash_at)
            with pytest.raises(_Crash):
                publish(str(directory), tag_for(3), 3)
        assert _latest_is_complete(directory)
        # The next run: leftovers removed, iteration 3 written and published again.
        remove_leftovers(str(directory))
        assert not (directory / (tag_for(3) + ".partial")).exists()
        _write_checkpoint(directory, tag_for(3) + ".partial", "new")
        publish(str(directory), tag_for(3), 3)
        assert sorted(os.listdir(directory)) == sorted(
            [tag_for(3), "latest", "latest_checkpointed_iteration.txt"]), crash_at
        assert (directory / tag_for(3) / "data").read_text() == "new"
        assert read_latest_tag(directory) == tag_for(3)


def test_partial_and_other_leftovers_are_never_checkpoints_and_go_at_the_next_save(tmp_path):
    _write_checkpoint(tmp_path, tag_for(2), "old")
    (tmp_path / "latest").write_text(tag_for(2))
    for leftover in (".partial", ".removing", ".old"):  # each with a metadata file even
        _write_checkpoint(tmp_path, tag_for(4) + leftover, "new")
    assert complete_iterations(str(tmp_path)) == [2]
    with pytest.raises(CheckpointError, match=re.escape(
            f"--ckpt-step 4: {tmp_path} has no complete checkpoint iter_0000004; complete "
            "ones: 2")):
        checkpoint_files.resolve_load_tag(str(tmp_path), 4)
    remove_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [tag_for(2), "latest"]


def test_save_retain_keeps_the_newest_and_the_one_latest_names(tmp_path):
    for iteration in (1, 2, 3, 4, 5):
        _write_checkpoint(tmp_path, tag_for(iteration), "old")
    (tmp_path / "latest").write_text(tag_for(2))  # e.g. a run resumed with --ckpt-step 2
    assert retain_newest(str(tmp_path), 2) == [1, 3]
    assert complete_iterations(str(tmp_path)) == [2, 4, 5]
    (tmp_path / "latest").write_text(tag_for(5))
    assert retain_newest(str(tmp_path), 1) == [2, 4]
    assert sorted(os.listdir(tmp_path)) == [tag_for(5), "latest"]


def test_latest_naming_a_missing_directory_is_one_line_with_the_step_to_load(tmp_path):
    from megatron_hypermoe.training.checkpoint.files import read_latest

    for iteration in (2, 4):
        _write_checkpoint(tmp_path, tag_for(iteration), "old")
    (tmp_path / "latest").write_text(tag_for(6))
    with pytest.raises(CheckpointError) as caught:
        read_latest(str(tmp_path))
    assert str(caught.value) == (
        f"--load {tmp_path}: 'latest' names 'iter_0000006', which does not exist (deleted, or "
        "not copied with the rest); pass --ckpt-step 4 to load the checkpoint of iteration 4 "
        "instead")
    assert checkpoint_files.resolve_load_tag(str(tmp_path), 2) == tag_for(2)


def test_checkpoint_flags_are_validated():
    base = RUN + ["--train-iters", "2"]
    for flags, message in [
            (["--save", "d", "--save-retain", "0"], "--save-retain 0 must be at least 1"),
            (["--save-retain", "2"], "--save-retain needs --save DIR"),
            (["--ckpt-step", "3"], "--ckpt-step needs --load DIR"),
            (["--load", "d", "--ckpt-step", "-1"], "--ckpt-step -1 must be an iteration >= 0")]:
        with pytest.raises(ArgumentError, match=re.escape(message)):
            parse_args(base + flags)
    args = parse_args(base + ["--save", "d", "--load", "d", "--save-retain", "3",
                              "--ckpt-step", "4"])
    assert (args.save_retain, args.ckpt_step) == (3, 4)


def test_a_truncated_deepspeed_file_is_named_as_damaged_not_as_refused(tmp_path):
    from megatron_hypermoe.compat.deepspeed import load_deepspeed_file

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint file {path} cannot be read, it is truncated or damaged")):
        load_deepspeed_file(str(path))


# The trainer, in subprocesses -----------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_resumes_from_the_previous_one_exactly(tmp_path):
    """SIGKILL in the middle of writing iteration 4's checkpoint (DeepSpeed's files written,
    ours not yet): 'latest' stays on iteration 2, the .partial directory is never loaded, and a
    resumed run reproduces the killed run's iterations 3 and 4 exactly, then removes it."""
    save, marker = tmp_path / "ckpt", tmp_path / "stalled"
    common = [*RUN, "--train-iters", "6", "--save", str(save), "--save-interval", "2"]
    command = [sys.executable, str(WORKER), "stall", str(marker), "4", *common,
               "--metrics-file", str(tmp_path / "killed.jsonl")]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, env=environment(), stdout=log,
                                   stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not marker.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), (tmp_path / "killed.log").read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    partial = save / (tag_for(4) + ".partial")
    assert (partial / "mp_rank_00_model_states.pt").is_file()
    assert read_latest_tag(save) == tag_for(2) and complete_iterations(str(save)) == [2]
    output = pretrain(*common, "--load", str(save), "--metrics-file",
                      str(tmp_path / "resumed.jsonl"))
    assert "loaded" in output and "at iteration 2" in output
    killed, _ = read_metrics(tmp_path / "killed.jsonl")
    resumed, _ = read_metrics(tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in killed] == [1, 2, 3, 4]
    assert [r["iteration"] for r in resumed] == [3, 4, 5, 6]
    for a, b in zip(killed[2:], resumed):
        assert (a["lm_loss"], a["grad_norm"], a["lr"]) == (b["lm_loss"], b["grad_norm"], b["lr"])
    assert not partial.exists()
    assert complete_iterations(str(save)) == [2, 4, 6]


def _digests(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in directory.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_full_disk_during_a_save_stops_with_one_line_and_keeps_the_previous(tmp_path):
    """A file-size limit (ulimit -f) makes the next checkpoint's first file fail to write
    (EFBIG; Python ignores SIGXFSZ): exit 1 with one error line, 'latest' and the previous
    checkpoint byte-identical, no .partial directory left."""
    save = tmp_path / "ckpt"
    common = [*RUN, "--train-iters", "4", "--save", str(save)]
    pretrain(*common, "--exit-interval", "2")
    before = _digests(save / tag_for(2))

    def limit_file_size():  # the model states file is ~6 MB; RNG and metadata files < 100 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = subprocess.run(pretrain_command(1) + [*common, "--load", str(save),
                                                   "--save-interval", "1"],
                            env=environment(), capture_output=True, text=True, timeout=240,
                            preexec_fn=limit_file_size)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    (line,) = error_line(output)
    assert line.startswith(f"error: saving checkpoint iter_0000003 failed: rank 0 could not "
                           f"write {save / 'iter_0000003.partial'}/mp_rank_00_model_states.pt")
    assert line.endswith("'latest' still names iter_0000002: free space (or raise the "
                         "file-size limit) and resume")
    assert sorted(os.listdir(save)) == [tag_for(2), "latest", "latest_checkpointed_iteration.txt",
                                        "zero_to_fp32.py", "zero_to_torch.py"]
    assert _digests(save / tag_for(2)) == before


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_write_failing_on_one_rank_stops_every_rank_with_its_line(tmp_path):
    """Rank 1's optimizer file fails to write (ENOSPC), rank 0's writes succeed: both ranks
    still pass DeepSpeed's barriers, agree, and stop with rank 1's error; nothing is published
    (no hang, no 'latest', no .partial directory)."""
    save = tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(WORKER), "fail", "1", *RUN, "--train-iters", "2",
         "--zero-stage", "1", "--save", str(save), "--save-interval", "1"],
        env=environment(), capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    lines = error_line(output)
    assert len(lines) == 2 and lines[0] == lines[1], output[-3000:]
    assert lines[0].startswith(
        f"error: saving checkpoint iter_0000001 failed: rank 1 could not write "
        f"{save / 'iter_0000001.partial'}/zero_pp_rank_1_mp_rank_00_optim_states.pt (OSError: "
        "[Errno 28] No space left on device"), lines[0]
    assert lines[0].endswith("no checkpoint is saved yet: free space (or raise the file-size "
                             "limit) and resume")
    assert sorted(os.listdir(save)) == ["zero_to_fp32.py", "zero_to_torch.py"]


@pytest.mark.slow
def test_ckpt_step_resumes_the_previous_checkpoint_exactly_and_resaves_over_a_damaged_one(
        tmp_path):
    """The newest checkpoint's optimizer file truncated: --ckpt-step 2 resumes from iteration 2
    and reproduces iterations 3 and 4; saving into the same directory replaces the damaged
    iteration 4 (re-saving an iteration 'latest' names), and --save-retain 1 then drops 2."""
    save = tmp_path / "ckpt"
    common = [*RUN, "--train-iters", "4", "--save", str(save), "--save-interval", "2"]
    pretrain(*common, "--metrics-file", str(tmp_path / "full.jsonl"))
    damaged = save / tag_for(4) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(damaged, "r+b") as handle:
        handle.truncate(os.path.getsize(damaged) // 3)
    pretrain(*common, "--load", str(save), "--ckpt-step", "2", "--save-retain", "1",
             "--metrics-file", str(tmp_path / "resumed.jsonl"))
    full, _ = read_metrics(tmp_path / "full.jsonl")
    resumed, _ = read_metrics(tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in resumed] == [3, 4]
    assert [(r["lm_loss"], r["grad_norm"], r["lr"]) for r in resumed] == \
        [(r["lm_loss"], r["grad_norm"], r["lr"]) for r in full[2:]]
    assert sorted(os.listdir(save)) == [tag_for(4), "latest", "latest_checkpointed_iteration.txt",
                                        "zero_to_fp32.py", "zero_to_torch.py"]
    from megatron_hypermoe.compat.deepspeed import load_deepspeed_file

    load_deepspeed_file(str(damaged))  # whole again


# A damaged checkpoint, in process ---------------------------------------------------------------
def with_checkpoint(run, **fields):
    """``run`` with these --load/--ckpt-step... fields (configs are frozen)."""
    return dataclasses.replace(run, checkpoint=dataclasses.replace(run.checkpoint, **fields))


@pytest.fixture
def tiny_engine(megatron_single_process, tmp_path):
    from megatron_hypermoe.cli.arguments import parse_run_config
    from megatron_hypermoe.training.setup import build_engine, build_model

    save = str(tmp_path / "ckpt")
    run = parse_run_config([*RUN, "--train-iters", "1", "--save", save, "--load",
                            save]).with_vocab(64)
    engine, _ = build_engine(build_model(run), run)
    return engine, run


@pytest.mark.parametrize("name,damage", [
    ("mp_rank_00_model_states.pt", "truncate"),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "truncate"),
    ("rng_rank_00000.safetensors", "truncate"),
    ("hypermoe_checkpoint.json", "truncate"),
    ("mp_rank_00_model_states.pt", "zeros"),
])
def test_a_damaged_file_in_the_newest_checkpoint_is_named_with_the_step_to_load(
        name, damage, tiny_engine, tmp_path):
    from megatron_hypermoe.training.checkpoint.save_load import (
        TrainState,
        load_checkpoint,
        save_checkpoint,
    )

    engine, run = tiny_engine
    for iteration in (2, 4):
        save_checkpoint(engine, run, TrainState(iteration=iteration))
    path = tmp_path / "ckpt" / tag_for(4) / name
    size = os.path.getsize(path)
    if damage == "truncate":
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)
    else:
        path.write_bytes(bytes(size))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(engine, run)
    message = str(caught.value)
    assert str(path) in message and "truncated or damaged" in message, message
    assert message.endswith("pass --ckpt-step 2 to load the checkpoint of iteration 2 instead")
    assert "\n" not in message
    assert load_checkpoint(engine, with_checkpoint(run, ckpt_step=2)).iteration == 2


# A damaged file of the reshard path (layout_free/), resumed in another layout ---------------------
# A one-process ZeRO-1 checkpoint resumed under ZeRO-2 takes the reshard path: the cheapest layout
# change. Saved once per module (iterations 2 and 4, in process); each test damages a copy of 4.
RESHARD_TO = ["--zero-stage", "2"]


def _tiny_engine_as_the_trainer_builds_it(save, *flags):
    """The engine and config of ``pretrain_gpt_hypermoe.py RUN --save/--load save *flags`` (same
    padded vocabulary), so that the trainer's command line loads what it saves."""
    from megatron_hypermoe.cli.arguments import parse_run_config
    from megatron_hypermoe.data.tokenizer import build_tokenizer
    from megatron_hypermoe.training.setup import build_engine, build_model

    run = parse_run_config([*RUN, "--train-iters", "4", "--save", str(save), "--load",
                            str(save), *flags])
    run = run.with_vocab(build_tokenizer(run.tokenizer).vocab_size)
    engine, _ = build_engine(build_model(run), run)
    return engine, run


@pytest.fixture(scope="module")
def layout_free_saved(megatron_single_process, tmp_path_factory):
    from megatron_hypermoe.training.checkpoint.save_load import TrainState, save_checkpoint

    save = tmp_path_factory.mktemp("layout_free") / "ckpt"
    engine, run = _tiny_engine_as_the_trainer_builds_it(save)
    for iteration in (2, 4):
        save_checkpoint(engine, run, TrainState(iteration=iteration))
    assert (save / tag_for(4) / "layout_free" / "index.json").is_file()
    return save


@pytest.fixture(scope="module")
def resharding_engine(megatron_single_process, layout_free_saved):
    """An engine of the other layout (loads only set its weights: the checkpoint has no Adam
    state, so one engine serves every test)."""
    return _tiny_engine_as_the_trainer_builds_it(layout_free_saved, *RESHARD_TO)


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _undecodable_dtype(path):
    """One fp32 tensor's dtype in the header made one torch has not: safe_open takes the file,
    only reading that tensor fails."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    key, entry = next((k, v) for k, v in sorted(header.items()) if k.startswith("fp32/") and
                      (v["data_offsets"][1] - v["data_offsets"][0]) % 3 == 0)
    start, end = entry["data_offsets"]
    entry.update(dtype="F6_E2M3", shape=[(end - start) * 8 // 6])  # 6 bits an element
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])


def _without_layout(path):
    index = json.loads(path.read_text())
    del index["layout"]
    path.write_text(json.dumps(index))


LAYOUT_FREE_DAMAGE = {
    "dense_tp_rank_00.safetensors": _truncate,
    "experts_ep_rank_00000_tp_rank_00.safetensors": lambda p: p.write_bytes(
        bytes(os.path.getsize(p))),
    "index.json": _truncate,
    "index.json-zeros": lambda p: p.write_bytes(bytes(os.path.getsize(p))),
    "index.json-without-layout": _without_layout,
    "dense_tp_rank_00.safetensors-read-lazily": _undecodable_dtype,
    "experts_ep_rank_00000_tp_rank_00.safetensors-missing": os.remove,
    "index.json-missing": os.remove,
}


def _damage_a_copy(saved, tmp_path, case):
    """A copy of the saved checkpoints with ``layout_free/<file>`` of iteration 4 damaged as
    LAYOUT_FREE_DAMAGE[case] says; (load directory, damaged file, what the error says)."""
    load = tmp_path / "ckpt"
    shutil.copytree(saved, load)
    path = load / tag_for(4) / "layout_free" / case.split("-", 1)[0]
    LAYOUT_FREE_DAMAGE[case](path)
    said = str(CheckpointError.missing_file(str(path))) if case.endswith("-missing") else \
        f"checkpoint file {path} cannot be read, it is truncated or damaged"
    return load, path, said


@pytest.mark.parametrize("case", list(LAYOUT_FREE_DAMAGE))
def test_a_damaged_layout_free_file_is_named_with_the_step_to_load(case, layout_free_saved,
                                                                   resharding_engine, tmp_path,
                                                                   capsys):
    """The reshard path's files as the same-layout ones: a truncated, damaged (also where
    safetensors finds it only when the tensor is read) or missing file is one line naming it
    and the iteration to load instead, and that one loads."""
    from megatron_hypermoe.training.checkpoint.save_load import load_checkpoint

    engine, run = resharding_engine
    load, path, said = _damage_a_copy(layout_free_saved, tmp_path, case)
    run = with_checkpoint(run, load=str(load))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(engine, run)
    if case != "index.json-missing":  # (without its index, the path is not taken)
        assert "resharding from TP 1 EP 1 DP 1 ZeRO 1 to TP 1 EP 1 DP 1 ZeRO 2" in \
            capsys.readouterr().out
    message = str(caught.value)
    assert message.startswith(said), message
    assert message.endswith("pass --ckpt-step 2 to load the checkpoint of iteration 2 instead")
    assert "\n" not in message
    assert load_checkpoint(engine, with_checkpoint(run, ckpt_step=2)).iteration == 2


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dense_tp_rank_00.safetensors", "index.json"])
def test_the_trainer_resuming_in_another_layout_names_a_damaged_layout_free_file(
        case, layout_free_saved, tmp_path):
    """The same through the command line: exit 1, one error line, no traceback."""
    load, path, said = _damage_a_copy(layout_free_saved, tmp_path, case)
    result = subprocess.run(pretrain_command(1) + [*RUN, "--train-iters", "4", "--load",
                                                   str(load), *RESHARD_TO],
                            env=environment(), capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "resharding from TP 1 EP 1 DP 1 ZeRO 1 to TP 1 EP 1 DP 1 ZeRO 2" in output
    assert "Traceback" not in output
    (line,) = error_line(output)
    assert line.startswith(f"error: {said} (")
    assert line.endswith("pass --ckpt-step 2 to load the checkpoint of iteration 2 instead")

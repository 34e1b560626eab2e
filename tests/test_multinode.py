"""Two nodes simulated on one host, through the shipped scripts configured only by their
environment variables: one launcher per "node" (the deepspeed launcher with a two-line hostfile
and --no_ssh --node_rank, torchrun --nnodes 2 --node_rank, the SLURM script with a fake srun),
one process each, gloo, EP=2 across the nodes, against the same script run on one process."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_hypermoe.parallel.distributed import TIMEOUT_SECONDS_VARIABLE, free_port
from tests.support.processes import REPO_ROOT, environment, error_line
from tests.support.run_outputs import read_metrics, relative

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

MULTINODE = str(REPO_ROOT / "examples" / "pretrain_hypermoe_multinode.sh")
SLURM = str(REPO_ROOT / "examples" / "pretrain_hypermoe_slurm.sh")
ITERATIONS = 12
# The example's sizes, precision and schedule, shrunk to the tiny model (the script's own
# DeepSpeed config states bf16 and batch 256: DS_CONFIG= lets the trainer generate it).
TINY = dict(NUM_LAYERS="2", HIDDEN_SIZE="64", FFN_HIDDEN_SIZE="128", NUM_ATTENTION_HEADS="4",
            NUM_EXPERTS="4", SEQ_LENGTH="32", MICRO_BATCH_SIZE="2", GLOBAL_BATCH_SIZE="4",
            TRAIN_ITERS=str(ITERATIONS), LR="1e-3", LR_WARMUP_ITERS="2", LOG_INTERVAL="1",
            EVAL_INTERVAL="1000", EVAL_ITERS="1", PRECISION="fp32", DS_CONFIG="")
# (--split: the script's 969,30,1 leaves the tiny corpus's test split so short that megatron-core
# loops forever building it.)
TINY_HYPER = ["--hyper-adapter-dim", "8", "--hyper-hidden-size", "16", "--seed", "7",
              "--split", "90,10,0"]


def script_environment(dataset, run, **variables):
    data = dataset[dataset.index("--data-path") + 1]
    tokenizer = dataset[dataset.index("--tokenizer-model") + 1]
    bin_dir = os.path.dirname(sys.executable)  # the deepspeed launcher
    return {**environment(), **TINY, "DATA_PREFIX": data, "TOKENIZER": tokenizer,
            "RUN": str(run), "PYTHON": sys.executable, "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "PATH": f"{bin_dir}:{os.environ['PATH']}",
            **variables}


def start(script, env, *extra):
    """The script in the background, its output to a file (a pipe nobody reads would fill)."""
    log = open(os.path.join(env["RUN"] + f".{time.monotonic_ns()}.log"), "w+")
    os.makedirs(env["RUN"], exist_ok=True)
    process = subprocess.Popen(["bash", script, *TINY_HYPER, *extra], env=env, text=True,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log
    return process


def output_of(process, timeout=180):
    process.wait(timeout=timeout)
    process.log.seek(0)
    return process.log.read()


def finish(process, expect=0, timeout=180):
    output = output_of(process, timeout)
    assert process.returncode == expect, f"exit {process.returncode}:\n{output[-5000:]}"
    return output


def two_nodes(env, *extra, per_node=None, expect=0):
    """Both nodes' launchers at once (node n also gets ``per_node(n)``); their outputs."""
    nodes = [start(MULTINODE, {**env, "NODE_RANK": str(n)}, *extra,
                   *(per_node(n) if per_node else ())) for n in (0, 1)]
    return [finish(node, expect) for node in nodes]


def assert_no_trainer_traceback(output):
    """(torchrun's agent prints its own ChildFailedError traceback: not the trainer's.)"""
    assert 'pretrain_gpt_hypermoe.py", line' not in output, output[-5000:]


def assert_same_training(records, reference, first=1, last=ITERATIONS):
    assert [r["iteration"] for r in records] == list(range(first, last + 1))
    worst = 0.0
    for got in records:
        want = reference[got["iteration"] - 1]
        for key in ("lm_loss", "grad_norm", "lr"):
            worst = max(worst, relative(got[key], want[key]))
            assert relative(got[key], want[key]) < 1e-5, (key, got, want)
    return worst


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    """The same script on one node, one process (EP=1): the losses to reproduce."""
    run = tmp_path_factory.mktemp("one_process")
    env = script_environment(dataset, run, LAUNCHER="torchrun", NNODES="1", NODE_RANK="0",
                             GPUS_PER_NODE="1", EP="1")
    finish(start(MULTINODE, env))
    records, _ = read_metrics(run / "metrics.jsonl")
    assert len(records) == ITERATIONS and records[-1]["lm_loss"] < records[0]["lm_loss"]
    return records


def test_deepspeed_launchers_as_two_nodes_train_as_one_process_and_resume(dataset, one_process,
                                                                          tmp_path):
    """deepspeed --hostfile (two lines) --no_ssh --node_rank 0|1: EP=2 across the nodes equals
    one process. --save is shared. The first launch has a node-local --data-cache-path (a
    directory per node: node 1 cannot see rank 0's index cache and builds its own) and stops at
    iteration 6; the second, with the script's shared cache, resumes on both nodes."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = script_environment(dataset, tmp_path / "run", LAUNCHER="deepspeed",
                             HOSTFILE=str(hostfile), EP="2")

    def node_local_cache(node):
        return ["--data-cache-path", str(tmp_path / f"node{node}-cache")]

    first = two_nodes(env, "--exit-interval", "6", per_node=node_local_cache)
    assert "2 rank(s), TP 1, EP 2, DP 2" in first[0]
    assert "building this node's copy" in first[1] and "building" not in first[0]
    caches = [sorted(p.name for p in (tmp_path / f"node{n}-cache").iterdir()) for n in (0, 1)]
    assert caches[0] and caches[0] == caches[1]
    resumed = two_nodes(env)
    assert "resuming with the same layout" in resumed[0] and "at iteration 6" in resumed[0]
    assert "building" not in resumed[1]  # a shared cache: rank 0 builds it, node 1 reads it
    records, _ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    worst = assert_same_training(records, one_process)
    print(f"two deepspeed nodes vs one process: worst relative difference {worst:.1e}")


def test_node_local_save_is_refused_before_the_first_step(dataset, tmp_path):
    """torchrun --nnodes 2 --node_rank 0|1 with --save on each node's own disk: one line, exit 1
    on both nodes, no checkpoint written."""
    env = script_environment(dataset, tmp_path / "run", LAUNCHER="torchrun", NNODES="2",
                             GPUS_PER_NODE="1", EP="2")

    def node_local_save(node):
        save = str(tmp_path / f"node{node}-save")
        return ["--save", save, "--load", save]

    outputs = two_nodes(env, per_node=node_local_save, expect=1)
    for output in outputs:
        (line,) = error_line(output)
        assert "is not shared: rank(s) 1 cannot see" in line, line
        assert_no_trainer_traceback(output)
    for node in (0, 1):
        assert not any(p.name.startswith("iter_") for p in (tmp_path / f"node{node}-save")
                       .iterdir())


def trainer_of(job, rank: int) -> psutil.Process:
    """The trainer process of ``rank`` under a started script's process tree."""
    deadline = time.time() + 180
    while time.time() < deadline and job.poll() is None:
        for child in psutil.Process(job.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and \
                        any("pretrain_gpt_hypermoe.py" in part for part in child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no trainer of rank {rank} (exit {job.poll()}):\n"
                         f"{output_of(job)[-3000:]}")


def latest_iteration(save):
    try:
        return int((save / "latest").read_text().strip().split("_")[-1])
    except (FileNotFoundError, ValueError):
        return 0


def test_slurm_script_node_death_and_restart_on_one_node(dataset, one_process, tmp_path):
    """sbatch's script under a fake srun/scontrol that start its command once per "node": two
    torchruns (master address: the first host of the node list). Node 1's trainer is killed
    mid-run: node 0 exits within seconds with one line naming rank 1. Restarting the example on
    one node resumes from the last checkpoint (resharded EP=2 -> 1) to the one-process losses."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && '
                                   'printf "localhost\\nother-node\\n"\n')
    (fake / "srun").write_text(
        '#!/bin/bash\necho "srun $*" >> "$SRUN_LOG"\n'
        'while [ "${1#--}" != "$1" ]; do shift; done\n'
        'for node in 0 1; do SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!); done\n'
        'rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=1; done; exit $rc\n')
    for tool in ("scontrol", "srun"):
        (fake / tool).chmod(0o755)
    save = tmp_path / "run" / "checkpoints"
    env = script_environment(dataset, tmp_path / "run", EP="2", SAVE_INTERVAL="1",
                             GPUS_PER_NODE="1", SLURM_JOB_NODELIST="node[0-1]",
                             SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(REPO_ROOT),
                             SRUN_LOG=str(tmp_path / "srun.log"),
                             PATH=f"{fake}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    del env["MASTER_ADDR"]  # from the node list
    job = start(SLURM, env)
    try:
        survivor, victim = trainer_of(job, 0), trainer_of(job, 1)
        torchrun = survivor.parent().cmdline()  # the master address: the node list's first
        assert torchrun[torchrun.index("--master_addr") + 1] == "localhost", torchrun
        deadline = time.time() + 120
        while latest_iteration(save) < 3 and time.time() < deadline and job.poll() is None:
            time.sleep(0.05)
        assert 3 <= latest_iteration(save) < ITERATIONS - 1, "the run ended before the kill"
        killed = time.time()
        victim.kill()
        survivor.wait(timeout=60)
        survivor_exit = time.time() - killed
        output = output_of(job, timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c" in \
        (tmp_path / "srun.log").read_text()
    lines = error_line(output)
    assert lines and all("lost rank 1 (node 1" in line for line in lines), output[-3000:]
    assert_no_trainer_traceback(output)
    assert survivor_exit < 20, survivor_exit
    print(f"survivor exited {survivor_exit:.1f} s after node 1 was killed")

    # The two-node SLURM run itself, up to its last checkpoint, trained as one process does.
    last = latest_iteration(save)
    records, _ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    worst = assert_same_training(records[:last], one_process, last=last)
    print(f"two SLURM nodes vs one process, iterations 1-{last}: worst relative difference "
          f"{worst:.1e}")

    # The same example on the one node left: EP must divide its one process.
    env = script_environment(dataset, tmp_path / "run", LAUNCHER="torchrun", NNODES="1",
                             NODE_RANK="0", GPUS_PER_NODE="1", EP="1")
    output = finish(start(MULTINODE, env))
    assert "resharding from TP 1 EP 2 DP 2" in output and f"at iteration {last}" in output
    records, _ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    resumed = [r for r in records if r["iteration"] > last][-(ITERATIONS - last):]
    worst = assert_same_training(resumed, one_process, first=last + 1)
    print(f"restart on one node from iteration {last}: worst relative difference {worst:.1e}")


def test_silent_node_stops_the_job_at_the_distributed_timeout(dataset, tmp_path):
    """A node that stops answering without closing its connections (SIGSTOP: a hung machine):
    after the distributed timeout (3 s here, in seconds through the environment) without its
    heartbeat, or a collective timing out, the survivor stops with one line naming it. (The
    heartbeat's silence is counted from its last beat, up to a second before the stop.)"""
    env = script_environment(dataset, tmp_path / "run", LAUNCHER="torchrun", NNODES="2",
                             GPUS_PER_NODE="1", EP="2", TRAIN_ITERS="100000",
                             **{TIMEOUT_SECONDS_VARIABLE: "3"})
    nodes = [start(MULTINODE, {**env, "NODE_RANK": str(n)}) for n in (0, 1)]
    victim = None
    try:
        survivor, victim = trainer_of(nodes[0], 0), trainer_of(nodes[1], 1)
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        stopped = time.time()
        victim.send_signal(signal.SIGSTOP)
        survivor.wait(timeout=60)
        survivor_exit = time.time() - stopped
        output = output_of(nodes[0], timeout=60)
    finally:
        if victim is not None:
            with contextlib.suppress(psutil.Error):
                victim.kill()  # stopped, it outlives its launcher
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    lines = error_line(output)
    assert lines and all("lost rank 1 (node 1" in line for line in lines), output[-3000:]
    assert 1.5 < survivor_exit < 15, survivor_exit
    print(f"survivor exited {survivor_exit:.1f} s after node 1 went silent")


def test_a_lost_store_node_is_named_as_such(dataset, tmp_path):
    """Node 0 hosts the job's rendezvous store (torchrun's agent there): when that whole node
    goes (launcher and trainer killed), node 1 stops with one line naming node 0 and the store,
    not a connection error per collective."""
    env = script_environment(dataset, tmp_path / "run", LAUNCHER="torchrun", NNODES="2",
                             GPUS_PER_NODE="1", EP="2", TRAIN_ITERS="100000",
                             **{TIMEOUT_SECONDS_VARIABLE: "3"})
    nodes = [start(MULTINODE, {**env, "NODE_RANK": str(n)}) for n in (0, 1)]
    try:
        survivor = trainer_of(nodes[1], 1)
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        killed = time.time()
        os.killpg(nodes[0].pid, signal.SIGKILL)  # the node: its launcher (the store) and trainer
        survivor.wait(timeout=60)
        survivor_exit = time.time() - killed
        output = output_of(nodes[1], timeout=60)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    lines = error_line(output)
    assert lines and all("lost rank 0 (node 0" in line and "rendezvous store" in line
                         for line in lines), output[-3000:]
    assert_no_trainer_traceback(output)
    print(f"node 1 exited {survivor_exit:.1f} s after node 0 (with the store) was killed")

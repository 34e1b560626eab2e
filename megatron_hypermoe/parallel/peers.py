"""Which rank runs where, and which one is gone: a lost node reported in one line.

At setup every rank learns every rank's node, host and pid (one all_gather) and starts a
heartbeat: a daemon thread that counts its own key up once a second in the job's rendezvous
store (the TCPStore at MASTER_ADDR:MASTER_PORT that torchrun's agent or the deepspeed launcher's
rank 0 hosts). A rank whose count stops moving is gone (killed, crashed, its node down).

- After a failed step (gloo reports a killed peer at once, "Connection reset by peer"; a silent
  one when --distributed-timeout-minutes is up), :meth:`PeerWatch.lost_peer_error` watches the
  counts for a few beats: if some stood still, the failure is that peer's loss and becomes one
  line naming it; otherwise the original exception stands (a bug keeps its traceback).
- The thread also watches the next rank's count (a ring: one read per rank per beat, so the
  store's load grows with the rank count, not its square). Silent for the distributed timeout,
  that rank is declared lost in the store, and every rank's thread prints the line and ends its
  process: the exit is bounded even where no collective raises (NCCL's watchdog, DeepSpeed's
  groups, which keep torch's default timeout).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional

import torch.distributed as dist

from megatron_hypermoe.errors import PeerLost

HEARTBEAT_SECONDS = 1.0
# After a failure: a count that stands still this many beats belongs to a lost rank.
QUIET_BEATS = 3
KEY = "hypermoe/peers/"
# The launchers' node index: torchrun, the deepspeed launcher, SLURM.
NODE_VARIABLES = ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")


@dataclass(frozen=True)
class Peer:
    rank: int
    node: str
    host: str
    pid: int


def this_node() -> str:
    for variable in NODE_VARIABLES:
        if variable in os.environ:
            return os.environ[variable]
    return socket.gethostname()


def describe(peers: List[Peer]) -> str:
    nodes = sorted({p.node for p in peers}, key=str)
    ranks = ", ".join(str(p.rank) for p in peers)
    hosts = ", ".join(sorted({p.host for p in peers}))
    pids = ", ".join(str(p.pid) for p in peers)
    return (f"rank{'s' if len(peers) > 1 else ''} {ranks} (node {', '.join(nodes)}, "
            f"host {hosts}, pid {pids})")


def lost_message(peers: List[Peer], how: str) -> str:
    return (f"lost {describe(peers)}: {how}; every rank stops. Restart the job: --load resumes "
            "from the last complete checkpoint, in any layout (e.g. on the remaining nodes)")


def beat_key(rank: int) -> str:
    return f"{KEY}beat/{rank}"


class PeerWatch:
    """The heartbeat thread and the job's rank table (``dist`` must be up, world size > 1)."""

    def __init__(self, timeout: timedelta):
        self.rank, world = dist.get_rank(), dist.get_world_size()
        self.timeout = timeout.total_seconds()
        self.peers: List[Optional[Peer]] = [None] * world
        dist.all_gather_object(self.peers, Peer(self.rank, this_node(), socket.gethostname(),
                                                os.getpid()))
        self.address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        self.store = self._client()
        self.store.add(beat_key(self.rank), 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hypermoe-heartbeat", daemon=True)
        self._thread.start()

    def _client(self):
        return dist.TCPStore(*self.address, is_master=False, wait_for_workers=False,
                             timeout=timedelta(seconds=HEARTBEAT_SECONDS * QUIET_BEATS))

    def stop(self) -> None:
        """Before the job's last barrier: a store host leaving after it is no loss."""
        self._stop.set()
        self._thread.join()

    # The heartbeat thread ------------------------------------------------------------------------
    def _run(self) -> None:
        neighbour = (self.rank + 1) % len(self.peers)
        count, changed, store_failing_since = None, time.monotonic(), None
        while not self._stop.wait(HEARTBEAT_SECONDS):
            now = time.monotonic()
            if store_failing_since is not None:
                # Probe with a plain socket: every failed store call prints a C++ stack.
                if self._store_reachable():
                    self.store, store_failing_since = self._client(), None
                elif now - store_failing_since > self.timeout:
                    self._exit(self._store_lost_message())
                continue
            try:
                self.store.add(beat_key(self.rank), 1)
                if self.store.check([KEY + "lost"]):
                    self._exit(self.store.get(KEY + "lost").decode())
                latest = self.store.add(beat_key(neighbour), 0)
            except (RuntimeError, OSError):  # the store unreachable or timing out
                store_failing_since = now
                continue
            if latest != count:
                count, changed = latest, now
            elif now - changed > self.timeout:
                message = lost_message([self.peers[neighbour]],
                                       f"no heartbeat for {self.timeout:g} s")
                try:
                    self.store.set(KEY + "lost", message)
                except (RuntimeError, OSError):
                    pass
                self._exit(message)

    def _store_reachable(self) -> bool:
        try:
            socket.create_connection(self.address, timeout=HEARTBEAT_SECONDS * QUIET_BEATS).close()
            return True
        except OSError:
            return False

    def _exit(self, message: str) -> None:
        if not self._stop.is_set():
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(1)

    def _store_lost_message(self) -> str:
        """The store lives with rank 0's launcher (torchrun) or process (deepspeed launcher)."""
        gone = [p for p in self.peers if p.node == self.peers[0].node]
        return lost_message(gone, "the job's rendezvous store at "
                                  f"{self.address[0]}:{self.address[1]}, on that node, is gone")

    # After a failed step -------------------------------------------------------------------------
    def lost_peer_error(self, error: BaseException) -> Optional[PeerLost]:
        """The failure as a lost peer (one line), or None when every rank still beats."""
        world = range(len(self.peers))
        time.sleep(HEARTBEAT_SECONDS)  # a process being killed closes its sockets one by one
        if not self._store_reachable():
            return PeerLost(self._store_lost_message())
        try:
            store = self._client()
            before = [store.add(beat_key(r), 0) for r in world]
            time.sleep(HEARTBEAT_SECONDS * QUIET_BEATS)
            after = [store.add(beat_key(r), 0) for r in world]
        except (RuntimeError, OSError):  # the store unreachable or timing out
            return PeerLost(self._store_lost_message())
        lost = [self.peers[r] for r in world if r != self.rank and before[r] == after[r]]
        if not lost:
            return None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = reason.split("] ", 1)[-1].split(". ")[0][:120]
        return PeerLost(lost_message(lost, f"a collective of rank {self.rank} failed "
                                           f"({type(error).__name__}: {reason})"))

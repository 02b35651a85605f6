"""``launch='mpi'``: the script runs as N MPI ranks (``srun --mpi=pmi2``, ``mpiexec``).

Every rank runs the same script and constructs the same executor:

* rank 0 starts the scheduler in its own process, tells the other ranks its
  address, and returns from the constructor to run the user's code; only this
  one task is set aside from the workers (``dask_mpi.initialize`` sets aside
  two: one for the scheduler, one for the client);
* every other rank becomes a worker inside :meth:`MpiLauncher.start` and
  never returns: when the scheduler closes (rank 0's executor shuts down) the
  worker ends and the process exits with status 0 via ``sys.exit``, so code
  after the constructor only ever runs on rank 0. The worker ranks of each
  node form its pool (see ``_pool``): each is a member, which runs calls,
  and the node's lowest worker rank also runs the node's agent (see
  ``_agent``), a Dask worker, in a thread; so the scheduler handles one
  worker per node, and ranks that are only members never import Dask.

mpi4py is imported here only, so no other mode initialises MPI. The address
travels by point-to-point messages, which worker ranks poll for with a
deadline (``timeout``), so they do not block forever in MPI if rank 0 fails
before sending it; if rank 0 fails while starting, it sends the error instead.
Once running, a worker whose scheduler disappears (rank 0 killed) gives up
after its death timeout; since MPI_Finalize would then wait forever for the
dead rank 0, all ranks first meet at a barrier with a deadline, and a worker
rank that finds rank 0 missing exits with status 1 without finalizing.
SLURM's ``--kill-on-bad-exit=1`` ends the whole step sooner than that.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from ..config import ExecutorOptions
from ..slurm import SlurmAllocation
from ._network import require_reachable, scheduler_host
from ._resources import worker_flags
from .base import Cluster, Launcher
from .srun import min_workers_for

logger = logging.getLogger("sulis_executor")

#: MPI tag of the message from rank 0 carrying the scheduler address.
ADDRESS_TAG = 0x5D5C
#: MPI tag of the message from a node's agent rank carrying its pool's socket.
POOL_TAG = 0x5D5D
POLL_INTERVAL = 0.01
#: Seconds the ranks wait for each other at the end (see _finish_together).
FINISH_TIMEOUT = 15.0


def _finish_together(comm: Any, timeout: float) -> bool:
    """A barrier with a deadline; True if every rank reached it in time.

    MPI_Finalize (run by mpi4py at exit) waits for every rank, so a worker
    rank whose rank 0 has died would hang there forever. Meeting here first
    tells each rank whether finalizing is safe.

    The barrier is polled in a daemon thread and the deadline is kept here:
    with a dead peer, MPICH's TCP netmod can spend forever inside a single
    ``MPI_Test`` (seen: retrying the connection to the dead rank 0), so a
    deadline checked between ``Test`` calls never comes.
    """
    reached = threading.Event()

    def barrier() -> None:
        request = comm.Ibarrier()
        while not request.Test():
            time.sleep(POLL_INTERVAL)
        reached.set()

    threading.Thread(target=barrier, name="sulis-mpi-finish", daemon=True).start()
    return reached.wait(timeout)


def _exit_if_stuck(seconds: float) -> None:
    """The last resort for a worker rank: if MPI code holding the GIL keeps
    even the deadline above from running, faulthandler's own C thread ends
    the process (status 1) after ``seconds``."""
    import faulthandler

    faulthandler.dump_traceback_later(seconds, exit=True, file=open(os.devnull, "w"))


class MpiLauncher(Launcher):
    name = "mpi"

    def __init__(self, options: ExecutorOptions, security: object = None) -> None:
        self._options = options
        self._security = security
        self._cluster: Any = None
        self.rank: int | None = None
        self.size: int | None = None

    def start(self, timeout: float) -> Cluster:
        try:
            from mpi4py import MPI
        except ImportError as error:
            raise RuntimeError(
                "launch='mpi' needs mpi4py (pip install 'sulis-executor[mpi]' or "
                f"load your site's mpi4py module); importing it failed: {error}"
            ) from None
        comm = MPI.COMM_WORLD
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        if self.size < 2:
            raise RuntimeError(
                "launch='mpi' needs at least 2 MPI ranks (rank 0 runs the scheduler and your "
                f"code, the others are workers) but this MPI world has {self.size}; start the "
                "script with 'srun --mpi=pmi2 python script.py' or 'mpiexec -n N python "
                "script.py', or use launch='local'"
            )
        # The ranks on this node (every rank takes part, at the same point).
        node_ranks = comm.Split_type(MPI.COMM_TYPE_SHARED).allgather(self.rank)
        if self.rank != 0:
            self._serve_as_worker(comm, timeout, sorted(r for r in node_ranks if r != 0))  # never returns
        return self._start_scheduler(comm, timeout)

    # -- rank 0 -----------------------------------------------------------

    def _start_scheduler(self, comm: Any, timeout: float) -> Cluster:
        from ._scheduler import start_scheduler

        options = self._options
        try:
            host = scheduler_host(options.interface)
            allocation = _allocation()
            if allocation is not None:  # the ranks' nodes, when SLURM started them
                require_reachable(host, options.interface, allocation.nodes)
            self._cluster = start_scheduler(options, self._security, host)
            from .._security import credentials_of, process_authkey

            # multiprocessing's key, for Manager proxies passed to calls.
            message: dict[str, Any] = {"address": self._cluster.scheduler_address,
                                       "authkey": process_authkey()}
            if self._security is not None:
                # MPI messages reach our own ranks only: no file needed.
                message["credentials"] = credentials_of(self._security)
        except BaseException as error:
            # Tell the workers, so they exit instead of waiting for an address.
            message = {"error": f"rank 0 could not start the scheduler: {error!r}"}
            self._send_to_workers(comm, message)
            raise
        self._send_to_workers(comm, message)
        assert self.size is not None
        expected = self.size - 1
        members = min_workers_for(options.wait_for_workers, expected)
        return Cluster(
            target=self._cluster,
            security=self._security,
            expected_workers=1,  # the nodes' agents: at least one
            min_workers=1,
            expected_members=members,
            description=f"an MPI world of {self.size} ranks ({expected} workers)",
            workers_reachable=True,
        )

    def _send_to_workers(self, comm: Any, message: dict[str, Any]) -> None:
        assert self.size is not None
        requests = [comm.isend(message, dest=rank, tag=ADDRESS_TAG) for rank in range(1, self.size)]
        # The messages are tiny, so they complete without the receivers
        # (eager protocol); waiting here keeps their buffers alive until then.
        for request in requests:
            request.wait()

    # -- ranks 1..N-1 -----------------------------------------------------

    def _receive_address(self, comm: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not comm.iprobe(source=0, tag=ADDRESS_TAG):
            if time.monotonic() > deadline:
                return {"error": self._no_address_error(timeout)}
            time.sleep(POLL_INTERVAL)
        message: dict[str, Any] = comm.recv(source=0, tag=ADDRESS_TAG)
        return message

    def _no_address_error(self, timeout: float) -> str:
        waited = (f"MPI rank {self.rank} waited {timeout:g} s for rank 0 to send the scheduler "
                  "address, and none came")
        if "dask_mpi" in sys.modules:
            # Its initialize() keeps rank 0 as the scheduler, which never gets here.
            return (f"{waited}: dask_mpi.initialize() ran, so rank 0 runs dask-mpi's scheduler "
                    "and never constructs SulisDaskExecutor. Leave launch= at 'auto' (or use "
                    "launch='attach') to join dask-mpi's cluster, or drop initialize() and let "
                    "the executor use every rank")
        return (f"{waited}: rank 0 has not constructed SulisDaskExecutor (in the MPI mode every "
                "rank must, at the same point): check rank 0's output for an error before it, "
                "or raise timeout= if it is only slow to get there")

    def _agent_argv(self, address: str) -> list[str]:
        return [
            address,
            "--name", f"mpi-{self.rank}",
            # If rank 0 dies the scheduler is gone for good: give up after
            # this long rather than keep the allocation busy.
            "--death-timeout", str(max(10.0, self._options.timeout)),
            *worker_flags(self._options, _allocation()),
        ]

    def _serve_as_worker(self, comm: Any, timeout: float, node_workers: list[int]) -> None:
        from .. import worker

        message = self._receive_address(comm, timeout)
        if "error" in message:
            print(f"sulis_executor: {message['error']}", file=sys.stderr, flush=True)
            sys.exit(1)
        if message.get("authkey"):
            worker.adopt_authkey(message["authkey"])
        if self.rank == node_workers[0]:
            status = self._serve_as_agent(comm, message, node_workers)
        else:
            pool = self._receive_pool(comm, node_workers[0], timeout)
            status = self._serve_as_member(pool, message)
        _exit_if_stuck(FINISH_TIMEOUT + 10)
        if not _finish_together(comm, FINISH_TIMEOUT):
            # Rank 0 is gone (the scheduler vanished and it never reached the
            # final barrier): MPI_Finalize would wait for it forever.
            print(f"sulis_executor: MPI rank {self.rank}: the scheduler on rank 0 went away "
                  "and rank 0 did not finish with the other ranks (did it die?); exiting "
                  "without MPI_Finalize", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        # The user's code after the constructor is rank 0's alone.
        sys.exit(status)

    def _serve_as_agent(self, comm: Any, message: dict[str, Any], node_workers: list[int]) -> int:
        """The node's agent (in a thread: a Dask worker feeding the pool),
        and one of its members (here)."""
        import tempfile

        from .. import worker

        security = None
        if "credentials" in message:
            from .._security import security_from

            security = security_from(message["credentials"])
        pool = os.path.join(tempfile.mkdtemp(prefix="sulis-node-"), "pool")
        for follower in node_workers[1:]:
            comm.send(pool, dest=follower, tag=POOL_TAG)
        argv = [*self._agent_argv(message["address"]), "--pool", str(len(node_workers)),
                "--pool-socket", pool]
        outcome: list[int] = []
        agent = threading.Thread(
            target=lambda: outcome.append(worker.main(argv, die_with_parent=False, security=security)),
            name="sulis-executor-agent", daemon=True)
        agent.start()
        self._serve_as_member(pool, message)
        agent.join(FINISH_TIMEOUT)
        import shutil

        shutil.rmtree(os.path.dirname(pool), ignore_errors=True)
        return outcome[0] if outcome else 1

    def _receive_pool(self, comm: Any, agent: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not comm.iprobe(source=agent, tag=POOL_TAG):
            if time.monotonic() > deadline:
                print(f"sulis_executor: MPI rank {self.rank} waited {timeout:g} s for the node's "
                      f"agent, rank {agent}, to start; check its output for errors",
                      file=sys.stderr, flush=True)
                sys.exit(1)
            time.sleep(POLL_INTERVAL)
        path: str = comm.recv(source=agent, tag=POOL_TAG)
        return path

    @staticmethod
    def _serve_as_member(pool: str, message: dict[str, Any]) -> int:
        from .. import _pool

        def security() -> Any:
            if "credentials" not in message:
                return None
            from .._security import security_from

            return security_from(message["credentials"])

        return _pool.serve(pool, "", None, _pool.MemberWorker(message["address"], security))

    def close(self, timeout: float) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is None:
            return
        deadline = time.monotonic() + timeout
        # Closing the scheduler tells every worker rank to exit.
        cluster.close(timeout=timeout)
        from mpi4py import MPI

        if not _finish_together(MPI.COMM_WORLD, max(1.0, min(FINISH_TIMEOUT, deadline - time.monotonic()))):
            logger.warning("not every MPI worker rank finished within the deadline; "
                           "MPI_Finalize at exit may wait for them")

    def dashboard_link(self) -> str | None:
        if self._cluster is None or not self._options.dashboard:
            return None
        link: str = self._cluster.dashboard_link
        return link


def _allocation() -> SlurmAllocation | None:
    try:
        return SlurmAllocation.from_environ(os.environ)
    except ValueError:
        return None

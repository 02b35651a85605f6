"""A node of an ``srun`` cluster: ``python -m sulis_executor._node - [OPTIONS]``.

The ``srun`` step runs one of these per node. It imports Dask once, then
forks the node's agent (a Dask worker, see ``_agent``) and its pool's
members, one per CPU of each SLURM task of the node (``nthreads`` per task;
see ``_pool``), so a node of 128 tasks pays for one import of Dask, not 128, and for one connection to the
scheduler. It stays single-threaded, to fork safely, and replaces a member
that exits (it died, or it ran ``max_tasks_per_child`` tasks) for as long as
the agent runs; when the agent ends (its scheduler closed, or a signal), it
hangs up on the members, which exit, and exits with the agent's status.

SIGTERM and SIGINT (``scancel``, the executor's ``terminate_workers``) go
on to the agent and every member; a second SIGTERM kills them.

The scheduler's address and the job's secrets (TLS credentials,
``multiprocessing``'s key) come as one JSON line on standard input once the
imports are done (``srun --input=all`` forwards the launcher's to every
node); the agent and the members get them in memory, through the fork.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import sys
import tempfile
from typing import Any

from ._forkserver import _fork, _import_what_workers_use, _read_nonblocking, _single_threaded_after_a_fork
from ._signals import unblock_signals
from .worker import _die_with_parent


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m sulis_executor._node", add_help=True)
    parser.add_argument("--members-per-node", required=True,
                        help="members of each node's pool, comma-separated, in the step's node "
                             "order (SLURM_NODEID picks this node's)")
    parser.add_argument("--max-tasks", type=int, default=None,
                        help="a member leaves after this many tasks (max_tasks_per_child)")
    # Everything else is the agent's: ``python -m sulis_executor.worker``'s arguments.
    return parser.parse_known_args(argv)


def members_on_this_node(spec: str, environ: dict[str, str]) -> int:
    counts = [int(part) for part in spec.split(",")]
    if len(counts) == 1:
        return counts[0]
    return counts[int(environ.get("SLURM_NODEID", "0"))]


class _Node:
    def __init__(self, members: int, agent_argv: list[str], pool: str, max_tasks: int | None,
                 secrets: dict[str, Any]) -> None:
        self.members = members
        self.agent_argv = agent_argv
        self.pool = pool
        self.max_tasks = max_tasks
        self.secrets = secrets
        self.agent: int | None = None
        self.children: set[int] = set()
        self.stopping = False
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only wakes the loop
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def run(self) -> Any:
        """Fork the agent and the members, then watch them until the agent
        ends: its exit status; in a forked child, what the child runs."""
        child = self._fork(self._agent) or None
        if child is not None:
            return child
        for _ in range(self.members):
            child = self._fork(self._member)
            if child is not None:
                return child
        while True:
            select.select([self.wake_read], [], [])
            while _read_nonblocking(self.wake_read):
                pass
            status, child = self._reap()
            if child is not None:
                return child
            if status is not None:
                return status

    def _fork(self, become: Any) -> Any:
        """Fork a child that runs ``become()``; in the child, return what it
        runs (after the loop unwinds, as a fresh interpreter would)."""
        pid = _fork()
        if pid == 0:
            return self._in_child(become)
        self.children.add(pid)
        if become == self._agent:
            self.agent = pid
        return None

    def _in_child(self, become: Any) -> Any:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.close(self.wake_read)
        os.close(self.wake_write)
        _die_with_parent()  # with this node process
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()  # each its own numbers, as a fresh process
        return become

    def _agent(self) -> int:
        from . import worker
        from ._security import security_from

        if self.secrets.get("authkey"):
            worker.adopt_authkey(self.secrets["authkey"])
        credentials = self.secrets.get("credentials")
        security = security_from(credentials) if credentials else None
        argv = [*self.agent_argv, "--pool", str(self.members), "--pool-socket", self.pool]
        return worker.main(argv, die_with_parent=False, security=security)

    def _member(self) -> int:
        from . import _pool, worker
        from ._security import security_from

        if self.secrets.get("authkey"):
            worker.adopt_authkey(self.secrets["authkey"])
        credentials = self.secrets.get("credentials")
        cluster = _pool.MemberWorker(
            self.agent_argv[0], lambda: security_from(credentials) if credentials else None)
        _pool.end_member_process(_pool.serve(self.pool, "", self.max_tasks, cluster))
        return 0  # not reached

    def _reap(self) -> tuple[int | None, Any]:
        """Reap what exited: ``(the agent's exit status, None)`` once it has
        ended and so have the members; ``(None, child)`` in a forked child."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self.children.discard(pid)
            if pid == self.agent:
                self.agent_status = os.waitstatus_to_exitcode(status)
                self._stop(signal.SIGTERM)
            elif not self.stopping and os.waitstatus_to_exitcode(status) != 0:
                # Died, or retired (max_tasks): another takes its place. One
                # that exited 0 left because the agent hung up: the node is
                # closing, and a new one would wait for the pool in vain.
                child = self._fork(self._member)
                if child is not None:
                    return None, child
        if self.stopping and not self.children:
            return max(0, getattr(self, "agent_status", 0)), None
        return None, None

    def _stop(self, signum: int) -> None:
        """Stop replacing members, and pass ``signum`` on to every child."""
        self.stopping = True
        for pid in self.children:
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stopping and signum == signal.SIGTERM:
            self._stop(signal.SIGKILL)  # a second SIGTERM: at once
            return
        self._stop(signum)


def main(argv: list[str] | None = None) -> int:
    unblock_signals()
    args, agent_argv = _parse(sys.argv[1:] if argv is None else argv)
    _die_with_parent()
    members = members_on_this_node(args.members_per_node, dict(os.environ))
    # Dask first, while the launcher starts the scheduler; then its greeting.
    _import_what_workers_use()
    if not _single_threaded_after_a_fork():
        print("sulis_executor._node: threads after importing Dask; forking is unsafe",
              file=sys.stderr)
        return 1
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the launcher gave up before the scheduler started
    secrets: dict[str, Any] = json.loads(line)
    agent_argv[0] = secrets["scheduler"]
    gc.freeze()  # keep the imports out of the children's collections (see _forkserver)
    directory = tempfile.mkdtemp(prefix="sulis-node-")  # mode 0700: this user's only
    try:
        outcome = _Node(members, agent_argv, os.path.join(directory, "pool"), args.max_tasks,
                        secrets).run()
        if callable(outcome):  # a forked child: run it, then exit as a process does
            return int(outcome())
        return int(outcome)
    finally:
        if os.path.isdir(directory) and not _is_child():
            import shutil

            shutil.rmtree(directory, ignore_errors=True)


_parent_pid = os.getpid()


def _is_child() -> bool:
    return os.getpid() != _parent_pid


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())

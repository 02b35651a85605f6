"""Start an executor, make it work, and report every socket its processes listen on.

    python tests/open_ports_probe.py OUT_DIR [EXECUTOR_OPTIONS_JSON]

Run by ``tests/test_open_ports.py`` (in a network namespace of its own, with
the comms on a non-loopback interface) and by the SLURM tests. Writes
``OUT_DIR/report.json``:

* ``comms``: the scheduler's address and the workers', as the scheduler
  knows them (the TLS comm ports);
* ``environ_holders``: every process on this machine whose environment
  (``/proc/PID/environ``, which keeps what the process started with even
  after it unsets a variable) holds any of the job's secrets: a line of the
  TLS private key, or the ``multiprocessing`` key given to the workers;
* ``processes``: for each process the executor started (this one, which runs
  the scheduler and the client; its descendants: fork server, local workers,
  ``srun``; and every worker, wherever it runs), its command line and the
  ``[host, port]`` of each listening TCP socket or bound UDP socket.

Under MPI every rank runs this script; each first notes the sockets MPI
itself opened (``OUT_DIR/mpi-PID.json``), which are MPI's, not ours, as
``srun``'s I/O ports are SLURM's. Rank 0 alone writes the report.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

Address = tuple[str, int]


def listening(pid: int) -> list[Address]:
    """The addresses process ``pid`` accepts connections or datagrams on.

    Read from ``/proc/PID/net/*``, which shows the network namespace of that
    process (psutil reads this process's), matched to its open sockets.
    """
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found: set[Address] = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except FileNotFoundError:
            continue
        for row in rows:
            local, remote, state, inode = row[1], row[2], row[3], row[9]
            listens = state == "0A" if table.startswith("tcp") else remote.endswith(":0000")
            if listens and inode in inodes:
                found.add(_decode(local))
    return sorted(found)


def _decode(hex_address: str) -> Address:
    """``0100007F:1F90`` (as in /proc/net/tcp) -> ``("127.0.0.1", 8080)``."""
    hex_ip, hex_port = hex_address.split(":")
    raw = bytes.fromhex(hex_ip)
    # Each 32-bit word is in the host's byte order (little-endian here).
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(hex_port, 16)


def secrets_of(ex: object) -> list[bytes]:
    """What must never be in an environment: each base64 line of the
    cluster's private key (a line survives JSON or shell quoting), and
    ``multiprocessing``'s key, as the launchers send it (hex)."""
    import multiprocessing

    key = getattr(ex.client.security, "tls_client_key", None) or ""  # type: ignore[attr-defined]
    lines = [line.encode() for line in key.splitlines() if line and not line.startswith("-----")]
    return [*lines, bytes(multiprocessing.current_process().authkey).hex().encode()]


def environ_holders(secrets: list[bytes]) -> list[str]:
    """``PID command`` of every process whose environment holds a secret."""
    holders = []
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            if any(secret in environ for secret in secrets):
                holders.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())}")
        except (OSError, psutil.Error):  # gone, or not ours to read
            continue
    return holders


def _pid() -> int:
    return os.getpid()


def _pid_after(_: int) -> int:
    import time

    time.sleep(0.01)  # stands for work, so that the calls spread over the members
    return os.getpid()


def host_port(address: str) -> Address:
    """``tls://10.77.0.1:4000`` -> ``("10.77.0.1", 4000)``."""
    host, _, port = address.split("://")[-1].rpartition(":")
    return host.strip("[]"), int(port)


def open_doors(report: dict[str, Any], not_ours: Callable[[str], bool] = lambda cmdline: False) -> list[str]:
    """Listening sockets in a report that are neither a TLS comm port nor on
    loopback; MPI's own (opened before the executor existed) and those of
    processes ``not_ours`` (by command line) aside."""
    comms = {host_port(address) for address in report["comms"]}
    doors = []
    for pid, process in report["processes"].items():
        if not_ours(process["cmdline"]):
            continue
        mpi_own = {tuple(a) for a in report["mpi_sockets"].get(pid, [])}
        for host, port in process["listening"]:
            if (host, port) in comms or (host, port) in mpi_own:
                continue
            if not ipaddress.ip_address(host).is_loopback:
                doors.append(f"{host}:{port} in {pid} ({process['cmdline']})")
    return doors


def main(out: Path, options: dict[str, object]) -> None:
    mpi = "PMI_RANK" in os.environ or "PMI_SIZE" in os.environ
    if mpi:
        from mpi4py import MPI  # noqa: F401  (MPI_Init: its own sockets open now)

        (out / f"mpi-{os.getpid()}.json").write_text(json.dumps(listening(os.getpid())))
    from sulis_executor import SulisDaskExecutor

    with SulisDaskExecutor(**options) as ex:  # type: ignore[arg-type]
        # Work done: every worker has connected, run tasks and sent results.
        assert list(ex.map(abs, range(-40, 0))) == list(range(40, 0, -1))
        info = ex.client.scheduler_info(n_workers=-1)
        comms = [info["address"], *info["workers"]]
        # The nodes' agents (Dask's workers), and the pools' members, which
        # run the calls (under MPI, ranks: not this process's children).
        agent_pids = set(ex.client.run(_pid).values())
        member_pids = set(ex.map(_pid_after, range(4 * ex.num_workers)))
        me = psutil.Process()
        pids = {me.pid, *(child.pid for child in me.children(recursive=True)), *agent_pids, *member_pids}
        processes = {}
        for pid in sorted(pids):
            try:
                cmdline = " ".join(psutil.Process(pid).cmdline())
            except psutil.NoSuchProcess:
                continue
            processes[pid] = {"cmdline": cmdline, "listening": listening(pid)}
        mpi_sockets = {}
        for path in out.glob("mpi-*.json"):
            mpi_sockets[int(path.stem.split("-")[1])] = json.loads(path.read_text())
        report = {"comms": comms, "agent_pids": sorted(agent_pids), "member_pids": sorted(member_pids),
                  "environ_holders": environ_holders(secrets_of(ex)),
                  "processes": processes, "mpi_sockets": mpi_sockets}
        (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})

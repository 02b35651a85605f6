"""Network helpers shared by the launch modes: which address to bind.

On a cluster the scheduler must listen where workers on other nodes can
reach it, and on Sulis that is usually a named interface (``ib0``). A typo in
that name would otherwise surface much later as workers that never arrive,
so it is checked up front, listing the interfaces this node really has.

Only the comms listen there, with TLS. Dask also gives the scheduler and
every worker a plain-HTTP server, without authentication; unless the
dashboard is asked for, it listens on loopback only and serves ``/health``
alone (:data:`HTTP_HOST`, :data:`HEALTH_ROUTES`), not Dask's info pages
(worker logs, call stacks), JSON and Prometheus metrics.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence

__all__ = ["HEALTH_ROUTES", "HTTP_HOST", "interface_addresses", "require_reachable",
           "scheduler_host", "validate_interface"]

#: Where the HTTP servers of the scheduler (dashboard off) and of the workers
#: listen, whatever address the comms bind: nothing on another node needs
#: them, and on the cluster network they would be open to anyone.
HTTP_HOST = "127.0.0.1"
#: What those servers serve, for Dask's ``distributed.*.http.routes``.
HEALTH_ROUTES = ("distributed.http.health",)


def interface_addresses() -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses (possibly none), on this node."""
    import psutil  # a dependency of distributed

    return {
        name: [a.address for a in addrs if a.family == socket.AF_INET]
        for name, addrs in psutil.net_if_addrs().items()
    }


def _describe(interfaces: dict[str, list[str]]) -> str:
    return ", ".join(
        f"{name} ({', '.join(ips) if ips else 'no IPv4 address'})"
        for name, ips in sorted(interfaces.items())
    )


def validate_interface(name: str) -> str:
    """Return the IPv4 address of interface ``name``.

    Raises ``ValueError`` naming the interfaces that do exist when ``name`` is
    unknown or has no IPv4 address (Dask comms need one).
    """
    interfaces = interface_addresses()
    if name not in interfaces:
        raise ValueError(
            f"network interface {name!r} does not exist on {socket.gethostname()}; "
            f"available interfaces: {_describe(interfaces)}. "
            "Pass one of these as interface= (or SULIS_EXECUTOR_INTERFACE), "
            "or leave it unset to use the address of the default route"
        )
    if not interfaces[name]:
        raise ValueError(
            f"network interface {name!r} on {socket.gethostname()} has no IPv4 address; "
            f"available interfaces: {_describe(interfaces)}. Choose one with an address"
        )
    return interfaces[name][0]


def scheduler_host(interface: str | None) -> str:
    """The address a scheduler for remote workers should bind.

    The named interface's address when one is given (validated), otherwise
    the address this node uses to reach the outside world, which is what
    other nodes of the same cluster can normally reach too. Never loopback by
    default: workers on other nodes could not connect to it.
    """
    if interface:
        return validate_interface(interface)
    from distributed.utils import get_ip

    return get_ip()


def require_reachable(host: str, interface: str | None, nodes: Sequence[str]) -> None:
    """Refuse a loopback scheduler address when workers run on other nodes.

    Each node's loopback is its own: a worker on another node that dials
    ``127.0.0.1`` reaches its own node, where no scheduler listens, and
    retries until it times out, so the executor would only fail at its
    start-up timeout with workers missing. ``nodes`` are the nodes the
    workers run on (this one among them, or not: a ``salloc`` shell runs on
    the login node); with this node alone, loopback is fine. Raises
    ``ValueError`` naming the interface and the way out.
    """
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        return  # a host name: nothing to tell
    here = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    others = [node for node in dict.fromkeys(nodes) if node != here]
    if not loopback or not others:
        return
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    if interface:
        chosen = f"network interface {interface!r} (interface= or SULIS_EXECUTOR_INTERFACE) has"
    else:
        chosen = "no interface is named (interface= or SULIS_EXECUTOR_INTERFACE), and this node's"
        chosen += " default address is"
    raise ValueError(
        f"{chosen} the loopback address {host}: a scheduler bound there on {here} cannot be "
        f"reached by the workers on the job's other nodes ({shown}), since every node's "
        "loopback is its own, so they would never connect. Set interface= (or "
        "SULIS_EXECUTOR_INTERFACE) to an interface on the network the nodes share (on Sulis, "
        f"ib0); interfaces on {here}: {_describe(interface_addresses())}"
    )

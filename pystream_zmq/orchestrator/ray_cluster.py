"""The Ray side of ``parallelize(cluster=...)`` that is not about one worker: importing Ray
(an optional extra, with a message that says how to get it), connecting, and which
addresses the links use.

Addresses. On a cluster whose nodes are all on this machine (every node's address is
this driver's, or a loopback address) the links stay on loopback, as a local pipeline's
over tcp: a node whose address is this machine's binds 127.0.0.1, one with a loopback
address of its own (127.0.0.2, ...) binds that. Across hosts, each worker binds its node's
address (Ray's ``NodeManagerAddress``) and the orchestrator binds this driver's (or the
host of ``parallelize(endpoint="tcp://HOST")``), and the rule of a local tcp pipeline holds:
no address other hosts can reach without ``curve=True``, unless ``insecure=True``.

The run's CURVE key pair, and the control channel's, reach the actors as arguments of Ray
calls. Across hosts those travel in Ray's gRPC, which is plaintext unless Ray's TLS is on
(``RAY_USE_TLS=1``): a multi-host run is refused without it, unless ``insecure=True``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from types import ModuleType

from pystream_zmq.errors import SecurityError

RAY = "ray"  # cluster="ray": the current connection (else RAY_ADDRESS, or `ray start`'s)
INSTALL_HINT = "pip install 'pystream-zmq[ray]'"
LOOPBACK = "127.0.0.1"


def import_ray() -> ModuleType:
    """The ``ray`` module; ImportError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            f"parallelize(cluster=...) runs the workers on a Ray cluster, and Ray is not "
            f"installed: {INSTALL_HINT}"
        ) from e
    return ray


def connect(cluster: str) -> bool:
    """Connect this process to the cluster ``cluster`` names (see module docstring); True
    when this call made the connection (then the launcher ends it at close)."""
    ray = import_ray()
    if ray.is_initialized():
        if cluster != RAY:
            raise ValueError(
                f"this process is already connected to a Ray cluster (ray.init()): pass "
                f"cluster='ray' to use it, not {cluster!r}"
            )
        return False
    try:
        ray.init(address="auto" if cluster == RAY else cluster, logging_level="WARNING")
    except ConnectionError as e:
        raise ConnectionError(
            f"parallelize(cluster={cluster!r}): no Ray cluster to connect to ({e}); call "
            "ray.init() first, set RAY_ADDRESS, or pass the cluster's address"
        ) from e
    return True


@dataclass(frozen=True)
class Addresses:
    """Which addresses the links use (see the module docstring)."""

    driver: str  # this process's own address, as Ray knows it
    one_host: bool  # every node is on this machine
    orchestrator: str  # the host the orchestrator binds (its endpoint="tcp://HOST")

    def node_host(self, node_address: str) -> str:
        """The host a worker on the node at ``node_address`` binds."""
        if self.one_host and not _is_loopback(node_address):
            return LOOPBACK
        return node_address

    def check_keys_travel(self, *, insecure: bool) -> None:
        """Refuse to hand the run's secret keys to actors over plaintext gRPC between hosts."""
        if self.one_host or insecure or _ray_tls():
            return
        raise SecurityError(
            "the Ray cluster spans several hosts, and the run's CURVE secret keys would reach "
            "the actors in Ray's plaintext gRPC: turn Ray's TLS on (RAY_USE_TLS=1 and its "
            "certificates, docs/ray.md), or pass insecure=True"
        )


def addresses(endpoint_host: str | None) -> Addresses:
    """The cluster's addresses, read from the connection; ``endpoint_host``: the host of
    ``parallelize(endpoint=...)``, if given."""
    ray = import_ray()
    driver = ray.util.get_node_ip_address()
    nodes = [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
    one_host = all(address == driver or _is_loopback(address) for address in nodes)
    default = LOOPBACK if one_host else driver
    return Addresses(driver, one_host, default if endpoint_host is None else endpoint_host)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _ray_tls() -> bool:
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")

"""Where a parallel pipeline's processes meet: ``ipc://`` files in the orchestrator's private
directory (the default), or ``tcp://`` on one host of this machine with ports the OS chooses
(``parallelize(endpoint="tcp://HOST")``), under CURVE with ``curve=True``.

The control channel is under CURVE over tcp whatever ``curve`` says: any local user can
connect to a tcp port, and its commands reach the stage objects. A key pair of its own,
made for the run, which the workers get over their private stdin pipe: they alone can
connect. Over ipc the socket folder (mode 0700) keeps everyone else out.

A tcp port is known only once its socket has bound ``tcp://HOST:*`` (it reads LAST_ENDPOINT):
``record`` notes it, and a process can connect only to what is bound already, so the
orchestrator starts its workers from the last one to the first.
"""

from __future__ import annotations

import os
from typing import Any

import zmq

from pystream_zmq.wire import endpoints, security, transport

CONTROL = "control"  # the control channel's link name
_HINT = "pass curve=True (encrypted, authenticated links) or insecure=True"


def check(endpoint: str | None, *, curve: bool = False, insecure: bool = False) -> str | None:
    """The tcp host of ``parallelize(endpoint=...)`` (an IPv6 address in brackets); None for
    ipc (``endpoint=None``). SecurityError (a ValueError) for a host other machines can
    reach without ``curve`` or ``insecure``."""
    if endpoint is None:
        return None
    try:
        parsed = endpoints.parse(endpoint)
        host_alone = parsed.scheme == endpoints.TCP and parsed.port is None  # the OS's ports
        if not host_alone or parsed.host == endpoints.ANY_HOST:  # workers connect to it
            raise ValueError(endpoint)
    except ValueError:
        raise ValueError(
            f"endpoint must be 'tcp://HOST', an address of this machine (the ports are chosen "
            f"by the OS), or None for ipc files; not {endpoint!r}"
        ) from None
    security.check_bind(f"{endpoint}:*", secured=curve, insecure=insecure, hint=_HINT)
    return parsed.url_host


class Links:
    """Names the orchestrator's endpoints ("control", "profile", "in0.0-0", "sink-0", ...)."""

    def __init__(self, directory: str, host: str | None, curve: bool) -> None:
        self._dir = directory
        self.host = host
        self._bound: dict[str, str] = {}
        self.curve = security.run_keys(os.path.join(directory, "curve")) if curve else None
        self.control_curve = self.curve  # the control channel's; see the module docstring
        if self.curve is None and host is not None:
            self.control_curve = security.run_keys(os.path.join(directory, "control-curve"))

    @property
    def bind_first(self) -> bool:
        """Whether a socket must bind before its peers are told where to connect (tcp)."""
        return self.host is not None

    def endpoint(self, name: str) -> str:
        """Where ``name`` is bound; not bound yet, where to bind it."""
        if name in self._bound:
            return self._bound[name]
        if self.host is None:
            return transport.ipc_endpoint(self._dir, name)
        return f"tcp://{self.host}:*"

    def bind_control(self, sock: zmq.Socket[Any]) -> None:
        """Bind the control channel's ROUTER, under ``control_curve``."""
        self.record(CONTROL, security.bind(sock, self.endpoint(CONTROL), self.control_curve))

    def record(self, name: str, endpoint: str) -> None:
        """Note where ``name`` was bound (a worker reports it with READY)."""
        self._bound[name] = endpoint

    def bound(self) -> dict[str, str]:
        """{name: endpoint} of every link bound so far (over ipc: every one recorded)."""
        return dict(self._bound)

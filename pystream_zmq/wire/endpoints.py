"""ZeroMQ endpoints, parsed in one place for every part of the package that reads one.

Forms: ``tcp://HOST:PORT``, or ``tcp://HOST`` alone where the ports are the OS's choice
(``parallelize(endpoint=...)``); HOST is ``*`` (every interface), an IPv6 address in
brackets, or an IPv4 address, host or interface name (ASCII letters, digits, ``_.-``);
PORT is 1-65535 or ``*`` (the OS chooses). Any other transport is ``SCHEME://ADDRESS``
(``ipc://PATH``, ``inproc://NAME``, ...), its address not read further. Which forms a caller
accepts is the caller's rule; this module only says what an endpoint is made of.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TCP = "tcp"
IPC = "ipc"
INPROC = "inproc"
ANY_HOST = "*"  # bind on every interface
ANY_PORT = 0  # "*": the OS chooses the port, as port 0 means to bind()

_FORM = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.+)")
# The IPv6 address keeps its brackets here; Endpoint.host is without them.
_TCP_ADDRESS = re.compile(r"(\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\*|[0-9]{1,5}))?")


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "tcp", "ipc", "inproc", ...
    host: str | None = None  # tcp: ANY_HOST, an address (IPv6 without brackets) or a name
    port: int | None = None  # tcp: 1-65535, ANY_PORT for "*", None when the text has none
    path: str | None = None  # other transports: everything after SCHEME://

    @property
    def is_ipv6(self) -> bool:
        return self.host is not None and ":" in self.host

    @property
    def url_host(self) -> str | None:
        """The host as an endpoint writes it: an IPv6 address in brackets."""
        return f"[{self.host}]" if self.is_ipv6 else self.host


def address(host: str, port: int | str) -> str:
    """``HOST:PORT`` as an endpoint (or a URL) writes it: an IPv6 ``host`` in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse(text: str) -> Endpoint:
    """The parts of ``text``; ValueError saying what is wrong with it."""
    form = _FORM.fullmatch(text)
    if form is None:
        raise ValueError(f"{text!r} is not an endpoint (SCHEME://ADDRESS, e.g. tcp://HOST:PORT)")
    scheme, address = form.groups()
    if scheme != TCP:
        return Endpoint(scheme, path=address)
    tcp = _TCP_ADDRESS.fullmatch(address)
    if tcp is None:
        raise ValueError(f"{text!r} is not tcp://HOST:PORT (HOST: *, [IPv6], an address or name)")
    host, port = tcp.group(1).strip("[]"), tcp.group(2)
    if port is None:
        return Endpoint(TCP, host=host)
    if port == "*":
        return Endpoint(TCP, host=host, port=ANY_PORT)
    if not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port {port} is not in 1-65535")
    return Endpoint(TCP, host=host, port=int(port))

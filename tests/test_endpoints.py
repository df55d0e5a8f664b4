"""wire/endpoints.py: the one endpoint parser behind pystream-worker's options,
parallelize(endpoint=...) and the loopback rule of wire/security.py."""

from __future__ import annotations

import pytest

from pystream_zmq.wire import endpoints
from pystream_zmq.wire.endpoints import ANY_PORT, Endpoint


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp://127.0.0.1:5700", Endpoint("tcp", host="127.0.0.1", port=5700)),
        ("tcp://*:*", Endpoint("tcp", host="*", port=ANY_PORT)),
        ("tcp://[::1]:65535", Endpoint("tcp", host="::1", port=65535)),
        ("tcp://camera-host_1.lan", Endpoint("tcp", host="camera-host_1.lan")),
        ("ipc:///tmp/a b", Endpoint("ipc", path="/tmp/a b")),
        ("inproc://wake-1", Endpoint("inproc", path="wake-1")),
        ("pgm://eth0;239.1.1.1:5", Endpoint("pgm", path="eth0;239.1.1.1:5")),
    ],
)  # fmt: skip
def test_parse(text: str, expected: Endpoint) -> None:
    assert endpoints.parse(text) == expected


def test_an_ipv6_host_is_written_in_brackets() -> None:
    assert endpoints.parse("tcp://[fd00::2]").url_host == "[fd00::2]"
    assert endpoints.parse("tcp://[fd00::2]").is_ipv6
    assert endpoints.parse("tcp://10.0.0.1:5").url_host == "10.0.0.1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp:/127.0.0.1:5", "is not an endpoint"),
        ("ipc://", "is not an endpoint"),
        ("tcp://::1:5", "is not tcp://HOST:PORT"),
        ("tcp://h:x", "is not tcp://HOST:PORT"),
        ("tcp://h:5 ", "is not tcp://HOST:PORT"),
        ("tcp://h:0", "port 0 is not in 1-65535"),
        ("tcp://h:70000", "port 70000 is not in 1-65535"),
    ],
)  # fmt: skip
def test_what_is_not_an_endpoint(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        endpoints.parse(text)

"""tcp across hosts and CURVE: real worker processes and sockets.

The "hosts" are loopback addresses (127.0.0.2 for one, 127.0.0.3 for another): they need no
privilege. Where this user may create network namespaces (root with CAP_NET_ADMIN), one
more test puts a worker in its own namespace, joined to this one by a veth pair, so it binds
an address that is not loopback, as on a real second host.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq
import zmq.auth
from click.testing import CliRunner

from pystream_zmq import cli, security


# -- binding an address other hosts can reach ------------------------------------------------
@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("tcp://127.0.0.1:5", True), ("tcp://127.3.4.5:5", True), ("tcp://[::1]:5", True),
        ("tcp://localhost:5", True), ("tcp://LocalHost:*", True), ("ipc:///tmp/x", True),
        ("tcp://*:5", False), ("tcp://0.0.0.0:5", False), ("tcp://[::]:5", False),
        ("tcp://10.0.0.1:5", False), ("tcp://[fd00::2]:5", False), ("tcp://eth0:5", False),
        ("tcp://lo:5", False), ("tcp://camera-host:5", False), ("pgm://eth0;239.1.1.1:5", False),
    ],
)  # fmt: skip
def test_what_counts_as_loopback(endpoint: str, expected: bool) -> None:
    assert security.is_loopback(endpoint) is expected


# -- key files -------------------------------------------------------------------------------
def test_keys_generate_writes_private_secrets_and_never_overwrites(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "keys"
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        result = CliRunner().invoke(cli.main, ["keys", "generate", str(folder), "camera", "gpu"])
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert folder.stat().st_mode & 0o777 == 0o700
    for name in ("camera", "gpu"):
        assert (folder / f"{name}.key_secret").stat().st_mode & 0o777 == 0o600
        assert (folder / f"{name}.key").stat().st_mode & 0o777 == 0o644
        public, secret = security.load_key_pair(folder / f"{name}.key_secret")
        assert zmq.curve_public(secret) == public  # a real key pair
        assert zmq.auth.load_certificate(folder / f"{name}.key") == (public, None)
    assert sorted(os.listdir(folder)) == ["camera.key", "camera.key_secret", "gpu.key",
                                          "gpu.key_secret"]  # fmt: skip

    before = (folder / "gpu.key_secret").read_bytes()
    result = CliRunner().invoke(cli.main, ["keys", "generate", str(folder), "gpu"])
    assert result.exit_code == 1
    assert "keys exist, not overwritten" in result.output and "--force" in result.output
    assert (folder / "gpu.key_secret").read_bytes() == before
    result = CliRunner().invoke(cli.main, ["keys", "generate", str(folder), "gpu", "--force"])
    assert result.exit_code == 0, result.output
    assert (folder / "gpu.key_secret").read_bytes() != before
    assert (folder / "gpu.key_secret").stat().st_mode & 0o777 == 0o600

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    result = CliRunner().invoke(cli.main, ["keys", "generate", str(shared), "x"])
    assert result.exit_code == 1 and "other users can open it (mode 0755)" in result.output
    assert not list(shared.iterdir())

"""The CURVE settings of a ``pystream-worker`` process, from its command line (the options
are in cli/options.py; what they do, in wire/security.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from pystream_zmq.errors import SecurityError
from pystream_zmq.wire import security

_HINT = "give --curve-secret and --curve-allow (keys: `pystream keys generate`), or --insecure"


def settings(
    opts: dict[str, Any], binds: Sequence[str], pushes: Sequence[str], profile: str | None = None
) -> security.Curve | None:
    """The CURVE settings from the command line, None for plaintext. A process binds as a
    CURVE server (``binds``) and connects as a client (``pushes``, ``profile``); without
    CURVE, an address other hosts can reach is bound only with --insecure."""
    secret_file, allow = opts.get("curve_secret"), opts.get("curve_allow")
    server_files: Sequence[str] = opts.get("curve_server_key") or ()
    try:
        if secret_file is None:
            if server_files or allow:
                raise click.UsageError(
                    "--curve-server-key and --curve-allow need --curve-secret (this process's "
                    "own key pair)"
                )
            insecure = bool(opts.get("insecure"))
            for endpoint in binds:
                security.check_bind(endpoint, secured=False, insecure=insecure, hint=_HINT)
            return None
        public, secret = security.load_key_pair(secret_file)
        if binds:
            if allow is None:
                raise click.UsageError(
                    "--curve-secret needs --curve-allow DIR, the client keys allowed to "
                    "connect to what this process binds (CURVE alone accepts any client key)"
                )
            security.check_allow_dir(allow)
        server_keys: dict[str, bytes] = {}
        if pushes:
            if len(server_files) not in (1, len(pushes)):
                raise click.UsageError(
                    "--curve-secret needs --curve-server-key FILE, the public key of the "
                    "process --push connects to: one for each --push, or one for all"
                )
            keys = [security.load_public_key(file) for file in server_files]
            server_keys = {push: keys[min(i, len(keys) - 1)] for i, push in enumerate(pushes)}
        if profile is not None:
            if not opts.get("curve_profile_key"):
                raise click.UsageError(
                    "--profile with --curve-secret needs --curve-profile-key FILE (the sink's "
                    "public key)"
                )
            server_keys[profile] = security.load_public_key(opts["curve_profile_key"])
        return security.Curve(public, secret, allow=allow, server_keys=server_keys)
    except SecurityError as e:
        raise click.UsageError(str(e)) from e

"""``pystream keys``: CURVE key pairs for ``pystream-worker`` links across hosts."""

from __future__ import annotations

import re
import socket

import click

from pystream_zmq.errors import SecurityError
from pystream_zmq.wire import security


@click.group()
def keys() -> None:
    """CURVE key pairs for links across hosts (see README "Across hosts")."""


@keys.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Overwrite existing keys of the same names.")
def generate(directory: str, names: tuple[str, ...], force: bool) -> None:
    """Write a key pair per NAME (default: this host's name) into DIRECTORY: NAME.key, the
    public key, to share; NAME.key_secret, the secret key, mode 0600, for that host only.
    A new DIRECTORY is created with mode 0700; existing keys are kept unless --force."""
    try:
        pairs = security.generate(directory, names or (_host_name(),), force=force)
    except SecurityError as e:
        raise click.ClickException(str(e)) from e
    for public, secret in pairs:
        click.echo(f"{public}: public key (--curve-server-key, --curve-allow)")
        click.echo(f"{secret}: secret key, mode 0600 (--curve-secret)")


def _host_name() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname().partition(".")[0])
    return name.lstrip("._-") or "host"

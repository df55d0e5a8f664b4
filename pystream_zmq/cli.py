"""The ``pystream`` command: tools around pipelines (subcommands are added by later work)."""

from __future__ import annotations

import click

from .keys_cli import keys
from .procfile import procfile_command
from .profile_cli import profile, top


@click.group()
@click.version_option(package_name="pystream-zmq")
def main() -> None:
    """pystream_zmq tools."""


main.add_command(profile)
main.add_command(top)
main.add_command(procfile_command)
main.add_command(keys)

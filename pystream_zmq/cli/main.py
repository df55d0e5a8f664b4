"""The ``pystream`` command: tools around pipelines (profiles, Procfiles, CURVE keys)."""

from __future__ import annotations

import click

from pystream_zmq.cli.keys import keys
from pystream_zmq.cli.procfile import procfile_command
from pystream_zmq.cli.profile import profile, top


@click.group()
@click.version_option(package_name="pystream-zmq")
def main() -> None:
    """pystream_zmq tools."""


main.add_command(profile)
main.add_command(top)
main.add_command(procfile_command)
main.add_command(keys)

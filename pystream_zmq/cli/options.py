"""The options of ``pystream-worker``, each defined once: a decorator per option, stacked by
the roles that take it (see cli/worker.py). Every option can also be set by the environment
variable its help names (``PYSTREAM_PULL``, ...), so a Procfile or unit file can set it once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from pystream_zmq.profiling import store
from pystream_zmq.stage import MAIN_PIPELINE_NAME
from pystream_zmq.wire import codec, endpoints, formats, transport

_F = TypeVar("_F", bound=Callable[..., Any])

DRAIN_TIMEOUT = 2.5  # below honcho's 5 s between SIGTERM and SIGKILL
# The sink's drain outlasts the stages', so that their end-of-stream markers still arrive.
SINK_DRAIN_TIMEOUT = 3.0


class _EndpointType(click.ParamType):
    """``tcp://HOST:PORT`` (PORT may be ``*``) or ``ipc://PATH``."""

    name = "endpoint"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            parsed = endpoints.parse(text)
            if parsed.scheme not in (endpoints.TCP, endpoints.IPC) or (
                parsed.scheme == endpoints.TCP and parsed.port is None
            ):
                raise ValueError(text)
        except ValueError:
            self.fail(f"{text!r} is not tcp://HOST:PORT or ipc://PATH", param, ctx)
        return text


_ENDPOINT = _EndpointType()


class _HostPortType(click.ParamType):
    """``HOST:PORT`` (``[HOST]:PORT`` for IPv6), as (host, port); PORT 0: a free one."""

    name = "host:port"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        host, _, port = str(value).rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not port.isdigit() or int(port) > 65535:
            self.fail(f"{value!r} is not HOST:PORT", param, ctx)
        return host, int(port)


HOST_PORT = _HostPortType()


def stack(*decorators: Callable[[_F], _F]) -> Callable[[_F], _F]:
    """Several options as one decorator, in --help in the order given."""

    def decorate(f: _F) -> _F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return decorate


def _option(*decls: str, envvar: str, **kwargs: Any) -> Callable[[_F], _F]:
    return click.option(*decls, envvar=envvar, show_envvar=True, show_default=True, **kwargs)


verbose = click.option(
    "-v",
    "--verbose",
    is_flag=True,
    envvar="PYSTREAM_VERBOSE",
    help="Debug logs, and tracebacks with errors.",
)

# -- links -----------------------------------------------------------------------------------
pull = _option(
    "--pull",
    envvar="PYSTREAM_PULL",
    type=_ENDPOINT,
    multiple=True,
    help="Endpoint to bind for the input; one per replica of the stage before.",
)
ordered = _option(
    "--ordered/--unordered",
    envvar="PYSTREAM_ORDERED",
    default=True,
    help="With several --pull (one per upstream replica): merge them in input order.",
)
port = _option(
    "--port",
    envvar="PORT",
    type=click.IntRange(1, 65535),
    help="Without --pull, bind tcp://127.0.0.1:PORT (honcho sets PORT).",
)
push = _option(
    "--push",
    envvar="PYSTREAM_PUSH",
    type=_ENDPOINT,
    required=True,
    multiple=True,
    help="Endpoint of the next process's input, to connect to; one per replica of the "
    "next stage (items go to the next one with room).",
)
input_format = _option(
    "--input-format",
    envvar="PYSTREAM_INPUT_FORMAT",
    type=click.Choice(formats.FORMATS),
    default=formats.PYSTREAM,
    help="msgpack-numpy: the input comes from a program outside PyStream, one msgpack frame "
    "per item (msgpack.packb(item, default=msgpack_numpy.encode)), numbered here.",
)
output_format = _option(
    "--output-format",
    envvar="PYSTREAM_OUTPUT_FORMAT",
    type=click.Choice(formats.FORMATS),
    default=formats.PYSTREAM,
    help="msgpack-numpy: send each output as one msgpack-numpy frame, to a program outside "
    "PyStream (it gets items only, no end-of-stream or dropped markers).",
)
hwm = _option(
    "--hwm",
    envvar="PYSTREAM_HWM",
    type=click.IntRange(min=1),
    default=transport.DEFAULT_HWM,
    help="Queue bound per link, in messages.",
)


def drain_timeout(default: float) -> Callable[[_F], _F]:
    return _option(
        "--drain-timeout",
        envvar="PYSTREAM_DRAIN_TIMEOUT",
        type=click.FloatRange(min=0),
        default=default,
        help="On a stop signal, how long to wait for the items in flight, in seconds "
        "(honcho kills after 5 s).",
    )


# -- what to run -----------------------------------------------------------------------------
param_pairs = _option(
    "--param",
    "param_pairs",
    envvar="PYSTREAM_PARAM",
    multiple=True,
    metavar="NAME=VALUE",
    help="One keyword argument (JSON or text).",
)
params_json = _option(
    "--params",
    "params_json",
    envvar="PYSTREAM_PARAMS",
    metavar="JSON",
    help="Keyword arguments for ATTR, a JSON object.",
)
factory = _option(
    "--factory",
    envvar="PYSTREAM_FACTORY",
    is_flag=True,
    help="ATTR is a factory: call it with the params to get the object.",
)
name = _option(
    "--name", envvar="PYSTREAM_NAME", help="Name in profiles and logs (default: from ATTR)."
)
native_threads = _option(
    "--native-threads",
    envvar="PYSTREAM_NATIVE_THREADS",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Size this process's native thread pools (OpenCV, BLAS, OpenMP) to N threads; "
    "0 leaves them alone. Several processes on one machine: its CPUs divided among them.",
)

# -- stage -----------------------------------------------------------------------------------
profile = _option(
    "--profile",
    envvar="PYSTREAM_PROFILE",
    type=_ENDPOINT,
    help="Send profile events to this endpoint (the sink's --profile-pull).",
)
replica = _option(
    "--replica",
    envvar="PYSTREAM_REPLICA",
    type=click.IntRange(min=0),
    help="Which replica of its stage this process is (profiles count each apart).",
)
max_age = _option(
    "--max-age",
    envvar="PYSTREAM_MAX_AGE",
    type=click.FloatRange(min=0, min_open=True),
    help="Drop items older than this many seconds (since the source sent them) on arrival.",
)
drop_policy = _option(
    "--drop-policy",
    envvar="PYSTREAM_DROP_POLICY",
    type=click.Choice(transport.LINK_POLICIES),
    default=transport.BLOCK,
    help="block: take items in order; latest: process only the newest waiting, drop the rest.",
)
max_message_bytes = _option(
    "--max-message-bytes",
    envvar="PYSTREAM_MAX_MESSAGE_BYTES",
    type=click.IntRange(min=1),
    default=codec.DEFAULT_MAX_MESSAGE_BYTES,
    help="Refuse input messages over this size (a bigger frame drops its sender).",
)

# -- source ----------------------------------------------------------------------------------
period = _option(
    "--period",
    envvar="PYSTREAM_PERIOD",
    type=click.FloatRange(min=0),
    default=0.01,
    help="Seconds between two items.",
)
count = _option(
    "--count",
    envvar="PYSTREAM_COUNT",
    type=click.IntRange(min=0),
    help="Send this many items, then wait to be stopped (default: no limit).",
)

# -- sink ------------------------------------------------------------------------------------
profile_pull = _option(
    "--profile-pull",
    envvar="PYSTREAM_PROFILE_PULL",
    type=_ENDPOINT,
    help="Bind this endpoint for the workers' profile events and store them.",
)
profile_dir = _option(
    "--profile-dir",
    envvar=store.PROFILE_DIR_ENV,
    type=click.Path(file_okay=False),
    help="Folder of profiles.sqlite3 (default: as `pystream profile` reads).",
)
run_name = _option(
    "--run-name",
    envvar="PYSTREAM_RUN_NAME",
    default=MAIN_PIPELINE_NAME,
    help="The run's name in the profile database (pystream profile --list).",
)
stages = _option(
    "--stages",
    envvar="PYSTREAM_STAGES",
    default="",
    help="Comma-separated stage names to register for profiles (Stage1,Child__StageA).",
)
save_latest = _option(
    "--save-latest",
    envvar="PYSTREAM_SAVE_LATEST",
    type=click.Path(dir_okay=False),
    help="Write the latest image output to this file (any format cv2.imwrite knows).",
)
image_key = _option(
    "--image-key",
    envvar="PYSTREAM_IMAGE_KEY",
    help="Key of the image in output dicts (default: the first uint8 image).",
)
live_view = _option(
    "--live-view",
    envvar="PYSTREAM_LIVE_VIEW",
    type=HOST_PORT,
    metavar="HOST:PORT",
    help="Serve the outputs' images and the figures (per stage with --profile-pull) to a "
    "browser at http://HOST:PORT/ (PORT 0: a free one, logged); a HOST other than "
    "loopback needs --insecure.",
)
report_every = _option(
    "--report-every",
    envvar="PYSTREAM_REPORT_EVERY",
    type=click.FloatRange(min=0.01),
    default=2.0,
    help="Seconds between progress reports.",
)

# -- CURVE: the process's key pair, the server keys of what it connects to, the client keys
# allowed to connect to what it binds (see wire/security.py) ---------------------------------
curve_secret = _option(
    "--curve-secret",
    envvar="PYSTREAM_CURVE_SECRET",
    type=click.Path(exists=True, dir_okay=False),
    metavar="FILE",
    help="This process's key pair (NAME.key_secret, mode 0600): CURVE encryption "
    "and authentication on every socket.",
)
curve_server_key = _option(
    "--curve-server-key",
    envvar="PYSTREAM_CURVE_SERVER_KEY",
    type=click.Path(exists=True, dir_okay=False),
    multiple=True,
    metavar="FILE",
    help="With --curve-secret: the public key (NAME.key) of the process --push "
    "connects to; one per --push, or one for all.",
)
curve_allow = _option(
    "--curve-allow",
    envvar="PYSTREAM_CURVE_ALLOW",
    type=click.Path(exists=True, file_okay=False),
    metavar="DIR",
    help="With --curve-secret: the client public keys (NAME.key files) allowed to "
    "connect to the endpoints this process binds.",
)
insecure = _option(
    "--insecure",
    envvar="PYSTREAM_INSECURE",
    is_flag=True,
    help="Bind an address other hosts can reach without CURVE (anyone who can "
    "reach it can read and inject items).",
)
curve_profile_key = _option(
    "--curve-profile-key",
    envvar="PYSTREAM_CURVE_PROFILE_KEY",
    type=click.Path(exists=True, dir_okay=False),
    metavar="FILE",
    help="With --curve-secret and --profile: the public key of the sink.",
)

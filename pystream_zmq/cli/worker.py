"""``pystream-worker``: one pipeline role per OS process (source, stage, serial
sub-pipeline, sink), wired by ZeroMQ endpoints; see README "Pipelines as services".

Every option has an environment variable (``PYSTREAM_PULL``, ...). Errors in the command
line or in ``MODULE:ATTR`` give one line and an exit code below (a traceback too with
``--verbose``). SIGTERM/SIGINT (and SIGQUIT, which honcho's supervisord export sends) drain
the items in flight and exit 0; a second one exits at once with 128 + the signal number.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import zmq

from pystream_zmq.cli.loader import LoadError, build, default_name, load, parse_params
from pystream_zmq.pipeline import Pipeline
from pystream_zmq.profiling import store
from pystream_zmq.stage import MAIN_PIPELINE_NAME, PATH_SEPARATOR, check_stage_name
from pystream_zmq.wire import codec, security, transport
from pystream_zmq.worker import standalone
from pystream_zmq.worker.spec import WorkerSpec

log = logging.getLogger(__name__)

EXIT_OK = 0  # finished, or stopped by a signal after draining
EXIT_RUNTIME = 1  # failed while running
EXIT_USAGE = 2  # bad command line: unknown option, malformed endpoint or value
EXIT_IMPORT = 3  # MODULE:ATTR cannot be imported, is not callable, or cannot be built
EXIT_ADDRESS = 4  # an endpoint cannot be bound or connected (e.g. port already in use)
# A second SIGTERM/SIGINT exits at once with 128 + its number (143 / 130), as shells do.

_CURVE_HINT = (
    "give --curve-secret and --curve-allow (keys: `pystream keys generate`), or --insecure"
)
_ENDPOINT = re.compile(r"(tcp://(\*|\[[0-9A-Fa-f:.]+\]|[\w.-]+):(\*|\d{1,5})|ipc://.+)")
_F = TypeVar("_F", bound=Callable[..., Any])


class _Endpoint(click.ParamType):
    name = "endpoint"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        match = _ENDPOINT.fullmatch(text)
        port = match.group(3) if match else None
        if not match or (port not in (None, "*") and not 0 < int(port) < 65536):
            self.fail(f"{text!r} is not tcp://HOST:PORT or ipc://PATH", param, ctx)
        return text


ENDPOINT = _Endpoint()


class _LoadFailed(click.ClickException):
    exit_code = EXIT_IMPORT


class _AddressFailed(click.ClickException):
    exit_code = EXIT_ADDRESS


class _WorkerGroup(click.Group):
    """Errors as one line, ``pystream-worker: error: ...``, instead of click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.ClickException as e:
            click.echo(f"pystream-worker: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            sys.exit(EXIT_USAGE)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


@click.group(cls=_WorkerGroup)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    envvar="PYSTREAM_VERBOSE",
    help="Debug logs, and tracebacks with errors.",
)
@click.version_option(package_name="pystream-zmq")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Run one role of a pipeline in this process."""
    ctx.obj = verbose


# -- shared options --------------------------------------------------------------------------
def _opt(*decls: str, envvar: str, **kwargs: Any) -> Callable[[_F], _F]:
    kwargs.setdefault("show_envvar", True)
    return click.option(*decls, envvar=envvar, **kwargs)


def _pull_options(f: _F) -> _F:
    f = _opt(
        "--port",
        envvar="PORT",
        type=click.IntRange(1, 65535),
        help="Without --pull, bind tcp://127.0.0.1:PORT (honcho sets PORT).",
    )(f)
    f = _opt(
        "--ordered/--unordered",
        envvar="PYSTREAM_ORDERED",
        default=True,
        help="With several --pull (one per upstream replica): merge them in input order.",
    )(f)
    return _opt(
        "--pull",
        envvar="PYSTREAM_PULL",
        type=ENDPOINT,
        multiple=True,
        help="Endpoint to bind for the input; one per replica of the stage before.",
    )(f)


def _push_option(f: _F) -> _F:
    return _opt(
        "--push",
        envvar="PYSTREAM_PUSH",
        type=ENDPOINT,
        required=True,
        multiple=True,
        help="Endpoint of the next process's input, to connect to; one per replica of the "
        "next stage (items go to the next one with room).",
    )(f)


def _build_options(f: _F) -> _F:
    f = _opt(
        "--factory",
        envvar="PYSTREAM_FACTORY",
        is_flag=True,
        help="ATTR is a factory: call it with the params to get the object.",
    )(f)
    f = _opt(
        "--params",
        "params_json",
        envvar="PYSTREAM_PARAMS",
        metavar="JSON",
        help="Keyword arguments for ATTR, a JSON object.",
    )(f)
    return _opt(
        "--param",
        "param_pairs",
        envvar="PYSTREAM_PARAM",
        multiple=True,
        metavar="NAME=VALUE",
        help="One keyword argument (JSON or text).",
    )(f)


def _run_options(f: _F) -> _F:
    f = _opt(
        "--hwm",
        envvar="PYSTREAM_HWM",
        type=click.IntRange(min=1),
        default=transport.DEFAULT_HWM,
        help="Queue bound per link, in messages.",
    )(f)
    f = _opt(
        "--drain-timeout",
        envvar="PYSTREAM_DRAIN_TIMEOUT",
        default=2.5,
        type=click.FloatRange(min=0),
        help="On a stop signal, how long to wait for the items in flight (honcho kills after 5 s).",
    )(f)
    return _opt(
        "--name", envvar="PYSTREAM_NAME", help="Name in profiles and logs (default: from ATTR)."
    )(f)


def _curve_options(*, binds: bool, connects: bool) -> Callable[[_F], _F]:
    """CURVE on every socket of the process: its own key pair, the server keys of what it
    connects to, the client keys allowed to connect to what it binds (see security.py)."""

    def decorate(f: _F) -> _F:
        if binds:
            f = _opt(
                "--insecure",
                envvar="PYSTREAM_INSECURE",
                is_flag=True,
                help="Bind an address other hosts can reach without CURVE (anyone who can "
                "reach it can read and inject items).",
            )(f)
            f = _opt(
                "--curve-allow",
                envvar="PYSTREAM_CURVE_ALLOW",
                type=click.Path(exists=True, file_okay=False),
                metavar="DIR",
                help="With --curve-secret: the client public keys (NAME.key files) allowed to "
                "connect to the endpoints this process binds.",
            )(f)
        if connects:
            f = _opt(
                "--curve-server-key",
                envvar="PYSTREAM_CURVE_SERVER_KEY",
                type=click.Path(exists=True, dir_okay=False),
                multiple=True,
                metavar="FILE",
                help="With --curve-secret: the public key (NAME.key) of the process --push "
                "connects to; one per --push, or one for all.",
            )(f)
        return _opt(
            "--curve-secret",
            envvar="PYSTREAM_CURVE_SECRET",
            type=click.Path(exists=True, dir_okay=False),
            metavar="FILE",
            help="This process's key pair (NAME.key_secret, mode 0600): CURVE encryption "
            "and authentication on every socket.",
        )(f)

    return decorate


def _stage_options(f: _F) -> _F:
    f = _opt(
        "--curve-profile-key",
        envvar="PYSTREAM_CURVE_PROFILE_KEY",
        type=click.Path(exists=True, dir_okay=False),
        metavar="FILE",
        help="With --curve-secret and --profile: the public key of the sink.",
    )(f)
    f = _curve_options(binds=True, connects=True)(f)
    f = _opt(
        "--max-message-bytes",
        envvar="PYSTREAM_MAX_MESSAGE_BYTES",
        type=click.IntRange(min=1),
        default=codec.DEFAULT_MAX_MESSAGE_BYTES,
        help="Refuse input messages over this size (a bigger frame drops its sender).",
    )(f)
    f = _opt(
        "--drop-policy",
        envvar="PYSTREAM_DROP_POLICY",
        type=click.Choice(transport.LINK_POLICIES),
        default=transport.BLOCK,
        help="block: take items in order; latest: process only the newest waiting, drop the rest.",
    )(f)
    f = _opt(
        "--max-age",
        envvar="PYSTREAM_MAX_AGE",
        type=click.FloatRange(min=0, min_open=True),
        help="Drop items older than this many seconds (since the source sent them) on arrival.",
    )(f)
    f = _opt(
        "--replica",
        envvar="PYSTREAM_REPLICA",
        type=click.IntRange(min=0),
        help="Which replica of its stage this process is (profiles count each apart).",
    )(f)
    f = _opt(
        "--profile",
        envvar="PYSTREAM_PROFILE",
        type=ENDPOINT,
        help="Send profile events to this endpoint (the sink's --profile-pull).",
    )(f)
    return _pull_options(_push_option(_build_options(_run_options(f))))


# -- the roles -------------------------------------------------------------------------------
@main.command()
@click.argument("ref", metavar="MODULE:ATTR")
@_stage_options
@click.pass_obj
def stage(verbose: bool, ref: str, **opts: Any) -> int:
    """Run one stage: a function, a Stage class (built from the params) or a factory."""
    obj = _build(verbose, ref, opts)
    name = _name(opts["name"], obj, ref)
    path = MAIN_PIPELINE_NAME + PATH_SEPARATOR + name
    return _serve_worker(verbose, name, [(path, obj)], opts)


@main.command("pipeline")
@click.argument("ref", metavar="MODULE:ATTR")
@_stage_options
@click.pass_obj
def pipeline_(verbose: bool, ref: str, **opts: Any) -> int:
    """Run a sub-pipeline inline: ATTR is called (with the params) and returns a Pipeline."""
    params = _params(opts)
    made = _guard(verbose, ref, lambda: load(ref)(**params))
    if not isinstance(made, Pipeline):
        raise _LoadFailed(f"{ref}: returned a {type(made).__name__}, not a Pipeline")
    name = _name(opts["name"], None, ref)
    leaves = made.plan(root=MAIN_PIPELINE_NAME + PATH_SEPARATOR + name).leaves()
    if not leaves:
        raise _LoadFailed(f"{ref}: the pipeline has no stages")
    return _serve_worker(verbose, name, leaves, opts)


@main.command()
@click.argument("ref", metavar="MODULE:ATTR")
@_push_option
@_build_options
@_opt(
    "--period",
    envvar="PYSTREAM_PERIOD",
    type=click.FloatRange(min=0),
    default=0.01,
    help="Seconds between two items.",
)
@_opt(
    "--count",
    envvar="PYSTREAM_COUNT",
    type=click.IntRange(min=0),
    help="Send this many items, then wait to be stopped (default: no limit).",
)
@_opt(
    "--hwm",
    envvar="PYSTREAM_HWM",
    type=click.IntRange(min=1),
    default=transport.DEFAULT_HWM,
    help="Queue bound of the output, in messages.",
)
@_curve_options(binds=False, connects=True)
@click.pass_obj
def source(verbose: bool, ref: str, **opts: Any) -> int:
    """Send items: ATTR is an iterator, a generator function (called once with the
    params), or a function or class instance called for each item."""
    obj = _guard(verbose, ref, lambda: load(ref))
    if isinstance(obj, Iterator):
        items = obj
    elif inspect.isgeneratorfunction(obj):
        params = _params(opts)
        items = _guard(verbose, ref, lambda: obj(**params))
    else:
        items = standalone.iterate(_build(verbose, ref, opts, obj))
    curve = _curve(opts, [], opts["push"])
    stopping = _start_process("source", verbose)
    return _run(
        verbose,
        lambda: standalone.run_source(
            items,
            list(opts["push"]),
            stopping,
            period=opts["period"],
            count=opts["count"],
            hwm=opts["hwm"],
            curve=curve,
        ),
    )


@main.command()
@_pull_options
@_opt(
    "--profile-pull",
    envvar="PYSTREAM_PROFILE_PULL",
    type=ENDPOINT,
    help="Bind this endpoint for the workers' profile events and store them.",
)
@_opt(
    "--profile-dir",
    envvar=store.PROFILE_DIR_ENV,
    type=click.Path(file_okay=False),
    help="Folder of profiles.sqlite3 (default: as `pystream profile` reads).",
)
@_opt(
    "--run-name",
    envvar="PYSTREAM_RUN_NAME",
    default=MAIN_PIPELINE_NAME,
    help="The run's pipeline name in the profile database.",
)
@_opt(
    "--stages",
    envvar="PYSTREAM_STAGES",
    default="",
    help="Comma-separated stage names to register for profiles (Stage1,Child__StageA).",
)
@_opt(
    "--save-latest",
    envvar="PYSTREAM_SAVE_LATEST",
    type=click.Path(dir_okay=False),
    help="Write the latest image output to this file (any format cv2.imwrite knows).",
)
@_opt(
    "--image-key",
    envvar="PYSTREAM_IMAGE_KEY",
    help="Key of the image in output dicts (default: the first uint8 image).",
)
@_opt(
    "--report-every",
    envvar="PYSTREAM_REPORT_EVERY",
    type=click.FloatRange(min=0.01),
    default=2.0,
    help="Seconds between progress reports.",
)
@_opt(
    "--drain-timeout",
    envvar="PYSTREAM_DRAIN_TIMEOUT",
    type=click.FloatRange(min=0),
    default=3.0,
    help="On a stop signal, how long to wait for the items in flight (a little longer "
    "than the stages, so that their end-of-stream markers still arrive).",
)
@_opt(
    "--hwm",
    envvar="PYSTREAM_HWM",
    type=click.IntRange(min=1),
    default=transport.DEFAULT_HWM,
    help="Queue bound of the input, in messages.",
)
@_curve_options(binds=True, connects=False)
@click.pass_obj
def sink(verbose: bool, **opts: Any) -> int:
    """Receive the outputs, report items/s, keep the latest (and save it)."""
    pulls = _pull_endpoints(opts)
    curve = _curve(opts, [*pulls, *filter(None, [opts["profile_pull"]])], [])
    profile = None
    if opts["profile_pull"]:
        names = [name for name in opts["stages"].split(",") if name]
        for name in names:
            for level in name.split(PATH_SEPARATOR):
                _check_name(level, " (in --stages)")
        folder = opts["profile_dir"] or store.get_profiler_db_folder()
        profile = standalone.ProfileTarget(
            Path(folder) / store.DB_FILENAME, opts["run_name"], names
        )
    on_latest = None
    if opts["save_latest"]:
        on_latest = standalone.ImageSaver(Path(opts["save_latest"]), opts["image_key"])
    stopping = _start_process("sink", verbose, opts["drain_timeout"])
    return _run(
        verbose,
        lambda: standalone.run_sink(
            pulls,
            stopping,
            ordered=opts["ordered"],
            profile_endpoint=opts["profile_pull"],
            profile=profile,
            report_every=opts["report_every"],
            on_latest=on_latest,
            hwm=opts["hwm"],
            curve=curve,
        ),
    )


# -- helpers ---------------------------------------------------------------------------------
def _params(opts: dict[str, Any]) -> dict[str, Any]:
    try:
        return parse_params(opts["param_pairs"], opts["params_json"])
    except ValueError as e:
        raise click.UsageError(str(e)) from e


def _guard(verbose: bool, ref: str, step: Callable[[], Any]) -> Any:
    """Run a loading step; its failure is one line (and a traceback with --verbose)."""
    try:
        return step()
    except LoadError as e:
        if verbose:
            traceback.print_exc()
        raise _LoadFailed(f"{ref}: {e}") from e
    except Exception as e:
        if verbose:
            traceback.print_exc()
        raise _LoadFailed(f"{ref}: {e!r}") from e


def _build(verbose: bool, ref: str, opts: dict[str, Any], obj: Any = None) -> Any:
    params = _params(opts)
    found = obj if obj is not None else _guard(verbose, ref, lambda: load(ref))
    return _guard(verbose, ref, lambda: build(found, params, factory=opts["factory"]))


def _check_name(name: str, hint: str = "") -> str:
    try:
        return check_stage_name(name)
    except ValueError as e:
        raise click.UsageError(f"{e}{hint}") from e


def _name(given: str | None, obj: object, ref: str) -> str:
    """--name, else the stage's own name attribute, else ATTR."""
    if given:
        return _check_name(given)
    return _check_name(default_name(obj, ref), " (choose another with --name)")


def _pull_endpoints(opts: dict[str, Any]) -> list[str]:
    if opts["pull"]:
        return [str(endpoint) for endpoint in opts["pull"]]
    if opts["port"]:
        return [f"tcp://127.0.0.1:{opts['port']}"]
    raise click.UsageError("give --pull (or set PORT) for the input endpoint")


def _serve_worker(
    verbose: bool, name: str, leaves: Sequence[tuple[str, Any]], opts: dict[str, Any]
) -> int:
    pulls, pushes = _pull_endpoints(opts), list(opts["push"])
    curve = _curve(opts, pulls, pushes, opts["profile"])
    spec = WorkerSpec(
        name=name,
        pull=pulls[0],
        push=pushes[0],
        more_pulls=tuple(pulls[1:]),
        more_pushes=tuple(pushes[1:]),
        ordered_input=opts["ordered"],
        replica=opts["replica"],
        profile=opts["profile"],
        hwm=opts["hwm"],
        max_message_bytes=opts["max_message_bytes"],
        drop_policy=opts["drop_policy"],
        max_age=opts["max_age"],
        curve=curve,
    )
    stopping = _start_process(name, verbose, opts["drain_timeout"])
    return _run(verbose, lambda: standalone.run_worker(spec, leaves, stopping))


def _curve(
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
                security.check_bind(endpoint, secured=False, insecure=insecure, hint=_CURVE_HINT)
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
    except security.SecurityError as e:
        raise click.UsageError(str(e)) from e


def _start_process(name: str, verbose: bool, drain_timeout: float = 2.5) -> standalone.Stopping:
    """Everything a running worker process needs once its arguments are good: logging with
    the stage name and pid, and signals turned into a drain."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # show up under honcho at once
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s [{name} pid %(process)d] %(name)s: %(message)s",
        force=True,
    )
    stopping = standalone.Stopping(drain_timeout=drain_timeout)
    _watch_signals(stopping)
    return stopping


def _watch_signals(stopping: standalone.Stopping) -> None:
    """Turn SIGTERM/SIGINT/SIGQUIT into a stop request, a second one into an immediate exit.

    The Python-level handler does nothing: the interpreter also writes each signal's number
    to the wakeup fd, and a thread reading it sets ``stop``. So no lock is taken inside a
    handler (which could deadlock against the interrupted code), and it works whichever
    thread (numpy's, ZeroMQ's) the kernel delivered the signal to."""
    rx, tx = socket.socketpair()
    tx.setblocking(False)
    signal.set_wakeup_fd(tx.fileno(), warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, lambda *_: None)

    def watch(rx: socket.socket, tx: socket.socket) -> None:  # holds tx open: the wakeup fd
        name = signal.Signals(rx.recv(1)[0]).name
        stopping.request()
        log.info("%s: stopping (again to exit at once)", name)
        signum = rx.recv(1)[0]
        log.warning("second signal (%s): exiting at once", signal.Signals(signum).name)
        logging.shutdown()
        os._exit(128 + signum)

    threading.Thread(target=watch, args=(rx, tx), name="pystream-signals", daemon=True).start()


def _run(verbose: bool, role: Callable[[], object]) -> int:
    try:
        role()
    except zmq.ZMQError as e:
        if e.errno in (zmq.EADDRINUSE, zmq.EINVAL, zmq.EADDRNOTAVAIL, zmq.EPROTONOSUPPORT):
            raise _AddressFailed(str(e)) from e
        log.error("failed: %s", e, exc_info=verbose)
        return EXIT_RUNTIME
    except Exception as e:
        log.error("failed: %s: %s", type(e).__name__, e, exc_info=verbose)
        return EXIT_RUNTIME
    return EXIT_OK

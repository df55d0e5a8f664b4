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
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import zmq

from pystream_zmq import threads
from pystream_zmq.cli import curve_options, options, process, roles, sink_role
from pystream_zmq.cli.loader import (
    LoadError,
    build,
    default_name,
    import_from_working_directory,
    load,
    parse_params,
)
from pystream_zmq.errors import SecurityError
from pystream_zmq.pipeline import Pipeline
from pystream_zmq.profiling import store
from pystream_zmq.stage import MAIN_PIPELINE_NAME, PATH_SEPARATOR, check_stage_name
from pystream_zmq.wire import formats
from pystream_zmq.worker.spec import WorkerSpec

if TYPE_CHECKING:
    from pystream_zmq.media.live import LiveView

log = logging.getLogger(__name__)

EXIT_OK = 0  # finished, or stopped by a signal after draining
EXIT_RUNTIME = 1  # failed while running
EXIT_USAGE = 2  # bad command line: unknown option, malformed endpoint or value
EXIT_IMPORT = 3  # MODULE:ATTR cannot be imported, is not callable, or cannot be built
EXIT_ADDRESS = 4  # an endpoint cannot be bound or connected (e.g. port already in use)
# A second SIGTERM/SIGINT exits at once with 128 + its number (143 / 130): see cli/process.py.


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
        process.leaving()
        sys.exit(code if isinstance(code, int) else EXIT_OK)


@click.group(cls=_WorkerGroup)
@options.verbose
@click.version_option(package_name="pystream-zmq")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Run one role of a pipeline in this process."""
    ctx.obj = verbose
    import_from_working_directory()


_input_options = options.stack(options.pull, options.ordered, options.port)
_build_options = options.stack(
    options.param_pairs, options.params_json, options.factory, options.native_threads
)
_stage_options = options.stack(
    _input_options,
    options.push,
    options.input_format,
    options.output_format,
    _build_options,
    options.name,
    options.drain_timeout(options.DRAIN_TIMEOUT),
    options.hwm,
    options.profile,
    options.replica,
    options.max_age,
    options.drop_policy,
    options.max_message_bytes,
    options.curve_secret,
    options.curve_server_key,
    options.curve_allow,
    options.insecure,
    options.curve_profile_key,
)


# -- the roles -------------------------------------------------------------------------------
@main.command(
    epilog="Example: pystream-worker stage services.demo:DummyStage --param name=Stage1 "
    "--pull tcp://127.0.0.1:5701 --push tcp://127.0.0.1:5702"
)
@click.argument("ref", metavar="MODULE:ATTR")
@_stage_options
@click.pass_obj
def stage(verbose: bool, ref: str, **opts: Any) -> int:
    """Run one stage: a function, a Stage class (built from the params) or a factory."""
    _limit_native_threads(opts)
    obj = _build(verbose, ref, opts)
    name = _name(opts["name"], obj, ref)
    path = MAIN_PIPELINE_NAME + PATH_SEPARATOR + name
    return _serve_worker(verbose, name, [(path, obj)], opts)


@main.command(
    "pipeline",
    epilog="Example: pystream-worker pipeline services.vision:vision_pipeline "
    "--pull tcp://127.0.0.1:5701 --push tcp://127.0.0.1:5702",
)
@click.argument("ref", metavar="MODULE:ATTR")
@_stage_options
@click.pass_obj
def pipeline_(verbose: bool, ref: str, **opts: Any) -> int:
    """Run a sub-pipeline inline: ATTR is called (with the params) and returns a Pipeline."""
    _limit_native_threads(opts)
    params = _params(opts)
    made = _guard(verbose, ref, lambda: load(ref)(**params))
    if not isinstance(made, Pipeline):
        raise _LoadFailed(f"{ref}: returned a {type(made).__name__}, not a Pipeline")
    name = _name(opts["name"], None, ref)
    leaves = made.plan(root=MAIN_PIPELINE_NAME + PATH_SEPARATOR + name).leaves()
    if not leaves:
        raise _LoadFailed(f"{ref}: the pipeline has no stages")
    return _serve_worker(verbose, name, leaves, opts)


@main.command(
    epilog="Example: pystream-worker source services.demo:generate_data --period 0.2 "
    "--push tcp://127.0.0.1:5701"
)
@click.argument("ref", metavar="MODULE:ATTR")
@options.stack(
    options.push,
    _build_options,
    options.period,
    options.count,
    options.hwm,
    options.curve_secret,
    options.curve_server_key,
)
@click.pass_obj
def source(verbose: bool, ref: str, **opts: Any) -> int:
    """Send items: ATTR is an iterator, a generator function (called once with the
    params), a class made with the params whose instances are iterable (a source such as
    pystream_zmq.media:VideoSource), or a function or class instance called for each
    item. Its end is the end of the stream."""
    _limit_native_threads(opts)
    obj = _guard(verbose, ref, lambda: load(ref))
    if isinstance(obj, Iterator):
        items = obj
    elif inspect.isgeneratorfunction(obj):
        params = _params(opts)
        items = _guard(verbose, ref, lambda: obj(**params))
    else:
        built = _build(verbose, ref, opts, obj, iterable=True)
        # A source object (pystream_zmq.media.VideoSource) is iterated; a callable, called.
        items = iter(built) if isinstance(built, Iterable) else roles.iterate(built)
    curve = curve_options.settings(opts, [], opts["push"])
    # The source drains nothing itself: it waits for the next process as a stage would.
    stopping = process.start("source", verbose, options.DRAIN_TIMEOUT)
    return _run(
        verbose,
        lambda: roles.run_source(
            items,
            list(opts["push"]),
            stopping,
            period=opts["period"],
            count=opts["count"],
            hwm=opts["hwm"],
            curve=curve,
        ),
    )


@main.command(
    epilog="Example: pystream-worker sink --pull tcp://127.0.0.1:5706 --save-latest latest.png"
)
@options.stack(
    _input_options,
    options.input_format,
    options.profile_pull,
    options.profile_dir,
    options.run_name,
    options.stages,
    options.save_latest,
    options.image_key,
    options.live_view,
    options.report_every,
    options.drain_timeout(options.SINK_DRAIN_TIMEOUT),
    options.hwm,
    options.curve_secret,
    options.curve_allow,
    options.insecure,
)
@click.pass_obj
def sink(verbose: bool, **opts: Any) -> int:
    """Receive the outputs, report items/s, keep the latest (and save it, or show it
    live in a browser)."""
    pulls = _pull_endpoints(opts)
    curve = curve_options.settings(opts, [*pulls, *filter(None, [opts["profile_pull"]])], [])
    profile = None
    if opts["profile_pull"]:
        names = [name for name in opts["stages"].split(",") if name]
        for name in names:
            for level in name.split(PATH_SEPARATOR):
                _check_name(level, " (in --stages)")
        folder = opts["profile_dir"] or store.get_profiler_db_folder()
        profile = sink_role.ProfileTarget(Path(folder) / store.DB_FILENAME, opts["run_name"], names)
    on_latest = None
    if opts["save_latest"]:
        try:
            on_latest = sink_role.ImageSaver(Path(opts["save_latest"]), opts["image_key"])
        except ValueError as e:
            raise click.UsageError(str(e)) from e
    stopping = process.start("sink", verbose, opts["drain_timeout"])
    live_view = _live_view(opts)
    try:
        return _run(
            verbose,
            lambda: sink_role.run_sink(
                pulls,
                stopping,
                ordered=opts["ordered"],
                profile_endpoint=opts["profile_pull"],
                profile=profile,
                report_every=opts["report_every"],
                on_latest=on_latest,
                hwm=opts["hwm"],
                curve=curve,
                input_format=opts["input_format"],
                live_view=live_view,
            ),
        )
    finally:
        if live_view is not None:
            live_view.close()


# -- helpers ---------------------------------------------------------------------------------
def _live_view(opts: dict[str, Any]) -> LiveView | None:
    """The sink's live view (--live-view), serving from now on; None without it."""
    if opts["live_view"] is None:
        return None
    from pystream_zmq.media.live import LiveView  # imports cv2: only the sink that shows

    host, port = opts["live_view"]
    try:
        view = LiveView(host, port, key=opts["image_key"], insecure=opts["insecure"])
    except SecurityError as e:
        raise click.UsageError(str(e)) from e
    except OSError as e:  # the port is taken, the address is not this host's
        raise _AddressFailed(f"cannot serve the live view on {host}:{port}: {e}") from e
    log.info("live view at %s", view.url)
    return view


def _limit_native_threads(opts: dict[str, Any]) -> None:
    """Before MODULE is imported, so that the libraries it loads see the limit."""
    if opts["native_threads"]:
        threads.limit(opts["native_threads"])


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


def _build(
    verbose: bool, ref: str, opts: dict[str, Any], obj: Any = None, *, iterable: bool = False
) -> Any:
    params = _params(opts)
    found = obj if obj is not None else _guard(verbose, ref, lambda: load(ref))
    return _guard(
        verbose, ref, lambda: build(found, params, factory=opts["factory"], iterable=iterable)
    )


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
    if opts["input_format"] == formats.MSGPACK_NUMPY and opts["replica"] is not None:
        # Each replica would number the items from 0: the numbers downstream would clash.
        raise click.UsageError("--input-format msgpack-numpy numbers the items: no --replica")
    curve = curve_options.settings(opts, pulls, pushes, opts["profile"])
    spec = WorkerSpec(
        name=MAIN_PIPELINE_NAME + PATH_SEPARATOR + name,  # its counters' path in the profiles
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
        input_format=opts["input_format"],
        output_format=opts["output_format"],
        native_threads=opts["native_threads"] or None,
    )
    stopping = process.start(name, verbose, opts["drain_timeout"])
    return _run(verbose, lambda: roles.run_worker(spec, leaves, stopping))


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

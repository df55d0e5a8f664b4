"""The sink role of ``pystream-worker``: the end of a chain of standalone processes. It
receives the outputs, reports items/s, keeps (and saves) the latest output and, with
``--profile-pull``, is the one writer of the profile database for the run.

Stopping (see roles.py): the sink waits until the last message it received is the
end-of-stream marker (or the drain timeout), and exits; its disconnect releases the stage
before it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from pystream_zmq.cli.roles import ACK_TIMEOUT, Stopping
from pystream_zmq.orchestrator.collector import Collector
from pystream_zmq.profiling import store
from pystream_zmq.stage import MAIN_PIPELINE_NAME, PATH_SEPARATOR
from pystream_zmq.wire import formats, security, transport

if TYPE_CHECKING:
    from pystream_zmq.media.live import LiveView

log = logging.getLogger(__name__)

# After the drain's deadline, how long the sink waits for the workers' last profile records:
# with the writer's ACK_TIMEOUT to store them, well inside honcho's 5 s before SIGKILL.
_LAST_RECORDS_WAIT = 0.5
_SLICE = 0.1  # seconds: how often the sink looks for a stop or the end of the data


@dataclass
class ProfileTarget:
    """Where the sink records profiles: a database, the run's name and its stage names
    (levels below MainPipeline joined by '__', e.g. ``Child__StageA``)."""

    db_path: Path
    run_name: str
    stages: Sequence[str]

    def layout(self) -> list[tuple[str, str]]:
        """(path, kind) in display order; a sub-pipeline's own path comes before its stages
        even when not listed (``pystream-worker pipeline`` records its counters there)."""
        paths: list[str] = []
        for name in self.stages:
            levels = [MAIN_PIPELINE_NAME, *name.split(PATH_SEPARATOR)]
            for depth in range(2, len(levels) + 1):
                path = PATH_SEPARATOR.join(levels[:depth])
                if path not in paths:
                    paths.append(path)
        parents = {p.rpartition(PATH_SEPARATOR)[0] for p in paths}
        kinds = [(path, "pipeline" if path in parents else "stage") for path in paths]
        return [(MAIN_PIPELINE_NAME, "pipeline"), *kinds]


def run_sink(
    pull_endpoints: list[str],
    stopping: Stopping,
    *,
    ordered: bool = True,
    profile_endpoint: str | None = None,
    profile: ProfileTarget | None = None,
    report_every: float = 2.0,
    on_latest: Callable[[Any], None] | None = None,
    hwm: int = transport.DEFAULT_HWM,
    curve: security.Curve | None = None,
    input_format: str = formats.PYSTREAM,
    live_view: LiveView | None = None,
) -> Any:
    """Receive outputs until stopped, or until a source's end of data; log progress every
    ``report_every`` seconds and hand the latest output to ``on_latest``; show each output
    as it comes, and the figures (from the profile database when profiling), in
    ``live_view``. Returns the latest output. ``input_format`` msgpack-numpy: from a
    program outside PyStream, whose end of stream is not waited for."""
    ctx: zmq.Context[Any] = zmq.Context()
    auth = security.start_authenticator(ctx, curve)
    recorder: store.RunRecorder | None = None
    collector: Collector | None = None
    try:

        def sink_counters() -> dict[str, int]:
            assert collector is not None
            counters = collector.counters()
            if recorder is not None:
                counters["dropped_events"] = recorder.dropped_events
            return counters

        collector = Collector(
            ctx,
            pull_endpoints,
            profile_endpoint,
            hwm,
            None,
            sink_counters,
            ordered=ordered,
            in_order=ordered or len(pull_endpoints) == 1,
            curve=curve,
            input_format=input_format,
        )
        if profile is not None and profile_endpoint is not None:
            recorder = _register(profile)  # once bound: a sink that cannot start has no run
            collector.record_to(recorder)
        collector.start()
        inputs = ", ".join(collector.sink_endpoints)
        profiles = collector.profile_endpoint or "off"
        log.info("ready: input %s, profiles %s%s", inputs, profiles, " (CURVE)" * bool(curve))
        if live_view is not None:
            _live_figures(live_view, collector, profile, recorder)
        progress = _Progress(collector, on_latest, live_view.show if live_view else None)
        next_report = time.monotonic() + report_every
        while not stopping.stop.is_set():
            if collector.data_ended():
                log.info("the input stream ended: stopping")
                break
            wait = min(_SLICE, max(0.0, next_report - time.monotonic()))
            if live_view is not None:
                progress.take(wait)  # each new output to the view as soon as it comes
            else:
                stopping.stop.wait(wait)
            if time.monotonic() >= next_report:
                progress.report()
                next_report += report_every
        ended = collector.data_ended()  # then everything came: the end was the last message
        if not ended and input_format == formats.PYSTREAM:  # a foreign sender sends no end
            log.info("stopping: waiting for the items in flight")
            if not collector.wait_for_end(max(0.0, stopping.drain_left())):
                log.warning("no end of stream in %g s; stopping anyway", stopping.drain_timeout)
        progress.report()
        if recorder is not None:
            stopped_at = stopping.requested_at if stopping.stop.is_set() else time.monotonic()
            drain_end = stopped_at + stopping.drain_timeout
            _wait_for_last_records(collector, drain_end + _LAST_RECORDS_WAIT)
        collector.stop()  # hands the recorder its last MainPipeline events
        if recorder is not None:
            recorder.counters({MAIN_PIPELINE_NAME: sink_counters()})
        log.info("stopped after %d items", collector.delivered)
        return progress.latest
    finally:
        if collector is not None:
            collector.stop()
        if recorder is not None:
            recorder.close(timeout=ACK_TIMEOUT)
        security.stop_authenticator(auth)
        ctx.destroy(linger=0)


def _register(profile: ProfileTarget) -> store.RunRecorder:
    writer = store.ProfileWriter(profile.db_path)
    run_id = writer.start_run(profile.run_name, "parallel", profile.layout())
    log.info("profiles: run %d in %s", run_id, profile.db_path)
    return store.RunRecorder(writer, run_id)


def _wait_for_last_records(collector: Collector, deadline: float) -> None:
    """Wait (until ``deadline``, monotonic) for every profiled worker's last records: each
    sends them, then PROFILE_END, once the end of stream has passed it or its drain timed
    out, so they can come after the end of stream reached the sink."""
    ends, connected = collector.wait_for_every_profile_end(max(0.0, deadline - time.monotonic()))
    if ends < connected:
        log.warning(
            "%d of %d profiled workers did not send their last records in time; the "
            "profile misses them", connected - ends, connected,
        )  # fmt: skip


def _live_figures(
    view: LiveView,
    collector: Collector,
    profile: ProfileTarget | None,
    recorder: store.RunRecorder | None,
) -> None:
    """The live view's table: per stage from the profile database the sink writes, else
    the outputs' rate from the sink's own counters."""
    from pystream_zmq.media.live import counter_figures, profile_figures  # cv2: only here

    if profile is not None and recorder is not None:
        view.figures(profile_figures(profile.db_path, recorder.run_id))
    else:
        view.figures(counter_figures(collector.counters))


class _Progress:
    """The sink's reports, and what it hands the newest output to: ``on_latest`` at each
    report, ``on_output`` as soon as it comes (the newest, when several came at once)."""

    def __init__(
        self,
        collector: Collector,
        on_latest: Callable[[Any], None] | None,
        on_output: Callable[[Any], None] | None = None,
    ) -> None:
        self._collector = collector
        self._on_latest = on_latest
        self._on_output = on_output
        self._count = 0
        self._at = time.monotonic()
        self.latest: Any = None
        self._fresh = False  # a latest output that on_latest has not had

    def report(self) -> None:
        now, count = time.monotonic(), self._collector.delivered
        rate = (count - self._count) / max(now - self._at, 1e-9)
        log.info("%d items received, %.1f items/s", count, rate)
        self._count, self._at = count, now
        self.take(0.0)
        if self._fresh and self._on_latest is not None:
            self._on_latest(self.latest)
        self._fresh = False

    def take(self, timeout: float) -> None:
        """The newest output, if one comes within ``timeout``."""
        latest = self._collector.take_latest(timeout)
        if latest is not None:
            self.latest, self._fresh = latest, True
            if self._on_output is not None:
                self._on_output(latest)


class ImageSaver:
    """Writes the image in the latest output with cv2.imwrite, through a temporary file so
    readers never see half an image."""

    def __init__(self, path: Path, key: str | None) -> None:
        try:
            import cv2  # only the sink that saves images needs it
        except ImportError as e:
            raise ValueError(
                "--save-latest needs OpenCV: pip install 'pystream-zmq[opencv]', or have "
                "opencv-python installed"
            ) from e
        self._imwrite = cv2.imwrite
        self._path = path
        self._key = key
        self._warned = False

    def __call__(self, output: Any) -> None:
        image = output.get(self._key) if isinstance(output, dict) and self._key else None
        if image is None and isinstance(output, dict) and not self._key:
            image = next((v for v in output.values() if _is_image(v)), None)
        if image is None or not _is_image(image):
            if not self._warned:
                log.warning(
                    "the output holds no uint8 image to save (keys: %s)",
                    list(output) if isinstance(output, dict) else type(output).__name__,
                )
                self._warned = True
            return
        partial = self._path.with_name(f".{self._path.stem}.partial{self._path.suffix}")
        if not self._imwrite(str(partial), image):
            log.warning("cv2.imwrite could not write %s", partial)
            return
        os.replace(partial, self._path)


def _is_image(value: Any) -> bool:
    return (
        isinstance(value, np.ndarray)
        and value.dtype == np.uint8
        and (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (1, 3, 4)))
    )

"""The live view: the page, the MJPEG stream (each new frame; a slow viewer skips frames
and holds nothing up), the figures (from a profiled pipeline, from stats(), from the sink
of standalone processes), the loopback rule, and a real headless Chromium showing the
moving scene and the figures changing. Real sockets, processes and browser."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from browser import Chromium, find_chromium
from conftest import wait_until
from test_seed_notebook import _env
from test_worker_cli import BIN, free_port, free_port_range

from pystream_zmq import Pipeline, SecurityError
from pystream_zmq.media import LiveView
from services.vision import MovingScene

TIMEOUT = 10.0  # every read from the view


def frame(column: int, width: int = 160, height: int = 120) -> np.ndarray[Any, Any]:
    """A dark frame with one white column: where it is tells frames apart after JPEG."""
    image = np.full((height, width, 3), 20, np.uint8)
    image[:, column : column + 4] = 255
    return image


def bright_column(jpeg: bytes) -> int:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image is not None, "not a JPEG"
    return int(np.argmax(image.mean(axis=0)))


def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return response.headers["Content-Type"], response.read()


def stats(view: LiveView) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(get(view.url + "stats.json")[1])
    return result


class Stream:
    """A viewer of /stream.mjpg that reads one part (a JPEG) at a time."""

    def __init__(self, url: str) -> None:
        self.response = urllib.request.urlopen(url + "stream.mjpg", timeout=TIMEOUT)
        kind = self.response.headers["Content-Type"]
        found = re.fullmatch(r"multipart/x-mixed-replace; boundary=(\S+)", kind)
        assert found, kind
        self.boundary = b"--" + found.group(1).encode()
        assert self.response.readline().rstrip(b"\r\n") == self.boundary

    def next_jpeg(self) -> bytes:
        headers = {}
        while line := self.response.readline().rstrip(b"\r\n"):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg", headers
        jpeg = self.response.read(int(headers["content-length"]))
        assert self.response.readline() == b"\r\n"
        assert self.response.readline().rstrip(b"\r\n") == self.boundary
        return jpeg

    def close(self) -> None:
        self.response.close()


@pytest.fixture
def view() -> Iterator[LiveView]:
    with LiveView() as live:
        yield live
    assert not [t for t in threading.enumerate() if t.name == "pystream-live-view"]


# -- the server alone ------------------------------------------------------------------------
def test_the_page_is_self_contained_with_the_stream_and_the_table(view: LiveView) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", view.url)
    kind, body = get(view.url)
    page = body.decode()
    assert kind == "text/html; charset=utf-8"
    assert '<img id="frame" src="stream.mjpg"' in page
    assert 'fetch("stats.json"' in page and "setTimeout(refresh, 500)" in page
    assert not re.search(r"(src|href)=\"?(https?:)?//", page)  # no external assets
    with pytest.raises(urllib.error.HTTPError, match="404"):
        get(view.url + "nothing")


def test_the_stream_sends_each_new_frame(view: LiveView) -> None:
    view.show({"image": frame(10), "index": 0})
    stream = Stream(view.url)
    try:
        assert bright_column(stream.next_jpeg()) in range(9, 15)
        view.show({"image": frame(100), "index": 1})
        assert bright_column(stream.next_jpeg()) in range(99, 105)
        view.show(frame(50))  # an image itself
        assert bright_column(stream.next_jpeg()) in range(49, 55)
    finally:
        stream.close()
    kind, jpeg = get(view.url + "frame.jpg")
    assert kind == "image/jpeg" and bright_column(jpeg) in range(49, 55)
    assert view.frames == 3


def test_a_slow_viewer_skips_frames_and_holds_nothing_up(view: LiveView) -> None:
    """A viewer that reads nothing while 300 large frames are shown: show() never waits
    for it, and once it reads it gets the newest frame, having skipped most."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (480, 640, 3), np.uint8)  # JPEGs of ~250 kB: buffers fill
    view.show(noise)
    stream = Stream(view.url)
    try:
        started = time.monotonic()
        for column in range(300):
            image = noise.copy()
            image[:, column % 600 : column % 600 + 30] = 255
            view.show(image)
        took = time.monotonic() - started
        assert took < 2.0, took  # copies of 1 MB frames; the viewer was not waited for
        parts = 0
        last = -1
        while last not in range(295, 305):  # the newest, as the viewer caught up
            last = bright_column(stream.next_jpeg())
            parts += 1
            assert parts < 100, "the viewer got every frame instead of the newest"
    finally:
        stream.close()
    assert view.frames == 301


def test_an_item_without_an_image_is_skipped_with_one_warning(
    view: LiveView, caplog: pytest.LogCaptureFixture
) -> None:
    view.show({"image": "not an image"})
    view.show({"other": frame(10)})
    assert view.frames == 0
    assert len([r for r in caplog.records if "skips items without" in r.message]) == 1
    with LiveView(key=None) as first_image:  # key=None: the first uint8 image in the item
        first_image.show({"index": 3, "frame": frame(10)})
        assert first_image.frames == 1


def test_close_ends_every_stream_and_thread() -> None:
    view = LiveView()
    view.show(frame(10))
    stream = Stream(view.url)
    stream.next_jpeg()
    started = time.monotonic()
    view.close()
    assert time.monotonic() - started < 2.0
    assert stream.response.read() == b""  # the server ended the stream
    stream.close()
    view.close()  # idempotent
    assert not [t for t in threading.enumerate() if t.name.startswith("pystream-live")]
    with pytest.raises(OSError):
        urllib.request.urlopen(view.url, timeout=TIMEOUT)


def test_a_host_other_than_loopback_needs_insecure() -> None:
    with pytest.raises(SecurityError, match=r"0\.0\.0\.0.*insecure=True"):
        LiveView("0.0.0.0")
    with pytest.raises(SecurityError):
        LiveView("")
    with LiveView("localhost") as view:
        assert get(view.url)[0].startswith("text/html")


# -- figures from a pipeline -----------------------------------------------------------------
def scene() -> Iterator[dict[str, Any]]:
    """The moving scene as the media sources give items: ``image``, ``index``."""
    source = MovingScene(160, 120)
    while True:
        item = source()
        yield {"image": item["frame"], "index": item["index"]}


def label(data: dict[str, Any]) -> dict[str, Any]:
    cv2.putText(data["image"], str(data["index"]), (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                (255, 255, 255), 1)  # fmt: skip
    return data


class Running:
    """A parallel pipeline over the moving scene, its outputs shown in ``view`` by a thread
    (``for out in pipeline.results(): view.show(out)``) until ``stop()``."""

    def __init__(self, view: LiveView, *, use_profiler: bool, period: float = 0.02) -> None:
        self.pipeline = Pipeline(input_generator=scene(), use_profiler=use_profiler)
        self.pipeline.add(label, "Label")
        self.pipeline.parallelize()
        view.watch(self.pipeline)
        outputs = self.pipeline.results()
        self.pipeline.start_loop(period)
        self.thread = threading.Thread(target=lambda: [view.show(out) for out in outputs])
        self.thread.start()

    def stop(self) -> None:
        self.pipeline.stop_loop()
        self.pipeline.cleanup()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


@pytest.fixture
def running(view: LiveView, request: pytest.FixtureRequest) -> Iterator[Running]:
    pipeline = Running(view, use_profiler=request.param)
    yield pipeline
    pipeline.stop()


@pytest.mark.parametrize("running", [True, False], ids=["profiled", "stats"], indirect=True)
def test_the_figures_move_with_a_running_pipeline(view: LiveView, running: Running) -> None:
    """Profiled: rates and p95 per stage from the profile database; else rates from
    stats(). Both move as items flow."""
    profiled = running.pipeline.use_profiler

    def rows() -> dict[str, dict[str, Any]]:
        return {row["stage"]: row for row in stats(view)["stages"]}

    def flowing() -> bool:
        now = rows()
        wanted = [now.get(stage, {}).get("items_per_s") for stage in ("MainPipeline", "Label")]
        return all(rate is not None and rate > 5 for rate in wanted)

    assert wait_until(flowing, timeout=TIMEOUT), stats(view)
    first = stats(view)
    assert first["error"] is None
    assert first["frames"] > 0 and first["fps"] is not None and first["fps"] > 5
    label_row = rows()["Label"]
    if profiled:
        assert label_row["p95_ms"] is not None and 0 < label_row["p95_ms"] < 1000
    else:
        assert label_row["p95_ms"] is None
    assert label_row["dropped"] == 0 and label_row["errors"] == 0
    assert wait_until(lambda: stats(view)["frames"] > first["frames"] + 5, timeout=TIMEOUT)
    assert wait_until(lambda: stats(view)["stages"] != first["stages"], timeout=TIMEOUT)


def test_the_table_says_why_when_the_figures_fail(view: LiveView) -> None:
    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("no database here")

    view.figures(broken)
    answer = stats(view)
    assert answer["stages"] == [] and answer["error"] == "RuntimeError: no database here"


# -- pystream-worker sink --live-view --------------------------------------------------------
def test_pystream_worker_sink_serves_the_live_view(tmp_path: Path) -> None:
    """source -> stage -> sink as three processes; the sink, profiling, serves the view:
    the stream's frames differ, the table has both paths and its figures move."""
    first, profile_port = free_port_range(2), free_port()
    commands = {
        "sink": ["sink", "--pull", f"tcp://127.0.0.1:{first + 1}", "--live-view", "127.0.0.1:0",
                 "--profile-pull", f"tcp://127.0.0.1:{profile_port}", "--stages", "Resize",
                 "--profile-dir", str(tmp_path), "--image-key", "frame"],
        "stage": ["stage", "services.vision:Resize", "--name", "Resize", "--param", "width=200",
                  "--param", "height=150", "--pull", f"tcp://127.0.0.1:{first}", "--push",
                  f"tcp://127.0.0.1:{first + 1}", "--profile", f"tcp://127.0.0.1:{profile_port}"],
        "source": ["source", "services.vision:MovingScene", "--period", "0.02",
                   "--push", f"tcp://127.0.0.1:{first}"],
    }  # fmt: skip
    procs = []
    try:
        for name, args in commands.items():
            with (tmp_path / f"{name}.log").open("wb") as log:
                procs.append(subprocess.Popen([BIN / "pystream-worker", *args], stdout=log,
                                              stderr=log, env=_env()))  # fmt: skip
        sink_log = tmp_path / "sink.log"
        assert wait_until(lambda: "live view at" in sink_log.read_text(), timeout=TIMEOUT)
        found = re.search(r"live view at (http://127\.0\.0\.1:\d+/)", sink_log.read_text())
        assert found, sink_log.read_text()
        url = found.group(1)

        def view_stats() -> dict[str, Any]:
            answer: dict[str, Any] = json.loads(get(url + "stats.json")[1])
            return answer

        def flowing() -> bool:
            rows = {row["stage"]: row for row in view_stats()["stages"]}
            return all((rows.get(s, {}).get("items_per_s") or 0) > 5
                       for s in ("MainPipeline", "Resize"))  # fmt: skip

        assert wait_until(flowing, timeout=30), (view_stats(), sink_log.read_text())
        before = view_stats()
        stream = Stream(url)
        try:
            one, two = stream.next_jpeg(), stream.next_jpeg()
        finally:
            stream.close()
        images = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in (one, two)]
        assert all(image.shape == (150, 200, 3) for image in images)  # the stage's output
        assert np.abs(images[0].astype(int) - images[1]).mean() > 0.5  # the scene moved
        assert wait_until(lambda: view_stats()["frames"] > before["frames"], timeout=TIMEOUT)
        rows = {row["stage"]: row for row in view_stats()["stages"]}
        assert rows["Resize"]["p95_ms"] is not None
    finally:
        for proc in reversed(procs):  # the source first, as honcho would
            proc.terminate()
        codes = [proc.wait(timeout=15) for proc in reversed(procs)]
    assert codes == [0, 0, 0]
    with pytest.raises(OSError):  # the sink closed its view
        get(url)


def test_pystream_worker_sink_refuses_a_public_live_view_and_names_a_busy_port() -> None:
    def sink(live_view: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BIN / "pystream-worker", "sink", "--pull", f"tcp://127.0.0.1:{free_port()}",
             "--live-view", live_view],
            capture_output=True, text=True, timeout=30, env=_env(),
        )  # fmt: skip

    public = sink("0.0.0.0:0")
    assert public.returncode == 2, public.stderr
    assert "refusing to serve the live view on 0.0.0.0" in public.stderr
    with LiveView() as taken:
        busy = sink(f"127.0.0.1:{taken.port}")
    assert busy.returncode == 4, busy.stderr
    assert f"cannot serve the live view on 127.0.0.1:{taken.port}" in busy.stderr


# -- a real browser --------------------------------------------------------------------------
@pytest.mark.browser
@pytest.mark.skipif(find_chromium() is None, reason="needs Debian's chromium (apt-get install "
                    "chromium); .ci/run installs it when it runs as root")  # fmt: skip
@pytest.mark.parametrize("running", [True], ids=["profiled"], indirect=True)
def test_headless_chromium_shows_the_moving_frame_and_the_figures(
    view: LiveView, running: Running, tmp_path: Path
) -> None:
    """The page in a real browser: the image region of two screenshots a moment apart
    differs (the scene moves), and so does the table's text (the figures refresh)."""
    with Chromium(tmp_path / "chromium") as browser:
        page = browser.open(view.url)
        # Polled from about:blank on: the elements may not be there yet.
        shown = "document.getElementById('frame')?.naturalWidth"
        table = "document.getElementById('stages')?.innerText ?? ''"
        assert wait_until(lambda: page.evaluate(shown) == 160, timeout=TIMEOUT)
        assert wait_until(lambda: "Label" in page.evaluate(table), timeout=TIMEOUT)
        box = page.evaluate(
            "(() => { const r = document.getElementById('frame').getBoundingClientRect();"
            " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()"
        )
        assert (box["width"], box["height"]) == (160, 120)

        def image_region() -> np.ndarray[Any, Any]:
            png = page.screenshot(box)
            (tmp_path / "screenshot.png").write_bytes(png)
            return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(int)

        first, text = image_region(), page.evaluate(table)
        (tmp_path / "first.png").write_bytes(page.screenshot())
        assert first.std() > 10  # the scene, not an empty box
        assert wait_until(lambda: np.abs(image_region() - first).mean() > 2, timeout=TIMEOUT)
        assert wait_until(lambda: page.evaluate(table) != text, timeout=TIMEOUT)
        (tmp_path / "second.png").write_bytes(page.screenshot())
        summary = page.evaluate("document.getElementById('summary').innerText")
        assert re.match(r"\d+ frames shown, \d+\.\d frames/s$", summary), summary

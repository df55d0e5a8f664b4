"""LiveView: the latest frame and per-stage figures of a running pipeline, served over HTTP
from a thread of the calling process (the standard library's ThreadingHTTPServer).

Endpoints: ``/`` a page with the stream and a table refreshed every half second;
``/stream.mjpg`` the frames as they come (multipart/x-mixed-replace, one JPEG per part);
``/frame.jpg`` the latest frame alone; ``/stats.json`` frames shown, frames/s and the rows.

Nothing a viewer does can hold the pipeline up: ``show()`` only keeps a reference, each
viewer has its own thread that sends the newest frame whenever it is ready for one (a slow
viewer skips frames), and a viewer that takes nothing for ``_CLIENT_TIMEOUT`` is dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pystream_zmq.errors import SecurityError
from pystream_zmq.media.live import page
from pystream_zmq.media.live.figures import Figures, Rates, Row, pipeline_figures
from pystream_zmq.media.live.frames import LatestFrame, is_image
from pystream_zmq.wire import endpoints, security

if TYPE_CHECKING:
    from pystream_zmq.pipeline import Pipeline

log = logging.getLogger(__name__)

_BOUNDARY = "pystream-frame"
_CLIENT_TIMEOUT = 10.0  # seconds a viewer may take to read a part or send its request
_FIGURES_EVERY = 0.4  # seconds: viewers asking more often share the last figures
_SHUTDOWN_POLL = 0.05  # seconds: how soon close() stops the server loop


class LiveView:
    """Serves the latest frame given to ``show()`` and per-stage figures on
    ``http://host:port/`` (``url``) until ``close()``; a context manager.

    ``port=0`` takes a free port. ``host`` must be a loopback address (the default) unless
    ``insecure=True``: the view has no authentication, and anyone who can reach it sees
    the frames. ``key``: where ``show()`` finds the frame in a dict item (None: the first
    uint8 image in it). ``quality``: JPEG quality, 1 to 100.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        key: str | None = "image",
        insecure: bool = False,
        quality: int = 80,
        title: str = "pystream_zmq live view",
    ) -> None:
        if not (insecure or security.is_loopback_host(host)):
            raise SecurityError(
                f"refusing to serve the live view on {host}: it is not a loopback address, "
                "and anyone who can reach it would see the frames; pass insecure=True "
                "(pystream-worker sink --insecure) to serve it anyway"
            )
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be 1 to 100, not {quality}")
        self.key = key
        self._frames = LatestFrame(quality)
        self._shown = Rates()
        self._figures: Figures | None = None
        self._figures_lock = threading.Lock()
        self._last_figures: tuple[float, list[Row], str | None] = (0.0, [], None)
        self._warned_no_image = False
        self._page = page.render(title)
        self._closed = False
        self._server = _Server(self, host, port)
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(_SHUTDOWN_POLL,),
            name="pystream-live-view",
            daemon=True,
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{endpoints.address(self.host, self.port)}/"

    @property
    def frames(self) -> int:
        """How many frames were shown."""
        return self._frames.count

    def show(self, item: Any) -> None:
        """Make ``item``'s frame the latest: a dict's ``key`` (see the class), or an image
        itself, a BGR (or gray, or BGRA) uint8 array. The view keeps a reference, so do not
        change the array afterwards. An item without one is skipped, with a warning once."""
        image = item if is_image(item) else _find_image(item, self.key)
        if image is None:
            if not self._warned_no_image:
                self._warned_no_image = True
                keys = list(item) if isinstance(item, dict) else type(item).__name__
                log.warning("the live view skips items without a uint8 image (%s)", keys)
            return
        self._frames.put(image)

    def figures(self, source: Figures | None) -> None:
        """Take the table's rows from ``source`` (see pystream_zmq.media.live.figures),
        called at most every 0.4 s, in a viewer's thread; None: no table."""
        with self._figures_lock:
            self._figures = source
            self._last_figures = (0.0, [], None)

    def watch(self, pipeline: Pipeline) -> None:
        """Take the table from ``pipeline``: its profile database when it is profiled,
        else its ``stats()``."""
        self.figures(pipeline_figures(pipeline))

    def close(self) -> None:
        """Stop serving; every viewer's connection is closed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._frames.close()  # streams waiting for a frame end
        self._server.shutdown()
        self._server.drop_clients()  # and those blocked on a slow viewer
        self._server.server_close()  # joins the viewers' threads
        self._thread.join()

    def __enter__(self) -> LiveView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what the handlers serve ------------------------------------------------------------
    def _stats(self) -> dict[str, Any]:
        with self._figures_lock:  # one viewer computes; the others wait and share it
            rows, error = self._current_figures()
            count = self._frames.count
            fps = self._shown("frames", count)
        fps = None if fps is None else round(fps, 2)
        return {"time": time.time(), "frames": count, "fps": fps, "stages": rows, "error": error}

    def _current_figures(self) -> tuple[list[Row], str | None]:
        """The last rows, or new ones if they are older than _FIGURES_EVERY."""
        at, rows, error = self._last_figures
        source = self._figures
        if source is None or time.monotonic() - at < _FIGURES_EVERY:
            return rows, error
        try:
            rows, error = source(), None
        except Exception as e:  # shown on the page; the view goes on
            text = f"{type(e).__name__}: {e}"
            if text != self._last_figures[2]:
                log.warning("the live view cannot read its figures: %s", text)
            rows, error = [], text
        self._last_figures = (time.monotonic(), rows, error)
        return rows, error


def _find_image(item: Any, key: str | None) -> Any:
    if not isinstance(item, dict):
        return None
    if key is not None:
        value = item.get(key)
        return value if is_image(value) else None
    return next((value for value in item.values() if is_image(value)), None)


class _Server(ThreadingHTTPServer):
    # Viewer threads are joined by server_close() (block_on_close), so none outlives close().
    daemon_threads = False

    def __init__(self, view: LiveView, host: str, port: int) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.view = view
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own looks the host's name up (getfqdn), which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @contextlib.contextmanager
    def client(self, connection: socket.socket) -> Iterator[None]:
        with self._clients_lock:
            self._clients.add(connection)
        try:
            yield
        finally:
            with self._clients_lock:
                self._clients.discard(connection)

    def drop_clients(self) -> None:
        """Shut every viewer's connection: a thread blocked reading or writing returns."""
        with self._clients_lock:
            for connection in self._clients:
                with contextlib.suppress(OSError):  # already gone
                    connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's own prints to stderr; the library logs.
        log.warning("the live view failed serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _CLIENT_TIMEOUT
    server_version = "pystream-live"

    def handle(self) -> None:
        with self.server.client(self.connection):
            try:
                super().handle()
            except OSError:  # the viewer left, was too slow, or close() dropped it
                log.debug("a live view client went: %s", self.client_address)

    def do_GET(self) -> None:
        view = self.server.view
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._reply(200, "text/html; charset=utf-8", view._page)
        elif path == "/stats.json":
            self._reply(200, "application/json", json.dumps(view._stats()).encode())
        elif path == "/frame.jpg":
            frame = view._frames.newer_than(0, timeout=0)
            if frame is None:
                self._reply(404, "text/plain", b"no frame yet\n")
            else:
                self._reply(200, "image/jpeg", frame[1])
        elif path == "/stream.mjpg":
            self._stream(view._frames)
        else:
            self._reply(404, "text/plain", b"not found\n")

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, frames: LatestFrame) -> None:
        """Every new frame, until the viewer leaves or the view closes. Each part is
        followed at once by the next boundary: a browser shows a part when it sees the
        boundary after it, so ending a part with one shows it without waiting for the next."""
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={_BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        boundary = f"\r\n--{_BOUNDARY}\r\n".encode()
        self.wfile.write(boundary[2:])
        seen = 0
        while (frame := frames.newer_than(seen)) is not None:
            seen, jpeg = frame
            head = f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
            self.wfile.write(head.encode() + jpeg + boundary)

    def log_message(self, format: str, *args: Any) -> None:
        # BaseHTTPRequestHandler writes every request to stderr; the library logs.
        log.debug("%s: " + format, self.client_address[0], *args)

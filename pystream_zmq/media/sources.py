"""Where frames come from: a video file, a camera, a network stream, a folder of images.

Each source is an iterable of items ``{"image": frame, "index": n, "time": t}`` (a BGR
uint8 array, its number from 0, and ``time.time()`` when it was read), so it is a
pipeline's ``input_generator`` as it is, and its end is the end of the stream:

    pipeline = Pipeline(input_generator=VideoSource("in.mp4"))

``pystream-worker source pystream_zmq.media:VideoSource --param source=in.mp4`` sends the
same items.
"""

from __future__ import annotations

import glob
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pystream_zmq.pacing import Pacer

log = logging.getLogger(__name__)

Item = dict[str, Any]


def _item(image: np.ndarray[Any, Any], index: int) -> Item:
    return {"image": image, "index": index, "time": time.time()}


class VideoSource:
    """Frames from OpenCV's ``VideoCapture``: a file (``"in.mp4"``), a camera (an int, or
    a string of digits: ``0``), or a stream URL (``rtsp://``, ``http://`` ...).

    A file ends at its last frame; ``realtime=True`` paces it at its own frame rate (as a
    camera would), else frames go as fast as the pipeline takes them. A camera or a stream
    that stops delivering is opened again after ``backoff`` seconds, doubling up to
    ``max_backoff``; each attempt is counted (``reconnects``) and logged, and after
    ``max_reconnects`` failures in a row the stream ends. ``fps`` and ``size`` (width,
    height) are what the source reports, for a writer's defaults."""

    def __init__(
        self,
        source: str | int | Path,
        *,
        realtime: bool = False,
        max_reconnects: int = 10,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
    ) -> None:
        if isinstance(source, str) and source.isdigit():
            source = int(source)
        self.source = source
        self.live = isinstance(source, int) or "://" in str(source)
        if not self.live and not Path(str(source)).is_file():
            raise FileNotFoundError(f"no video file {source}")
        self.realtime = realtime
        self.max_reconnects = max_reconnects
        self.backoff, self.max_backoff = backoff, max_backoff
        self.reconnects = 0
        self._stop = threading.Event()
        self._capture = self._open()
        if self._capture is None:
            raise OSError(f"cannot open video source {source!r}")
        self.fps = self._capture.get(cv2.CAP_PROP_FPS) or 30.0
        width = int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.size = (width, height)

    def _open(self) -> cv2.VideoCapture | None:
        capture = cv2.VideoCapture(self.source if self.live else str(self.source))
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def __iter__(self) -> Iterator[Item]:
        pacer = Pacer(1 / self.fps) if self.realtime else None
        index = 0
        while True:
            capture = self._capture
            ok, frame = capture.read() if capture is not None else (False, None)
            if ok and frame is not None:
                yield _item(frame, index)
                index += 1
                if pacer is not None and pacer.wait(self._stop):
                    return
                continue
            if not self.live or not self._reopen():
                self.close()
                return

    def _reopen(self) -> bool:
        """Open a live source again, with backoff; False after max_reconnects failures."""
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        delay = self.backoff
        for attempt in range(1, self.max_reconnects + 1):
            self.reconnects += 1
            log.warning(
                "video source %s stopped delivering; opening it again in %.1f s (attempt %d "
                "of %d)",
                self.source, delay, attempt, self.max_reconnects,
            )  # fmt: skip
            if self._stop.wait(delay):
                return False
            self._capture = self._open()
            if self._capture is not None:
                return True
            delay = min(delay * 2, self.max_backoff)
        log.error("video source %s: gave up after %d attempts", self.source, self.max_reconnects)
        return False

    def close(self) -> None:
        """Release the capture; a paced or reconnecting iteration ends."""
        self._stop.set()
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class ImageFolder:
    """The images a glob pattern matches (``"frames/*.png"``, or a folder: every file in
    it), in name order; ``period`` seconds between two (default: as fast as taken).
    A file that cannot be read is skipped with a warning."""

    def __init__(self, pattern: str | Path, *, period: float = 0.0) -> None:
        path = Path(pattern)
        self.pattern = str(path / "*") if path.is_dir() else str(pattern)
        self.files = sorted(glob.glob(self.pattern))
        if not self.files:
            raise FileNotFoundError(f"no image matches {self.pattern}")
        self.period = period

    def __iter__(self) -> Iterator[Item]:
        pacer, never = Pacer(self.period), threading.Event()
        index = 0
        for name in self.files:
            image = cv2.imread(name, cv2.IMREAD_COLOR)
            if image is None:
                log.warning("skipped %s: not an image OpenCV can read", name)
                continue
            item = _item(image, index)
            item["path"] = name
            yield item
            index += 1
            if self.period:
                pacer.wait(never)

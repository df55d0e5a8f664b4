"""The live view's latest frame: ``put()`` keeps a reference and wakes the viewers, and
the JPEG is made when a viewer first asks for that frame, once, however many viewers there
are. So showing a frame costs the pipeline nothing but a lock, nobody watching costs no
encoding, and a viewer that falls behind simply gets the newest frame next."""

from __future__ import annotations

import threading
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.uint8]


def is_image(value: Any) -> bool:
    """A uint8 array cv2.imencode takes: gray, or 1, 3 (BGR) or 4 (BGRA) channels."""
    return (
        isinstance(value, np.ndarray)
        and value.dtype == np.uint8
        and value.size > 0
        and (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (1, 3, 4)))
    )


class LatestFrame:
    """The newest frame, numbered from 1 in the order given, and its JPEG once asked for."""

    def __init__(self, quality: int) -> None:
        self._params = [cv2.IMWRITE_JPEG_QUALITY, quality]
        self._cond = threading.Condition()
        self._seq = 0
        self._image: Image | None = None
        self._closed = False
        # Encoding holds this lock, not _cond: put() never waits for an encoding.
        self._encode_lock = threading.Lock()
        self._jpeg: tuple[int, bytes] = (0, b"")

    @property
    def count(self) -> int:
        """How many frames were put."""
        return self._seq

    def put(self, image: Image) -> None:
        with self._cond:
            self._seq += 1
            self._image = image
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiting viewer; from now on they get None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def newer_than(self, seen: int, timeout: float | None = None) -> tuple[int, bytes] | None:
        """(number, JPEG) of the newest frame once there is one after ``seen``, waiting up
        to ``timeout`` seconds (None: until there is, or until closed); None if there was
        none in time, or the view was closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._seq > seen, timeout)
            if self._closed or self._seq <= seen or self._image is None:
                return None
            seq, image = self._seq, self._image
        return self._encoded(seq, image)

    def _encoded(self, seq: int, image: Image) -> tuple[int, bytes]:
        with self._encode_lock:
            if self._jpeg[0] < seq:  # else a viewer encoded this frame, or a newer one
                ok, data = cv2.imencode(".jpg", image, self._params)
                if not ok:
                    raise ValueError(f"cv2.imencode could not encode a {image.shape} image")
                self._jpeg = (seq, data.tobytes())
            return self._jpeg

"""Where frames go: a video file, a folder of images. Each sink is a stage (it returns
the item it was given), so it can be a pipeline's last stage, running in its own worker
under ``parallelize()``, in input order; or it can take ``pipeline.results()``:

    writer = VideoWriter("out.mp4", fps=source.fps)
    for out in pipeline.results():
        writer(out)
    writer.cleanup()

Files are opened at the first item, in the process that writes them, and closed by
``cleanup()`` (which the pipeline calls in that process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2

from pystream_zmq.stage import Stage

Item = dict[str, Any]

_FOURCC = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "MJPG", ".mov": "mp4v"}


class VideoWriter(Stage):
    """Writes each item's ``key`` frame (BGR uint8) to a video file. ``fps`` defaults to
    30; ``size`` (width, height) to the first frame's, and a frame of another size is
    resized to it. The codec follows the file's extension (mp4v for .mp4 and .mov, MJPG
    for .avi and .mkv) unless ``fourcc`` is given. ``frames`` counts what was written."""

    def __init__(
        self,
        path: str | Path,
        *,
        fps: float = 30.0,
        size: tuple[int, int] | None = None,
        key: str = "image",
        fourcc: str | None = None,
        name: str = "VideoWriter",
    ) -> None:
        self.path = str(path)
        self.fps, self.size, self.key = fps, size, key
        suffix = Path(self.path).suffix.lower()
        self.fourcc = fourcc or _FOURCC.get(suffix, "mp4v")
        self.name = name
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None

    def __call__(self, data: Item) -> Item:
        frame = data[self.key]
        if self._writer is None:
            self.size = self.size or (frame.shape[1], frame.shape[0])
            fourcc = cv2.VideoWriter.fourcc(*self.fourcc)
            self._writer = cv2.VideoWriter(self.path, fourcc, self.fps, self.size)
            if not self._writer.isOpened():
                self._writer = None
                raise OSError(f"cannot write video {self.path} ({self.fourcc})")
        if (frame.shape[1], frame.shape[0]) != self.size:
            frame = cv2.resize(frame, self.size)
        self._writer.write(frame)
        self.frames += 1
        return data

    def cleanup(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __getstate__(self) -> dict[str, Any]:
        # Sent to a worker before the first frame; an open writer never travels.
        return {**self.__dict__, "_writer": None}


class ImageFolderWriter(Stage):
    """Writes each item's ``key`` frame as an image file in ``folder`` (made if missing),
    named by ``pattern`` formatted with the item (``{index:06d}``: the item's ``index``)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        pattern: str = "frame_{index:06d}.png",
        key: str = "image",
        name: str = "ImageFolderWriter",
    ) -> None:
        self.folder = Path(folder)
        self.pattern, self.key, self.name = pattern, key, name
        self.written = 0

    def __call__(self, data: Item) -> Item:
        self.folder.mkdir(parents=True, exist_ok=True)
        index = data.get("index", self.written)
        target = self.folder / self.pattern.format(index=index)
        if not cv2.imwrite(str(target), data[self.key]):
            raise OSError(f"cannot write image {target}")
        self.written += 1
        return data

    def cleanup(self) -> None:
        pass

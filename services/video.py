"""The video job: a video file in, background subtraction finds what moves, a box is
drawn around it, every frame out. Items are pystream_zmq.media's: ``image`` (BGR uint8),
``index``, ``time``; ``boxes`` once detected.

    pipeline = video_job()                      # the Python API
    pystream procfile services.video:video_job  # the same as a Procfile (the shipped one)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pystream_zmq import Pipeline, Stage
from pystream_zmq.media import VideoSource

Item = dict[str, Any]
GREEN = (0, 255, 0)


def make_demo_video(
    path: str | Path, frames: int = 300, size: tuple[int, int] = (640, 480)
) -> None:
    """A synthetic scene: two shapes crossing a shaded background, at 30 frames/s."""
    width, height = size
    ramp = np.linspace(40, 120, width, dtype=np.uint8)
    background = np.dstack([np.tile(ramp, (height, 1))] * 3)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30, size)
    try:
        for i in range(frames):
            frame = background.copy()
            x = 20 + i * 5 % (width - 100)
            cv2.rectangle(frame, (x, height // 3), (x + 60, height // 3 + 60), (255, 255, 255), -1)
            y = 20 + i * 3 % (height - 80)
            cv2.circle(frame, (width - 120, y + 30), 30, (0, 200, 255), -1)
            writer.write(frame)
    finally:
        writer.release()


class DemoVideo(VideoSource):
    """The demo's input: ``path``, made at the first run if it is not there, read at its
    own frame rate (as a camera would deliver it)."""

    def __init__(self, path: str = "demo.avi", frames: int = 300) -> None:
        self.path, self.frames = path, frames
        if not Path(path).is_file():
            make_demo_video(path, frames)
        super().__init__(path, realtime=True)


def blur(data: Item) -> Item:
    data["blurred"] = cv2.GaussianBlur(data["image"], (5, 5), 0)
    return data


class Detect(Stage):
    """Background subtraction (MOG2) on ``blurred``; a green box around each moving blob
    on ``image``, and their count in ``boxes``. The background model is this stage's state:
    it lives in one worker and sees the frames in order."""

    def __init__(self, min_area: int = 50) -> None:
        self.name = "Detect"
        self.min_area = min_area
        self.model: Any = None

    def __call__(self, data: Item) -> Item:
        if self.model is None:
            self.model = cv2.createBackgroundSubtractorMOG2(history=50, detectShadows=False)
        mask = self.model.apply(data.pop("blurred"))
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boxes = [cv2.boundingRect(c) for c in contours if cv2.contourArea(c) > self.min_area]
        for x, y, w, h in boxes:
            cv2.rectangle(data["image"], (x, y), (x + w, y + h), GREEN, 2)
        data["boxes"] = len(boxes)
        return data

    def cleanup(self) -> None:
        self.model = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "model": None}  # made again where it runs


def video_job() -> Pipeline:
    pipeline = Pipeline(input_generator=DemoVideo(), use_profiler=True)
    pipeline.add(blur, "Blur")
    pipeline.add(Detect())
    return pipeline

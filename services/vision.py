"""A small real vision pipeline: a synthetic moving scene -> resize -> blur -> edges ->
overlay. Items are dicts: ``frame`` (BGR uint8), ``index``, and ``edges`` once found.

    pipeline = vision_pipeline()                      # the Python API
    pystream procfile services.vision:vision_pipeline # the same as a Procfile
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from pystream_zmq import Pipeline, Stage

Item = dict[str, Any]


class MovingScene:
    """Source: each call returns the next frame of a ball bouncing over a gradient."""

    def __init__(self, width: int = 640, height: int = 480) -> None:
        self.width, self.height = width, height
        self.index = 0
        ramp = np.linspace(40, 160, width, dtype=np.uint8)
        self._background = np.dstack([np.tile(ramp, (height, 1))] * 3)

    def __call__(self) -> Item:
        frame = self._background.copy()
        t = self.index
        x = int((np.sin(t / 15) * 0.4 + 0.5) * self.width)
        y = int((np.cos(t / 23) * 0.4 + 0.5) * self.height)
        cv2.circle(frame, (x, y), self.height // 8, (0, 200, 255), thickness=-1)
        cv2.rectangle(
            frame,
            (t * 7 % self.width, 20),
            (t * 7 % self.width + 60, 80),
            (255, 80, 0),
            thickness=-1,
        )
        self.index += 1
        return {"frame": frame, "index": t}


class Resize(Stage):
    """Scales ``frame`` to width x height."""

    def __init__(self, width: int = 320, height: int = 240) -> None:
        self.width, self.height = width, height

    def __call__(self, data: Item) -> Item:
        data["frame"] = cv2.resize(data["frame"], (self.width, self.height))
        return data

    def cleanup(self) -> None:
        pass


def blur(data: Item) -> Item:
    data["frame"] = cv2.GaussianBlur(data["frame"], (5, 5), 0)
    return data


def edges(data: Item) -> Item:
    data["edges"] = cv2.Canny(cv2.cvtColor(data["frame"], cv2.COLOR_BGR2GRAY), 50, 150)
    return data


def overlay(data: Item) -> Item:
    """Draws the edges in green and the frame number onto ``frame``, in place."""
    frame = data["frame"]
    frame[data["edges"] > 0] = (0, 255, 0)
    cv2.putText(
        frame,
        f"#{data['index']}",
        (8, frame.shape[0] - 10),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.6,
        (255, 255, 255),
        1,
    )
    return data


def vision_pipeline() -> Pipeline:
    pipeline = Pipeline(input_generator=MovingScene(), use_profiler=True)
    pipeline.add(Resize(320, 240), "Resize")
    pipeline.add(blur, "Blur")
    pipeline.add(edges, "Edges")
    pipeline.add(overlay, "Overlay")
    return pipeline

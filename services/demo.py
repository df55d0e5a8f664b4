"""The seed notebook's demo stages (``scripts/demo.py`` keeps the notebook verbatim), as an
importable module, and the seed pipeline that the repository's Procfile runs:

    pystream procfile services.demo:seed_pipeline --period 0.2 > Procfile
"""

from __future__ import annotations

import cv2
import numpy as np

from pystream_zmq import Pipeline, Stage


class DummyStage(Stage):
    """Convolves the image 100 times and counts the items it processed."""

    def __init__(self, name: str) -> None:
        self.count = 0
        self.name = name
        self.kernel = np.random.randint(-10, 10, size=(5, 5))

    def __call__(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        img = data["data"]
        for _ in range(100):
            img = cv2.filter2D(src=img, ddepth=-1, kernel=self.kernel)
        data["data"] = img
        self.count += 1
        return data

    def cleanup(self) -> None:
        self.count = 0


def dummy_stage_func(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same convolutions as a function stage, with a new kernel each time."""
    img = data["data"]
    kernel = np.random.randint(-10, 10, size=(5, 5))
    for _ in range(100):
        img = cv2.filter2D(src=img, ddepth=-1, kernel=kernel)
    data["data"] = img
    return data


def generate_data() -> dict[str, np.ndarray]:
    """A random 480x720 colour frame."""
    return {"data": np.random.randint(0, 255, size=(480, 720, 3), dtype=np.uint8)}


def seed_pipeline() -> Pipeline:
    """The seed notebook's first pipeline: five counting stages, profiled."""
    pipeline = Pipeline(input_generator=generate_data, use_profiler=True)
    for i in range(5):
        pipeline.add(DummyStage(f"Stage{i + 1}"))
    return pipeline

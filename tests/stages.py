"""Stages the tests run in worker processes (importable by the workers by module name)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pystream_zmq import Stage


def add_one(data: dict[str, Any]) -> dict[str, Any]:
    data["x"] += 1
    return data


def double(data: dict[str, Any]) -> dict[str, Any]:
    data["x"] *= 2
    return data


def draw(data: dict[str, Any]) -> dict[str, Any]:
    """Writes into its input in place, as cv2 drawing functions do."""
    data["image"][0, 0] = 255
    return data


def record_pid(data: dict[str, Any]) -> dict[str, Any]:
    data.setdefault("pids", []).append(os.getpid())
    return data


def native_threads(data: dict[str, Any]) -> dict[str, Any]:
    """Appends [OpenCV's threads, sorted sizes of the BLAS pools] as this process sees them;
    cv2 is imported here, as a stage's own code loads it, after its worker has started."""
    import cv2
    import threadpoolctl

    pools = threadpoolctl.threadpool_info()
    blas = sorted({pool["num_threads"] for pool in pools if pool["user_api"] == "blas"})
    data.setdefault("threads", []).append([cv2.getNumThreads(), blas])
    return data


class Counter(Stage):
    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name
        self.count = 0
        self.kernel = np.arange(4)

    def __call__(self, data: Any) -> Any:
        self.count += 1
        return data

    def cleanup(self) -> None:
        self.count = 0


class FailOn(Stage):
    """Raises on the item whose ``x`` equals ``bad``."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if data["x"] == self.bad:
            raise ValueError(f"cannot take {self.bad}")
        return data

    def cleanup(self) -> None:
        pass


class Gate(Stage):
    """Holds each item until the test writes one byte into a FIFO: backpressure on demand,
    with no sleeping."""

    def __init__(self, fifo: str) -> None:
        self.fifo = fifo
        self.reader: Any = None

    def __call__(self, data: Any) -> Any:
        if self.reader is None:
            self.reader = open(self.fifo, "rb", buffering=0)  # noqa: SIM115
        self.reader.read(1)
        return data

    def cleanup(self) -> None:
        pass


class HoldAt(Gate):
    """A Gate for the items whose ``x`` is in ``held``; the others pass at once."""

    def __init__(self, fifo: str, held: tuple[int, ...]) -> None:
        super().__init__(fifo)
        self.held = held

    def __call__(self, data: Any) -> Any:
        return super().__call__(data) if data["x"] in self.held else data


def _refuse_to_load() -> None:
    raise ImportError("this stage cannot be loaded in a worker")


class Unloadable(Stage):
    def __reduce__(self) -> Any:
        return (_refuse_to_load, ())

    def __call__(self, data: Any) -> Any:
        return data

    def cleanup(self) -> None:
        pass


def spin(data: dict[str, Any]) -> dict[str, Any]:
    """Pure-Python work that holds the GIL."""
    total = 0
    for i in range(data.get("work", 200_000)):
        total += i * i
    data["total"] = total
    return data


def spin_and_note_pid(data: dict[str, Any]) -> dict[str, Any]:
    data = spin(data)
    data["pid"] = os.getpid()
    return data


class ReusesItsBuffer(Stage):
    """Returns the same 1 MB array every time, overwritten with the item's number: the
    zero-copy send must not let a later call change what an earlier item carries."""

    def __init__(self) -> None:
        self.buffer = np.zeros(1 << 20, np.int64)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        self.buffer[:] = data["x"]
        return {"x": data["x"], "buffer": self.buffer}

    def cleanup(self) -> None:
        pass


def add_to_buffer(data: dict[str, Any]) -> dict[str, Any]:
    """Changes the array it received in place and passes it on."""
    data["buffer"] += 1
    data["x"] += 1
    return data


def keep_buffer(data: dict[str, Any]) -> dict[str, Any]:
    """Passes on a view of the whole array it received, and a slice of it as a new array."""
    return {"x": data["x"], "buffer": data["buffer"].reshape(-1), "half": data["buffer"][::2]}


class ChecksBuffer(Stage):
    def __init__(self) -> None:
        self.checked = 0
        self.corrupt = 0

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        self.checked += 1
        self.corrupt += int(not (data["buffer"] == data["x"]).all())
        return {"x": data["x"]}

    def cleanup(self) -> None:
        pass


def sleep_5ms(data: Any) -> Any:
    time.sleep(0.005)  # the stage's work (a known delay), not synchronisation
    return data


def sleep_10ms(data: Any) -> Any:
    time.sleep(0.010)  # the stage's work (a known delay), not synchronisation
    return data


def tiny() -> dict[str, Any]:
    """A source: one small item per call."""
    return {"x": 0}


class Sleep(Stage):
    """Works for a known time per item (sleeping is its work, not synchronisation)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, data: Any) -> Any:
        time.sleep(self.seconds)
        return data

    def cleanup(self) -> None:
        pass


def jitter(data: dict[str, Any]) -> dict[str, Any]:
    """Takes 0-4 ms depending on the item, so replicas finish out of order; notes its pid."""
    time.sleep((data["x"] * 7 % 5) / 1000)
    data["pid"] = os.getpid()
    return data


class Recorder(Stage):
    """Keeps every ``x`` it sees, in arrival order, and the pids that processed them."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.pids: list[int] = []

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        self.seen.append(data["x"])
        self.pids.append(data.get("pid", 0))
        return data

    def cleanup(self) -> None:
        pass


def counting() -> Iterator[dict[str, Any]]:
    """A source: {"x": 0}, {"x": 1}, ..."""
    x = 0
    while True:
        yield {"x": x}
        x += 1


class SlowCount(Stage):
    """Counts its items (``n``); each takes ``seconds`` (sleeping is its work, not
    synchronisation), and creates the file ``started`` as it begins."""

    def __init__(self, seconds: float, started: str) -> None:
        self.seconds = seconds
        self.started = started
        self.n = 0

    def __call__(self, data: Any) -> Any:
        open(self.started, "a").close()
        time.sleep(self.seconds)
        self.n += 1
        return data

    def cleanup(self) -> None:
        pass


class KeepsViews(Stage):
    """Keeps a view (and a slice) of every array it receives, for ever, and checks on each
    call that none of them has changed: shared memory must never reuse a region it holds."""

    def __init__(self) -> None:
        self.kept: list[tuple[int, Any, Any]] = []
        self.checked = 0
        self.changed = 0

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        image = data["image"]
        self.kept.append((data["x"] % 251, image.reshape(-1), image[::2, 1]))
        for value, flat, part in self.kept:
            self.checked += 1
            self.changed += int(not ((flat == value).all() and (part == value).all()))
        return data

    def cleanup(self) -> None:
        self.kept = []


def fill_image(data: dict[str, Any]) -> dict[str, Any]:
    """Writes into the array it received (which must be writeable) before passing it on."""
    data["image"][...] = data["x"] % 251
    return data


def no_op(data: Any) -> Any:
    """Returns the very item it was given."""
    return data


class KeepsFirstImage(Stage):
    """Keeps what it received first, as ``how`` says, and checks on every call that the
    first value is still what it keeps; shared memory must copy what a stage keeps, never
    pass it on (``shm.handoff``)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.kept: Any = None
        self.value = -1
        self.checked = 0
        self.changed = 0

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        image = data["image"]
        if self.kept is None:
            self.value = int(image.flat[0])
            if self.how == "array":
                self.kept = image
            elif self.how == "slice":
                self.kept = image[10:20]
            elif self.how == "view":
                self.kept = image.reshape(-1)
            elif self.how == "memoryview":
                self.kept = memoryview(image)
            elif self.how == "dict":  # the dict, and a copy of it goes on
                self.kept = data
                data = dict(data)
        else:
            self.checked += 1
            kept = np.asarray(self.kept["image"] if self.how == "dict" else self.kept)
            self.changed += int(not (kept == self.value).all())
        return data

    def cleanup(self) -> None:
        self.kept = None

"""A vision job end to end: a video file in, every frame through blur and background
subtraction with a box drawn, every frame out to a video file and to results(), in order,
serial and parallel; image folders; a live source that stops is reopened. Real files,
OpenCV's video I/O and worker processes."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq
from conftest import wait_until
from test_seed_notebook import _env
from test_worker_cli import (  # noqa: F401  (run_honcho and honcho_env: fixtures)
    BIN,
    Honcho,
    free_port_range,
    honcho_env,
    run_honcho,
    stopped_after,
    stopped_codes,
)

from pystream_zmq import Pipeline
from pystream_zmq.media import ImageFolder, ImageFolderWriter, VideoSource, VideoWriter
from pystream_zmq.wire import codec, transport
from services.video import Detect, blur, make_demo_video

FRAMES, WIDTH, HEIGHT = 300, 160, 120


def make_video(path: Path, frames: int = FRAMES) -> Path:
    make_demo_video(path, frames, size=(WIDTH, HEIGHT))
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("video") / "in.avi")


def read_frames(path: Path) -> list[np.ndarray[Any, Any]]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def boxed(frame: np.ndarray[Any, Any]) -> bool:
    """A green box is drawn in the frame (MJPG blurs colours a little)."""
    b, g, r = (frame[..., i].astype(int) for i in range(3))
    return bool(((g > 200) & (b < 80) & (r < 80)).sum() > 20)


@pytest.mark.parametrize("mode", ["serialize", "parallelize"])
def test_every_frame_of_a_video_comes_out_in_order_with_its_box(
    mode: str, video: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    source = VideoSource(video)
    assert source.size == (WIDTH, HEIGHT)
    out = tmp_path / "out.avi"
    with Pipeline(input_generator=source) as pipeline:
        pipeline.add(blur)
        pipeline.add(Detect())
        pipeline.add(VideoWriter(out, fps=source.fps))
        getattr(pipeline, mode)()
        outputs = pipeline.results()
        pipeline.start_loop(0)
        indexes = [(item["index"], item["boxes"]) for item in outputs]
        assert pipeline.join(timeout=30)
    assert [index for index, _ in indexes] == list(range(FRAMES))
    assert sum(boxes > 0 for _, boxes in indexes) > FRAMES * 0.9
    written = read_frames(out)
    assert len(written) == FRAMES
    assert sum(map(boxed, written)) > FRAMES * 0.9
    assert [r.getMessage() for r in caplog.records] == []


def test_a_video_source_paces_a_file_at_its_own_rate_when_asked(video: Path) -> None:
    source = VideoSource(video, realtime=True)
    items = iter(source)
    first = next(items)["time"]
    for _ in range(14):
        last = next(items)["time"]
    source.close()
    assert 14 / 30 * 0.9 < last - first < 14 / 30 * 2  # 30 frames/s, as the file says


def test_image_folders_in_and_out(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((8, 8, 3), i * 40, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    with Pipeline(input_generator=ImageFolder(folder)) as pipeline:
        pipeline.add(ImageFolderWriter(tmp_path / "out"))
        pipeline.parallelize()
        pipeline.start_loop(0)
        assert pipeline.join(timeout=30)
    written = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in written] == [f"frame_{i:06d}.png" for i in range(5)]
    assert [int(cv2.imread(str(p))[0, 0, 0]) for p in written] == [0, 40, 80, 120, 160]


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no video file"):
        VideoSource(tmp_path / "nope.mp4")
    with pytest.raises(FileNotFoundError, match="no image matches"):
        ImageFolder(tmp_path / "*.png")


def test_a_live_source_that_stops_is_opened_again_and_counted(tmp_path: Path) -> None:
    """A stream URL (file:// here, through OpenCV's FFmpeg reader) that ends is reopened;
    once it cannot be opened any more, the stream ends after max_reconnects tries."""
    path = make_video(tmp_path / "live.avi", frames=10)
    source = VideoSource(f"file://{path}", backoff=0.01, max_reconnects=3)
    assert source.live
    items = iter(source)
    indexes = [next(items)["index"] for _ in range(25)]  # through two reopenings
    assert indexes == list(range(25))
    assert source.reconnects == 2
    path.unlink()
    rest = list(items)  # the file is gone: three failed tries, then the end
    assert len(rest) <= 10
    assert source.reconnects == 2 + 3


def test_pystream_worker_source_sends_a_video_file_frame_by_frame(
    video: Path, tmp_path: Path
) -> None:
    """The same source as a process: every frame, in order, then 'sent all 300 items'."""
    port = free_port_range(1)
    ctx: zmq.Context[Any] = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(f"tcp://127.0.0.1:{port}")
    log_path = tmp_path / "source.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [BIN / "pystream-worker", "source", "pystream_zmq.media:VideoSource",
             "--param", f"source={video}", "--period", "0", "--push", f"tcp://127.0.0.1:{port}"],
            stdout=log_file, stderr=log_file, env=_env(),
        )  # fmt: skip
    try:
        indexes = []
        while len(indexes) < FRAMES:
            assert pull.poll(10_000), log_path.read_text()
            frames = pull.recv_multipart()
            _, seq, _ = transport.unpack_envelope(frames[0])
            item: Any = codec.decode(transport.payload(frames))
            assert item["image"].shape == (HEIGHT, WIDTH, 3)
            indexes.append((seq, item["index"]))
        assert indexes == [(i, i) for i in range(FRAMES)]
        assert wait_until(lambda: "sent all 300 items" in log_path.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        ctx.destroy(linger=0)


def test_a_procfile_over_a_video_file_ends_by_itself(
    video: Path,
    tmp_path: Path,
    run_honcho: Callable[[Path], Honcho],  # noqa: F811
) -> None:
    """source -> two stages -> sink under honcho: every frame comes
    out, then the end of the file goes down the chain and every process exits 0, with
    nobody stopping them."""
    base = free_port_range(5)
    ep = [f"tcp://127.0.0.1:{base + i}" for i in range(5)]
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        f"source: exec pystream-worker source pystream_zmq.media:VideoSource"
        f" --param source={video} --period 0 --push {ep[0]}\n"
        f"Blur: exec pystream-worker stage services.video:blur --pull {ep[0]} --push {ep[1]}\n"
        f"Detect: exec pystream-worker stage services.video:Detect --pull {ep[1]} --push {ep[2]}\n"
        f"sink: exec pystream-worker sink --pull {ep[2]}\n"
    )
    honcho = run_honcho(procfile)
    assert honcho.proc.wait(timeout=60) == 0, honcho.output()
    output = honcho.output()
    assert stopped_codes(output) == {"source": 0, "Blur": 0, "Detect": 0, "sink": 0}, output
    sink = stopped_after(output, "sink")
    assert sink is not None and int(sink.group(1)) == FRAMES, output
    assert "the input stream ended: stopping" in output
    assert "Traceback" not in output


def test_the_readmes_video_job_runs(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = re.search(r"```python\n(from pystream_zmq import Pipeline\n.*?)```", readme, re.S)
    assert example is not None
    script = tmp_path / "job.py"
    script.write_text(example.group(1))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=_env())  # fmt: skip
    assert result.returncode == 0, result.stderr
    frames, boxed_frames = re.fullmatch(r"(\d+) frames, (\d+) with a box\n", result.stdout).groups()
    assert int(frames) == 100 and int(boxed_frames) > 80, result.stdout
    assert len(read_frames(tmp_path / "out.avi")) == 100

"""Sources and sinks for vision pipelines: video files, cameras, streams and image folders
(OpenCV's video I/O), and a live view in the browser."""

try:
    import cv2  # noqa: F401
except ImportError as e:  # a clear word instead of "No module named 'cv2'"
    raise ImportError(
        "pystream_zmq.media needs OpenCV: pip install 'pystream-zmq[opencv]' (the headless "
        "build), or have opencv-python (the GUI build) installed already"
    ) from e

from pystream_zmq.media.live import LiveView
from pystream_zmq.media.sinks import ImageFolderWriter, VideoWriter
from pystream_zmq.media.sources import ImageFolder, VideoSource

__all__ = ["ImageFolder", "ImageFolderWriter", "LiveView", "VideoSource", "VideoWriter"]

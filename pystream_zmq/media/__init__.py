"""Sources and sinks for vision pipelines: video files, cameras, streams and image folders
(OpenCV's video I/O), and a live view in the browser."""

from pystream_zmq.media.live import LiveView
from pystream_zmq.media.sinks import ImageFolderWriter, VideoWriter
from pystream_zmq.media.sources import ImageFolder, VideoSource

__all__ = ["ImageFolder", "ImageFolderWriter", "LiveView", "VideoSource", "VideoWriter"]

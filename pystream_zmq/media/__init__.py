"""Sources and sinks for vision pipelines: video files, cameras, streams and image folders
(OpenCV's video I/O)."""

from pystream_zmq.media.sinks import ImageFolderWriter, VideoWriter
from pystream_zmq.media.sources import ImageFolder, VideoSource

__all__ = ["ImageFolder", "ImageFolderWriter", "VideoSource", "VideoWriter"]

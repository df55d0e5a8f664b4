"""The live view: a running pipeline's latest frame and per-stage figures in a browser,
served over HTTP from a thread (see docs/media.md)."""

from pystream_zmq.media.live.figures import counter_figures, pipeline_figures, profile_figures
from pystream_zmq.media.live.server import LiveView

__all__ = ["LiveView", "counter_figures", "pipeline_figures", "profile_figures"]

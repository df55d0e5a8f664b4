"""pystream_zmq: PyStream's pipeline API with every stage in its own process, linked by
ZeroMQ. Change ``from pystream import Pipeline, Stage`` to
``from pystream_zmq import Pipeline, Stage``."""

from pystream_zmq.errors import (
    DecodeError,
    ItemTooLargeError,
    PipelineStateError,
    PyStreamError,
    SecurityError,
    StageError,
    StageNameError,
    UnsupportedTypeError,
    WorkerStartupError,
)
from pystream_zmq.pipeline import Pipeline
from pystream_zmq.profiling.store import get_profiler_db_folder, set_profiler_db_folder
from pystream_zmq.stage import MAIN_PIPELINE_NAME, Stage

__all__ = [
    "MAIN_PIPELINE_NAME",
    "DecodeError",
    "ItemTooLargeError",
    "Pipeline",
    "PipelineStateError",
    "PyStreamError",
    "SecurityError",
    "Stage",
    "StageError",
    "StageNameError",
    "UnsupportedTypeError",
    "WorkerStartupError",
    "get_profiler_db_folder",
    "set_profiler_db_folder",
]

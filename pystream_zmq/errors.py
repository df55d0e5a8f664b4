"""The exception tree: one root, specific leaves that carry context."""

from __future__ import annotations


class PyStreamError(Exception):
    """Root of every error this library raises on purpose."""


class PipelineStateError(PyStreamError):
    """An operation does not fit the pipeline's current state (e.g. forward() before
    serialize() or parallelize())."""


class StageNameError(PyStreamError, ValueError):
    """A stage name is invalid or already used in the pipeline."""


class UnsupportedTypeError(PyStreamError, TypeError):
    """A value cannot be sent between processes; the message names its key path."""


class ItemTooLargeError(PyStreamError, ValueError):
    """An item is over a limit a receiver would refuse it for (message bytes, items per
    container); the message names the key path and the limit."""


class DecodeError(PyStreamError):
    """Received bytes are not a valid message. Raised for every kind of bad input, so a
    receiver needs to catch only this."""


class WorkerStartupError(PyStreamError):
    """A worker process could not start its stage."""

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(f"stage {stage!r} failed to start: {detail}")
        self.stage = stage
        self.detail = detail


class StageError(PyStreamError):
    """A stage raised while processing an item; carries the remote traceback text."""

    def __init__(self, stage: str, seq: int, message: str, remote_traceback: str) -> None:
        super().__init__(f"stage {stage!r} failed on item {seq}: {message}")
        self.stage = stage
        self.seq = seq
        self.remote_traceback = remote_traceback


class WorkerCrashedError(PyStreamError):
    """A worker process kept dying: its restart limit is used up."""

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(f"stage {stage!r} stopped working: {detail}")
        self.stage = stage
        self.detail = detail


class SecurityError(PyStreamError, ValueError):
    """A link would be unsafe (a non-loopback address bound without CURVE), or a key file or
    allow-list cannot be used; the message names the address or file."""

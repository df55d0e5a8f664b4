"""A pipeline's input side: where ``forward()`` without data takes its items (its
``input_generator``: a callable returning one item per call, PyStream's, or an iterable)
and ``start_loop()``'s thread. The end of the stream is the iterable running out, or the
callable raising ``StopIteration``; the loop then stops by itself."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from pystream_zmq.errors import PipelineStateError, PyStreamError, StageError
from pystream_zmq.pacing import InputLoop

log = logging.getLogger(__name__)


class EndOfInput(Exception):
    """The input generator has nothing more."""


class Input:
    def __init__(self, source: Callable[[], Any] | Iterable[Any] | None) -> None:
        self.source = source
        self.ended = False
        self._next: Callable[[], Any] | None = None  # made from the source at the first use
        self.loop: InputLoop | None = None

    def restart(self) -> None:
        """Read the source anew (a list from its start; a generator goes on where it was)."""
        self._next, self.ended = None, False

    def next(self) -> Any:
        """The next item; EndOfInput at the end of the stream."""
        if self._next is None:
            if self.source is None:
                raise PipelineStateError("forward() without data needs an input_generator")
            source = self.source
            self._next = source if callable(source) else iter(source).__next__
        if self.ended:
            raise EndOfInput
        try:
            return self._next()
        except StopIteration:
            self.ended = True
            log.info("the input stream ended")
            raise EndOfInput from None

    def start_loop(self, forward: Callable[[], bool], period: float) -> None:
        if self.source is None:
            raise PipelineStateError("start_loop() needs an input_generator")
        if self.loop is not None:
            raise PipelineStateError("the loop is already running")
        self.loop = InputLoop(forward, period, lambda: self.ended)
        self.loop.start()

    def stop_loop(self) -> InputLoop | None:
        """Stop the loop, if there is one; it, to raise what stopped it (``raise_error``)."""
        loop, self.loop = self.loop, None
        if loop is not None:
            loop.stop()
        return loop

    def wait_for_loop(self, timeout: float) -> bool:
        """Wait until the loop is over (the end of the stream, or an error, raised here);
        True at once without a loop."""
        loop = self.loop
        if loop is None:
            return True
        loop.join(timeout)
        if loop.is_alive():
            return False
        raise_error(loop)
        return True

    def finished(self) -> bool:
        """The stream has ended and the loop, if any, is over; raises what stopped the
        loop early."""
        loop_over = self.wait_for_loop(0.0)  # raises what stopped it, even before the end
        return self.ended and loop_over


def raise_error(loop: InputLoop | None) -> None:
    """What made ``loop`` stop early: a StageError (on_error="raise") as forward() raised
    it, anything else as the PyStreamError it caused."""
    error = loop.error if loop is not None else None
    if isinstance(error, StageError):
        raise error
    if error is not None:
        raise PyStreamError(f"the input loop stopped early: {error!r}") from error

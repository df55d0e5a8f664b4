"""Where ``forward()`` without data takes its items: a pipeline's ``input_generator``, a
callable returning one item per call (PyStream's) or an iterable. Its end is the end of
the stream: the iterable runs out, or the callable raises ``StopIteration``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from pystream_zmq.errors import PipelineStateError

log = logging.getLogger(__name__)


class EndOfInput(Exception):
    """The input generator has nothing more."""


class Input:
    def __init__(self, source: Callable[[], Any] | Iterable[Any] | None) -> None:
        self.source = source
        self.ended = False
        self._next: Callable[[], Any] | None = None  # made from the source at the first use

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

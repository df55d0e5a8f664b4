"""The wire format's constants, shared by its encoder (``encoding.py``) and its decoder
(``decoding.py``); ``codec.py`` describes the format."""

from __future__ import annotations

import re
import reprlib

OUT_OF_BAND_MIN_BYTES = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_CONTAINER_LEN = 1_000_000
MAX_DEPTH = 100  # levels of nested containers; far below Python's recursion limit
EXT_TUPLE, EXT_ARRAY, EXT_BUFFER, EXT_SCALAR, EXT_SHARED = 1, 2, 3, 4, 5

KINDS = frozenset("biufc")  # numpy dtype kinds that travel: bool, int, uint, float, complex
PLAIN = frozenset({str, float, bool, bytes, type(None)})  # msgpack carries these as they are
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
MAX_NDIM = 64  # numpy's own limit; also keeps the shape product cheap
# Only names like '<f4', '|b1', 'c16' ever reach np.dtype, whose parser accepts far more.
DTYPE_NAME = re.compile(r"[<>|=]?[biufc][0-9]{1,2}")


def show(value: object) -> str:
    """``value`` in an error message, short, whatever its ``__repr__`` does."""
    try:
        return reprlib.repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        return "?"

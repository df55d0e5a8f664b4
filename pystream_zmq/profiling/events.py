"""The wire format of profile event batches, as workers send them to whoever stores them.

An event is ``(path, seq, arrive, start, end)``: the stage's profile path, the item's
sequence number, and time.time() when the worker received the item and around the stage call.

A batch is msgpack ``[format, paths, path index, seq, arrive, start, end]``: a path table plus
one little-endian binary column per field. A column costs one C call to pack and to unpack,
and its element types are exact by construction, so unpacking need not check every value.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack
import numpy as np

from pystream_zmq.errors import DecodeError
from pystream_zmq.stage import Event

_FORMAT = 1
_DTYPES = ("<u4", "<i8", "<f8", "<f8", "<f8")


def pack_events(events: Sequence[Event]) -> bytes:
    """Encode a batch of events for the profile socket (see unpack_events)."""
    index: dict[str, int] = {}
    paths, *columns = zip(*events, strict=True) if events else [()] * 5
    numbers = [[index.setdefault(path, len(index)) for path in paths], *columns]
    binary = [np.array(col, dtype).tobytes() for dtype, col in zip(_DTYPES, numbers, strict=True)]
    return msgpack.packb([_FORMAT, list(index), *binary], use_bin_type=True)


def unpack_events(data: bytes | memoryview) -> list[Event]:
    """Decode bytes from pack_events. Untrusted input: any problem raises DecodeError."""
    try:
        size = len(data)
        message = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_str_len=size, max_bin_len=size,
            max_array_len=size, max_map_len=size, max_ext_len=size,
        )  # fmt: skip
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise DecodeError(f"profile events are not valid msgpack: {e}") from e
    if type(message) is not list or len(message) != 7 or message[0] != _FORMAT:
        raise DecodeError("profile events: expected [1, paths, 5 columns]")
    version, paths, *binary = message
    if type(version) is not int:  # True == 1 too
        raise DecodeError("profile events: bad format tag")
    if type(paths) is not list or any(type(path) is not str for path in paths):
        raise DecodeError("profile events: paths must be a list of str")
    if any(type(col) is not bytes for col in binary):
        raise DecodeError("profile events: columns must be binary")
    try:
        index, *columns = (np.frombuffer(b, t) for t, b in zip(_DTYPES, binary, strict=True))
    except ValueError as e:  # not a whole number of values
        raise DecodeError(f"profile events: {e}") from e
    if len({len(col) for col in binary[1:]}) != 1 or len(index) != len(columns[0]):
        raise DecodeError("profile events: columns have different lengths")
    if len(index) and index.max() >= len(paths):
        raise DecodeError("profile events: path index out of range")
    values = [col.tolist() for col in columns]
    return list(zip(map(paths.__getitem__, index.tolist()), *values, strict=True))

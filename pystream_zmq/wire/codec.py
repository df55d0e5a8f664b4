"""Wire format of data items: ``encode(obj) -> frames`` and ``decode(frames) -> obj``;
``check(obj)`` raises what ``encode`` would, without encoding (``serialize()``'s check).

A message is a list of ZeroMQ frames. ``frames[0]`` is a msgpack header holding the object
tree; dicts (str keys), lists, str, bytes, int, float, bool and None are plain msgpack. The
rest are ExtTypes whose payload is itself msgpack:

- ``EXT_TUPLE`` (1): a list of items, decoded as a tuple.
- ``EXT_ARRAY`` (2): ``[dtype.str, shape, raw C-order bytes]``, a small numpy array inline.
- ``EXT_BUFFER`` (3): ``[dtype.str, shape, frame index]``, an array whose C-order bytes are
  the whole frame ``frames[index]``. Arrays of ``OUT_OF_BAND_MIN_BYTES`` or more travel this
  way, as zero-copy memoryviews; each frame after the header is referenced exactly once.
- ``EXT_SCALAR`` (4): ``[dtype.str, raw bytes]``, a numpy scalar.
- ``EXT_SHARED`` (5): ``[dtype.str, shape, pool, entry, generation, offset]``, an array
  whose C-order bytes are in a same-host shared-memory pool (``pystream_zmq.shm``), put
  there by ``encode_shared``; only a decoder given that pool's ``Views`` reads it.

Byte order is kept as it is (``'>f4'`` arrives as ``'>f4'``). Decoding treats every frame
as hostile: no pickle, only bool/int/uint/float/complex dtypes, sizes checked before any
allocation, and every failure raised as one ``DecodeError``. ``decode_plain`` reads
another program's single msgpack frame under the same checks (``wire/foreign_codec.py``).
"""

from pystream_zmq.wire.decoding import array_from, decode, decode_plain
from pystream_zmq.wire.encoding import Placer, check, encode, encode_shared
from pystream_zmq.wire.format import (
    DEFAULT_MAX_CONTAINER_LEN,
    DEFAULT_MAX_MESSAGE_BYTES,
    EXT_ARRAY,
    EXT_BUFFER,
    EXT_SCALAR,
    EXT_SHARED,
    EXT_TUPLE,
    MAX_DEPTH,
    OUT_OF_BAND_MIN_BYTES,
)

__all__ = [
    "DEFAULT_MAX_CONTAINER_LEN",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "EXT_ARRAY",
    "EXT_BUFFER",
    "EXT_SCALAR",
    "EXT_SHARED",
    "EXT_TUPLE",
    "MAX_DEPTH",
    "OUT_OF_BAND_MIN_BYTES",
    "Placer",
    "array_from",
    "check",
    "decode",
    "decode_plain",
    "encode",
    "encode_shared",
]

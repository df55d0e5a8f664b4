"""Writes the regression corpus of hostile frames that tests/test_hardening.py replays.

Each ``*.msgpack`` file is ``{"target": ..., "frames": [bytes, ...], "note": str}``, where
target is ``message`` (what a worker's data socket reads: envelope and codec header in the
first frame, then out-of-band buffers),
``events`` (the one payload frame of a profile EVENTS message) or ``msgpack-numpy`` (what a
``--input-format msgpack-numpy`` receiver reads from a program outside PyStream: one plain
msgpack frame, replayed by tests/test_interop.py). Every entry must give a
``DecodeError``. Run ``python tests/corpus/make_corpus.py`` to rewrite the files; a fuzz
failure worth keeping is added to ENTRIES below.

The msgpack-numpy frames of ``../shared/RELIABILITY.md`` are built with msgpack-numpy's own
encoder (a map with b"nd", b"type", b"kind", b"shape", b"data"), then placed where our wire
format carries an array (EXT_ARRAY), since that is where a receiver would parse them.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
from msgpack import ExtType, packb

from pystream_zmq.profiling.events import pack_events
from pystream_zmq.wire import codec, transport

HERE = Path(__file__).resolve().parent
ENVELOPE = transport.pack_envelope(transport.KIND_DATA, 7, 1.0)


def mn(arr: np.ndarray[Any, Any], **override: Any) -> dict[bytes, Any]:
    """msgpack-numpy's own encoding of ``arr``, with fields replaced."""
    fields = dict(msgpack_numpy.encode(arr))
    fields.update({k.encode(): v for k, v in override.items()})
    fields[b"data"] = bytes(fields[b"data"])
    return fields


def as_array(fields: dict[bytes, Any]) -> bytes:
    """msgpack-numpy's fields where our format expects [dtype, shape, data]."""
    dtype = fields[b"type"]
    dtype = dtype if isinstance(dtype, str) else str(dtype)
    payload = packb([dtype, list(fields[b"shape"]), fields[b"data"]])
    return packb({"a": ExtType(codec.EXT_ARRAY, payload)})


def message(*frames: bytes) -> list[bytes]:
    return [ENVELOPE + frames[0], *frames[1:]]


def foreign(item: Any) -> tuple[str, list[bytes]]:
    """A frame as a program outside PyStream sends it, from msgpack-numpy's own encoder."""
    return "msgpack-numpy", [packb(item, default=msgpack_numpy.encode)]


OBJECT = mn(np.array([1, None], dtype=object))  # kind b"O": msgpack-numpy pickle.loads this
ENTRIES: dict[str, tuple[str, list[bytes], str]] = {
    "mn_kind_O_pickle": ("message", message(as_array(OBJECT)), "msgpack-numpy #57: pickle"),
    "mn_kind_O_pickle_raw_dtype": (
        "message",
        message(packb({"a": ExtType(codec.EXT_ARRAY, packb(["O8", [2], OBJECT[b"data"]]))})),
        "the pickle bytes under an object dtype string",
    ),
    "mn_object_dtype_with_data": (
        "message",
        message(as_array(mn(np.zeros(2, "i8"), type="|O"))),
        "dtype |O with 16 bytes of data: numpy segfault",
    ),
    "mn_S_shape_minus_one": (
        "message",
        message(as_array(mn(np.zeros(3, "S1"), shape=(-1,)))),
        "dtype S with shape (-1,): SIGFPE",
    ),
    "mn_S_zero_itemsize": (
        "message",
        message(as_array(mn(np.zeros(3, "S1"), type="S0", shape=(-1,)))),
        "itemsize 0",
    ),
    "mn_dtype_syntax_error": (
        "message",
        message(as_array(mn(np.zeros(1, "f4"), type="(i4,"))),
        "np.dtype raises SyntaxError",
    ),
    "mn_dtype_syntax_error_2": (
        "message",
        message(as_array(mn(np.zeros(1, "f4"), type="[('a', 'f4'),"))),
        "np.dtype raises SyntaxError",
    ),
    "mn_dtype_list": (
        "message",
        message(packb({"a": ExtType(codec.EXT_ARRAY, packb([[["", "|O"]], [2], b"\0" * 16]))})),
        "msgpack-numpy's list form of an object dtype",
    ),
    "pickle_header": ("message", message(pickle.dumps({"x": 1})), "a pickled payload"),
    "pickle_protocol_0": ("message", message(pickle.dumps({"x": 1}, protocol=0)), "pickle 0"),
    "envelope_short": ("message", [ENVELOPE[:16]], "first frame of 16 bytes"),
    "envelope_long": ("message", message(b"\0" + packb({"x": 1})), "stray byte before the header"),
    "envelope_kind": (
        "message",
        [struct.pack("<BQd", 9, 1, 0.0) + packb({"x": 1})],
        "unknown envelope kind",
    ),
    "no_codec_frames": ("message", [ENVELOPE], "envelope alone: no header"),
    "header_in_own_frame": (
        "message",
        [ENVELOPE, packb({"x": 1})],
        "the old layout (envelope frame, then header frame)",
    ),
    "truncated_multipart": (
        "message",
        message(codec.encode({"img": np.zeros(70_000, np.uint8)})[0]),
        "header names an out-of-band frame that never came",
    ),
    "extra_frame": ("message", message(packb({"x": 1}), b"spare"), "a frame nobody references"),
    "truncated_msgpack": ("message", message(packb({"x": 1, "y": "abc"})[:-2]), "cut short"),
    "bad_utf8": ("message", message(b"\xa2\xff\xfe"), "str that is not UTF-8"),
    "shape_buffer_mismatch": (
        "message",
        message(packb(ExtType(codec.EXT_ARRAY, packb(["<f4", [3], b"\0" * 8])))),
        "3 floats in 8 bytes",
    ),
    "shape_product_overflow": (
        "message",
        message(packb(ExtType(codec.EXT_ARRAY, packb(["<f8", [2**62, 2**62], b""])))),
        "shape product past 2**64",
    ),
    "array_len_bomb": (
        "message",
        message(b"\xdd\xff\xff\xff\xff" + b"\xc0" * 64),
        "array header claims 2**32-1 items",
    ),
    "map_len_bomb": (
        "message",
        message(b"\xdf\xff\xff\xff\xff" + b"\xc0" * 64),
        "map header claims 2**32-1 pairs",
    ),
    "bin_len_bomb": (
        "message",
        message(b"\xc6\xff\xff\xff\xff" + b"\0" * 16),
        "bin header claims 4 GB",
    ),
    # msgpack-numpy frames straight from a foreign sender: no envelope, no ext types.
    "fmn_kind_O_pickle": (
        *foreign({"img": np.array([1, None], dtype=object)}),
        "msgpack-numpy #57: its decoder pickle.loads this",
    ),
    "fmn_kind_O_top_level": (*foreign(np.array([{"a": 1}], dtype=object)), "the whole item"),
    "fmn_object_dtype_with_data": (
        *foreign({"a": mn(np.zeros(2, "i8"), type="|O")}),
        "dtype |O with 16 bytes of data: numpy segfault",
    ),
    "fmn_object_scalar": (
        *foreign({"a": {b"nd": False, b"type": "|O", b"data": b"\0" * 8}}),
        "an object scalar",
    ),
    "fmn_S_shape_minus_one": (
        *foreign({"a": mn(np.zeros(3, "S1"), shape=(-1,))}),
        "dtype S with shape (-1,): SIGFPE",
    ),
    "fmn_S_zero_itemsize": (
        *foreign({"a": mn(np.zeros(3, "S1"), type="S0", shape=(-1,))}),
        "itemsize 0",
    ),
    "fmn_structured": (
        *foreign({"a": np.zeros(2, [("x", "<f4"), ("y", "<i4")])}),
        "kind V: a structured dtype, its descr a list",
    ),
    "fmn_structured_no_kind": (
        *foreign({"a": mn(np.zeros(2, [("x", "<f4")]), kind=b"")}),
        "a structured descr under an empty kind",
    ),
    "fmn_dtype_syntax_error": (
        *foreign({"a": mn(np.zeros(1, "f4"), type="(i4,")}),
        "np.dtype raises SyntaxError",
    ),
    "fmn_unicode_dtype": (*foreign({"a": np.array(["abc"])}), "dtype <U3: not a number"),
    "fmn_shape_data_mismatch": (
        *foreign({"a": mn(np.zeros(3, "f4"), data=b"\0" * 8)}),
        "3 floats in 8 bytes",
    ),
    "fmn_shape_negative": (*foreign({"a": mn(np.zeros(2, "f4"), shape=(-1, -2))}), "-1 x -2"),
    "fmn_shape_product_overflow": (
        *foreign({"a": mn(np.zeros(0, "f8"), shape=(2**62, 2**62))}),
        "shape product past 2**64",
    ),
    "fmn_data_str": (
        *foreign({"a": {**mn(np.zeros(2, "u1")), b"data": "\0\0"}}),
        "data sent as str (use_bin_type=False)",
    ),
    "fmn_nd_not_bool": (*foreign({"a": mn(np.zeros(2, "u1"), nd=1)}), "b'nd' is 1"),
    "fmn_no_data": (*foreign({"a": {b"nd": True, b"type": "<f4", b"shape": [1]}}), "no data"),
    "fmn_complex_not_str": (*foreign({"z": {b"complex": True, b"data": 5}}), "complex of an int"),
    "fmn_ext_type": ("msgpack-numpy", [packb({"a": ExtType(2, b"x")})], "an ext type"),
    "fmn_bin_len_bomb": (
        "msgpack-numpy",
        [b"\x81\xa1a\xc6\xff\xff\xff\xff" + b"\0" * 16],
        "bin header claims 4 GB",
    ),
    "fmn_array_len_bomb": (
        "msgpack-numpy",
        [b"\xdd\xff\xff\xff\xff" + b"\xc0" * 64],
        "array header claims 2**32-1 items",
    ),
    "fmn_map_len_bomb": (
        "msgpack-numpy",
        [b"\xdf\xff\xff\xff\xff" + b"\xc0" * 64],
        "map header claims 2**32-1 pairs",
    ),
    "fmn_nested_deep": ("msgpack-numpy", [b"\x91" * 5000 + b"\xc0"], "5000 nested lists"),
    "fmn_truncated": (
        "msgpack-numpy",
        [packb({"a": np.zeros(4, "f4")}, default=msgpack_numpy.encode)[:-3]],
        "cut short",
    ),
    "fmn_pickle": ("msgpack-numpy", [pickle.dumps({"x": 1})], "a pickle, not msgpack"),
    "fmn_int_key": ("msgpack-numpy", [packb({1: 2})], "a map key that is not a str"),
    "fmn_two_frames": ("msgpack-numpy", [packb({"x": 1})] * 2, "one frame per item, not two"),
    "fmn_ours": ("msgpack-numpy", message(packb({"x": 1})), "our envelope and header"),
    "fmn_empty": ("msgpack-numpy", [b""], "an empty frame"),
    "events_garbage": ("events", [b"\x97\x01"], "7-list cut short"),
    "events_ragged": (
        "events",
        [packb([1, ["p"], b"\0" * 4, *[b"\0" * 8] * 3, b"\0" * 7], use_bin_type=True)],
        "column not a whole number of values",
    ),
    "events_path_index": (
        "events",
        [pack_events([("p", 1, 0.0, 0.0, 0.0)]).replace(b"\x91\xa1p", b"\x90")],
        "path index out of range",
    ),
    "events_pickle": ("events", [pickle.dumps([("p", 1, 0.0, 0.0, 0.0)])], "a pickled batch"),
    "events_array_bomb": ("events", [b"\xdd\xff\xff\xff\xff" + b"\xc0" * 8], "claims 4G items"),
}


def main() -> None:
    for old in HERE.glob("*.msgpack"):
        old.unlink()
    for name, (target, frames, note) in ENTRIES.items():
        body = {"target": target, "frames": [bytes(f) for f in frames], "note": note}
        (HERE / f"{name}.msgpack").write_bytes(msgpack.packb(body, use_bin_type=True))


if __name__ == "__main__":
    main()

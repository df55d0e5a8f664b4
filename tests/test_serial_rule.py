"""One rule for what may pass between stages: under serialize(), what parallelize() would
refuse is refused the same way, with the same message, counted the same; check_sendable=False
lets it through. Serial and parallel runs side by side, and codec.check against encode."""

from __future__ import annotations

import logging
import re
import tracemalloc
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import stages
from hypothesis import given, settings
from hypothesis import strategies as st

from pystream_zmq import (
    ItemTooLargeError,
    Pipeline,
    Stage,
    StageError,
    UnsupportedTypeError,
)
from pystream_zmq.plan import unit_leaves
from pystream_zmq.stage import MAIN_PIPELINE_NAME
from pystream_zmq.wire import codec, encoding

MODES = ("serialize", "parallelize")
_REFUSED_LINE = re.compile(r"stage \S+ returned what cannot be sent \(item \d+ dropped\): .*")


class MyBox:
    """A user's own class: nothing the wire format carries."""


class Spoil(Stage):
    """Returns ``bad`` in place of item 1's ``x``, the item otherwise."""

    def __init__(self, bad: str) -> None:
        self.bad = bad

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if data["x"] != 1:
            return data
        if self.bad == "set":
            return {"x": 1, "items": [0, 1, 2, {1, 2}]}
        if self.bad == "text":  # what os.fsdecode makes of a file name that is not UTF-8
            return {"x": 1, "files": ("ok.png", b"caf\xe9".decode("utf-8", "surrogateescape"))}
        return {"x": 1, "meta": {"box": MyBox()}}

    def cleanup(self) -> None:
        pass


def to_list(data: dict[str, Any]) -> dict[str, Any]:
    """Makes the set Spoil("set") put in item 1 sendable again."""
    if "items" in data:
        data["items"] = [sorted(x) if isinstance(x, set) else x for x in data["items"]]
    return data


def start(pipeline: Pipeline, mode: str, **settings: Any) -> Pipeline:
    if mode == "parallelize":
        return pipeline.parallelize(block_output=True, **settings)
    return pipeline.serialize(**settings)


def run(mode: str, bad: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture):
    """Items 0, 1, 2 through Spoil then add_one: (outputs, stats, the refusal's log lines)."""
    capfd.readouterr()
    caplog.clear()
    with Pipeline() as pipeline:
        pipeline.add(Spoil(bad), "Spoil")
        pipeline.add(stages.add_one, "AddOne")
        start(pipeline, mode)
        with caplog.at_level(logging.ERROR, "pystream_zmq"):
            outputs = []
            for x in range(3):
                assert pipeline.forward({"x": x})
                if x != 1:  # parallel: block_output=True waits for it
                    outputs.append(pipeline.get_results())
            pipeline.stop_loop()
            stats = pipeline.stats()
    logged = caplog.text + capfd.readouterr().err  # serial: this process; parallel: a worker's
    return outputs, stats, _REFUSED_LINE.findall(logged)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("set", "data['items'][3]: cannot send a set"),
        ("object", "data['meta']['box']: cannot send a MyBox"),
        ("text", "data['files'][1]: a str that is not valid UTF-8 ('\\udce9')"),
    ],
)
def test_a_stage_output_parallel_would_refuse_is_refused_serially_the_same_way(
    bad: str, message: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    seen = {mode: run(mode, bad, capfd, caplog) for mode in MODES}
    want = f"stage MainPipeline__Spoil returned what cannot be sent (item 1 dropped): {message}"
    for mode, (outputs, stats, lines) in seen.items():
        assert outputs == [{"x": 1}, {"x": 3}], mode
        assert lines == [want], mode
        assert (stats.forwarded, stats.delivered, stats.dropped, stats.lost) == (3, 2, 1, 0)
        spoil, add_one = stats.stages["MainPipeline__Spoil"], stats.stages["MainPipeline__AddOne"]
        assert (spoil["encode_errors"], spoil["stage_errors"]) == (1, 0), mode
        assert (add_one["encode_errors"], add_one["stage_errors"]) == (0, 0), mode


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("set", "data['items'][3]: cannot send a set"),
        ("object", "data['meta']['box']: cannot send a MyBox"),
        ("text", "data['files'][1]: a str that is not valid UTF-8 ('\\udce9')"),
    ],
)
def test_under_on_error_raise_both_modes_raise_the_same_stage_error(bad: str, message: str) -> None:
    for mode in MODES:
        with Pipeline(on_error="raise") as pipeline:
            pipeline.add(Spoil(bad), "Spoil")
            start(pipeline, mode)
            assert pipeline.forward({"x": 0})
            assert pipeline.get_results() == {"x": 0}
            with pytest.raises(StageError) as raised:
                pipeline.forward({"x": 1})  # serial: raises here
                pipeline.stop_loop()  # parallel: once the report came out,
                pipeline.get_results()  # the next call raises
            error = raised.value
            assert str(error) == (
                f"stage 'MainPipeline__Spoil' failed on item 1: UnsupportedTypeError: {message}"
            ), mode
            assert (error.stage, error.seq) == ("MainPipeline__Spoil", 1), mode
            assert f"UnsupportedTypeError: {message}" in error.remote_traceback, mode
            assert pipeline.forward({"x": 2})  # and the pipeline goes on
            assert pipeline.get_results() == {"x": 2}


@pytest.mark.parametrize(
    ("item", "error", "settings"),
    [
        ({"items": [0, 1, 2, {1, 2}]}, UnsupportedTypeError, {}),
        ({"meta": {"box": MyBox()}}, UnsupportedTypeError, {}),
        ({3: "three"}, UnsupportedTypeError, {}),
        ({"pad": b"." * 1000}, ItemTooLargeError, {"max_message_bytes": 1000}),
        ({"keys": [0] * (codec.DEFAULT_MAX_CONTAINER_LEN + 1)}, ItemTooLargeError, {}),
    ],
    ids=["set", "object", "int-key", "over-max_message_bytes", "over-1000000-items"],
)
def test_forward_of_what_cannot_be_sent_raises_the_same_error_in_both_modes(
    item: object, error: type[Exception], settings: dict[str, int]
) -> None:
    messages = []
    for mode in MODES:
        with Pipeline() as pipeline:
            pipeline.add(stages.add_one)
            start(pipeline, mode, **settings)
            with pytest.raises(error) as raised:
                pipeline.forward(item)
            messages.append(str(raised.value))
            assert pipeline.forward({"x": 1})  # nothing was taken; the pipeline goes on
            assert pipeline.get_results() == {"x": 2}
            assert pipeline.stats().forwarded == 1
    assert messages[0] == messages[1]
    assert messages[0].startswith("data")


def test_check_sendable_false_lets_anything_through() -> None:
    box = MyBox()
    with Pipeline() as pipeline:
        pipeline.add(Spoil("set"), "Spoil")
        pipeline.add(lambda data: {**data, "box": box}, "Box")
        pipeline.serialize(check_sendable=False)
        assert pipeline.forward({"x": 1, "s": {"a"}})
        assert pipeline.get_results() == {"x": 1, "items": [0, 1, 2, {1, 2}], "box": box}
        stats = pipeline.stats()
        assert (stats.delivered, stats.dropped) == (1, 0)
        assert "encode_errors" not in stats.stages["MainPipeline__Spoil"]


@pytest.mark.parametrize("limit", [0, -1, 1.5, None])
def test_max_message_bytes_must_be_a_positive_int(limit: object) -> None:
    with Pipeline() as pipeline, pytest.raises(ValueError, match="max_message_bytes"):
        pipeline.serialize(max_message_bytes=limit)  # type: ignore[arg-type]
    assert pipeline.mode is None


def test_a_serialized_child_passes_anything_among_its_own_stages() -> None:
    """A child pipeline that would run in one worker: its stages may hand each other a set,
    as in that worker; only what leaves the child is checked, counted under its path."""
    for mode in MODES:
        child = Pipeline()
        child.add(Spoil("set"), "Spoil")
        child.add(to_list, "ToList")
        spoiled = Pipeline()
        spoiled.add(stages.add_one, "AddOne")
        spoiled.add(Spoil("set"), "Spoil")
        with Pipeline() as pipeline:
            pipeline.add(child.as_stage(), "Child")
            pipeline.add(spoiled.as_stage(), "Spoiled")
            start(pipeline, mode)
            assert pipeline.forward({"x": 0})  # Spoiled spoils item 0 (0 + 1 = 1)
            assert pipeline.forward({"x": 1})  # Child spoils and mends item 1
            assert pipeline.get_results() == {"x": 2, "items": [0, 1, 2, [1, 2]]}, mode
            pipeline.stop_loop()
            stats = pipeline.stats()
            assert (stats.delivered, stats.dropped) == (1, 1), mode
            assert stats.stages["MainPipeline__Child"]["encode_errors"] == 0, mode
            assert stats.stages["MainPipeline__Spoiled"]["encode_errors"] == 1, mode
            assert stats.stages["MainPipeline__Spoiled__Spoil"]["stage_errors"] == 0, mode


def test_the_serial_units_are_the_plans() -> None:
    inner = Pipeline()
    inner.add(stages.add_one, "A")
    inner.add(stages.double, "B")
    deep = Pipeline()
    deep.add(stages.add_one, "C")
    deep.add(inner.as_stage(), "Inner")
    pipeline = Pipeline()
    pipeline.add(stages.add_one, "First")
    pipeline.add(deep.as_stage(), "Deep")
    pipeline.add(stages.double, "Last", replicas=2)
    plan = pipeline.plan()
    units = unit_leaves(pipeline, MAIN_PIPELINE_NAME)
    assert [(unit.name, unit.leaves) for unit in plan.units] == units
    assert [name for name, _ in units] == [
        "MainPipeline__First",
        "MainPipeline__Deep",
        "MainPipeline__Last",
    ]


# -- codec.check: what encode would raise, without frames or copies ---------------------------


def _outcome(call: Any) -> tuple[str, str]:
    try:
        call()
    except (UnsupportedTypeError, ItemTooLargeError) as e:
        return type(e).__name__, str(e)
    return "ok", ""


def leaves_good_and_bad() -> st.SearchStrategy[object]:
    numbers = hnp.arrays(st.sampled_from(["<f4", ">i8", "u1", "?", "c8"]), hnp.array_shapes())
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**65), 2**65),  # past the 64-bit range at both ends
        st.floats(),
        st.text(max_size=8),
        st.sampled_from(["caf\udce9", "\udcff"]),  # lone surrogates: not valid UTF-8
        st.binary(max_size=8),
        numbers,
        numbers.map(lambda a: a[..., ::2]),  # non-contiguous
        numbers.map(lambda a: a.reshape(-1)[:1][0] if a.size else np.float16(1)),  # scalars
        st.sampled_from(
            [{1}, MyBox(), bytearray(b"x"), np.array(["s"]), np.str_("u"), np.ma.masked_array([1])]
        ),
    )


def trees_good_and_bad() -> st.SearchStrategy[object]:
    # an int key is refused, so is a lone surrogate
    keys = st.one_of(st.text(max_size=4), st.integers(0, 3), st.just("\udcff"))
    return st.recursive(
        leaves_good_and_bad(),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
            st.dictionaries(keys, children, max_size=4),
        ),
        max_leaves=12,
    )


@settings(max_examples=1000, deadline=None)
@given(trees_good_and_bad(), st.sampled_from([10**9, 200, 60, 3]), st.sampled_from([1000, 2]))
def test_check_raises_exactly_what_encode_raises(
    tree: object, max_message_bytes: int, max_container_len: int
) -> None:
    limits = {"max_message_bytes": max_message_bytes, "max_container_len": max_container_len}
    want = _outcome(lambda: codec.encode(tree, **limits))
    assert _outcome(lambda: codec.check(tree, **limits)) == want
    if want[0] == "ok":  # private: the size bound check() relies on must be a bound
        assert encoding._bound(tree, 0, max_container_len) >= sum(
            memoryview(frame).nbytes for frame in codec.encode(tree, **limits)
        )


def test_check_copies_no_array() -> None:
    """A non-contiguous 80 MB view, which encode would have to copy, checked in place; over
    the limit, its exact size is told without a copy too."""
    view = np.zeros((4000, 10000, 4), np.uint8)[:, ::2]
    tracemalloc.start()
    try:
        codec.check({"image": view})
        with pytest.raises(ItemTooLargeError) as refused:
            codec.check({"image": view}, max_message_bytes=view.nbytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    with pytest.raises(ItemTooLargeError) as encoded:
        codec.encode({"image": view}, max_message_bytes=view.nbytes)
    assert str(refused.value) == str(encoded.value)

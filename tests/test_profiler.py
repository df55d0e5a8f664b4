"""Pure tests of the profiler: DB folder resolution, the event wire format, the SQLite writer
and PyStream's latency/throughput summary. Every database lives in tmp_path."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystream_zmq.errors import DecodeError
from pystream_zmq.profiling import schema, store
from pystream_zmq.profiling.events import pack_events, unpack_events
from pystream_zmq.profiling.store import PROFILE_DIR_ENV, ProfileWriter
from pystream_zmq.profiling.summary import read_profiles
from pystream_zmq.stage import MAIN_PIPELINE_NAME, Event

MAIN = MAIN_PIPELINE_NAME
BASE = 100.0  # small base times keep float differences exact enough to compare tightly
fuzz = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(autouse=True)
def _reset_db_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "_db_folder", None)  # restored after each test


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "profiles.sqlite3"


@pytest.fixture
def make_writer(db: Path) -> Iterator[Callable[..., ProfileWriter]]:
    writers: list[ProfileWriter] = []

    def make(**kwargs: Any) -> ProfileWriter:
        writers.append(ProfileWriter(db, **kwargs))
        return writers[-1]

    yield make
    for writer in writers:
        writer.close()


def events(path: str, latencies: list[float], period: float = 0.1) -> list[Event]:
    """One event per item; ends are ``period`` apart, item i took latencies[i]."""
    result = []
    for seq, latency in enumerate(latencies):
        end = BASE + seq * period
        result.append((path, seq, end - latency - 0.001, end - latency, end))
    return result


def record(writer: ProfileWriter, stages: list[tuple[str, str]], *batches: list[Event]) -> int:
    run_id = writer.start_run(MAIN, "parallel", stages)
    for batch in batches:
        assert writer.submit(run_id, batch)
    assert writer.flush(timeout=10)
    return run_id


# -- DB folder -------------------------------------------------------------------------------
def test_set_folder_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path / "env"))
    store.set_profiler_db_folder(tmp_path / "set")
    assert store.get_profiler_db_folder() == str(tmp_path / "set")


def test_env_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path / "env"))
    assert store.get_profiler_db_folder() == str(tmp_path / "env")


def test_default_uses_xdg_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert store.get_profiler_db_folder() == str(tmp_path / "state" / "pystream_zmq")


@pytest.mark.parametrize("xdg", [None, "", "relative/state"])
def test_default_is_in_home_not_in_package(
    xdg: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    if xdg is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = Path(store.get_profiler_db_folder())
    assert folder == tmp_path / ".local" / "state" / "pystream_zmq"
    assert not folder.resolve().is_relative_to(Path(store.__file__).resolve().parent)


def test_db_path_creates_folder(tmp_path: Path) -> None:
    store.set_profiler_db_folder(tmp_path / "a" / "b")
    path = store.profiler_db_path()
    assert path == tmp_path / "a" / "b" / store.DB_FILENAME
    assert path.parent.is_dir()


# -- wire format -----------------------------------------------------------------------------
def test_pack_unpack_round_trip() -> None:
    batch: list[Event] = [
        (f"{MAIN}__Stage1", 0, 1.5, 2.5, 3.5),
        (f"{MAIN}__Child__A", 2**62, 1.0, 2.0, 3.0),
        (f"{MAIN}__Stage1", 1, 4.0, 5.0, 6.25),
    ]
    assert unpack_events(pack_events(batch)) == batch
    assert unpack_events(memoryview(pack_events(batch))) == batch
    assert unpack_events(pack_events([])) == []


def test_ints_become_floats() -> None:
    (event,) = unpack_events(pack_events([("p", 3, 1, 2, 3)]))
    assert event == ("p", 3, 1.0, 2.0, 3.0)
    assert [type(value) for value in event] == [str, int, float, float, float]


def _message(*fields: object) -> bytes:
    return msgpack.packb(list(fields))


_I4, _F8 = b"\0" * 4, b"\0" * 8
BAD_MESSAGES = {
    "empty": b"",
    "reserved byte": b"\xc1",
    "truncated": pack_events([("p", 1, 1.0, 2.0, 3.0)])[:-3],
    "trailing data": pack_events([]) + b"\x00",
    "invalid utf-8": b"\xa1\xff",
    "huge array": b"\xdd\xff\xff\xff\xff",
    "huge str": b"\xdb\xff\xff\xff\xff",
    "huge bin": b"\xc6\xff\xff\xff\xff" + b"\0" * 10,
    "int map key": msgpack.packb({1: 2}),
    "not a list": msgpack.packb({"a": 1}),
    "wrong format": _message(2, ["p"], _I4, _F8, _F8, _F8, _F8),
    "too few fields": _message(1, ["p"], _I4, _F8, _F8, _F8),
    "path not str": _message(1, [7], _I4, _F8, _F8, _F8, _F8),
    "paths not list": _message(1, "p", _I4, _F8, _F8, _F8, _F8),
    "column not bin": _message(1, ["p"], [0], [1], [1.0], [2.0], [3.0]),
    "column of str": _message(1, ["p"], _I4, "x" * 8, _F8, _F8, _F8),
    "partial value": _message(1, ["p"], _I4, _F8, _F8, _F8, b"\0" * 7),
    "unequal columns": _message(1, ["p"], _I4, _F8, _F8, _F8, _F8 * 2),
    "unequal index": _message(1, ["p"], _I4 * 2, _F8, _F8, _F8, _F8),
    "index out of range": _message(1, ["p"], b"\1\0\0\0", _F8, _F8, _F8, _F8),
    "no paths": _message(1, [], _I4, _F8, _F8, _F8, _F8),
}


@pytest.mark.parametrize("data", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_unpack_rejects_bad_input(data: bytes) -> None:
    with pytest.raises(DecodeError):
        unpack_events(data)


def test_unpack_rejects_non_bytes() -> None:
    with pytest.raises(DecodeError):
        unpack_events("not bytes")  # type: ignore[arg-type]


def _check(data: bytes) -> None:
    """unpack_events either raises DecodeError or returns exactly typed events."""
    try:
        result = unpack_events(data)
    except DecodeError:
        return
    for event in result:
        assert [type(value) for value in event] == [str, int, float, float, float]


@fuzz
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check(data)


@fuzz
@given(st.data())
def test_fuzz_corrupted_batch(data: st.DataObject) -> None:
    packed = bytearray(pack_events(events("MainPipeline__A", [0.01] * 3)))
    for _ in range(data.draw(st.integers(1, 4))):
        packed[data.draw(st.integers(0, len(packed) - 1))] = data.draw(st.integers(0, 255))
    _check(bytes(packed[: data.draw(st.integers(0, len(packed)))]))


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
    | st.binary(max_size=24),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)  # fmt: skip


@settings(fuzz, max_examples=60)
@given(st.lists(_msgpack_values, min_size=7, max_size=7) | _msgpack_values)
def test_fuzz_wrong_structures(value: object) -> None:
    if isinstance(value, list) and value:
        value[0] = 1  # get past the format check more often
    _check(msgpack.packb(value))


# -- writer and read_profiles ----------------------------------------------------------------
LAYOUT = [
    (MAIN, "pipeline"),
    (f"{MAIN}__Stage2", "stage"),  # display order is not alphabetical
    (f"{MAIN}__Child", "pipeline"),
    (f"{MAIN}__Child__A", "stage"),
    (f"{MAIN}__Child__B", "stage"),
    (f"{MAIN}__Child__Grand", "pipeline"),
    (f"{MAIN}__Child__Grand__X", "stage"),
    (f"{MAIN}__Stage1", "stage"),
]


def test_latency_and_throughput_by_hand(make_writer: Callable[..., ProfileWriter], db: Path):
    writer = make_writer()
    stage2 = events(f"{MAIN}__Stage2", [0.005, 0.010] * 5)  # ends 0.1 s apart
    run_id = record(writer, [(MAIN, "pipeline"), (f"{MAIN}__Stage2", "stage")], stage2)
    latency, throughput = read_profiles(db, run_id)
    assert latency[f"{MAIN}__Stage2"] == pytest.approx(0.0075, rel=1e-9)
    assert throughput[f"{MAIN}__Stage2"] == pytest.approx(10.0, rel=1e-9)
    assert writer.written_events == 10
    assert writer.dropped_events == 0


def test_key_order_and_derived_child_pipelines(
    make_writer: Callable[..., ProfileWriter], db: Path
) -> None:
    n = 6
    main = events(MAIN, [0.05] * n)

    def timed(path: str, begin: float, end: float) -> list[Event]:
        """Item i runs from begin to end seconds after BASE + i / 10."""
        return [(path, i, BASE + i / 10, BASE + i / 10 + begin, BASE + i / 10 + end)
                for i in range(n)]  # fmt: skip

    child = timed(f"{MAIN}__Child__A", 0.0, 0.01) + timed(f"{MAIN}__Child__B", 0.01, 0.03)
    child += timed(f"{MAIN}__Child__Grand__X", 0.03, 0.04)
    stage1 = events(f"{MAIN}__Stage1", [0.02] * n, period=0.5)
    run_id = record(make_writer(), LAYOUT, main, child, stage1)

    latency, throughput = read_profiles(db, run_id)
    assert list(latency) == list(throughput) == [path for path, _ in LAYOUT]
    expected = {
        MAIN: (0.05, 10.0),
        f"{MAIN}__Child": (0.04, 10.0),  # from A's start to Grand__X's end
        f"{MAIN}__Child__A": (0.01, 10.0),
        f"{MAIN}__Child__B": (0.02, 10.0),
        f"{MAIN}__Child__Grand": (0.01, 10.0),
        f"{MAIN}__Child__Grand__X": (0.01, 10.0),
        f"{MAIN}__Stage1": (0.02, 2.0),
    }
    for path, (lat, thr) in expected.items():
        assert latency[path] == pytest.approx(lat, rel=1e-9), path
        assert throughput[path] == pytest.approx(thr, rel=1e-9), path
    assert math.isnan(latency[f"{MAIN}__Stage2"])  # no events at all
    assert math.isnan(throughput[f"{MAIN}__Stage2"])


def test_nan_cases(make_writer: Callable[..., ProfileWriter], db: Path) -> None:
    one = [(f"{MAIN}__One", 0, BASE, BASE + 1.0, BASE + 1.25)]
    same_end = [(f"{MAIN}__Same", i, BASE, BASE + 1.0, BASE + 2.0) for i in range(3)]
    names = ["One", "Same", "Empty"]
    stages = [(MAIN, "pipeline")] + [(f"{MAIN}__{name}", "stage") for name in names]
    latency, throughput = read_profiles(db, record(make_writer(), stages, one + same_end))
    assert latency[f"{MAIN}__One"] == 0.25
    assert math.isnan(throughput[f"{MAIN}__One"])  # one event
    assert latency[f"{MAIN}__Same"] == 1.0
    assert math.isnan(throughput[f"{MAIN}__Same"])  # only zero intervals
    assert math.isnan(latency[f"{MAIN}__Empty"])  # no events
    assert math.isnan(throughput[f"{MAIN}__Empty"])
    # Without events of its own, even MainPipeline is derived: items 0-2 span 1 s each.
    assert latency[MAIN] == 1.0
    assert math.isnan(throughput[MAIN])


def test_runs_stay_separate_and_unknown_run_is_empty(
    make_writer: Callable[..., ProfileWriter], db: Path, tmp_path: Path
) -> None:
    writer = make_writer()
    stages = [(MAIN, "pipeline")]
    first = record(writer, stages, events(MAIN, [0.1] * 3))
    second = record(writer, stages, events(MAIN, [0.2] * 3, period=0.25))
    assert first != second
    assert read_profiles(db, first)[0][MAIN] == pytest.approx(0.1)
    assert read_profiles(db, second) == (
        {MAIN: pytest.approx(0.2)},
        {MAIN: pytest.approx(4.0)},
    )
    assert read_profiles(db, second + 100) == ({}, {})
    assert read_profiles(tmp_path / "missing.sqlite3", 1) == ({}, {})


def test_two_writers_share_one_file(make_writer: Callable[..., ProfileWriter], db: Path):
    one, two = make_writer(), make_writer()
    stages = [(MAIN, "pipeline")]
    run_one = record(one, stages, events(MAIN, [0.1] * 3))
    run_two = record(two, stages, events(MAIN, [0.3] * 3))
    assert read_profiles(db, run_one)[0] == {MAIN: pytest.approx(0.1)}
    assert read_profiles(db, run_two)[0] == {MAIN: pytest.approx(0.3)}


def test_schema_and_run_row(make_writer: Callable[..., ProfileWriter], db: Path) -> None:
    run_id = make_writer().start_run("Demo", "serial", LAYOUT[:2])
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (schema.SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        pipeline, mode, started, pid = conn.execute(
            "SELECT pipeline, mode, started, pid FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        stages = conn.execute(
            "SELECT position, path, kind FROM stages WHERE run_id = ? ORDER BY position",
            (run_id,),
        ).fetchall()
    conn.close()
    assert (pipeline, mode) == ("Demo", "serial")
    assert abs(started - time.time()) < 60
    assert pid > 0
    assert stages == [(0, MAIN, "pipeline"), (1, f"{MAIN}__Stage2", "stage")]


def test_newer_schema_is_refused(make_writer: Callable[..., ProfileWriter], db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(schema.ProfileSchemaError):
        make_writer().start_run(MAIN, "serial", [(MAIN, "pipeline")])


@pytest.mark.parametrize(
    ("mode", "stages"),
    [
        ("fast", [(MAIN, "pipeline")]),
        ("serial", []),
        ("serial", [(f"{MAIN}__A", "stage")]),
        ("serial", [(MAIN, "pipeline"), (f"{MAIN}__A", "stage"), (f"{MAIN}__A", "stage")]),
    ],
)
def test_start_run_validates(
    mode: str, stages: list[tuple[str, str]], make_writer: Callable[..., ProfileWriter]
) -> None:
    with pytest.raises(ValueError):
        make_writer().start_run(MAIN, mode, stages)


def test_bad_events_are_dropped_and_the_thread_survives(
    make_writer: Callable[..., ProfileWriter], db: Path
) -> None:
    writer = make_writer()
    run_id = record(writer, [(MAIN, "pipeline")], [("too", "short")])  # type: ignore[list-item]
    assert writer.dropped_events == 1
    assert writer.submit(run_id, events(MAIN, [0.1] * 2))
    assert writer.flush(timeout=10)
    assert writer.written_events == 2


def test_close_is_idempotent_and_later_submits_drop(
    make_writer: Callable[..., ProfileWriter],
) -> None:
    writer = make_writer()
    run_id = record(writer, [(MAIN, "pipeline")], events(MAIN, [0.1] * 2))
    writer.close()
    writer.close()
    assert not writer.submit(run_id, events(MAIN, [0.1] * 3))
    assert (writer.written_events, writer.dropped_events) == (2, 3)
    with pytest.raises(RuntimeError):
        writer.start_run(MAIN, "serial", [(MAIN, "pipeline")])


# -- backpressure ----------------------------------------------------------------------------
@pytest.fixture
def locked(db: Path) -> Iterator[Callable[[], sqlite3.Connection]]:
    """Lock the (already created) DB like another process would; unlocks at teardown."""
    conns: list[sqlite3.Connection] = []

    def lock() -> sqlite3.Connection:
        conns.append(sqlite3.connect(db, isolation_level=None))
        conns[-1].execute("BEGIN EXCLUSIVE")
        return conns[-1]

    yield lock
    for conn in conns:
        conn.close()


def test_submit_never_blocks_on_a_locked_db(
    make_writer: Callable[..., ProfileWriter],
    locked: Callable[[], sqlite3.Connection],
) -> None:
    writer = make_writer(max_pending_batches=2, commit_interval=0.01)
    run_id = writer.start_run(MAIN, "parallel", [(MAIN, "pipeline")])
    lock = locked()
    batches = [events(MAIN, [0.01] * 10) for _ in range(20)]

    began = time.monotonic()
    accepted = [writer.submit(run_id, batch) for batch in batches]
    assert time.monotonic() - began < 0.1
    assert accepted.count(True) == 2  # the writer cannot finish a batch while locked
    assert writer.dropped_events == 18 * 10
    assert not writer.flush(timeout=0.3)

    lock.execute("ROLLBACK")
    assert writer.flush(timeout=10)
    assert writer.written_events == 20
    assert writer.written_events + writer.dropped_events == 200


def test_writer_retries_while_the_db_stays_locked(
    make_writer: Callable[..., ProfileWriter],
    locked: Callable[[], sqlite3.Connection],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(store, "_WRITER_BUSY_TIMEOUT", 0.02)  # give up on SQLite's wait soon
    writer = make_writer()
    run_id = writer.start_run(MAIN, "parallel", [(MAIN, "pipeline")])
    lock = locked()
    assert writer.submit(run_id, events(MAIN, [0.01] * 5))
    deadline = time.monotonic() + 10
    while "locked" not in caplog.text and time.monotonic() < deadline:
        writer.flush(timeout=0.01)  # a bounded wait between polls
    assert "profile database is locked" in caplog.text
    lock.execute("ROLLBACK")
    assert writer.flush(timeout=10)
    assert (writer.written_events, writer.dropped_events) == (5, 0)


def test_close_gives_up_on_a_locked_db(
    make_writer: Callable[..., ProfileWriter], locked: Callable[[], sqlite3.Connection]
) -> None:
    writer = make_writer()
    run_id = writer.start_run(MAIN, "parallel", [(MAIN, "pipeline")])
    lock = locked()
    assert writer.submit(run_id, events(MAIN, [0.01] * 5))
    began = time.monotonic()
    writer.close(timeout=0.3)
    assert time.monotonic() - began < 1.0
    assert writer.written_events == 0
    lock.execute("ROLLBACK")
    assert writer._thread is not None  # private: the thread is what this test watches
    writer._thread.join(timeout=10)  # the thread finishes on its own once the lock is gone
    assert writer.written_events + writer.dropped_events == 5

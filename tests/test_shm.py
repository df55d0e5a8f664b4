"""Large arrays through shared memory (issue 16): the data, what a kept view or result
sees, the pool full, the counters, and the switch. Crashes: test_shm_crashes.py; hostile
descriptors: test_shm_codec.py."""

from __future__ import annotations

import contextlib
import gc
import mmap
import os

import numpy as np
import pytest
import stages
from conftest import wait_until
from shm_checks import dev_shm, left_in_dev_shm

from pystream_zmq import Pipeline
from pystream_zmq.shm.sender import WARM_BYTES

SHAPE = (480, 720, 3)  # 1 MB
STAGES = ("MainPipeline__A", "MainPipeline__B", "MainPipeline__C")


def shm_counters(pipeline: Pipeline) -> dict[str, dict[str, int]]:
    stats = pipeline.stats()
    picked = {path: {k: v for k, v in c.items() if k.startswith(("shm_", "frame_"))}
              for path, c in stats.stages.items()}  # fmt: skip
    source = {k: v for k, v in stats.source.items() if k.startswith(("shm_", "frame_"))}
    return {"source": source, **picked}


def three_stages(**settings: object) -> Pipeline:
    pipeline = Pipeline()
    pipeline.add(stages.add_to_buffer, "A")
    pipeline.add(stages.add_to_buffer, "B")
    pipeline.add(stages.add_to_buffer, "C")
    pipeline.parallelize(block_output=True, **settings)  # type: ignore[arg-type]
    return pipeline


def test_large_arrays_through_three_stages_arrive_intact_writeable_and_by_shared_memory() -> None:
    before = dev_shm()
    items = 40
    with three_stages() as pipeline:
        assert pipeline.stats().shared_memory
        out = []
        for x in range(items):
            buffer = np.full(SHAPE, x, np.int16)  # 2 MB, changed by each stage
            extra = np.arange(100_000, dtype=">f8") * x  # another dtype, byte order kept
            assert pipeline.forward({"x": x, "buffer": buffer, "extra": extra})
            out.append(pipeline.get_results())
        assert [item["x"] for item in out] == [x + 3 for x in range(items)]
        for x, item in enumerate(out):
            assert item["buffer"].dtype == np.int16 and item["buffer"].shape == SHAPE
            assert (item["buffer"] == x + 3).all()
            assert item["extra"].dtype == np.dtype(">f8")
            assert np.array_equal(item["extra"], np.arange(100_000, dtype=">f8") * x)
            assert item["buffer"].flags.writeable and item["extra"].flags.writeable
        counters = shm_counters(pipeline)
        for path in ("source", *STAGES):
            assert counters[path]["shm_arrays"] == 2 * items, counters
            assert counters[path]["frame_arrays"] == 0 and counters[path]["shm_full"] == 0
            assert counters[path]["shm_bytes"] == items * (2 * np.prod(SHAPE) + 800_000)
            assert counters[path]["shm_passed"] == (0 if path == "source" else 2 * items)
    assert not left_in_dev_shm(before)


def test_a_stage_keeping_views_for_ever_never_sees_them_change_nor_stalls() -> None:
    """A small pool, held on to: it fills, the rest goes by frame, nothing is lost."""
    keeper = stages.KeepsViews()
    items = 30
    with Pipeline() as pipeline:
        pipeline.add(stages.fill_image, "Fill")
        pipeline.add(keeper, "Keep")
        pipeline.parallelize(block_output=True, shm_pool_mb=6)  # ~5 regions of 1 MB
        results = pipeline.results()
        for x in range(items):
            assert pipeline.forward({"x": x, "image": np.zeros(SHAPE, np.uint8)})
            assert next(results)["x"] == x  # every one comes out: none stalls
        counters = shm_counters(pipeline)["MainPipeline__Fill"]
        assert counters["shm_full"] > 0 and counters["shm_arrays"] >= 4, counters
        assert counters["shm_arrays"] + counters["frame_arrays"] == items
        pipeline.stop_loop()
        assert keeper.checked == items * (items + 1) // 2
        assert keeper.changed == 0


def test_results_kept_by_the_user_never_change_nor_stall_the_pipeline() -> None:
    items = 30
    with Pipeline() as pipeline:
        pipeline.add(stages.fill_image, "Fill")
        pipeline.parallelize(block_output=True, shm_pool_mb=6)
        kept = []
        for x in range(items):
            assert pipeline.forward({"x": x, "image": np.zeros(SHAPE, np.uint8)})
            result = pipeline.get_results()
            kept.append((result["x"], result["image"], result["image"][100:200]))
        for x, (seen, image, part) in enumerate(kept):
            assert seen == x and (image == x).all() and (part == x).all()
        counters = shm_counters(pipeline)
        # Fill passes forward()'s regions on to us without a copy, and we hold them: that
        # pool fills, then Fill's own (forward() goes by frame, Fill copies).
        fill = counters["MainPipeline__Fill"]
        assert fill["shm_passed"] >= 4 and counters["source"]["shm_full"] > 0, counters
        assert fill["shm_full"] > 0, counters
        # Let go of them: the pools serve again.
        del kept, result, image, part
        full = {path: counters[path]["shm_full"] for path in ("source", "MainPipeline__Fill")}
        for x in range(10):
            assert pipeline.forward({"x": x, "image": np.zeros(SHAPE, np.uint8)})
            assert (pipeline.get_results()["image"] == x).all()
        counters = shm_counters(pipeline)
        assert {path: counters[path]["shm_full"] for path in full} == full, counters
        assert counters["MainPipeline__Fill"]["shm_passed"] == fill["shm_passed"] + 10


def test_results_iterator_keeps_every_output_intact() -> None:
    with three_stages(shm_pool_mb=8) as pipeline:
        results = pipeline.results()
        kept = []
        for x in range(20):
            assert pipeline.forward({"x": x, "buffer": np.full(SHAPE, x, np.uint8)})
            kept.append(next(results))
        assert [(item["x"], int(item["buffer"].min()), int(item["buffer"].max()))
                for item in kept] == [(x + 3, x + 3, x + 3) for x in range(20)]  # fmt: skip


def test_small_arrays_keep_the_frame_path() -> None:
    with three_stages() as pipeline:
        small = np.zeros(60 * 1024 // 8, np.float64)  # inline in the header: under 64 KiB
        assert pipeline.forward({"x": 0, "buffer": small})
        assert (pipeline.get_results()["buffer"] == 3).all()
        counters = shm_counters(pipeline)
        assert all(c["shm_arrays"] == 0 and c["frame_arrays"] == 0 for c in counters.values())
        assert pipeline.forward({"x": 0, "buffer": np.zeros(64 * 1024, np.uint8)})
        assert (pipeline.get_results()["buffer"] == 3).all()
        assert all(c["shm_arrays"] == 1 for c in shm_counters(pipeline).values())


@pytest.mark.parametrize("how", ["off", "tcp"])
def test_the_switch_and_tcp_links_keep_the_frame_path(how: str) -> None:
    settings = {"shm": False} if how == "off" else {"endpoint": "tcp://127.0.0.1"}
    with three_stages(**settings) as pipeline:
        for x in range(5):
            assert pipeline.forward({"x": x, "buffer": np.full(SHAPE, x, np.uint8)})
            assert (pipeline.get_results()["buffer"] == x + 3).all()
        stats = pipeline.stats()
        assert not stats.shared_memory
        assert not any(name.startswith("shm_") for name in stats.source)
        assert not any("shm_arrays" in counters for counters in stats.stages.values())


def test_the_counters_reach_the_profile_report() -> None:
    with Pipeline(use_profiler=True) as pipeline:
        pipeline.add(stages.add_to_buffer, "A")
        pipeline.parallelize(block_output=True)
        for x in range(5):
            assert pipeline.forward({"x": x, "buffer": np.zeros(SHAPE, np.uint8)})
            assert pipeline.get_results() is not None
        pipeline.stop_loop()
    report = pipeline.get_profile_report()
    assert report is not None
    by_path = {stage.path: stage.counters for stage in report.stages}
    assert by_path["MainPipeline__A"]["shm_arrays"] == 5
    assert by_path["MainPipeline__A"]["shm_passed"] == 5  # forward()'s regions, passed on
    assert by_path["MainPipeline"]["shm_arrays"] == 5  # forward()'s link


def test_a_pipeline_that_stopped_holds_no_pool_once_its_results_are_let_go() -> None:
    """The pools go with the processes: the workers' with them, ours with the last result
    built on one (its mapping holds the file)."""
    with three_stages() as pipeline:
        assert pipeline.forward({"x": 0, "buffer": np.zeros(SHAPE, np.uint8)})
        result = pipeline.get_results()
    assert (result["buffer"] == 3).all()  # still readable after cleanup
    del result
    assert wait_until(lambda: gc.collect() >= 0 and not _fds_named("pystream-shm"))


def _fds_named(name: str) -> list[str]:
    fd_dir = "/proc/self/fd"
    found = []
    for fd in os.listdir(fd_dir):
        try:
            if name in os.readlink(os.path.join(fd_dir, fd)):
                found.append(fd)
        except OSError:
            pass
    return found


def test_a_no_op_stage_passes_the_region_on_without_a_copy() -> None:
    """forward()'s regions go through three stages that return what they got (in place
    changes, a new dict, the same dict) to the results, never copied."""
    items = 40
    with Pipeline() as pipeline:
        pipeline.add(stages.no_op, "A")
        pipeline.add(stages.add_to_buffer, "B")  # changes it in place: passed on too
        pipeline.add(lambda data: {"x": data["x"], "buffer": data["buffer"].reshape(-1)}, "C")
        pipeline.parallelize(block_output=True, shm_pool_mb=8)
        for x in range(items):
            assert pipeline.forward({"x": x, "buffer": np.full(SHAPE, x % 200, np.uint8)})
            result = pipeline.get_results()
            assert result["x"] == x + 1 and result["buffer"].shape == (np.prod(SHAPE),)
            assert (result["buffer"] == x % 200 + 1).all() and result["buffer"].flags.writeable
        del result
        counters = shm_counters(pipeline)
        assert counters["source"]["shm_arrays"] == items and counters["source"]["shm_full"] == 0
        for path in ("MainPipeline__A", "MainPipeline__B", "MainPipeline__C"):
            assert counters[path]["shm_passed"] == counters[path]["shm_arrays"] == items, counters
            assert counters[path]["shm_bytes"] == items * np.prod(SHAPE)


@pytest.mark.parametrize("how", ["array", "slice", "view", "memoryview", "dict"])
def test_a_stage_keeping_what_it_received_gets_a_copy_and_its_kept_data_never_changes(
    how: str,
) -> None:
    keeper = stages.KeepsFirstImage(how)
    items = 60  # many times what the small pools hold: every region is reused
    with Pipeline() as pipeline:
        pipeline.add(stages.no_op, "Before")
        pipeline.add(keeper, "Keep")
        pipeline.add(stages.no_op, "After")
        pipeline.parallelize(block_output=True, shm_pool_mb=6)
        for x in range(items):
            assert pipeline.forward({"x": x, "image": np.full(SHAPE, x % 200 + 1, np.uint8)})
            result = pipeline.get_results()
            assert result["x"] == x and (result["image"] == x % 200 + 1).all()
        del result
        counters = shm_counters(pipeline)
        keep = counters["MainPipeline__Keep"]
        # The first item is copied, the rest are passed on; so are all of them before and after.
        assert keep["shm_arrays"] == items and keep["shm_passed"] == items - 1, counters
        assert counters["MainPipeline__Before"]["shm_passed"] == items, counters
        assert counters["MainPipeline__After"]["shm_passed"] == items, counters
        pipeline.stop_loop()
    assert keeper.value == 1 and keeper.checked == items - 1
    assert keeper.changed == 0


def pool_bytes_in_memory() -> int:
    """What the kernel holds of this process's shared-memory pools (memfd files), in bytes."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pystream-shm"):
                total += os.fstat(int(fd)).st_blocks * 512
    return total


def populate_works() -> bool:
    """Whether this kernel maps pages in on request (MADV_POPULATE_WRITE: linux 5.14+)."""
    with mmap.mmap(-1, mmap.PAGESIZE) as probe:
        try:
            probe.madvise(23, 0, mmap.PAGESIZE)
        except OSError:
            return False
    return True


@pytest.mark.skipif(not populate_works(), reason="the kernel has no MADV_POPULATE_WRITE")
def test_forward_s_pool_is_mapped_in_at_its_first_array_not_frame_by_frame() -> None:
    """A fresh page costs a fault and a zeroing when first written: the sender has the
    first WARM_BYTES of its pool mapped in on a thread of its own at its first array."""
    gc.collect()  # earlier tests' pools, if any are still about
    with three_stages() as pipeline:
        before = pool_bytes_in_memory()  # the new pools are sparse until then
        assert pipeline.forward({"buffer": np.zeros(SHAPE, np.uint8)})
        assert wait_until(lambda: pool_bytes_in_memory() >= before + WARM_BYTES, timeout=10)

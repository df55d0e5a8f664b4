"""Native thread pools per worker process, ``parallelize(native_threads=...)``: OpenCV,
OpenBLAS, MKL and OpenMP each start a pool as large as the machine, in every process, so N
workers run N pools of all-the-CPUs threads that fight over the cores. By default each
worker's pools get a fair share instead: the usable CPUs divided among the workers.

Each library reads its variable once, when it loads. The orchestrator puts them in a
worker's environment at launch (``environment``): numpy's OpenBLAS, loaded with this package
before the worker reads its spec, then starts no threads beyond its share (threadpoolctl
alone would leave them idle but alive). ``limit`` is for a process already running
(pystream-worker; an orchestrated worker too, before it unpickles its stages): the variables
for what it loads from now on, threadpoolctl for the BLAS and OpenMP pools already loaded,
``cv2.setNumThreads`` if OpenCV is. The user's own process is never touched.
"""

from __future__ import annotations

import os
import sys

AUTO = "auto"  # a fair share of the usable CPUs per worker process

# OPENCV_FOR_THREADS_NUM caps OpenCV's pool as cv2.setNumThreads does, without importing
# cv2 (35 MB and ~25 ms) into a worker whose stages never use it.
ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), not all the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check(setting: object) -> None:
    """Refuse a ``native_threads`` setting that is not "auto", None or a count >= 0."""
    if setting is None or setting == AUTO:
        return
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(
            f"native_threads must be {AUTO!r}, None (leave them alone) or a number of threads "
            f">= 0, not {setting!r}"
        )


def per_worker(setting: int | str | None, workers: int, *, pinned: bool = False) -> int | None:
    """The threads each of ``workers`` processes gets; None (or 0) leaves the pools alone.
    "auto": max(1, usable CPUs // workers), and 1 when each worker is pinned to one CPU."""
    if setting == AUTO:
        return 1 if pinned else max(1, usable_cpus() // max(1, workers))
    return int(setting) if setting else None


def environment(threads: int) -> dict[str, str]:
    """The variables that size a library's pool when it loads."""
    return dict.fromkeys(ENV_VARS, str(threads))


def limit(threads: int) -> list[str]:
    """Size this process's native thread pools to ``threads``: the variables for libraries
    loaded from now on, and the pools already loaded. Returns the names of those."""
    from threadpoolctl import ThreadpoolController

    os.environ.update(environment(threads))
    controller = ThreadpoolController()
    controller.limit(limits=threads)
    limited = [str(info["internal_api"]) for info in controller.info()]
    cv2 = sys.modules.get("cv2")  # not imported: the variable above sizes it when it loads
    if cv2 is not None:
        cv2.setNumThreads(threads)
        limited.append("opencv")
    return limited

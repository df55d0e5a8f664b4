"""``Pipeline.stats()``: what a running pipeline has done, as plain data -- for tests,
tools and users alike, so that none of them reads the orchestrator's private state."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerStats:
    """One worker process (a replica of a unit)."""

    name: str  # the unit's path; "<path>#<replica>" for a replica
    pid: int  # of the process running now (a restart changes it)
    alive: bool  # running, and it has said it is ready
    restarts: int  # how often it was started again after dying or being ended
    # {why: how often}, for the restarts there were: "died" (by itself), "deadline" (a
    # stage call ran past it), "max_memory" (its resident size passed max_memory_mb)
    restart_reasons: dict[str, int] = field(default_factory=dict)
    # Its resident memory in bytes, now and at its highest (this process's: a restart starts
    # afresh), as it last reported them; None when it did not answer
    rss_bytes: int | None = None
    rss_peak_bytes: int | None = None
    native_threads: int | None = None  # its native thread pools' size; None: left alone
    # parallelize(cluster=...): the id and address of the cluster node it runs on; else None
    node_id: str | None = None
    node_address: str | None = None


@dataclass(frozen=True)
class PipelineStats:
    """Counters by sequence number: after a drain, and once a worker has died past its
    restarts (what was in flight then is lost), forwarded = delivered + dropped + lost."""

    mode: str  # "serial" or "parallel"
    forwarded: int = 0  # items that entered the first stage
    refused: int = 0  # forward() returned False
    replaced: int = 0  # drop_policy="latest": taken by forward(), replaced before entering
    delivered: int = 0  # outputs that came out
    dropped: int = 0  # dropped by a stage, a drop policy or max_age (a marker came out)
    lost: int = 0  # never came out: lost with a worker that died
    # Not ours, ignored: outputs with a sequence number never sent (someone else sent them
    # to the sink), and control messages from peers that are not this pipeline's workers.
    rogue: int = 0
    rogue_control: int = 0
    lost_ranges: tuple[tuple[int, int], ...] = ()  # (first, last) sequence numbers, inclusive
    out: int = 0  # every item below this sequence number has come out (or is lost)
    # forwarded - out, at most: parallelize(max_in_flight=), or one per worker under
    # drop_policy="latest" (0 in serial mode); see parallelize() for the usual bound
    max_in_flight: int = 0
    decode_errors: int = 0  # malformed outputs or profile messages received, dropped
    workers: tuple[WorkerStats, ...] = ()
    # {path: {name: value}} as each worker last reported them; a replica's end in "#N".
    stages: dict[str, dict[str, int]] = field(default_factory=dict)
    # {link name: endpoint} where each of the orchestrator's links is bound ("control",
    # "profile", "in0.0-0", "sink-0", ...; see pystream_zmq.plan).
    endpoints: dict[str, str] = field(default_factory=dict)
    socket_dir: str | None = None  # the private folder of ipc files and run keys
    curve_public_key: bytes | None = None  # the run's CURVE public key (curve=True)
    # Whether large arrays go through shared memory (parallelize(shm=True), ipc, Linux);
    # how forward()'s went: shm_arrays/shm_bytes, frame_arrays/frame_bytes, shm_full (sent
    # by frame for want of room). Each stage's own output link: the same names in
    # ``stages``, and shm_passed (of shm_arrays, received regions passed on without a
    # copy). See docs/shared-memory.md. ``source`` and each stage also count the batches
    # small items went in (batches) and the items those held (batched).
    shared_memory: bool = False
    source: dict[str, int] = field(default_factory=dict)

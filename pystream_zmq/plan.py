"""The plan: what a parallel pipeline will run, as plain data, built without starting
anything. Every launcher reads it -- the orchestrator (local worker processes),
``pystream procfile`` (honcho) and ``pystream-worker pipeline`` -- and none re-derives it.

A plan is a chain of units. A unit is what one worker process runs: a stage, or a serial
sub-pipeline's stages inline; a unit with replicas is that many processes sharing its input.
Links follow one rule: **every process binds its own inputs, one per sender upstream**, and
the process upstream connects to them. So a replica of unit ``u`` binds ``in{u}.{r}-{s}``
for each replica ``s`` of the unit before it (the source, before the first unit, is one
sender); the sink, after the last unit, binds ``sink-{s}``. A launcher turns these names
into endpoints: ipc files, OS-chosen tcp ports, or the consecutive ports of a Procfile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pystream_zmq.stage import ON_ERROR_POLICIES, PATH_SEPARATOR, REPLICA_MARK, Leaf
from pystream_zmq.wire import transport

SOURCE = -1  # the unit index of the source, before the first unit
DEFAULT_STALL_AFTER = 10.0  # seconds one stage call may take before a WARNING says so
DEFAULT_MAX_ATTRIBUTE_BYTES = 64 * 2**20  # a stage attribute larger stays in its worker
MIB = 2**20  # max_memory_mb counts these


@dataclass(frozen=True)
class Limits:
    """How long a stage call may take, how large a stage attribute may be to be copied back,
    and how much memory its worker may hold (``add(stall_after=, deadline=,
    max_attribute_bytes=, max_memory_mb=)``). None: as the enclosing entry's (a child
    pipeline's), else the default. ``math.inf``: no limit."""

    stall_after: float | None = None  # seconds on one item, then a WARNING (repeated)
    deadline: float | None = None  # seconds on one item, then its worker is restarted
    max_attribute_bytes: float | None = None  # encoded bytes; larger stays in the worker
    # MiB of resident memory; past it, after an item, the worker is replaced
    max_memory_mb: float | None = None

    def __post_init__(self) -> None:
        for name in ("stall_after", "deadline", "max_attribute_bytes", "max_memory_mb"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            ):
                raise ValueError(f"{name} must be a positive number (or math.inf), not {value!r}")

    def under(self, outer: Limits) -> Limits:
        """These limits, with what is not set taken from ``outer``."""
        return Limits(
            outer.stall_after if self.stall_after is None else self.stall_after,
            outer.deadline if self.deadline is None else self.deadline,
            outer.max_attribute_bytes
            if self.max_attribute_bytes is None
            else self.max_attribute_bytes,
            outer.max_memory_mb if self.max_memory_mb is None else self.max_memory_mb,
        )

    def resolved(self) -> tuple[float, float, float]:
        """(stall_after, deadline, max_attribute_bytes), the defaults for what is not set."""
        full = self.under(DEFAULT_LIMITS)
        assert full.stall_after and full.deadline and full.max_attribute_bytes  # set, > 0
        return full.stall_after, full.deadline, full.max_attribute_bytes

    def max_memory_bytes(self) -> float:
        """The resident memory its worker may hold, in bytes (``math.inf`` when not set)."""
        mb = self.under(DEFAULT_LIMITS).max_memory_mb
        assert mb is not None  # set in DEFAULT_LIMITS
        return mb * MIB


@dataclass(frozen=True)
class Placement:
    """Where a cluster launcher may start a unit's workers (``add(resources=, num_cpus=)``):
    logical resources a node must have free, as a cluster scheduler counts them (Ray's
    ``{"GPU": 1}``, or a custom one naming a host's camera). Local ``parallelize()`` runs
    every worker on this machine and reads none of it, so that one pipeline definition
    runs both ways. None / (): as the enclosing entry's, else the launcher's default."""

    resources: tuple[tuple[str, float], ...] = ()  # (name, amount), sorted by name
    num_cpus: float | None = None

    def __post_init__(self) -> None:
        for name, amount in self.resources:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a resource name must be a non-empty string, not {name!r}")
            if name == "CPU":
                raise ValueError("give CPUs as num_cpus=, not as resources={'CPU': ...}")
            _check_amount(f"resources[{name!r}]", amount)
        if self.num_cpus is not None:
            _check_amount("num_cpus", self.num_cpus)

    @classmethod
    def of(cls, resources: Mapping[str, float] | None, num_cpus: float | None) -> Placement:
        if resources is not None and not isinstance(resources, Mapping):
            raise TypeError(f"resources must be a mapping of name to amount, not {resources!r}")
        return cls(tuple(sorted((resources or {}).items())), num_cpus)

    def under(self, outer: Placement) -> Placement:
        """This placement, with what is not set taken from ``outer``."""
        return Placement(
            self.resources or outer.resources,
            outer.num_cpus if self.num_cpus is None else self.num_cpus,
        )


def _check_amount(what: str, amount: object) -> None:
    if not (isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount >= 0):
        raise ValueError(f"{what} must be a number of at least 0, not {amount!r}")
    if not math.isfinite(amount):
        raise ValueError(f"{what} must be finite, not {amount!r}")


# What a stage runs under when nothing is set: a stall WARNING after 10 s, no deadline, no
# memory limit.
DEFAULT_LIMITS = Limits(DEFAULT_STALL_AFTER, math.inf, DEFAULT_MAX_ATTRIBUTE_BYTES, math.inf)


@dataclass(frozen=True)
class Entry:
    """One stage of a pipeline, as ``Pipeline.add`` recorded it."""

    name: str
    stage: Callable[[Any], Any]
    child: Tree | None = None  # the pipeline, when the stage is another's as_stage()
    on_error: str | None = None  # None: the pipeline's own
    drop_policy: str | None = None  # of the link into it; None: the pipeline-wide policy
    replicas: int = 1
    ordered: bool = True
    limits: Limits = Limits()  # what is not set: the enclosing entry's, else the default
    placement: Placement = Placement()  # read by cluster launchers only

    def __post_init__(self) -> None:
        """Refuse what ``add()`` cannot take (Limits check themselves)."""
        if self.on_error is not None:
            check_on_error(self.on_error)
        if self.drop_policy is not None:
            check_drop_policy(self.drop_policy, transport.LINK_POLICIES)
        if type(self.replicas) is not int or self.replicas < 1:
            raise ValueError(
                f"replicas must be a whole number of at least 1, not {self.replicas!r}"
            )


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, not {on_error!r}")
    return on_error


def check_drop_policy(policy: str, allowed: tuple[str, ...]) -> str:
    if policy not in allowed:
        raise ValueError(f"drop_policy must be one of {allowed}, not {policy!r}")
    return policy


class Tree(Protocol):
    """What a plan is built from: a pipeline's entries (``Pipeline`` is one)."""

    on_error: str

    @property
    def entries(self) -> Sequence[Entry]: ...

    @property
    def mode(self) -> str | None: ...  # "serial", "parallel", or None: not started


@dataclass(frozen=True)
class Unit:
    """What one worker process runs."""

    name: str  # its profile path, e.g. "MainPipeline__Stage1"
    leaves: tuple[Leaf, ...]  # (profile path, stage) run one after the other
    raise_on: frozenset[str] = frozenset()  # leaf paths whose errors go to the user
    drop_policy: str = transport.BLOCK  # of the link into this unit's processes
    replicas: int = 1  # processes sharing the unit's input
    ordered: bool = True  # the replicas' outputs are put back in input order
    # Each leaf's limits, in the order of ``leaves``, every field set; () for the defaults.
    limits: tuple[Limits, ...] = field(default=())
    placement: Placement = Placement()  # where a cluster launcher may start its workers

    def limits_by_path(self) -> dict[str, Limits]:
        """{leaf path: its limits}, DEFAULT_LIMITS for a leaf with none recorded."""
        given = dict(zip((path for path, _ in self.leaves), self.limits, strict=False))
        return {path: given.get(path, DEFAULT_LIMITS) for path, _ in self.leaves}


@dataclass(frozen=True)
class Process:
    """One worker process: a replica of a unit, and its links."""

    index: int  # position in Plan.processes (chain order)
    unit: int
    replica: int
    name: str  # the unit's path; "<path>#<replica>" for a unit with replicas
    binds: tuple[str, ...]  # link names of its inputs, one per sender upstream
    connects: tuple[str, ...]  # link names of its outputs, one per receiver downstream
    ordered_input: bool  # merge its inputs in sequence order (the unit before has replicas)


@dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]
    processes: tuple[Process, ...]
    source_connects: tuple[str, ...]  # where the source sends: one per first-unit replica
    sink_binds: tuple[str, ...]  # what the sink binds: one per last-unit replica
    sink_ordered: bool  # the sink merges its inputs in sequence order
    in_order: bool  # outputs come out in input order at all
    layout: tuple[tuple[str, str], ...]  # (path, "pipeline" | "stage") of every profile level

    def process(self, unit: int, replica: int) -> Process:
        return next(p for p in self.processes if p.unit == unit and p.replica == replica)

    def link_names(self) -> list[str]:
        """Every link name, in chain order: each process's inputs, then the sink's."""
        return [name for p in self.processes for name in p.binds] + list(self.sink_binds)

    def leaves(self) -> list[Leaf]:
        """Every stage of every unit, in chain order (to run them all in one process)."""
        return [leaf for unit in self.units for leaf in unit.leaves]


def build_plan(units: Sequence[Unit], layout: Sequence[tuple[str, str]]) -> Plan:
    """The plan of a chain of units; ValueError for a layout whose order cannot be kept."""
    check_order(units)
    processes: list[Process] = []
    for u, unit in enumerate(units):
        before = units[u - 1] if u > 0 else None
        for r in range(unit.replicas):
            name = unit.name if unit.replicas == 1 else f"{unit.name}{REPLICA_MARK}{r}"
            processes.append(
                Process(
                    index=len(processes),
                    unit=u,
                    replica=r,
                    name=name,
                    binds=tuple(_input_names(units, u, r)),
                    connects=tuple(_output_names(units, u, r)),
                    ordered_input=before is not None and before.replicas > 1 and before.ordered,
                )
            )
    last = units[-1] if units else None
    return Plan(
        units=tuple(units),
        processes=tuple(processes),
        source_connects=tuple(_output_names(units, SOURCE, 0)),
        sink_binds=tuple(_input_names(units, len(units), 0)),
        sink_ordered=last is not None and last.replicas > 1 and last.ordered,
        in_order=all(unit.ordered or unit.replicas == 1 for unit in units),
        layout=tuple(layout),
    )


def _input_names(units: Sequence[Unit], unit: int, replica: int) -> list[str]:
    """What a replica of ``unit`` binds (``unit == len(units)``: the sink)."""
    senders = units[unit - 1].replicas if unit > 0 else 1
    name = "sink" if unit == len(units) else f"in{unit}.{replica}"
    return [f"{name}-{sender}" for sender in range(senders)]


def _output_names(units: Sequence[Unit], unit: int, replica: int) -> list[str]:
    """Where a replica of ``unit`` (SOURCE: the source) connects: its own input on each
    replica of the next unit."""
    after = unit + 1
    receivers = units[after].replicas if after < len(units) else 1
    return [_input_names(units, after, r)[replica] for r in range(receivers)]


def check_order(units: Sequence[Unit]) -> None:
    """Replicas' outputs are put back in order by the next single process (a one-replica
    unit, or the sink), merging one in-order stream per replica. Refuse the layouts where
    that cannot work, rather than deliver out of order."""
    scrambled_by: str | None = None  # the unit after which items are out of order for good
    for unit, after in zip(units, [*units[1:], None], strict=True):
        if unit.replicas == 1 or not unit.ordered:
            if unit.replicas > 1 and scrambled_by is None:
                scrambled_by = unit.name
            continue
        if scrambled_by is not None:
            raise ValueError(
                f"stage {unit.name} has replicas and ordered=True, but its input is already "
                f"out of order ({scrambled_by} has replicas and ordered=False): set "
                f"ordered=False on {unit.name} too"
            )
        if after is not None and after.replicas > 1:
            raise ValueError(
                f"stages {unit.name} and {after.name} both have replicas: order is restored in "
                f"front of a single worker only; set ordered=False on {unit.name}, or put a "
                f"stage with one worker between them"
            )


# -- from a pipeline's entries ---------------------------------------------------------------
def plan_of(tree: Tree, *, drop_policy: str, root: str) -> Plan:
    """The plan of running ``tree`` under ``parallelize(drop_policy=...)``."""
    raising = raising_paths(tree, root, tree.on_error)
    link_policy = transport.LATEST if drop_policy == transport.LATEST else transport.BLOCK
    found = list(units(tree, root, raising, link_policy))
    return build_plan(found, [(root, "pipeline"), *((p, k) for p, k, _ in layout(tree, root))])


def layout(tree: Tree, prefix: str) -> Iterator[tuple[str, str, Callable[[Any], Any]]]:
    """(path, "stage" | "pipeline", stage) for every level below ``prefix``, in order."""
    for entry in tree.entries:
        path = prefix + PATH_SEPARATOR + entry.name
        if entry.child is not None:
            yield path, "pipeline", entry.stage
            yield from layout(entry.child, path)
        else:
            yield path, "stage", entry.stage


def leaves(tree: Tree, prefix: str) -> list[Leaf]:
    """Every stage below ``prefix``, children's included, in chain order."""
    return [(path, stage) for path, kind, stage in layout(tree, prefix) if kind == "stage"]


def raising_paths(tree: Tree, prefix: str, default: str) -> frozenset[str]:
    """Leaf paths whose errors are raised to the user (on_error="raise")."""
    paths: set[str] = set()
    for entry in tree.entries:
        path = prefix + PATH_SEPARATOR + entry.name
        policy = entry.on_error or default
        if entry.child is not None:
            paths |= raising_paths(entry.child, path, policy)
        elif policy == "raise":
            paths.add(path)
    return frozenset(paths)


def units(
    tree: Tree,
    prefix: str,
    raising: frozenset[str],
    policy: str,
    outer: Limits = DEFAULT_LIMITS,
    where: Placement = Placement(),
) -> Iterator[Unit]:
    """One unit per worker: a stage, a serialized child's stages together, or a
    parallelized child's units; ``policy`` is the drop policy of links not set per stage,
    ``outer`` the limits of stages that set none."""
    for entry in tree.entries:
        path = prefix + PATH_SEPARATOR + entry.name
        mine = entry.drop_policy or policy
        limits = entry.limits.under(outer)
        placement = entry.placement.under(where)
        if entry.child is None:
            own = ((path, entry.stage),)
            yield Unit(
                path, own, raising & {path}, mine, entry.replicas, entry.ordered, (limits,),
                placement,
            )  # fmt: skip
        elif entry.child.mode == "parallel":
            if entry.replicas > 1:
                raise ValueError(
                    f"{path}: replicas apply to a stage or a serialized sub-pipeline; "
                    "give them to the parallel sub-pipeline's stages instead"
                )
            yield from units(entry.child, path, raising, mine, limits, placement)
        else:
            inline = tuple(leaves(entry.child, path))
            raise_on = raising & {leaf_path for leaf_path, _ in inline}
            inline_limits = tuple(leaf_limits(entry.child, limits))
            yield Unit(
                path, inline, raise_on, mine, entry.replicas, entry.ordered, inline_limits,
                placement,
            )  # fmt: skip


def leaf_limits(tree: Tree, outer: Limits) -> Iterator[Limits]:
    """The limits of every stage below ``tree``, in the order of ``leaves``."""
    for entry in tree.entries:
        limits = entry.limits.under(outer)
        if entry.child is None:
            yield limits
        else:
            yield from leaf_limits(entry.child, limits)


def unit_leaves(tree: Tree, prefix: str) -> list[tuple[str, tuple[Leaf, ...]]]:
    """(unit path, its leaves) of each unit ``units`` would make, in chain order: what
    ``serialize()`` reads to check each unit's output as ``parallelize()`` would send it.
    Unlike a plan it refuses no layout: replicas and order do not apply to stages inline."""
    found: list[tuple[str, tuple[Leaf, ...]]] = []
    for entry in tree.entries:
        path = prefix + PATH_SEPARATOR + entry.name
        if entry.child is None:
            found.append((path, ((path, entry.stage),)))
        elif entry.child.mode == "parallel":
            found += unit_leaves(entry.child, path)
        else:
            found.append((path, tuple(leaves(entry.child, path))))
    return found

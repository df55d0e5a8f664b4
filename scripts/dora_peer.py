"""dora-rs as a peer in scripts/bench.py (issue 16, item 3).

dora-rs and dora-rs-cli 1.1.0 live in their own virtual environment, ``.dora-venv`` (created
on first use, as ``.bench-venv`` is for the thread-based PyStream). Every trial writes a
dataflow (source -> ``hops`` no-op nodes -> sink, and the sink's ``ack`` output back to the
source) and runs it with ``dora run`` (a daemon inside the CLI process, no coordinator) in a
process group of its own, which is killed if the run does not end by itself. The nodes are
``scripts/dora_node.py``; the sink numbers every item and writes what it got.

Settings (variants):
- ``zero-copy``: dora's default: large messages in shared memory, ``queue_policy:
  drop_oldest`` on every input (queue_size 10); nothing slows the source down.
- ``backpressure``: ``queue_policy: backpressure`` on every input. In dora 1.1 this does not
  slow the sender either: an input buffers up to 10x ``queue_size`` (at least 100) and then
  drops the oldest, with an ERROR log line per item.
- ``credit N``: the default transport, made lossless by hand (the sink still checks): the
  source keeps at most N items that the sink has not acknowledged (N = 4 for frames, 8 for
  small messages; never more than an input's queue holds).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DORA_VENV = ROOT / ".dora-venv"
NODE = Path(__file__).resolve().parent / "dora_node.py"
VERSION = "1.1.0"
PREFIX = "dora "  # variant names: "dora zero-copy", "dora backpressure", "dora credit 4"
WINDOW = {"mb": 4, "4k": 4, "small": 8}
RUN_TIMEOUT = 180.0
MAX_4K = 40  # 4K frames per dora trial at most (dora moves ~4 of them a second here)
SHM = Path("/dev/shm")
LEFT_IN_SHM: list[str] = []  # zenoh segments that runs left behind (removed; reported)


def variants(payload: str, latency: bool = False) -> list[str]:
    names = ["zero-copy", "backpressure"] + ([] if latency else [f"credit {WINDOW[payload]}"])
    return [PREFIX + name for name in names]


def is_dora(variant: str) -> bool:
    return variant.startswith(PREFIX)


def lossless(variant: str) -> bool:
    return not variant.endswith("zero-copy")


def setup(quick: bool) -> str | None:
    """The ``dora`` CLI of .dora-venv, installed on first use and checked with a one-item
    dataflow; None, with a one-line reason printed, when dora cannot be had. Never in
    --quick mode nor in CI: dora is an optional peer, not a dependency."""
    if quick:
        print("dora-rs: skipped in --quick mode")
        return None
    if os.environ.get("CI"):
        print("dora-rs: skipped in CI")
        return None
    python, dora = DORA_VENV / "bin" / "python", DORA_VENV / "bin" / "dora"
    probe = [str(python), "-c", "import dora, numpy, pyarrow"]
    try:
        ready = dora.exists() and subprocess.run(probe, capture_output=True).returncode == 0
        if not ready:
            print(f"creating {DORA_VENV.name}/ with dora-rs and dora-rs-cli {VERSION} ...")
            sys.stdout.flush()
            subprocess.run([sys.executable, "-m", "venv", str(DORA_VENV)], check=True)
            pip = [str(python), "-m", "pip", "install", "-q", f"dora-rs=={VERSION}"]
            pip += [f"dora-rs-cli=={VERSION}", "numpy"]
            subprocess.run(pip, check=True, capture_output=True, timeout=600)
            subprocess.run(probe, check=True, capture_output=True)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"dora-rs: could not be installed ({e}); dora rows skipped")
        return None
    try:
        run(str(dora), {"payload": "small", "n": 3, "hops": 1, "variant": PREFIX + "zero-copy"})
    except (RuntimeError, OSError) as e:
        print(f"dora-rs: a one-item dataflow did not run ({e}); dora rows skipped")
        return None
    return str(dora)


def _dataflow(spec_path: Path, hops: int, policy: str) -> str:
    """The dataflow as YAML (written as JSON, which is YAML: no quoting to get wrong)."""
    python = str(DORA_VENV / "bin" / "python")

    def node(role: str, name: str, inputs: dict[str, str], outputs: list[str]) -> dict[str, Any]:
        long = {key: {"source": src, "queue_policy": policy} for key, src in inputs.items()}
        return {
            "id": name,
            "path": python,
            "args": f"{NODE} {role} {spec_path}",
            "inputs": long,
            "outputs": outputs,
        }

    names = ["source"] + [f"hop{i}" for i in range(hops)] + ["sink"]
    nodes = [node("source", "source", {"ack": "sink/ack"}, ["data"])]
    for i in range(hops):
        nodes.append(node("hop", names[i + 1], {"data": f"{names[i]}/data"}, ["data"]))
    nodes.append(node("sink", "sink", {"data": f"{names[-2]}/data"}, ["ack"]))
    return json.dumps({"nodes": nodes}, indent=1)


def run(dora: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One ``dora run`` of one variant; the sink's result (rate or latencies, and the items
    lost, reordered and duplicated). Raises RuntimeError when the run fails."""
    variant = spec["variant"][len(PREFIX) :]
    policy = "backpressure" if variant == "backpressure" else "drop_oldest"
    window = int(variant.split()[1]) if variant.startswith("credit") else 0
    folder = Path(tempfile.mkdtemp(prefix="bench-dora-"))
    try:
        result_path = folder / "result.json"
        node_spec = {"payload": spec["payload"], "n": spec["n"], "window": window}
        node_spec |= {"mode": "latency" if "rate" in spec else "throughput"}
        node_spec |= {"rate": spec.get("rate", 100.0), "result": str(result_path)}
        spec_path = folder / "spec.json"
        spec_path.write_text(json.dumps(node_spec))
        flow = folder / "dataflow.yml"
        flow.write_text(_dataflow(spec_path, spec["hops"], policy))
        log = folder / "dora.log"
        before = _zenoh_segments()
        cmd = [dora, "run", str(flow), "--log-level", "warn"]
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(RUN_TIMEOUT)
            finally:  # ended normally, timed out or Ctrl-C: nothing of it stays
                stop_group(proc)
                for name in sorted(_zenoh_segments() - before):
                    LEFT_IN_SHM.append(name)
                    with contextlib.suppress(OSError):
                        (SHM / name).unlink()
        if code != 0 or not result_path.exists():
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"dora run exited with {code}: {tail[-300:]}")
        result: dict[str, Any] = json.loads(result_path.read_text())
        return result
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"dora run took more than {RUN_TIMEOUT:.0f} s") from e
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _zenoh_segments() -> set[str]:
    """The shared-memory segments of zenoh (dora's transport) in /dev/shm: a run can leave
    one behind after it ended normally."""
    with contextlib.suppress(OSError):
        return {p.name for p in SHM.iterdir() if p.name.endswith(".zenoh")}
    return set()


def stop_group(proc: subprocess.Popen[Any]) -> None:
    """SIGINT to the run's process group (dora stops its nodes), then SIGKILL to whatever
    of the group is still there after a grace period."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        os.killpg(proc.pid, signal.SIGKILL)  # the nodes too, even if the CLI has exited
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


# ===================================================================== reporting ======


def _span(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if min(values) != max(values) else f"{values[0]}"


def _loss_text(runs: list[dict[str, Any]]) -> str:
    text = f"lost {_span([r['lost'] for r in runs])}"
    text += f", reordered {_span([r['reordered'] for r in runs])}"
    dups = sum(r.get("duplicates", 0) for r in runs)
    return text + (f", duplicated {dups}" if dups else "")


def rate_lines(by_variant: dict[str, list[dict[str, Any]]], n: int, unit: str) -> list[str]:
    """One line per dora variant: median rate (runs), and the items lost and reordered (of
    n per run; the rate counts the items delivered)."""
    lines = []
    for variant, runs in by_variant.items():
        rates = [r["rate"] for r in runs]
        digits = 1 if max(rates) < 100 else 0  # 4K frames: a few a second
        lines.append(
            f"  {variant:19} {statistics.median(rates):8.{digits}f} {unit}  "
            f"({', '.join(f'{v:.{digits}f}' for v in rates)})  {_loss_text(runs)} of {n} each"
        )
    return lines


def best_lossless(by_variant: dict[str, list[dict[str, Any]]]) -> str | None:
    """dora's best lossless setting: the fastest (median rate) of the settings meant to be
    lossless, whatever they lost; the losses are printed next to the ratio. (The fastest, not
    the fastest that lost nothing: in dora 1.1 the credit window still lost a few items now
    and then, and ``backpressure`` drops once its buffer is full.)"""
    settings = [v for v in by_variant if lossless(v)]
    rate = {v: statistics.median(r["rate"] for r in by_variant[v]) for v in settings}
    return max(settings, key=rate.__getitem__) if settings else None


Verdict = str | tuple[str, float, bool, str, str]  # a line, or bench.py's check() arguments


def report(
    res: dict[str, Any],
    args: Any,
    paired: Callable[[list[float], list[float]], tuple[float, float]],
    pct: Callable[[list[float], float], float],
) -> tuple[list[str], list[Verdict]]:
    """bench.py's lines for dora, and its ratios against dora (issue 16's targets): ours
    over dora's best lossless setting (the one with the highest median that lost and
    reordered nothing), and over its zero-copy default, in the same run."""
    dora = res["dora"]
    lines: list[str] = []
    verdicts: list[Verdict] = []

    def against(
        what: str,
        ours: list[float] | None,
        section: str,
        target: float | None,
        mine: str = "pystream_zmq",
    ) -> None:
        if ours is None or section not in dora:
            return
        by_variant = dora[section]
        best = best_lossless(by_variant)
        for variant in [best, PREFIX + "zero-copy"]:
            if variant is None:
                continue
            runs = by_variant[variant]
            p, m = paired(ours, [r["rate"] for r in runs])
            name = "dora lossless" if lossless(variant) else variant
            extra = f"  ({variant}; ratio of medians {m:.2f}; dora {_loss_text(runs)})"
            label = f"{what}: {mine} / {name}"
            if target is not None and lossless(variant):
                verdicts.append((label, p, p >= target, f">= {target}", extra))
            else:
                verdicts.append(f"{label:44} = {p:8.2f}  (no target){extra}")

    if "mb" in dora:
        lines.append("dora-rs 1.1, 1 MB frames through 3 hops, frames/s (median; runs; items lost)")
        lines += rate_lines(dora["mb"], args.frames, "/s")
        against("1 MB frames, 3 stages", res["mb"].get(3, {}).get("pystream_zmq"), "mb", 1.5)
    if "small" in dora:
        lines.append("dora-rs 1.1, small messages through 1 hop, msgs/s (median; runs; items lost)")
        lines += rate_lines(dora["small"], args.messages, "/s")
        # issue 16's target: forwarded from one thread, every output read in another
        reader = "pystream_zmq results()"
        against("small msgs", res["small"].get(reader), "small", 1.2, mine=reader)
    if "4k" in dora:
        lines.append("dora-rs 1.1, 4K frames through 3 hops, frames/s (median; runs; items lost)")
        lines += rate_lines(dora["4k"], min(args.frames_4k, MAX_4K), "/s")
        ours = res["shm"].get("4k", {}).get("pystream_zmq")
        against("4K frames, 3 stages", ours, "4k", None)
    if "latency" in dora:
        lines.append(
            f"dora-rs 1.1, latency, 1 MB frames at {args.rate:g}/s through "
            f"{args.latency_hops} hops, ms"
        )
        ours = res["latency"].get("pystream_zmq")
        for variant, runs in dora["latency"].items():
            hop_ms = [x for r in runs for x in r["hop_ms"]]
            total_ms = [x for r in runs for x in r["total_ms"]]
            lines.append(
                f"  {variant:19} per hop p50 {pct(hop_ms, 50):6.2f}  p99 {pct(hop_ms, 99):6.2f}"
                f"   end-to-end p50 {pct(total_ms, 50):6.2f}  p99 {pct(total_ms, 99):6.2f}"
                f"  ({len(total_ms)} items; {_loss_text(runs)})"
            )
            if ours and hop_ms:
                ratio = pct(ours["hop_ms"], 50) / pct(hop_ms, 50)
                label = f"latency p50 per hop: pystream_zmq / {variant}"
                if variant == PREFIX + "zero-copy":
                    verdicts.append((label, ratio, ratio <= 0.8, "<= 0.8", ""))
                else:
                    verdicts.append(f"{label:44} = {ratio:8.2f}  (no target)")
    if LEFT_IN_SHM:
        lines.append(
            f"dora-rs left {len(LEFT_IN_SHM)} zenoh segment(s) in /dev/shm after runs that "
            "ended; removed"
        )
    return lines, verdicts

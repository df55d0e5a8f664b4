"""What the shared-memory tests look at in /proc and /dev/shm (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

POOL_NAME = "memfd:pystream-shm"


def _held_by(pid: int) -> str:
    """The files process ``pid`` maps or holds open, as one text ('' if unreadable)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return ""
    return maps + "\n".join(links)


def holders_of_pools(but: int | None = None) -> list[int]:
    """Every process (but ``but``) holding one of our pools, open or mapped."""
    return [p.pid for p in psutil.process_iter() if p.pid != but and POOL_NAME in _held_by(p.pid)]


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def left_in_dev_shm(before: set[str]) -> set[str]:
    """Entries of /dev/shm made since ``before`` that no living process holds: what a run
    left behind. (Another program on this machine may make its own while it runs; those
    it holds are not ours.)"""
    new = dev_shm() - before
    if not new:
        return set()
    held = "\n".join(_held_by(p.pid) for p in psutil.process_iter())
    return {name for name in new if f"/dev/shm/{name}" not in held}

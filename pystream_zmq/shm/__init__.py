"""Same-host shared memory for large arrays (issue 16): on the orchestrator's ipc links,
an array of ``DEFAULT_MIN_BYTES`` or more is copied into the sending process's pool, and
the message carries a small descriptor in its place; the receiver builds the array on its
own mapping of that pool, with no copy. ZeroMQ still carries envelope, header and order.

- ``layout``: one pool is an anonymous memfd: a header, a lease table, the data area;
- ``sender``: the one process that writes a pool places arrays in it (``Allocator``);
- ``receiver``: any process that reads one builds arrays on it, and releases each lease
  when the last view of its array is gone (``Views``);
- ``pools``: what a process holds (``Shared``), and what the orchestrator creates
  (``create_pools``).

docs/shared-memory.md tells the whole story: safety, settings, counters.
"""

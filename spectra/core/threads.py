"""How many threads torch computes with on the CPU while spectra trains.

torch's default is one intra-op thread per core. Every parallel operation then waits for its
slowest thread, so on a machine whose cores are also busy with other work each operation waits
for a thread that the scheduler has put aside, and small models train many times slower than
with one thread. spectra's training paths (the demo, ``spectra train``, the task loops, the
theory suite) therefore train with ``TRAINING_THREADS`` threads unless told otherwise; the
measurements behind that choice are in docs/performance.md (``benchmarks/bench_threads.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

TRAINING_THREADS = 1


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, restoring the previous count after.

    ``None`` leaves torch's setting alone (the caller manages threads itself).
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}; must be None or an int >= 1")
    import torch  # here, not above: the command line reads TRAINING_THREADS without torch
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

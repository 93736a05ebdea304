"""How many intra-op threads torch may use in each of loraport's own threads.

torch's CPU ops split work over an OpenMP team once a tensor passes ~32K elements, and every such op waits
for its whole team at the end. When the cores are also busy with loraport's other pipeline threads (reader,
writer, hashing) or with other processes, a team member is often descheduled and each op stalls for a
scheduler time slice: measured on the 2-core development machine under load, NaN checks of 224 small
adapter tensors took 1.3–2.7 s with 2 threads and 0.03 s with 1. loraport's concurrency comes from its
pipeline (and from the quantizer's worker threads), so each of those threads gets a small team of its own:
`op_threads()` leaves two cores to the rest of the pipeline. The setting is per OS thread (OpenMP keeps it
per thread), so a thread changes only itself.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def op_threads() -> int:
    """Intra-op threads for a pipeline stage that runs beside two other busy stages."""
    return max(1, min(torch.get_num_threads(), cores() - 2))


@contextmanager
def torch_threads(n: int):
    """Run the body with torch limited to `n` intra-op threads in the calling thread, then restore."""
    prev = torch.get_num_threads()
    if n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)

"""glibc malloc settings for the two kinds of process teacher-farm runs (elsewhere: no-ops).

Both sides move blocks of megabytes, in opposite patterns, and glibc's defaults suit neither:

- The client holds a few answers of megabytes each at a time (Arrow bodies, decoded tables), of
  ever-changing sizes. glibc serves such blocks with mmap and, after the first is freed, raises its
  mmap threshold (up to 32 MiB), so later blocks come from the heap instead, where they fragment it:
  over hours the resident set creeps up although nothing is kept (measured: 460 to 750 MiB in two
  minutes at 570k tokens/s, against a flat 460-620 MiB with the threshold pinned).
  ``pin_mmap_threshold`` keeps big blocks in mmap, returned to the system when freed.
- An engine's worker on a CPU reduces the logits slice after slice: the same few blocks of
  megabytes, allocated and freed again for every slice. With the defaults, freed blocks go back to
  the system (munmap, or a trim of the heap's top) and every new one is faulted in page by page:
  0.7 to 3.7 million page faults per 372k tokens scored (vocabulary 4,096), and a sixth to a third
  of the end-to-end time. ``keep_freed_memory`` serves them from the heap and keeps it: no faults
  after the first slices, at the cost of holding the largest working set reached.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems: blocks above it are always mmapped.
MMAP_THRESHOLD_MAX = 32 << 20


def mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt`` for this process; False where it does not apply (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        fn = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc: nothing to set
        return False
    return bool(fn(param, value))


def _set_by_user() -> bool:
    """The user's own malloc settings, which win over ours."""
    return bool(
        os.environ.get("MALLOC_MMAP_THRESHOLD_")
        or os.environ.get("MALLOC_TRIM_THRESHOLD_")
        or "malloc" in os.environ.get("GLIBC_TUNABLES", "")
    )


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve blocks of ``nbytes`` or more with mmap for the rest of the process (the client's setting).

    Returns whether it took effect. The user's own malloc settings in the environment win.
    """
    return not _set_by_user() and mallopt(M_MMAP_THRESHOLD, nbytes)


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30) -> bool:
    """Serve blocks below ``mmap_threshold`` from the heap and keep up to ``trim_threshold`` of it
    free (an engine worker's setting on a CPU). Returns whether it took effect; the user's own malloc
    settings in the environment win."""
    if _set_by_user():
        return False
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) and mallopt(M_TRIM_THRESHOLD, trim_threshold)

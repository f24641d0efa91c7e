"""The process's memory allocator: glibc's thresholds for returning freed memory to the system."""

from __future__ import annotations

import os


def tune_allocator() -> bool:
    """Keep glibc from returning and re-faulting large buffers on every batch (the logits of one evaluation batch
    of a 49k-vocabulary model are 400 MB): raise malloc's mmap and trim thresholds for this process.

    On this project's 2-core machine it cuts the system time of an evaluation from 8.8 s to 0.1 s and its wall time
    by a third; under glibc's defaults even a bare forward pass over 8,192 tokens of smollm2-135m takes between 0
    and 1.2 million page faults (up to 2 s of system time), depending on the heap's history. The command line calls
    it at start; the Python API leaves it to the caller (a library must not change its host process on its own):
    call ``neurospec.tune_allocator()`` once, e.g. at the top of a notebook. It is skipped when the user sets
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` themselves, or ``NEUROSPEC_NO_MALLOPT``, and on
    platforms without glibc. Returns whether the thresholds were changed. Freed memory then stays with the process
    for reuse instead of going back to the system.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux") or any(
        os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "NEUROSPEC_NO_MALLOPT")
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 31))
    except (OSError, AttributeError):
        return False

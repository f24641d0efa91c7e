"""What the benchmark scripts print beside their figures: the machine, the settings that move CPU timings, memory."""

from __future__ import annotations

import os
import platform
import resource

import torch

ALLOCATOR_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict:
    """CPU model and cores, torch threads, allocator settings, whether the fused CPU kernels are on, load."""
    from neurospec.record import kernels

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "allocator": {k: os.environ.get(k) for k in ALLOCATOR_VARS},
        "kernels": kernels.usable(torch.zeros(1, 1)),
        "load_average_1min": os.getloadavg()[0],
    }

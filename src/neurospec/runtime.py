"""How the process runs: the number of torch, BLAS and OpenMP threads while a block of work runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

from neurospec.errors import NeurospecError


@contextmanager
def limited_threads(threads: int | None = 1) -> Iterator[None]:
    """Run the block with ``threads`` torch, BLAS and OpenMP threads (restored afterwards); ``None`` changes nothing.

    The analyses here are many small products. On a busy 2-core machine, two threads that wait for each other made
    them 7x (a smollm2 forward pass) to 80x (a dense 655-node eigendecomposition) slower than one thread, and
    scikit-learn's k-means (OpenMP) 15x slower.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise NeurospecError(f"threads must be >= 1 or None, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):  # BLAS and OpenMP (scikit-learn k-means)
            yield
    finally:
        torch.set_num_threads(before)

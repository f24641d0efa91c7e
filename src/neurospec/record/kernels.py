"""Fused CPU kernels (numba) for the per-batch work of :class:`~neurospec.record.accumulators.NeuronStats`.

The kernels read a batch ``x`` ``[tokens, width]`` (float32 or float64, C-contiguous, on the CPU):

- :func:`moments_histogram` (``NeuronStats.update`` calls it as :func:`stats_update`, which also writes the
  edges of the windows that move and reuses its buffers): everything in one call. Per block of columns:
  per neuron, the sum and sum of squares of ``x - shift``, sum |x|, sum sqrt|x|, the count of x > 0, min and max
  (and min and max over every ``step``-th row, the rows a sampled histogram sees), all accumulated in float64,
  optionally also the sums of the 3rd and 4th powers of ``x - shift`` (the shape statistics of the output-side
  recording, :mod:`neurospec.sparsity.outputs`); then each neuron's histogram grid widened to the new values (as
  :func:`~neurospec.record.histogram.fit_grid`), its counts moved where the window changed (as
  :func:`~neurospec.record.histogram.regrid`), and the block's rows binned in place into the int64 counts (as
  :meth:`~neurospec.record.histogram.Binner.counts_torch` bins them, in x's dtype). A neuron with a non-finite
  value gets non-finite sums and is not binned: the caller takes the masked path for it.
- :func:`moments`: the same partial sums alone.
- :func:`histogram_add`: each entry's histogram slot on a given grid, added in place to the int64 counts,
  optionally only where ``keep`` (the masked path).

A fourth, :func:`move_rows`, serves :class:`~neurospec.record.reservoir.Reservoir`: it merges the rows that beat
the sample's keys into the key-sorted sample in place, writing only the rows that move. A fifth,
:func:`w1_normal`, reads a finished histogram: the W1 distance of each neuron's distribution to N(0, 1)
(:func:`neurospec.sparsity.wasserstein.w1_from_stats`): per neuron, a numba pass that walks its CDF's knots instead
of a searchsorted, gathers and a dozen torch passes over a ``[neurons, 1024]`` grid, with N(0, 1)'s CDF at the
points from torch's vectorised ``erf`` between that pass and a second one that integrates (20 -> 4.8 ms for
1,536 neurons; the C library's ``erf``, called point by point, took over half the time; the points go knot interval
by knot interval, in chunks of 32 neurons whose arrays stay in the L2 cache, each thread taking whole chunks). :func:`quantiles` reads a
histogram's quantiles in one pass per neuron. A sixth, :func:`add_partials`, adds a batch's partials into the
``NeuronStats`` state (the torch ``_add_fast`` arithmetic, bit for bit) in one call instead of about twenty small
tensor operations, each a few microseconds, that cost about 0.5 ms per update inside a forward pass. Two more
serve the output-side recording (:mod:`neurospec.sparsity.outputs`) the same way: :func:`central_add` merges a
batch's power sums into the running central moments, :func:`pair_distances` does the mapping difficulty's work
on its token pairs (together about 0.5 ms of torch operations per module and batch, inside the forward pass).

They replace about a dozen torch passes over the batch, a batch-sized scratch buffer, a single-threaded
``bincount`` and the torch grid checks of every batch. The torch code stays the reference: it runs for tensors on
other devices, when numba cannot be imported, and when the environment variable ``NEUROSPEC_NO_KERNELS=1`` is set (read at import; tests flip
:data:`ENABLED`). Results agree with the torch path: histogram counts, grids and edges exactly, sums to float rounding (more
accurate here, as the torch path sums each batch in its dtype).

Compilation: numba is imported only when the first CPU batch arrives; each kernel is compiled per dtype on its
first call (about 5 s for the kernels in float32, once per machine and source version: ``cache=True`` keeps the
machine code in ``__pycache__`` next to this file, or in numba's cache directory when that is read-only).

Threads: the columns are split into ``torch.get_num_threads()`` contiguous ranges (``NEUROSPEC_KERNEL_THREADS``
sets another count, e.g. 1). The moments kernel (:func:`moments_histogram`, :func:`moments`) runs in torch's own
OpenMP team: ``GOMP_parallel`` of the OpenMP runtime this process loaded for torch (libgomp; Intel's and LLVM's
runtimes export the same entry point) calls a numba ``cfunc`` on every thread of the team, and each thread claims
column ranges (an atomic counter) until none is left. After each of its parallel regions torch's worker threads
spin for a while before they sleep, so a separate pool thread started during a forward pass shares a core with a
spinning worker and runs at about half speed; the team's threads take the work at once (2.2 ms against 3.9 ms for
a pool thread and 4.5 ms for one thread, right after a matrix product, on this project's 2-core machine).
``NEUROSPEC_KERNEL_TEAM=0`` turns this off; without such a runtime, and in a forked child (libgomp hangs in a child
forked after its threads started; torch itself runs serially there), the other kernels' way is used: the calling
thread and a small pool of Python threads (the kernels release the GIL). numba's own parallel loops are not used:
inside them the loops lost their vectorisation (about 3x slower per thread), and numba's OpenMP layer loads a
second copy of libgomp with its own threads.

Memory access: a thread reads its column range row by row, in blocks of at least 16 and at most 1,024 columns;
with a histogram, as many as keep the block's int64 counts within about 1 MB (the L2 cache of this project's
benchmark machine holds them: 496 columns at 256 bins). Wide blocks matter more than a block that fits the cache: each row's part of a block is one contiguous run
that the hardware prefetcher follows, where blocks of 128 columns (512 bytes per row, each row in another page)
made the moments twice as slow on this project's machine. The moments take four rows at a time (each float64 sum
is read and written once per four values). The histogram: once every neuron of a block has a grid and the caller
allows it (``fuse``; NeuronStats does once it has seen three times the batch's rows), the four rows are binned right after their
moments, on the grids as they stand: their slots are computed in a vectorised loop that also takes the least and
greatest slot (an integer min/max reduction: a boolean "any value off its window" flag in that loop stopped its
vectorisation and lost the gain), then added in a scalar loop; a group of four rows with a value in an end slot is
noted. Once the batch's extremes are known, a neuron whose window moves gets its end slots back as they were, its
counts regridded, and its values off the old window (only in the noted groups and the last rows) binned on the new
grid; a neuron with a non-finite value gets back every count of the batch. The counts equal those of a second read
bit for bit. On ``[2048, 1536]`` float32 outputs of smollm2-135m, one thread: 6.6-7.0 ms per update with the
second read, 5.2-5.6 ms with one; inside a forward pass on 2 threads the gain is smaller (about 0.2-0.4 ms per
update) and the batch right after the first, whose windows move by 10-20 %, costs 1.3 ms more, hence the caller's
wait. Otherwise (``step > 1``, a neuron without a grid, the first batches) the block is read a second time for the
binning, once its grids are known (with ``step > 1``, the sampled rows' extremes take one more pass over those
rows).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

ENABLED = os.environ.get("NEUROSPEC_NO_KERNELS", "") not in ("1", "true", "yes")
"""False: always use the torch code (``NEUROSPEC_NO_KERNELS=1``)."""


def _threads_from_env() -> int | None:
    text = os.environ.get("NEUROSPEC_KERNEL_THREADS", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import warnings

        warnings.warn(f"NEUROSPEC_KERNEL_THREADS must be a positive integer, got {text!r}: ignored (the kernels use "
                      "torch.get_num_threads() threads)", stacklevel=2)
        return None
    return value


THREADS = _threads_from_env()
"""Threads of a kernel call (``NEUROSPEC_KERNEL_THREADS``, read at import); None: ``torch.get_num_threads()``."""

MOMENT_ROWS = 10
"""Rows of :func:`moments`' result: sum(x - shift), sum (x - shift)^2, sum |x|, sum sqrt|x|, count x > 0, min, max,
the shift, and min and max over the rows ``0, step, 2 * step, ...`` (the first eight as in
``accumulators._fast_partials``). For a neuron with a NaN or infinite value its sums are not finite and its
other rows are unspecified (the callers then take the masked path). The sum of sqrt|x| adds the square roots of
four rows in x's dtype before adding them in float64."""
HIGHER_ROWS = (MOMENT_ROWS, MOMENT_ROWS + 1)
"""Rows of :func:`moments`' result with ``higher=True``: sum (x - shift)^3 and sum (x - shift)^4."""
SHIFT_ROWS = 64
"""The shift of a neuron is the mean of its values in rows ``0, s, 2 * s, ...`` with ``s = max(1, tokens //
SHIFT_ROWS)``: close to the batch's mean, so that the sums of ``x - shift`` stay accurate for neurons whose mean
is large compared with their spread."""

_BLOCK = 1024  # columns per block of the moments alone (twelve float64 sums each: 96 KB, in the L2 cache)
_HIST_BLOCK = 256  # columns per block of histogram_add (int64 counts of 256 bins: 528 KB)
_COUNT_BYTES = 1 << 20  # with binning, a block's histogram counts at most this large (they stay in the L2 cache)
CELL_LIMIT = 2**23
"""Histogram cell indices stay in ``[-CELL_LIMIT, CELL_LIMIT)`` (:data:`neurospec.record.histogram.CELL_LIMIT`)."""
_CELL_LIMIT = float(CELL_LIMIT)
MAX_BINS = 1 << 20
"""The most histogram bins per neuron (slots of a block of columns stay int32 indices)."""
MIN_LEVEL = -126
"""The finest histogram level (:data:`neurospec.record.histogram.MIN_LEVEL`)."""
_MIN_LEVEL = MIN_LEVEL
W1_CHUNK_POINTS = 1 << 15
"""Evaluation points per chunk of :func:`w1_normal` (whole neurons; 256 KB each of z values, CDF values and N(0, 1)'s
CDF, which stay in the L2 cache between the three steps: 2 MB chunks took about 10% longer). Each thread takes every
``threads``-th chunk, all three steps; at this size torch's ``erf`` runs on the calling thread."""
_MIN_PER_THREAD = 1 << 16  # entries below which a batch is not split across threads
_LOCK = threading.Lock()
_pool: tuple[ThreadPoolExecutor, int, int] | None = None  # (pool, its threads, the process that made it)


def _after_fork_in_child() -> None:
    """A forked child gets a fresh lock (the parent's may have been held by another thread at the fork), no pool
    (the parent's pool threads do not exist in the child) and no OpenMP team (libgomp hangs in a child forked after
    its threads started; torch runs serially there for the same reason)."""
    global _LOCK, _pool, _team
    _LOCK = threading.Lock()
    _pool = None
    _team = False  # an OpenMP runtime whose threads the parent used is unusable here (as torch, run serially)


os.register_at_fork(after_in_child=_after_fork_in_child)
_jit: dict[str, Any] | None = None  # the compiled kernels; {} when numba is unavailable
_nb_cell: Any = None  # helpers of the moments kernel (set by _compile; globals, not closure cells, so that
_nb_fit_one: Any = None  # numba's on-disk cache can key the kernel that calls them)
_nb_regrid_row: Any = None
_nb_slot: Any = None
_nb_cdf_knots: Any = None
_nb_moments: Any = None
_nb_as_pointer: Any = None
_nb_claim: Any = None


def _compile() -> dict[str, Any]:
    """Import numba and define the kernels (each compiled per dtype on its first call, or loaded from the cache)."""
    global _jit
    if _jit is not None:
        return _jit
    try:
        import numba
        import numpy as np
        from numba import types
        from numba.extending import intrinsic
    except Exception:  # noqa: BLE001 - any import failure means: use the torch code
        _jit = {}
        return _jit
    njit = numba.njit(cache=True, nogil=True, error_model="numpy")

    @njit
    def cell_one(v, lv):  # pragma: no cover - compiled
        # histogram.cells: floor(v / 2**level), a negative value whose quotient underflows to -0 in cell -1; a cell
        # index moved up ``lv`` levels is the same (histogram._coarsen)
        c = np.floor(v * math.ldexp(1.0, -lv))
        if c == 0.0 and v < 0.0:
            c = -1.0
        return c

    global _nb_cell, _nb_fit_one, _nb_regrid_row  # module globals, so that the callers' cache entries hold
    _nb_cell = cell_one

    @njit
    def fit_one(a, b, lv, f, la, bins, spread_bits):  # pragma: no cover - compiled
        # histogram.fit_grid for one neuron with new extremes a <= b (finite): its (level, first, last).
        has = f == f
        if has:
            ca = _nb_cell(a, lv)
            cb = _nb_cell(b, lv)
            if ca >= f and cb < f + bins and cb < _CELL_LIMIT:
                return lv, f, max(la, cb)
        mag = max(abs(a), abs(b))
        bound = max(np.floor(np.log2(mag)) - 25.0, np.floor(np.log2(0.5 * b - 0.5 * a)) - spread_bits)
        if bound != bound:
            bound = -np.inf
        bound = min(max(bound, np.float64(_MIN_LEVEL)), 1100.0)
        new_level = max(lv, np.int64(bound))
        if has:
            lo = min(_nb_cell(f, new_level - lv), _nb_cell(a, new_level))
            hi = max(_nb_cell(la, new_level - lv), _nb_cell(b, new_level))
        else:
            lo = _nb_cell(a, new_level)
            hi = _nb_cell(b, new_level)
        while hi - lo >= bins or lo < -_CELL_LIMIT or hi >= _CELL_LIMIT:
            new_level += 1
            lo = np.floor(lo / 2.0)
            hi = np.floor(hi / 2.0)
        return new_level, lo, hi

    _nb_fit_one = fit_one

    @njit
    def regrid_row(counts, row, bins, old_level, old_first, new_level, new_first):  # pragma: no cover
        # histogram.regrid for one neuron: regular bin i (cell old_first + i) goes to cell
        # floor((old_first + i) / 2**up) of the new grid; under/overflow stay.
        moved = np.zeros(bins + 2, dtype=np.int64)
        moved[0] = counts[row]
        moved[bins + 1] = counts[row + bins + 1]
        for i in range(bins):
            cnt = counts[row + 1 + i]
            if cnt != 0:
                t = np.int64(_nb_cell(old_first + i, new_level - old_level) - new_first) + 1
                moved[min(max(t, 1), bins)] += cnt
        for i in range(bins + 2):
            counts[row + i] = moved[i]

    _nb_regrid_row = regrid_row

    @njit
    def slot_one(v, s, h, lo, hi):  # pragma: no cover - compiled
        # Binner.counts_torch's slot of one value, in x's dtype: clip(floor(v * s) - h, lo, hi) (s = 2**-level,
        # h = first - 1, lo = 0, hi = bins + 1), a negative value whose product rounds to -0 in cell -1, NaN in lo
        t = np.floor(v * s)
        t -= (t == lo) & (v < lo)
        t = min(max(t - h, lo), hi)
        return t if t == t else lo

    global _nb_slot
    _nb_slot = slot_one

    @njit
    def cdf_knots_one(counts, j, low, high, kmin, kmax, knots, cum):  # pragma: no cover - compiled
        # histogram._cdf_knots for neuron j, into knots and cum (bins + 3 entries each): min, lo, the regular
        # edges up to hi, max, clipped to [min, max], and the cumulative mass at each. Returns the total mass, or
        # -1 for a neuron without a usable histogram (no mass, no extremes, or an edge that is not finite).
        k = knots.shape[0]
        bins = k - 3
        cum[0] = 0.0
        for i in range(k - 1):
            cum[i + 1] = cum[i] + np.float64(counts[j, i])
        total = cum[k - 1]
        if not (total > 0.0 and kmin <= kmax and np.isfinite(low) and np.isfinite(high)):
            return -1.0
        knots[0] = kmin
        for i in range(bins + 1):
            knots[i + 1] = low + (high - low) * (np.float64(i) / bins)
        knots[k - 1] = kmax
        for i in range(k):
            knots[i] = min(max(knots[i], kmin), kmax)
        return total

    global _nb_cdf_knots
    _nb_cdf_knots = cdf_knots_one

    @njit
    def moments_kernel(x, shift_rows, step, higher, block, binning, counts, level, first, last, bins, spread_bits,
                       done, lo_edges, hi_edges, moved, j_start, j_stop, out):  # pragma: no cover - compiled
        n = x.shape[0]
        every = max(1, n // shift_rows)
        taken = (n - 1) // every + 1
        stride = bins + 2
        edges = lo_edges.shape[0] != 0  # also write the edges of the windows that move
        for j0 in range(j_start, j_stop, block):
            j1 = min(j0 + block, j_stop)
            m = j1 - j0
            s1 = np.zeros(m)
            s2 = np.zeros(m)
            sa = np.zeros(m)
            sq = np.zeros(m)
            s3 = np.zeros(m)
            s4 = np.zeros(m)
            pc = np.zeros(m)
            mn = np.full(m, np.inf)
            mx = np.full(m, -np.inf)
            smn = np.full(m, np.inf)
            smx = np.full(m, -np.inf)
            c = np.zeros(m)
            for i in range(0, n, every):
                row = x[i, j0:j1]
                for k in range(m):
                    c[k] += np.float64(row[k])
            c /= taken
            # With every row binned (step 1) and every neuron of the block holding a grid already, the histogram is
            # filled in this same read of the block, on the grids as they stand (binning on a grid and then moving
            # it equals binning on the moved grid: the cells of one level nest in those of the next). A value
            # outside its neuron's window lands in an end slot and its four rows are noted; once the batch's
            # extremes are known, the neurons whose windows move get their end slots back and those values binned
            # again (below). Otherwise the block is read a second time for the histogram, after the moments.
            fuse = binning == 2 and step == 1
            if fuse:
                for k in range(m):
                    if not (first[j0 + k] == first[j0 + k]):  # a neuron without a grid yet (its first batch)
                        fuse = False
                        break
            if fuse:
                cb = counts[j0 * stride : j1 * stride]
                osc = np.empty(m, dtype=x.dtype)  # 2**-level and first - 1 of each neuron's grid as it stands
                osh = np.empty(m, dtype=x.dtype)
                offset = np.empty(m, dtype=np.int32)
                under = np.empty(m, dtype=np.int64)  # the end slots' counts before this batch
                over = np.empty(m, dtype=np.int64)
                for k in range(m):
                    osc[k] = math.ldexp(1.0, -level[j0 + k])
                    osh[k] = first[j0 + k] - 1.0
                    offset[k] = k * stride
                    under[k] = cb[k * stride]
                    over[k] = cb[k * stride + bins + 1]
                q0 = np.empty(m, dtype=np.int32)
                q1 = np.empty(m, dtype=np.int32)
                q2 = np.empty(m, dtype=np.int32)
                q3 = np.empty(m, dtype=np.int32)
                quads = np.empty(n // 4 + 1, dtype=np.int64)  # first rows of the quads with a value off its window
                nquads = 0
                ends = np.zeros(2, dtype=x.dtype)  # 0 and bins + 1 in x's dtype (so that the slots stay in it)
                ends[1] = bins + 1
                lo, hi = ends[0], ends[1]
            # Four rows at a time: their terms added in pairs, then into the float64 sums, so that each sum is read
            # and written once per four values (one row at a time, the loads and stores of the sums, not the
            # arithmetic, set the pace).
            for i in range(0, n - n % 4, 4):
                r0 = x[i, j0:j1]
                r1 = x[i + 1, j0:j1]
                r2 = x[i + 2, j0:j1]
                r3 = x[i + 3, j0:j1]
                for k in range(m):
                    v0, v1, v2, v3 = r0[k], r1[k], r2[k], r3[k]
                    a0, a1, a2, a3 = np.abs(v0), np.abs(v1), np.abs(v2), np.abs(v3)
                    ck = c[k]
                    d0, d1 = np.float64(v0) - ck, np.float64(v1) - ck
                    d2, d3 = np.float64(v2) - ck, np.float64(v3) - ck
                    e0, e1, e2, e3 = d0 * d0, d1 * d1, d2 * d2, d3 * d3
                    s1[k] += (d0 + d1) + (d2 + d3)
                    s2[k] += (e0 + e1) + (e2 + e3)
                    sa[k] += (np.float64(a0) + np.float64(a1)) + (np.float64(a2) + np.float64(a3))
                    sq[k] += np.float64((np.sqrt(a0) + np.sqrt(a1)) + (np.sqrt(a2) + np.sqrt(a3)))  # in x's dtype
                    pc[k] += ((1.0 if v0 > 0.0 else 0.0) + (1.0 if v1 > 0.0 else 0.0)) \
                        + ((1.0 if v2 > 0.0 else 0.0) + (1.0 if v3 > 0.0 else 0.0))
                    w = np.float64(min(min(v0, v1), min(v2, v3)))  # (a NaN makes s1 NaN: its partials go unused)
                    mn[k] = w if w < mn[k] else mn[k]
                    w = np.float64(max(max(v0, v1), max(v2, v3)))
                    mx[k] = w if w > mx[k] else mx[k]
                    if higher:
                        s3[k] += (e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3)
                        s4[k] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
                if fuse:
                    # the four rows' slots (vectorised), then the increments (a scatter)
                    emin = np.int32(1)  # the least and the greatest slot of the quad (end slots: 0, bins + 1)
                    emax = np.int32(bins)
                    for k in range(m):
                        sk, hk, ok_ = osc[k], osh[k], offset[k]
                        # (a NaN lands in slot 0: its neuron's counts are taken back below)
                        i0 = np.int32(_nb_slot(r0[k], sk, hk, lo, hi))
                        i1 = np.int32(_nb_slot(r1[k], sk, hk, lo, hi))
                        i2 = np.int32(_nb_slot(r2[k], sk, hk, lo, hi))
                        i3 = np.int32(_nb_slot(r3[k], sk, hk, lo, hi))
                        emin = min(emin, min(min(i0, i1), min(i2, i3)))
                        emax = max(emax, max(max(i0, i1), max(i2, i3)))
                        q0[k] = i0 + ok_
                        q1[k] = i1 + ok_
                        q2[k] = i2 + ok_
                        q3[k] = i3 + ok_
                    for k in range(m):
                        cb[q0[k]] += 1
                        cb[q1[k]] += 1
                        cb[q2[k]] += 1
                        cb[q3[k]] += 1
                    if emin == 0 or emax == bins + 1:
                        quads[nquads] = i
                        nquads += 1
            for i in range(n - n % 4, n):
                row = x[i, j0:j1]
                for k in range(m):
                    v = row[k]
                    a = np.abs(v)
                    w = np.float64(v)
                    d = w - c[k]
                    e = d * d
                    s1[k] += d
                    s2[k] += e
                    sa[k] += np.float64(a)
                    sq[k] += np.float64(np.sqrt(a))
                    pc[k] += 1.0 if w > 0.0 else 0.0
                    mn[k] = w if w < mn[k] else mn[k]
                    mx[k] = w if w > mx[k] else mx[k]
                    if higher:
                        s3[k] += e * d
                        s4[k] += e * e
                if fuse:  # (these last rows are looked at again below, whatever their values)
                    for k in range(m):
                        cb[np.int32(_nb_slot(row[k], osc[k], osh[k], lo, hi)) + offset[k]] += 1
            if step > 1:
                for i in range(0, n, step):
                    row = x[i, j0:j1]
                    for k in range(m):
                        w = np.float64(row[k])
                        smn[k] = w if w < smn[k] else smn[k]
                        smx[k] = w if w > smx[k] else smx[k]
            else:  # every row is sampled: the extremes are the batch's
                smn[:] = mn
                smx[:] = mx
            out[0, j0:j1] = s1
            out[1, j0:j1] = s2
            out[2, j0:j1] = sa
            out[3, j0:j1] = sq
            out[4, j0:j1] = pc
            out[5, j0:j1] = mn
            out[6, j0:j1] = mx
            out[7, j0:j1] = c
            out[8, j0:j1] = smn
            out[9, j0:j1] = smx
            if higher:
                out[10, j0:j1] = s3
                out[11, j0:j1] = s4
            if not binning:
                continue
            if fuse:
                # Each neuron with finite values gets its grid fitted to its old values and this batch's; one whose
                # window moves gets its end slots back as they were, its counts moved to the new grid (regrid), then
                # the values that were off its old window binned on the new one. A neuron with a non-finite value gets
                # back every count of this batch and is left for the caller.
                fix = np.empty(m, dtype=np.int64)
                nfix = 0
                sc = np.zeros(m, dtype=x.dtype)
                sh = np.zeros(m, dtype=x.dtype)
                for k in range(m):
                    j = j0 + k
                    ok = np.isfinite(s1[k]) and np.isfinite(s2[k]) and smn[k] <= smx[k]
                    done[j] = ok
                    if ok:
                        lv, f, la = _nb_fit_one(smn[k], smx[k], level[j], first[j], last[j], bins, spread_bits)
                        if lv == level[j] and f == first[j]:
                            last[j] = la
                            continue
                        cb[k * stride] = under[k]
                        cb[k * stride + bins + 1] = over[k]
                        _nb_regrid_row(counts, j * stride, bins, level[j], first[j], lv, f)
                        if edges:
                            unit = math.ldexp(1.0, lv)
                            lo_edges[j] = f * unit
                            hi_edges[j] = (f + bins) * unit
                        moved[0] = 1
                        level[j] = lv
                        first[j] = f
                        last[j] = la
                        sc[k] = math.ldexp(1.0, -lv)
                        sh[k] = f - 1.0
                    else:
                        for i in range(n):
                            cb[np.int32(_nb_slot(x[i, j], osc[k], osh[k], lo, hi)) + offset[k]] -= 1
                    fix[nfix] = k
                    nfix += 1
                if nfix == 0:
                    continue
                tail = n - n % 4
                for u in range(nquads + n - tail):
                    if u < nquads:
                        i0, i1 = quads[u], quads[u] + 4
                    else:
                        i0 = tail + u - nquads
                        i1 = i0 + 1
                    for i in range(i0, i1):
                        row = x[i, j0:j1]
                        for w in range(nfix):
                            k = fix[w]
                            if not done[j0 + k]:
                                continue
                            v = row[k]
                            t = _nb_slot(v, osc[k], osh[k], lo, hi)
                            if t == lo or t == hi:
                                cb[np.int32(_nb_slot(v, sc[k], sh[k], lo, hi)) + offset[k]] += 1
                continue
            # The histogram, from the block read again. Each neuron with finite values gets the grid of its old
            # values and this batch's (fit_grid, from its old grid and the extremes of the rows the histogram
            # sees), its counts moved to it where it changed (regrid), then its values binned; a neuron with a
            # non-finite value is left untouched for the caller (``done`` False).
            sc = np.zeros(m, dtype=x.dtype)  # 2**-level and first - 1 of each neuron's grid, in x's dtype
            sh = np.zeros(m, dtype=x.dtype)
            slot = np.empty(m, dtype=np.int32)
            offset = np.empty(m, dtype=np.int32)
            for k in range(m):
                offset[k] = k * stride
            inside = np.zeros(m, dtype=np.bool_)
            count_inside = 0
            for k in range(m):
                j = j0 + k
                ok = np.isfinite(s1[k]) and np.isfinite(s2[k]) and smn[k] <= smx[k]
                done[j] = ok
                inside[k] = ok
                if not ok:
                    continue
                count_inside += 1
                lv, f, la = _nb_fit_one(smn[k], smx[k], level[j], first[j], last[j], bins, spread_bits)
                if not (lv == level[j] and f == first[j]):  # the window moved (always, for a neuron without values)
                    if first[j] == first[j]:
                        _nb_regrid_row(counts, j * stride, bins, level[j], first[j], lv, f)
                    if edges:  # Grid.edges of this neuron: first * 2**level and (first + bins) * 2**level
                        unit = math.ldexp(1.0, lv)
                        lo_edges[j] = f * unit
                        hi_edges[j] = (f + bins) * unit
                    moved[0] = 1  # (every thread that writes, writes 1)
                level[j] = lv
                first[j] = f
                last[j] = la
                sc[k] = math.ldexp(1.0, -lv)
                sh[k] = f - 1.0
            if count_inside == 0:
                continue
            cb = counts[j0 * stride : j1 * stride]
            ends = np.zeros(2, dtype=x.dtype)  # 0 and bins + 1 in x's dtype (so that the slots stay in it)
            ends[1] = bins + 1
            lo, hi = ends[0], ends[1]
            for i in range(0, n, step):
                row = x[i, j0:j1]
                # Each value's slot (plus its neuron's offset), in x's dtype as Binner.counts_torch computes it:
                # clip(floor(v * 2**-level) - (first - 1), 0, bins + 1), a tiny negative product that rounds to -0
                # in cell -1. Vectorised (float32 input gets twice the lanes); then the increments (a scatter).
                for k in range(m):  # (NaN, in a neuron not binned here: any slot in bounds)
                    slot[k] = np.int32(_nb_slot(row[k], sc[k], sh[k], lo, hi)) + offset[k]
                if count_inside == m:
                    for k in range(m):
                        cb[slot[k]] += 1
                else:
                    for k in range(m):
                        if inside[k]:
                            cb[slot[k]] += 1

    @njit
    def hist_kernel(x, keep, use_keep, scale, shift, bins, step, j_start, j_stop, counts):  # pragma: no cover
        n = x.shape[0]
        stride = bins + 2
        top = np.float64(bins + 1)
        for j0 in range(j_start, j_stop, _HIST_BLOCK):
            j1 = min(j0 + _HIST_BLOCK, j_stop)
            m = j1 - j0
            slot = np.empty(m, dtype=np.int64)
            sc = scale[j0:j1]
            sh = shift[j0:j1]
            for i in range(0, n, step):
                row = x[i, j0:j1]
                # The slots of a row first (vectorised), then the increments (a scatter).
                for k in range(m):
                    v = np.float64(row[k])
                    # floor(v * 2**-level) is exact in float64; for float32 input it equals the torch path's float32
                    # cell, whose products that underflow to -0 are moved to cell -1 (no underflow here).
                    t = np.floor(v * sc[k])
                    t -= (t == 0.0) & (v < 0.0)
                    t = min(max(t - sh[k], 0.0), top)
                    t = t if t == t else 0.0  # NaN (only where a keep mask drops it) never indexes out of bounds
                    slot[k] = (j0 + k) * stride + np.int64(t)
                if use_keep:
                    kept = keep[i, j0:j1]
                    for k in range(m):
                        if kept[k]:
                            counts[slot[k]] += 1
                else:
                    for k in range(m):
                        counts[slot[k]] += 1

    @njit
    def move_rows_kernel(values, order, filled, rows, first):  # pragma: no cover - compiled
        # Descending positions: an old row only moves to a later position, so its source is still intact.
        for p in range(order.shape[0] - 1, first - 1, -1):
            src = order[p]
            if src >= filled:
                values[p, :] = rows[src - filled, :]
            elif src != p:
                values[p, :] = values[src, :]

    sqrt2 = math.sqrt(2.0)
    sqrt_2pi = math.sqrt(2.0 * math.pi)
    inv_sqrt2 = 1.0 / math.sqrt(2.0)

    @njit
    def w1_points_kernel(steps, counts, lo, hi, hmin, hmax, mn, mx, mean, sd, row0, u, j_start, j_stop,
                         zf):  # pragma: no cover - compiled
        # w1_normal, step 1, for neurons row0 + j (the torch code's operations, with a division by the same
        # number replaced by a product with its inverse): each evaluation point's z value (zf[0, j]), the
        # histogram's CDF there (zf[1, j]) and z / sqrt(2) (u[j], for erf); a neuron without a score gets NaN in
        # zf[0, j, 0]. Within a knot interval the CDF rises by a fixed slope, computed once per interval.
        k = counts.shape[1] + 1  # knots: min, lo, the bins' upper edges up to hi, max
        knots = np.empty(k)
        cum = np.empty(k)
        slope = np.empty(k)
        points = steps.shape[0]
        for jj in range(j_start, j_stop):
            j = row0 + jj
            zf[0, jj, 0] = np.nan
            a, b, s = mn[j], mx[j], sd[j]
            if not (np.isfinite(a) and np.isfinite(b) and s > 0.0 and b > a):
                continue
            total = _nb_cdf_knots(counts, j, lo[j], hi[j], hmin[j], hmax[j], knots, cum)
            if total < 0.0:
                continue
            inv_norm = 1.0 / max(total, 1.0)
            for q in range(1, k):
                gap = knots[q] - knots[q - 1]
                slope[q] = (cum[q] - cum[q - 1]) / gap if gap > 0.0 else 0.0  # (inf for a subnormal gap)
            m = mean[j]
            inv_s = 1.0 / s
            # Knot interval by knot interval (p: the number of knots <= y), the points inside it in one run.
            i = 0
            width_ab = b - a
            for p in range(k + 1):
                if p == 0:
                    c0, sl, k0 = 0.0, 0.0, 0.0
                elif p == k:
                    c0, sl, k0 = total, 0.0, 0.0
                else:
                    c0, sl, k0 = cum[p - 1], slope[p], knots[p - 1]
                top = knots[p] if p < k else np.inf
                by_fraction = sl == np.inf  # a gap so small that the slope overflows: the fraction of the gap
                while i < points:
                    y = a + width_ab * steps[i]
                    if y >= top:
                        break
                    if by_fraction:
                        mass = c0 + (cum[p] - c0) * min(max((y - k0) / (top - k0), 0.0), 1.0)
                    else:
                        mass = c0 + sl * (y - k0)
                    z = (y - m) * inv_s
                    zf[0, jj, i] = z
                    zf[1, jj, i] = mass * inv_norm
                    u[jj, i] = z * inv_sqrt2
                    i += 1

    @njit
    def w1_sum_kernel(zf, e, row0, j_start, j_stop, out):  # pragma: no cover - compiled
        # w1_normal, step 3: the integral of |F - Phi| over the points (Phi = (1 + e) / 2, e = erf(z / sqrt(2))
        # given) and the normal tails.
        points = zf.shape[2]
        for jj in range(j_start, j_stop):
            j = row0 + jj
            if not zf[0, jj, 0] == zf[0, jj, 0]:
                out[j] = np.nan
                continue
            inside = 0.0
            z0 = zf[0, jj, 0]
            d0 = zf[1, jj, 0] - (1.0 + e[jj, 0]) * 0.5
            for i in range(1, points):
                z = zf[0, jj, i]
                d = zf[1, jj, i] - (1.0 + e[jj, i]) * 0.5
                h = z - z0
                if d0 * d >= 0.0:
                    inside += 0.5 * (abs(d0) + abs(d)) * h
                else:
                    inside += 0.5 * (d0 * d0 + d * d) / max(abs(d0) + abs(d), 1e-300) * h
                d0 = d
                z0 = z
            z_first = zf[0, jj, 0]
            t = -z0
            left = z_first * (0.5 * (1.0 + math.erf(z_first / sqrt2))) + math.exp(-0.5 * z_first * z_first) / sqrt_2pi
            right = t * (0.5 * (1.0 + math.erf(t / sqrt2))) + math.exp(-0.5 * t * t) / sqrt_2pi
            out[j] = inside + left + right

    @njit
    def add_partials_kernel(part, n, s_sum, s_sum_sq, s_sum_abs, s_sum_sqrt, s_pos_sum, s_neg_sum, s_pos_count,
                            s_count, s_min, s_max):  # pragma: no cover - compiled
        # NeuronStats._add_fast, operation by operation (the same float64 arithmetic in the same order), after
        # the check that every partial is finite (else nothing changes and False is returned).
        for r in range(part.shape[0]):
            for j in range(part.shape[1]):
                if not np.isfinite(part[r, j]):
                    return False
        nf = np.float64(n)
        for j in range(part.shape[1]):
            shift, sum_c, sum_abs = part[7, j], part[0, j], part[2, j]
            mn, mx = part[5, j], part[6, j]
            total = nf * shift + sum_c
            s_sum[j] += total
            s_sum_sq[j] += part[1, j] + 2.0 * shift * sum_c + nf * shift * shift
            s_sum_abs[j] += sum_abs
            s_sum_sqrt[j] += part[3, j]
            # accumulators._signed_sums
            if mn >= 0.0:
                pos, neg = sum_abs, 0.0
            elif mx <= 0.0:
                pos, neg = 0.0, -sum_abs
            else:
                pos, neg = 0.5 * (total + sum_abs), 0.5 * (total - sum_abs)
            s_pos_sum[j] += pos
            s_neg_sum[j] += neg
            s_pos_count[j] += np.int64(np.rint(part[4, j]))
            s_count[j] += n
            s_min[j] = min(s_min[j], mn)
            s_max[j] = max(s_max[j], mx)
        return True

    @njit
    def quantile_kernel(q, counts, lo, hi, hmin, hmax, j_start, j_stop, out):  # pragma: no cover - compiled
        # histogram.quantiles per neuron, in the same float64 operations: the CDF knots and their cumulative mass
        # (histogram._cdf_knots), then for each q the first knot whose mass reaches q * total (searchsorted, left)
        # and the linear interpolation before it.
        k = counts.shape[1] + 1  # knots: min, lo, the bins' upper edges up to hi, max
        knots = np.empty(k)
        cum = np.empty(k)
        for j in range(j_start, j_stop):
            total = _nb_cdf_knots(counts, j, lo[j], hi[j], hmin[j], hmax[j], knots, cum)
            if total < 0.0:
                for r in range(q.shape[0]):
                    out[r, j] = np.nan
                continue
            for r in range(q.shape[0]):
                target = q[r] * total
                a, b = 0, k  # the first index whose mass is >= target, or k
                while a < b:
                    mid = (a + b) // 2
                    if cum[mid] < target:
                        a = mid + 1
                    else:
                        b = mid
                hi_i = min(a, k - 1)
                lo_i = max(hi_i - 1, 0)
                c0 = cum[lo_i]
                gain = cum[hi_i] - c0
                frac = (target - c0) / gain if gain > 0.0 else 1.0
                if hi_i == 0:
                    out[r, j] = knots[0]
                else:
                    out[r, j] = knots[lo_i] + (knots[hi_i] - knots[lo_i]) * frac

    @njit
    def central_add_kernel(nb, na, shift, sums, mean, m2, m3, m4):  # pragma: no cover - compiled
        # CentralMoments.add_shifted, then its _combine, operation by operation in float64 (integer powers as
        # products); False, changing nothing, if some batch moment is not finite.
        width = mean.shape[0]
        n = na + nb
        fa, fb, fn = np.float64(na), np.float64(nb), np.float64(n)
        q4 = fa * fa - fa * fb + fb * fb  # (in float64: exact below 9e7 tokens, and no int64 overflow beyond)
        aa, bb = fa * fa, fb * fb
        for rep in range(2):  # a check of every neuron first, then the update
            for j in range(width):
                e = sums[0, j] / fb
                b2 = sums[1, j] - fb * e * e
                b3 = sums[2, j] - 3.0 * e * sums[1, j] + 2.0 * fb * (e * e * e)
                b4 = sums[3, j] - 4.0 * e * sums[2, j] + 6.0 * e * e * sums[1, j] - 3.0 * fb * (e * e * e * e)
                b2 = 0.0 if b2 < 0.0 else b2
                b4 = 0.0 if b4 < 0.0 else b4
                mb = shift[j] + e
                if rep == 0:
                    if not (np.isfinite(mb) and np.isfinite(b2) and np.isfinite(b3) and np.isfinite(b4)):
                        return False
                    continue
                a2, a3, a4 = m2[j], m3[j], m4[j]
                delta = mb - mean[j]
                d_n = delta / fn
                m4[j] = (a4 + b4 + delta * (d_n * d_n * d_n) * fa * fb * q4
                         + 6.0 * d_n * d_n * (aa * b2 + bb * a2) + 4.0 * d_n * (fa * b3 - fb * a3))
                m3[j] = a3 + b3 + delta * d_n * d_n * fa * fb * (fa - fb) + 3.0 * d_n * (fa * b2 - fb * a2)
                m2[j] = a2 + b2 + delta * d_n * fa * fb
                mean[j] = mean[j] + d_n * fb
        return True

    @njit
    def pair_distances_kernel(x, y, a, b, ratio_sum, buf, row0):  # pragma: no cover - compiled
        # MappingDifficulty.update for the pairs (a[p], b[p]): dx = ||x_a - x_b|| (differences in x's dtype,
        # squares summed in float64); for each pair with dx > 0, dy = |y_a - y_b| (in y's dtype) written to row
        # row0 + (kept pairs so far) of buf, and dy / dx added to ratio_sum in float64. Returns (pairs kept,
        # their largest dx).
        kept = 0
        top = 0.0
        width = y.shape[1]
        for p in range(a.shape[0]):
            ra, rb = x[a[p]], x[b[p]]
            acc = 0.0
            for i in range(ra.shape[0]):
                d = np.float64(ra[i] - rb[i])
                acc += d * d
            dx = np.sqrt(acc)
            if not dx > 0.0:
                continue
            ya, yb, out = y[a[p]], y[b[p]], buf[row0 + kept]
            for o in range(width):
                dy = np.abs(ya[o] - yb[o])
                out[o] = dy
                ratio_sum[o] += np.float64(dy) / dx
            kept += 1
            top = max(top, dx)
        return kept, top

    global _nb_moments, _nb_as_pointer, _nb_claim
    _nb_moments = moments_kernel

    @intrinsic
    def as_pointer(typingctx, address):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

        return types.voidptr(types.int64), codegen

    @intrinsic
    def claim(typingctx, address):  # pragma: no cover - compiled
        # atomically add 1 to the int64 at ``address``; returns the value before
        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))
            return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "monotonic")

        return types.int64(types.int64), codegen

    _nb_as_pointer, _nb_claim = as_pointer, claim

    @numba.cfunc(types.void(types.CPointer(types.int64)), cache=True, nogil=True, error_model="numpy")
    def moments_team(meta):  # pragma: no cover - compiled
        # Run by every thread of an OpenMP team (_moments_call, which writes ``meta``): each claims column
        # ranges until none is left.
        n, width, parts = meta[1], meta[2], meta[21]
        counts = numba.carray(_nb_as_pointer(meta[9]), (meta[10],), dtype=np.int64)
        level = numba.carray(_nb_as_pointer(meta[11]), (meta[14],), dtype=np.int64)
        first = numba.carray(_nb_as_pointer(meta[12]), (meta[14],), dtype=np.float64)
        last = numba.carray(_nb_as_pointer(meta[13]), (meta[14],), dtype=np.float64)
        done = numba.carray(_nb_as_pointer(meta[17]), (meta[18],), dtype=np.bool_)
        out = numba.carray(_nb_as_pointer(meta[19]), (meta[20], width), dtype=np.float64)
        counter = meta[22]
        lo_edges = numba.carray(_nb_as_pointer(meta[23]), (meta[25],), dtype=np.float64)
        hi_edges = numba.carray(_nb_as_pointer(meta[24]), (meta[25],), dtype=np.float64)
        moved = numba.carray(_nb_as_pointer(meta[26]), (1,), dtype=np.int64)
        while True:
            p = _nb_claim(counter)
            if p >= parts:
                break
            j0, j1 = width * p // parts, width * (p + 1) // parts
            if meta[3] == 4:
                x32 = numba.carray(_nb_as_pointer(meta[0]), (n, width), dtype=np.float32)
                _nb_moments(x32, meta[4], meta[5], meta[6] != 0, meta[7], meta[8], counts, level, first, last,
                            meta[15], np.float64(meta[16]), done, lo_edges, hi_edges, moved, j0, j1, out)
            elif meta[3] == 8:
                x64 = numba.carray(_nb_as_pointer(meta[0]), (n, width), dtype=np.float64)
                _nb_moments(x64, meta[4], meta[5], meta[6] != 0, meta[7], meta[8], counts, level, first, last,
                            meta[15], np.float64(meta[16]), done, lo_edges, hi_edges, moved, j0, j1, out)

    _jit = {"moments": moments_kernel, "hist": hist_kernel, "move_rows": move_rows_kernel,
            "moments_team": moments_team, "add_partials": add_partials_kernel, "central_add": central_add_kernel,
            "pair_distances": pair_distances_kernel, "quantiles": quantile_kernel,
            "w1_points": w1_points_kernel, "w1_sum": w1_sum_kernel}
    return _jit


def usable(x: Tensor) -> bool:
    """Whether the kernels handle ``x``: enabled, numba importable, a float32/float64 CPU tensor."""
    if not ENABLED or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    return bool(_compile())


_team: Any = None  # GOMP_parallel of the OpenMP runtime torch runs on (ctypes), False when there is none


def _openmp_team() -> Any:
    """``GOMP_parallel`` of the OpenMP library torch's own threads come from (libgomp; Intel's and LLVM's runtimes
    export it too), as torch's ``libtorch_cpu.so`` resolves it; None when there is none (other platforms, a torch
    without OpenMP, ``NEUROSPEC_KERNEL_TEAM=0``)."""
    global _team
    if _team is None:
        _team = False
        if os.environ.get("NEUROSPEC_KERNEL_TEAM", "") not in ("0", "false", "no"):
            try:
                import ctypes

                # The symbol as torch's own library resolves it (dlsym searches the library's dependencies first):
                # the runtime whose threads torch uses, wherever it was installed from.
                lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
                if os.path.exists(lib):
                    fn = ctypes.CDLL(lib).GOMP_parallel
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                    fn.restype = None
                    _team = fn
            except (OSError, AttributeError):
                _team = False
    return _team or None


def _parts(width: int, numel: int) -> int:
    return max(1, min(THREADS or torch.get_num_threads(), width, numel // _MIN_PER_THREAD))


def _moments_call(x: Tensor, step: int, higher: bool, block: int, binning: int, counts: Any, level: Any,
                  first: Any, last: Any, bins: int, spread_bits: int, done: Any, out: Any,
                  edges: tuple[Any, Any, Any] | None = None) -> None:
    """Run the moments kernel over ``x``'s columns: in torch's own OpenMP team when there is one (its worker
    threads, which spin for a while after each of torch's parallel regions, take the other column ranges at once
    instead of sharing a core with a pool thread), else on the Python pool (:func:`_in_parallel`). ``out``: a
    float64 tensor or array; ``binning``: 0 (moments only), 1 (and the histogram, from a second read of each
    block) or 2 (the histogram in the same read where every neuron of the block has a grid); ``edges``:
    ``(lo, hi, moved)`` arrays (float64 ``[width]`` twice, int64 ``[1]``): the
    edges of every window that moves are written there and ``moved[0]`` set to 1 if any moved."""
    import numpy as np

    global _NO_EDGES
    if edges is None:
        if _NO_EDGES is None:
            _NO_EDGES = (np.zeros(0), np.zeros(0), np.zeros(1, dtype=np.int64))
        edges = _NO_EDGES
    lo_edges, hi_edges, moved = edges
    if x.dtype not in (torch.float32, torch.float64) or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"the moments kernel reads contiguous float32 or float64 CPU tensors, got {x.dtype} on "
                         f"{x.device}")
    width = x.shape[1]
    parts = _parts(width, x.numel())
    team = _openmp_team() if parts > 1 else None
    xs = x.numpy()
    outs = out.numpy() if isinstance(out, Tensor) else out
    if team is None:
        _in_parallel(_compile()["moments"], width, x.numel(), xs, SHIFT_ROWS, int(step), bool(higher), block,
                     int(binning), counts, level, first, last, int(bins), float(spread_bits), done, lo_edges,
                     hi_edges, moved, outs)
        return
    meta = np.array([
        xs.ctypes.data, xs.shape[0], width, xs.itemsize, SHIFT_ROWS, int(step), int(higher), int(block),
        int(binning), counts.ctypes.data, counts.shape[0], level.ctypes.data, first.ctypes.data, last.ctypes.data,
        level.shape[0], int(bins), int(spread_bits), done.ctypes.data, done.shape[0], outs.ctypes.data,
        outs.shape[0], parts, 0, lo_edges.ctypes.data, hi_edges.ctypes.data, lo_edges.shape[0], moved.ctypes.data,
    ], dtype=np.int64)
    counter = np.zeros(1, dtype=np.int64)  # the next column range to claim
    meta[22] = counter.ctypes.data
    team(_compile()["moments_team"].address, meta.ctypes.data, parts, 0)


def _in_parallel(kernel: Any, width: int, numel: int, *args: Any) -> None:
    """Run ``kernel(*args, j_start, j_stop, out)`` on ``torch.get_num_threads()`` contiguous column ranges at once
    (``args[-1]`` is ``out``): the calling thread takes the first range, pool threads the others."""
    *front, out = args
    parts = _parts(width, numel)
    if parts == 1:
        kernel(*front, 0, width, out)
        return
    edges = [width * p // parts for p in range(parts + 1)]
    kernel(*front, 0, 0, out)  # an empty range: compiled (or loaded) here, before threads call it at once
    _run_parts(lambda p: kernel(*front, edges[p], edges[p + 1], out), parts)


def _run_parts(work: Any, parts: int) -> None:
    """``work(p)`` for ``p = 0 .. parts - 1`` at once: the calling thread takes ``p = 0``, pool threads the others
    (``work`` should release the GIL: a numba kernel, a torch operation)."""
    global _pool
    if parts == 1:
        work(0)
        return
    with _LOCK:
        # A new pool when more threads are wanted, or in a forked child (whose copy of the pool has no threads).
        if _pool is None or _pool[1] < parts - 1 or _pool[2] != os.getpid():
            if _pool is not None and _pool[2] == os.getpid():
                _pool[0].shutdown(wait=False)  # its queued work is none: every caller waits for its futures
            _pool = (ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="neurospec-kernel"), parts - 1,
                     os.getpid())
        pool = _pool[0]
    futures = [pool.submit(work, p) for p in range(1, parts)]
    try:
        work(0)
    finally:
        for f in futures:
            f.result()


_NO_BINS = None  # dummy histogram arguments of a moments-only call (made on first use)
_NO_EDGES = None  # dummy edge arguments (no edges written)


def moments(x: Tensor, step: int = 1, higher: bool = False) -> Tensor:
    """Float64 ``[MOMENT_ROWS, width]`` partial results of a CPU batch ``x`` ``[tokens, width]`` (see
    :data:`MOMENT_ROWS` and :data:`SHIFT_ROWS`); with ``higher``, ``[MOMENT_ROWS + 2, width]``: also the sums of
    ``(x - shift)^3`` and ``(x - shift)^4`` (rows :data:`HIGHER_ROWS`), from the same read of ``x``."""
    global _NO_BINS
    x = x.contiguous()
    # NaN until written: a column range left undone (it never should be) reads as non-finite, never as sums
    out = torch.full((MOMENT_ROWS + (2 if higher else 0), x.shape[1]), math.nan, dtype=torch.float64)
    if _NO_BINS is None:
        import numpy as np

        f = np.zeros(1)
        _NO_BINS = (np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), f, f, 0, 0, np.zeros(1, dtype=np.bool_))
    counts, level, first, last, bins, bits, done = _NO_BINS
    _compile()
    _moments_call(x, step, higher, _BLOCK, 0, counts, level, first, last, bins, bits, done, out)
    return out


def _require_cpu(caller: str, **named: tuple[Tensor, torch.dtype]) -> None:
    """A ``ValueError`` naming the first of ``named`` (name -> (tensor, dtype)) that is not a contiguous CPU tensor
    of its dtype (what the kernels read through raw pointers)."""
    for name, (t, dtype) in named.items():
        if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{caller}: {name} must be a contiguous {dtype} CPU tensor")


def moments_histogram(
    x: Tensor, counts: Tensor, level: Tensor, first: Tensor, last: Tensor, bins: int, step: int = 1,
    higher: bool = False, fuse: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`moments` of ``x`` and, in the same call, its histogram on grids widened as needed.

    ``counts``: int64 ``[width * (bins + 2)]`` (C-contiguous, CPU), the histogram on the grid ``level`` (int64
    ``[width]``), ``first``, ``last`` (float64 ``[width]``, NaN for a neuron without values;
    :class:`~neurospec.record.histogram.Grid`). For each neuron whose values in ``x`` are all finite, in place:
    the grid becomes that of its old values and the rows ``0, step, 2 * step, ...`` of ``x``
    (:func:`~neurospec.record.histogram.fit_grid`), its counts move to it
    (:func:`~neurospec.record.histogram.regrid`), and those rows are binned into ``counts`` (as
    :meth:`~neurospec.record.histogram.Binner.counts_torch` bins them, in x's dtype). A neuron with a NaN or
    infinite value is not touched: the caller bins it with a mask. Returns ``(partials, done)``: the partials of
    :func:`moments` and bool ``[width]``, True where the neuron was binned.

    The columns go in blocks whose int64 counts take at most about 1 MB (they stay in the L2 cache while the block's
    rows are binned), at least 16 and at most 1,024 columns. With ``fuse`` (and ``step`` 1), a block whose neurons
    all have a grid is binned in the same read of ``x`` as its moments, on the grids as they stand, and the few
    neurons whose windows then move are corrected (the same counts; cheaper while few windows move, dearer when
    many do, as in the first batches)."""
    x = x.contiguous()
    width = x.shape[1]
    _require_cpu("moments_histogram", counts=(counts, torch.int64), level=(level, torch.int64),
                 first=(first, torch.float64), last=(last, torch.float64))
    if counts.numel() != width * (bins + 2) or level.shape != (width,) or first.shape != (width,) \
            or last.shape != (width,):
        raise ValueError("moments_histogram: counts, level, first and last do not match x's width and bins")
    if not 2 <= bins <= MAX_BINS:
        raise ValueError(f"moments_histogram: bins must be in [2, {MAX_BINS}], got {bins}")
    out = torch.full((MOMENT_ROWS + (2 if higher else 0), width), math.nan, dtype=torch.float64)  # (see moments)
    done = torch.zeros(width, dtype=torch.bool)
    block = max(16, min(_BLOCK, _COUNT_BYTES // ((bins + 2) * 8) // 16 * 16))
    _compile()
    _moments_call(x, step, higher, block, 2 if fuse else 1, counts.numpy(), level.numpy(), first.numpy(),
                  last.numpy(), bins, math.ceil(math.log2(bins)), done.numpy(), out)
    return out, done


class UpdateBuffers:
    """What one accumulator's :func:`stats_update` calls reuse: the float64 partials and ``done`` arrays of its
    width, the ``moved`` flag, and the numpy views of the tensors it passes (rebuilt when a tensor is replaced or
    its storage moved). A copy (``copy.deepcopy``, pickling) starts empty: its views would belong to the copy's
    tensors' originals."""

    def __init__(self) -> None:
        self._views: dict[str, tuple[tuple[Tensor, ...], tuple[int, ...], tuple[Any, ...]]] = {}
        self.out: Tensor | None = None
        self.done: Any = None
        self.moved: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def views(self, key: str, tensors: tuple[Tensor, ...], check: Any = None) -> tuple[Any, ...]:
        """``t.numpy()`` of each tensor, reused while the same tensor objects with the same storage come back
        (under ``key``); ``check(tensors)`` runs whenever they are rebuilt."""
        known = self._views.get(key)
        if known is not None and len(known[0]) == len(tensors) and all(
                a is b and p == b.data_ptr() for a, p, b in zip(known[0], known[1], tensors, strict=True)):
            return known[2]
        if check is not None:
            check(tensors)
        arrays = tuple(t.numpy() for t in tensors)
        self._views[key] = (tensors, tuple(t.data_ptr() for t in tensors), arrays)
        return arrays


def _check_update_tensors(tensors: tuple[Tensor, ...]) -> None:
    counts, level, first, last, lo, hi, _ = tensors
    named = {"level": (level, torch.int64), "first": (first, torch.float64), "last": (last, torch.float64),
             "lo": (lo, torch.float64), "hi": (hi, torch.float64)}
    _require_cpu("stats_update", counts=(counts, torch.int64), **named)
    width = level.shape[0] if level.dim() == 1 else -1
    for name, (t, _) in {"counts": (counts, None), **named}.items():
        if (t.dim() != 2 or t.shape[0] != width) if name == "counts" else (t.shape != (width,)):
            raise ValueError(f"stats_update: {name} has shape {tuple(t.shape)}, not of the grid's width {width}")


def stats_update(
    x: Tensor, counts: Tensor, level: Tensor, first: Tensor, last: Tensor, lo: Tensor, hi: Tensor, bins: int,
    step: int, higher: bool, buffers: UpdateBuffers, fuse: bool = True,
) -> tuple[Tensor, Any, bool]:
    """:func:`moments_histogram` as :class:`~neurospec.record.accumulators.NeuronStats` calls it once per batch:
    the grid (``level``, ``first``, ``last``) changes in place and the kernel also writes the edges ``lo`` and
    ``hi`` (float64 ``[width]``, :meth:`~neurospec.record.histogram.Grid.edges`) of every window that moves, so
    that no torch operation is left around the call (inside a forward pass each small one costs tens of
    microseconds: its code is no longer in the caches). ``x``: contiguous float32/float64 CPU ``[tokens, width]``;
    ``counts`` contiguous int64 ``[width, bins + 2]``; the others contiguous CPU tensors of the dtypes of
    :class:`~neurospec.record.histogram.Grid` (checked when ``buffers`` first sees them). Returns
    ``(partials, done, moved)``: the partials (a buffer of ``buffers``, overwritten by the next call), the numpy
    bool ``[width]`` of the neurons binned, and whether some window moved. ``fuse``: as in
    :func:`moments_histogram`."""
    import numpy as np

    width = x.shape[1]
    if level.shape[0] != width or counts.shape[-1] != bins + 2 or not 2 <= bins <= MAX_BINS:
        raise ValueError(f"stats_update: a batch of width {width} and {bins} bins for a grid of width "
                         f"{level.shape[0]} and counts of shape {tuple(counts.shape)}")
    rows = MOMENT_ROWS + (2 if higher else 0)
    if buffers.out is None or tuple(buffers.out.shape) != (rows, width):
        buffers.out = torch.empty(rows, width, dtype=torch.float64)
        buffers.done = np.zeros(width, dtype=np.bool_)
        buffers.moved = np.zeros(1, dtype=np.int64)
    out, done, moved = buffers.out, buffers.done, buffers.moved
    c, lv, f, la, lo_np, hi_np, outs = buffers.views("update", (counts, level, first, last, lo, hi, out),
                                                     _check_update_tensors)
    outs.fill(math.nan)  # (see moments: a column range left undone reads as non-finite, never as old sums)
    done.fill(False)
    moved[0] = 0
    block = max(16, min(_BLOCK, _COUNT_BYTES // ((bins + 2) * 8) // 16 * 16))
    _compile()
    _moments_call(x, step, higher, block, 2 if fuse else 1, c.reshape(-1), lv, f, la, bins,
                  math.ceil(math.log2(bins)), done, outs, (lo_np, hi_np, moved))
    return out, done, bool(moved[0])


_STATE_SUMS = ("sum", "sum_sq", "sum_abs", "sum_sqrt_abs", "pos_sum", "neg_sum", "pos_count", "count", "min", "max")


def add_partials(part: Tensor, n: int, state: dict[str, Tensor], buffers: UpdateBuffers | None = None) -> bool:
    """Add a CPU batch's partials (the first :data:`MOMENT_ROWS` rows of :func:`moments_histogram`'s result, from
    ``n`` rows) into a :class:`~neurospec.record.accumulators.NeuronStats` state in place, as its torch
    ``_add_fast`` does (the same float64 operations in the same order, so the same bits), in one call instead of
    about twenty small tensor operations. Returns False, changing nothing, if some partial is not finite (the
    caller then takes the masked path)."""
    tensors = tuple(state[name] for name in _STATE_SUMS)
    arrays = buffers.views("state", tensors) if buffers is not None else [t.numpy() for t in tensors]
    return bool(_compile()["add_partials"](part.contiguous().numpy(), int(n), *arrays))


def quantiles(q: Tensor, counts: Tensor, lo: Tensor, hi: Tensor, hmin: Tensor, hmax: Tensor) -> Tensor:
    """Float64 ``[len(q), width]``: the quantiles ``q`` (float64, in [0, 1]) of each neuron's histogram (``counts``
    ``[width, bins + 2]`` with ``lo``, ``hi``, ``hmin``, ``hmax``, all on the CPU), as
    :func:`neurospec.record.histogram.quantiles` computes them (the same float64 operations: equal bit for bit),
    in one pass per neuron instead of building its ``[width, bins + 3]`` knots and masses."""
    width = counts.shape[0]
    f64 = [t.to(torch.float64).contiguous().numpy() for t in (q, lo, hi, hmin, hmax)]
    out = torch.empty(q.numel(), width, dtype=torch.float64)
    _in_parallel(_compile()["quantiles"], width, counts.numel(), f64[0], counts.to(torch.int64).contiguous().numpy(),
                 *f64[1:], out.numpy())
    return out


def central_add(nb: int, na: int, shift: Tensor, sums: Tensor, mean: Tensor, m2: Tensor, m3: Tensor,
                m4: Tensor) -> bool:
    """:meth:`~neurospec.sparsity.outputs.CentralMoments.add_shifted` in one call: a batch of ``nb`` tokens,
    given by its float64 power sums ``sums`` ``[4, width]`` about ``shift``, combined in place into the running
    ``mean, m2, m3, m4`` (float64, CPU) of ``na`` tokens, with the torch code's float64 arithmetic in its order
    (integer powers as products: equal to float rounding). Returns False, changing nothing, if a batch moment is
    not finite."""
    f64 = [t.contiguous().numpy() for t in (shift, sums)]
    return bool(_compile()["central_add"](int(nb), int(na), *f64, mean.numpy(), m2.numpy(), m3.numpy(), m4.numpy()))


def pair_distances(x: Tensor, y: Tensor, a: Tensor, b: Tensor, ratio_sum: Tensor, buf: Tensor,
                   row0: int) -> tuple[int, float]:
    """The per-batch work of :meth:`~neurospec.sparsity.outputs.MappingDifficulty.update` for the token pairs
    ``(a[p], b[p])`` in one call: ``x`` ``[tokens, d]`` and ``y`` ``[tokens, width]`` C-contiguous CPU float
    tensors of one dtype. Each pair's ``dx = ||x_a - x_b||`` (float64 sum of squares); for the pairs with ``dx >
    0``, in order, ``|y_a - y_b|`` goes to rows ``row0, row0 + 1, ...`` of ``buf`` (y's dtype) and ``dy / dx`` is
    added to ``ratio_sum`` (float64) in place. Returns (pairs kept, their largest dx)."""
    if row0 < 0 or row0 + a.numel() > buf.shape[0] or buf.shape[1] != y.shape[1] or buf.dtype != y.dtype:
        raise ValueError(f"pair_distances: {a.numel()} rows from row {row0} do not fit a buffer of shape "
                         f"{tuple(buf.shape)} ({buf.dtype}) for outputs of width {y.shape[1]} ({y.dtype})")
    kept, top = _compile()["pair_distances"](x.numpy(), y.numpy(), a.numpy(), b.numpy(), ratio_sum.numpy(),
                                             buf.numpy(), int(row0))
    return int(kept), float(top)


def histogram_add(
    counts: Tensor, x: Tensor, scale: Tensor, shift: Tensor, bins: int, keep: Tensor | None = None, step: int = 1
) -> None:
    """Add the histogram slots of ``x[::step]`` (where ``keep[::step]``) to ``counts`` (int64 ``[width * (bins +
    2)]``, C-contiguous, CPU) in place: ``slot = neuron * (bins + 2) + clip(floor(x * scale) - shift, 0, bins +
    1)`` with float64 ``scale`` and ``shift`` ``[width]`` (a negative value whose product rounds to -0 gets cell
    -1)."""
    if counts.dtype != torch.int64 or not counts.is_contiguous() or counts.device.type != "cpu":
        raise ValueError("histogram_add: counts must be a contiguous int64 CPU tensor")
    x = x.contiguous()
    width = x.shape[1]
    if counts.numel() != width * (bins + 2) or scale.shape != (width,) or shift.shape != (width,):
        raise ValueError("histogram_add: counts, scale and shift do not match x's width and bins")
    mask = torch.ones(1, 1, dtype=torch.bool) if keep is None else keep.contiguous()
    _in_parallel(
        _compile()["hist"], width, x.numel() // step, x.numpy(), mask.numpy(), keep is not None,
        scale.to(torch.float64).contiguous().numpy(), shift.to(torch.float64).contiguous().numpy(), int(bins),
        int(step), counts.numpy(),
    )


def move_rows(values: Tensor, order: Tensor, filled: int, rows: Tensor) -> None:
    """Rearrange ``values`` (float32 ``[k, width]``, contiguous, CPU) in place so that row ``p`` becomes row
    ``order[p]`` of ``cat(values[:filled], rows)``, for ``p < len(order)``; only the rows that change are written
    (about one copy of them, instead of a concatenation, a gather and a copy back).

    ``order`` must keep the old rows in their order (``order`` restricted to values below ``filled`` increasing)
    and place each at or after its old position, as a stable merge of two sorted key lists does."""
    if values.dtype != torch.float32 or not values.is_contiguous() or values.device.type != "cpu":
        raise ValueError("move_rows: values must be a contiguous float32 CPU tensor")
    m = order.numel()
    changed = (order != torch.arange(m)) | (order >= filled)  # new rows always change their position
    if not bool(changed.any()):
        return
    first = int(changed.to(torch.uint8).argmax())
    rows = rows.to(torch.float32).contiguous()
    _compile()["move_rows"](values.numpy(), order.contiguous().numpy(), int(filled), rows.numpy(), first)


def w1_normal(
    steps: Tensor, counts: Tensor, lo: Tensor, hi: Tensor, hmin: Tensor, hmax: Tensor, mn: Tensor, mx: Tensor,
    mean: Tensor, std: Tensor,
) -> Tensor:
    """Float64 ``[width]``: per neuron, the W1 distance of its histogram's distribution, shifted by ``mean`` and
    scaled by ``std``, to N(0, 1), as :func:`neurospec.sparsity.wasserstein.w1_from_stats` defines it (NaN where it
    does). ``steps`` ``[points]`` are the positions in ``[0, 1]`` of the evaluation points between each neuron's
    ``mn`` and ``mx``; ``counts`` ``[width, bins + 2]`` with ``lo``, ``hi``, ``hmin``, ``hmax`` is the histogram
    (:class:`~neurospec.record.histogram.Histogram`), whose knots must be sorted (``hi >= lo``); all on the CPU.

    Per chunk of :data:`W1_CHUNK_POINTS` points (whole neurons; the threads take every ``threads``-th chunk each), in
    three steps: a numba pass per neuron gives
    every point's z value, the CDF there (a pointer walks the CDF's knots as the evenly spaced points advance: no
    search) and ``z / sqrt(2)``; torch's vectorised ``erf`` takes the last in place; a second numba pass forms
    N(0, 1)'s CDF ``(1 + erf) / 2``, integrates ``|F - Phi|`` and adds the normal tails. The formulas are the torch
    code's, with a division by a neuron's constant (its standard deviation, its histogram's mass, ``sqrt(2)``)
    replaced by a product with the inverse and the CDF's rise per knot interval computed once per interval, so
    the two agree to float rounding (about 1e-15 relative)."""
    import numpy as np

    width, points = counts.shape[0], steps.numel()
    f64 = [t.to(torch.float64).contiguous().numpy() for t in (steps, lo, hi, hmin, hmax, mn, mx, mean, std)]
    c64 = counts.to(torch.int64).contiguous().numpy()
    out = torch.empty(width, dtype=torch.float64)
    jit = _compile()
    chunk = max(1, min(width, W1_CHUNK_POINTS // points))
    starts = list(range(0, width, chunk))
    parts = min(_parts(width, width * points), len(starts))
    out_np = out.numpy()

    jit["w1_points"](f64[0], c64, *f64[1:], 0, np.empty((1, points)), 0, 0, np.empty((2, 1, points)))
    jit["w1_sum"](np.empty((2, 1, points)), np.empty((1, points)), 0, 0, 0, out_np)  # (compiled before the threads)

    def run(p: int) -> None:  # every parts-th chunk, all three steps, on one thread with its own buffers
        zf = torch.empty(2, chunk, points, dtype=torch.float64)
        phi = torch.empty(chunk, points, dtype=torch.float64)
        zn, pn = zf.numpy(), phi.numpy()
        for r0 in starts[p::parts]:
            n = min(chunk, width - r0)
            jit["w1_points"](f64[0], c64, *f64[1:], r0, pn, 0, n, zn)
            phi[:n].erf_()  # wasserstein.normal_cdf: 0.5 * (1 + erf(z / sqrt(2))); w1_sum does the rest
            jit["w1_sum"](zn, pn, r0, 0, n, out_np)

    _run_parts(run, parts)
    return out

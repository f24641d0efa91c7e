"""Output-side recording of linear layers: every output row (neuron) of chosen linear modules, streamed over tokens.

A neuron is one output row ``o`` of a linear module, its output ``y_o = w_o . x (+ b_o)`` over calibration tokens,
read by a forward hook on the module's output (``nn.Linear`` and GPT-2's ``Conv1D``). Per module, one pass feeds:

- :class:`~neurospec.record.accumulators.NeuronStats` (``width = out``): float64 moments, exact extremes and the
  histogram on nested power-of-two grids that merges exactly (the W1 score reads its CDF);
- :class:`CentralMoments`: count, mean and the 2nd-4th central moment sums (skewness, kurtosis, bimodality), each
  batch's moments about its own mean merged with the pairwise update rules, so merging equals one pass;
- :class:`MappingDifficulty`: over ``pairs`` random token pairs per batch (seeded), the ratio of each neuron's output
  distance to the input distance (see the class).

Memory is flat in tokens: ``out * (bins + 2)`` counts and a few ``[out]`` float64 vectors per module.
Which modules (:func:`choose_linears`): by default the MLP input projections of every block (Llama
``mlp.gate_proj``/``mlp.up_proj``, GPT-2 ``mlp.c_fc``, BERT ``intermediate.dense``); ``scope="all"``: every linear
module of the blocks; or the blocks / module names given, named as the sparsity driver names them
(``layers.3.mlp.up_proj``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neurospec.errors import NeurospecError
from neurospec.models.linear import is_linear, linear_dims
from neurospec.models.loading import LoadedModel
from neurospec.models.sites import find_sites
from neurospec.record import kernels
from neurospec.record.accumulators import _SHIFT, _SUM_C, _SUM_SQ_C, NeuronStats, quantiles
from neurospec.record.histogram import check_bins
from neurospec.sparsity.driver import LinearRef, list_linears, select_linears

SCOPES = ("mlp_in", "all")


# ------------------------------------------------------------------------------------------------ choosing modules
def mlp_input_names(model: nn.Module) -> list[str]:
    """Names (``layers.L.<path>``) of the MLP input projections of every block, in block order."""
    by_path = {ref.path: name for name, ref in list_linears(model).items()}
    names = []
    for site in find_sites(model):
        if site.kind != "mlp":
            continue
        names += [by_path[p] for p in site.inputs if p in by_path]
    return names


def choose_linears(model: nn.Module, layers: Sequence[int | str] | None = None, *,
                   scope: str = "mlp_in") -> dict[str, LinearRef]:
    """The linear modules to record. ``layers``: block indices (``3``, ``"layers.3"``: that block's modules of the
    scope) or module names (``"layers.3.mlp.up_proj"``: exactly that module, any linear); ``None``: every block.
    ``scope``: ``"mlp_in"`` (the MLP input projections) or ``"all"`` (every linear module)."""
    if scope not in SCOPES:
        raise NeurospecError(f"scope must be one of {SCOPES}, got {scope!r}")
    every = list_linears(model)
    in_scope = set(every) if scope == "all" else set(mlp_input_names(model))
    if scope == "mlp_in" and not in_scope:
        raise NeurospecError(f"no MLP input projection was found in {type(model).__name__}: name the linear modules "
                             "to record, or record every linear module (scope='all', --all-linear)")
    if layers is None:
        return {n: r for n, r in every.items() if n in in_scope}
    chosen: set[str] = set()
    for item in layers:
        text = str(item).strip()
        picked = select_linears(model, [text])  # clear errors for unknown blocks, names and non-linear modules
        is_block = text.isdigit() or (text.startswith("layers.") and text[7:].isdigit())
        chosen |= {n for n in picked if n in in_scope} if is_block else set(picked)
    if not chosen:
        raise NeurospecError(f"the layers {list(layers)} hold no module of scope {scope!r}")
    return {n: r for n, r in every.items() if n in chosen}


# ------------------------------------------------------------------------------------------------ accumulators
def _rows(y: Tensor, width: int, what: str) -> Tensor:
    y = y.detach()
    if y.shape[-1] != width:
        raise NeurospecError(f"{what}: expected {width} neurons in the last dimension, got shape {tuple(y.shape)}")
    y = y.reshape(-1, width)
    return y if y.dtype in (torch.float32, torch.float64) else y.float()


_NONFINITE = "CentralMoments: the outputs hold NaN or inf; check the model and its dtype"


class CentralMoments:
    """Per-neuron count, mean and central moment sums ``M_k = sum (y - mean)^k`` for ``k = 2, 3, 4`` (float64).

    Each batch gives its power sums ``sum (y - c)^k``, ``k = 1..4``, about a per-neuron shift ``c`` close to its
    mean (the CPU kernel: float64 sums about the mean of 64 spread rows, :func:`~neurospec.record.kernels.moments`;
    elsewhere: the batch mean in y's dtype, sums in y's dtype), turned exactly into the batch's mean and central
    moment sums (:meth:`add_shifted`), then combined with the running state by the pairwise update rules for
    ``M_2 .. M_4`` (Chan et al.; Pebay) in float64, so ``merge`` of two accumulators equals one pass over all their
    tokens up to rounding. Non-finite outputs are not allowed (a clear error).
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.n = 0
        z = torch.zeros(width, dtype=torch.float64)
        self.mean, self.m2, self.m3, self.m4 = z, z.clone(), z.clone(), z.clone()

    def update(self, y: Tensor) -> None:
        y = _rows(y, self.width, "CentralMoments")
        if y.shape[0] == 0:
            return
        shift = y.mean(0)  # in y's dtype: close to the mean; the sum of y - shift below corrects it exactly
        d = y - shift
        d2 = d * d
        part = torch.stack([shift, d.sum(0), d2.sum(0), (d2 * d).sum(0), (d2 * d2).sum(0)]).to("cpu", torch.float64)
        self.add_shifted(y.shape[0], part[0], part[1:])

    def add_shifted(self, n: int, shift: Tensor, sums: Tensor) -> None:
        """Add a batch of ``n`` tokens given by its float64 power sums about a per-neuron ``shift`` (close to the
        batch mean): ``sums`` ``[4, width]`` holds ``sum (y - shift)^k`` for ``k = 1..4`` (the CPU kernel's
        :func:`~neurospec.record.kernels.moments` with ``higher=True`` gives them in the pass that feeds the
        histogram statistics). They are turned into the batch's mean and central moment sums (binomial expansion
        about ``e = sum (y - shift) / n``) and combined as :meth:`update` does."""
        if n == 0:
            return
        if kernels.usable(sums) and sums.dtype == torch.float64 and shift.dtype == torch.float64:
            # one numba call instead of about thirty small tensor operations (the same float64 arithmetic)
            if not kernels.central_add(n, self.n, shift, sums, self.mean, self.m2, self.m3, self.m4):
                raise NeurospecError(_NONFINITE)
            self.n += n
            return
        s1, s2, s3, s4 = sums[0], sums[1], sums[2], sums[3]
        e = s1 / n
        m2 = s2 - n * e * e
        m3 = s3 - 3 * e * s2 + 2 * n * e**3
        m4 = s4 - 4 * e * s3 + 6 * e * e * s2 - 3 * n * e**4
        part = torch.stack([shift + e, m2.clamp(min=0), m3, m4.clamp(min=0)])
        self._check(part)
        self._combine(n, part[0], part[1], part[2], part[3])

    @staticmethod
    def _check(part: Tensor) -> None:
        if not bool(torch.isfinite(part).all()):
            raise NeurospecError(_NONFINITE)

    def merge(self, other: CentralMoments) -> CentralMoments:
        if other.width != self.width:
            raise NeurospecError(f"cannot merge CentralMoments of width {other.width} into width {self.width}")
        if other.n:
            self._combine(other.n, other.mean, other.m2, other.m3, other.m4)
        return self

    def _combine(self, nb: int, mb: Tensor, m2b: Tensor, m3b: Tensor, m4b: Tensor) -> None:
        na, n = self.n, self.n + nb
        delta = mb - self.mean
        d_n = delta / n
        m2a, m3a, m4a = self.m2, self.m3, self.m4
        m4 = (m4a + m4b + delta * d_n**3 * na * nb * (na * na - na * nb + nb * nb)
              + 6 * d_n * d_n * (na * na * m2b + nb * nb * m2a) + 4 * d_n * (na * m3b - nb * m3a))
        m3 = m3a + m3b + delta * d_n * d_n * na * nb * (na - nb) + 3 * d_n * (na * m2b - nb * m2a)
        m2 = m2a + m2b + delta * d_n * na * nb
        self.mean, self.m2, self.m3, self.m4, self.n = self.mean + d_n * nb, m2, m3, m4, n

    def compute(self) -> dict[str, Tensor]:
        """``mean, var`` (population), ``skewness`` ``g1 = m3 / m2^1.5``, ``kurtosis`` (excess, ``m4 / m2^2 - 3``)
        and ``bimodality``: Sarle's coefficient ``(G1^2 + 1) / (G2 + 3 (n-1)^2 / ((n-2)(n-3)))`` with the
        sample-corrected skewness ``G1`` and excess kurtosis ``G2`` (those of ``scipy.stats.skew/kurtosis(...,
        bias=False)``); above 5/9 (a uniform's value) hints at two modes. Constant neurons give NaN shape values."""
        n = self.n
        if n < 4:
            raise NeurospecError(f"the shape statistics need at least 4 tokens, got {n}: record more tokens")
        var = self.m2 / n
        m3, m4 = self.m3 / n, self.m4 / n
        ok = var > 0
        safe = torch.where(ok, var, 1.0)
        g1 = torch.where(ok, m3 / safe**1.5, math.nan)
        g2 = torch.where(ok, m4 / safe**2 - 3.0, math.nan)
        big_g1 = g1 * math.sqrt(n * (n - 1)) / (n - 2)
        big_g2 = ((n + 1) * g2 + 6.0) * (n - 1) / ((n - 2) * (n - 3))
        bc = (big_g1**2 + 1.0) / (big_g2 + 3.0 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
        return {"mean": self.mean.clone(), "var": var, "skewness": g1, "kurtosis": g2, "bimodality": bc}


def draw_pairs(n_tokens: int, n_pairs: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n_pairs`` pairs ``(a, b)`` of distinct token indices in ``[0, n_tokens)``, drawn uniformly with
    ``generator`` (a fixed order of draws: ``a`` first, then the offset ``b - a`` modulo ``n_tokens``)."""
    a = torch.randint(0, n_tokens, (n_pairs,), generator=generator)
    off = torch.randint(1, n_tokens, (n_pairs,), generator=generator)
    return a, (a + off) % n_tokens


class MappingDifficulty:
    """How far apart a neuron puts tokens relative to how far apart their inputs are, over random token pairs.

    For each batch, ``pairs`` pairs ``(a, b)`` of distinct tokens are drawn (:func:`draw_pairs`, one generator
    seeded with ``seed`` per accumulator, so batch ``k`` always gets the same pairs). Per pair ``p`` and neuron
    ``o``: the output distance ``dy_po = |y_ao - y_bo|`` and the input distance ``dx_p = ||x_a - x_b||``. The score
    averages over all pairs with ``dx_p > 0``::

        D_o = mean_p [ (dy_po / median_p dy_po) / (dx_p / max_p dx_p) ]
            = (max_p dx_p / median_p dy_po) * mean_p (dy_po / dx_p)

    so it streams: a running sum of ``dy / dx`` per neuron, the running maximum of ``dx``, and the median of ``dy``
    from a :class:`~neurospec.record.accumulators.NeuronStats` histogram of the pair distances (exact to within one
    of its bins). A neuron whose median output distance is 0 gets NaN.
    """

    def __init__(self, width: int, *, pairs: int = 64, seed: int = 0) -> None:
        if pairs < 1:
            raise NeurospecError(f"pairs per batch must be >= 1, got {pairs}")
        self.width, self.pairs = width, pairs
        self.generator = torch.Generator().manual_seed(seed)
        self.ratio_sum = torch.zeros(width, dtype=torch.float64)
        self.n = 0
        self.max_dx = 0.0
        self._dy = NeuronStats(width)
        self._pending: list[Tensor] = []  # pair distances not yet in ``dy`` (added in bulk: fewer, larger updates)
        self._pending_rows = 0
        self._buf: Tensor | None = None  # the CPU kernel's pending pair distances: its first _buf_rows rows
        self._buf_rows = 0

    FLUSH_ROWS = 256
    """Pair distances are held back until this many rows are pending, then added to the histogram in one update
    (the same counts and extremes as one update per batch; the per-update costs are paid once per 4 batches of
    64 pairs, for ``FLUSH_ROWS * width`` floats held: 1.5 MB for 1,536 neurons)."""

    @property
    def dy(self) -> NeuronStats:
        """The histogram statistics of the pair distances ``dy`` (every pending row added)."""
        self._flush()
        return self._dy

    def _flush(self) -> None:
        if self._pending:
            rows = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
            self._pending, self._pending_rows = [], 0
            self._dy.update(rows)
        if self._buf_rows:
            rows, self._buf_rows = self._buf[: self._buf_rows], 0
            self._dy.update(rows)

    def update(self, x: Tensor, y: Tensor) -> None:
        y = _rows(y, self.width, "MappingDifficulty")
        x = x.detach().reshape(y.shape[0], -1)
        if y.shape[0] < 2:
            return
        a, b = draw_pairs(y.shape[0], self.pairs, self.generator)
        if kernels.usable(y) and x.device.type == "cpu":
            self._update_cpu(x, y, a, b)
            return
        a, b = a.to(y.device), b.to(y.device)
        dx = (x[a].to(y.dtype) - x[b].to(y.dtype)).norm(dim=1)
        keep = dx > 0
        dy = (y[a] - y[b]).abs()[keep]
        dx = dx[keep]
        if dx.numel() == 0:
            return
        self.ratio_sum += (dy / dx[:, None]).sum(0).to("cpu", torch.float64)
        self.n += int(dx.numel())
        self.max_dx = max(self.max_dx, float(dx.max()))
        self._pending.append(dy)
        self._pending_rows += int(dy.shape[0])
        if self._pending_rows >= self.FLUSH_ROWS:
            self._flush()

    def _update_cpu(self, x: Tensor, y: Tensor, a: Tensor, b: Tensor) -> None:
        """:meth:`update` in one kernel call (:func:`~neurospec.record.kernels.pair_distances`): the same pairs and
        quantities, the input distances and the sum of ``dy / dx`` in float64, the pair distances written straight
        into a buffer of ``max(FLUSH_ROWS, pairs)`` rows, added to the histogram once ``FLUSH_ROWS`` rows are
        pending or when the next batch's pairs might not fit."""
        rows = max(self.FLUSH_ROWS, self.pairs)
        buf = self._buf
        if self._pending or (buf is not None and (buf.dtype != y.dtype or buf.shape[0] < rows)):
            self._flush()  # (rows from the torch path, of another dtype, or in a buffer too small, go first)
            buf = self._buf = None
        if buf is None:
            buf = self._buf = torch.empty(rows, self.width, dtype=y.dtype)
        if self._buf_rows + self.pairs > buf.shape[0]:
            self._flush()
        kept, top = kernels.pair_distances(x.to(y.dtype).contiguous(), y.contiguous(), a, b, self.ratio_sum,
                                           self._buf, self._buf_rows)
        self._buf_rows += kept
        self.n += kept
        self.max_dx = max(self.max_dx, top)
        if self._buf_rows >= self.FLUSH_ROWS:
            self._flush()

    def merge(self, other: MappingDifficulty) -> MappingDifficulty:
        self.ratio_sum += other.ratio_sum
        self.n += other.n
        self.max_dx = max(self.max_dx, other.max_dx)
        self.dy.merge(other.dy)
        return self

    def compute(self) -> Tensor:
        """``FloatTensor[width]`` (float64): ``D_o``; NaN without pairs or for a zero median distance."""
        if self.n == 0:
            return torch.full((self.width,), math.nan, dtype=torch.float64)
        median = quantiles(self.dy, 0.5)[0]
        mean_ratio = self.ratio_sum / self.n
        return torch.where(median > 0, self.max_dx * mean_ratio / median.clamp(min=1e-300), math.nan)


@dataclass
class ModuleOutputs:
    """The accumulators of one linear module's outputs."""

    name: str
    stats: NeuronStats
    moments: CentralMoments
    difficulty: MappingDifficulty

    def update(self, x: Tensor, y: Tensor) -> None:
        w = self.stats.width
        flat = _rows(y, w, self.name)
        # One kernel call for every moment and the histogram (CPU): the histogram statistics' partials and the
        # 3rd and 4th power sums about the same shift.
        part = self.stats.update(flat, higher=True)
        if part is not None:
            r3, r4 = kernels.HIGHER_ROWS
            self.moments.add_shifted(flat.shape[0], part[_SHIFT], part[[_SUM_C, _SUM_SQ_C, r3, r4]])
        else:
            self.moments.update(flat)
        self.difficulty.update(x, flat)

    def merge(self, other: ModuleOutputs) -> ModuleOutputs:
        self.stats.merge(other.stats)
        self.moments.merge(other.moments)
        self.difficulty.merge(other.difficulty)
        return self


def new_outputs(name: str, width: int, *, pairs: int = 64, seed: int = 0, hist_bins: int = 256,
                hist_every: int = 1) -> ModuleOutputs:
    """The accumulators of one module; ``hist_every = k`` bins only rows ``0, k, 2k, ...`` of each batch into the
    histogram (the moments see every token)."""
    if not isinstance(hist_every, int) or hist_every < 1:
        raise NeurospecError(f"hist_every must be a positive integer (1: every token), got {hist_every!r}")
    check_bins(hist_bins)
    return ModuleOutputs(name, NeuronStats(width, hist_bins=hist_bins, hist_sample_every=hist_every),
                         CentralMoments(width),
                         MappingDifficulty(width, pairs=pairs, seed=seed))


# ------------------------------------------------------------------------------------------------ one pass
@torch.no_grad()
def record_outputs(
    model: nn.Module | LoadedModel,
    blocks: Tensor,
    *,
    modules: Mapping[str, LinearRef] | None = None,
    layers: Sequence[int | str] | None = None,
    scope: str = "mlp_in",
    batch_size: int = 8,
    pairs: int = 64,
    seed: int = 0,
    hist_bins: int = 256,
    hist_every: int = 1,
) -> dict[str, ModuleOutputs]:
    """One forward pass over ``blocks`` (``LongTensor[n, seq]`` token ids, or pixel values) with a forward hook on
    each chosen linear module (``modules``, or :func:`choose_linears` of ``layers`` and ``scope``) feeding its
    :class:`ModuleOutputs`. The model is not changed (hooks are removed, no weight is touched).

    ``hist_every = k``: the histograms (and so W1) see every k-th token of each batch, the moments every token;
    about k times cheaper binning for a W1 estimated from ``1/k`` of the tokens. Rows are the batch's tokens in
    order (sequence by sequence), so with a sequence length divisible by ``k`` the same positions of every sequence
    are sampled, the first among them (often an outlier): choose ``k`` coprime to the sequence length (3 or 5 for
    256) to spread the sample over positions."""
    net = model.model if isinstance(model, LoadedModel) else model
    if modules is None:
        modules = choose_linears(net, layers, scope=scope)
    if not modules:
        raise NeurospecError("no linear module was chosen to record")
    for name, ref in modules.items():
        if not is_linear(ref.module):
            raise NeurospecError(f"{name} is a {type(ref.module).__name__}, not a linear module (nn.Linear or "
                                 "Conv1D): only linear modules have output rows to score")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise NeurospecError(f"batch_size must be a positive integer, got {batch_size!r}")
    if blocks.dim() < 2 or blocks.shape[0] == 0:
        raise NeurospecError(f"blocks must be [n, seq] token ids (or pixel values) with n >= 1, got "
                             f"{tuple(blocks.shape)}")
    accs = {name: new_outputs(name, linear_dims(ref.module)[1], pairs=pairs, seed=seed, hist_bins=hist_bins,
                              hist_every=hist_every)
            for name, ref in modules.items()}

    def hook_for(name: str):
        def hook(mod, args, output):
            accs[name].update(args[0], output)
        return hook

    handles = [ref.module.register_forward_hook(hook_for(name)) for name, ref in modules.items()]
    key = "pixel_values" if blocks.is_floating_point() else "input_ids"
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        for i in range(0, blocks.shape[0], batch_size):
            net(**{key: blocks[i : i + batch_size].to(device)})
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    missing = [n for n, a in accs.items() if a.moments.n == 0]
    if missing:
        raise NeurospecError(f"modules {missing[:3]} were never called by the model's forward pass; they cannot be "
                             "scored")
    return accs

"""Do skill neurons agree with selective-pruning neurons of the same task?

Selective-pruning neurons (METHODS.md section 1, :mod:`neurospec.score.selective`) of a labelled task come from
class-conditional statistics: for each class ``c``, the neurons' statistics over the training examples of ``c``
(forget) against those of the other classes (retain), read at the same site and positions as the skill neurons
(the prompt positions of the MLP site), so the two methods differ only in their scoring rule. A neuron's task
score is the max over classes of the scorer (``abs`` by default: ``mean|x|_c / (mean|x|_rest + eps)``); a binary
task thus scores both directions. The selective set takes the same count per layer as the skill set (ties broken
by the same seeded order, :func:`~neurospec.skills.predictivity.select_top_p`).

Agreement (:func:`overlap_test`): ``n_common = sum_l |A_l & B_l|`` of the skill set ``A`` and the selective set
``B``. Under the null (``B_l`` a uniformly random ``K_l``-subset of the ``W_l`` neurons of layer ``l``, independent
across layers) ``|A_l & B_l|`` is hypergeometric with mean ``k_l K_l / W_l``; the chance expectation is their sum,
and the p-value ``P(X >= n_common)`` is the exact upper tail of the sum of the per-layer hypergeometrics (their
probability mass functions convolved, :data:`scipy.stats.hypergeom`). Reported as fractions of ``|A|``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from neurospec.data.labelled import LabelledTask
from neurospec.errors import NeurospecError
from neurospec.models.sites import Site
from neurospec.record.accumulators import NeuronStats
from neurospec.score.selective import SCORERS, score_neurons
from neurospec.skills.prompting import Prompt, PromptedModel, capture

HIST_BINS = 8  # the scorers read moments only; the histogram is kept small


def class_statistics(pm: PromptedModel, task: LabelledTask, prompt: Prompt | None, sites: Sequence[Site], *,
                     split: str = "train", batch_size: int = 16) -> list[dict[str, NeuronStats]]:
    """Per class, ``{site: NeuronStats}`` of the activations at the prompt positions of ``split``'s examples of
    that class (every prompt position of an example is one row). Cost: one forward of the body per example."""
    stats = [{s.name: NeuronStats(s.width, hist_bins=HIST_BINS) for s in sites} for _ in range(task.n_classes)]
    items, labels = task.split(split)
    current: dict[str, Tensor] = {}

    def sink(name: str, x: Tensor) -> None:
        y = current["y"]
        for c in torch.unique(y).tolist():
            stats[c][name].update(x[(y == c).to(x.device)].reshape(-1, x.shape[-1]))

    with torch.inference_mode(), capture(pm.loaded.model, sites, lambda: pm.current_positions, sink):
        for i in range(0, len(items), batch_size):
            current["y"] = torch.as_tensor(labels[i : i + batch_size])
            pm.run_body(items[i : i + batch_size], prompt)
    return stats


def selective_scores(stats: Sequence[Mapping[str, NeuronStats]], method: str = "abs", *, task: str = "",
                     seed: int = 0) -> dict[str, Tensor]:
    """``{site: float64 [width]}``: max over classes ``c`` of ``method``'s score with ``c`` as forget and the other
    classes as retain."""
    if method not in SCORERS:
        raise NeurospecError(f"unknown selective score {method!r}; choose one of {', '.join(SCORERS)}")
    if len(stats) < 2:
        raise NeurospecError("selective scores need at least two classes")
    best: dict[str, Tensor] = {}
    for c, forget in enumerate(stats):
        retain = {}
        for site in forget:
            merged = NeuronStats(forget[site].width, hist_bins=HIST_BINS)
            for d, other in enumerate(stats):
                if d != c:
                    merged.merge(other[site])
            retain[site] = merged.compute()
        scores = score_neurons(method, {s: a.compute() for s, a in forget.items()}, retain, seed=seed,
                               task=f"{task}|{c}")
        for site, v in scores.items():
            best[site] = v if site not in best else torch.maximum(best[site], v)
    return best


def overlap_test(a: Mapping[str, Tensor], b: Mapping[str, Tensor], widths: Mapping[str, int]) -> dict:
    """Overlap of two neuron sets with per-layer sizes ``k_l`` (``a``) and ``K_l`` (``b``) against layer-matched
    chance (module docstring): ``{overlap, chance, pvalue, n_common, n}``, overlap and chance as fractions of
    ``|a|``."""
    from scipy.stats import hypergeom

    n_common = n = 0
    expected = 0.0
    pmf = np.ones(1)
    for site, idx in a.items():
        other = b.get(site, torch.empty(0, dtype=torch.long))
        k, K, W = int(idx.numel()), int(other.numel()), int(widths[site])
        if k > W or K > W:
            raise NeurospecError(f"site {site}: sets of {k} and {K} neurons do not fit its width {W}")
        n_common += len(set(idx.tolist()) & set(other.tolist()))
        n += k
        expected += k * K / W if W else 0.0
        if k and K:
            pmf = np.convolve(pmf, hypergeom(W, K, k).pmf(np.arange(min(k, K) + 1)))
    pvalue = float(min(1.0, pmf[n_common:].sum())) if n else 1.0
    return {"overlap": n_common / n if n else 0.0, "chance": expected / n if n else 0.0, "pvalue": pvalue,
            "n_common": n_common, "n": n}

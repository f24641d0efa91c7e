"""Language-model and representation metrics, streamed over fixed-length token blocks.

``evaluate_lm`` (causal LM): every position ``t < seq-1`` of every block predicts token ``t+1``.

- ``loss``: mean cross-entropy over all predicted positions; ``perplexity = exp(loss)``.
- ``top1`` / ``top{k}``: fraction of positions whose target is among the ``k`` highest logits. One definition
  (:func:`target_rank`) serves every evaluator of the package: the target's rank is the number of *other* tokens
  whose logit is ``>=`` the target's, so ties count against the target (constant logits are never a hit), and the
  target is in the top ``k`` when its rank is ``< k``.
- ``nonfinite``: the number of positions with a NaN or infinite logit. They are never a hit (they stay in the
  denominators) and they make ``loss`` NaN or infinite; a warning says how many there were.
- ``skip_top1``: top-1 over the positions whose *target* is not in ``skip_ids`` (by convention the 50 most frequent
  tokens of the task's collection split: :func:`most_frequent_tokens`); ``None`` without ``skip_ids``.
- ``tokens`` / ``skip_tokens``: the number of positions each average is over.

Masked LM (e.g. ``BertForMaskedLM``): a seeded masking evaluation. Each position that is not a special token is
chosen with probability ``mlm_prob`` (default 0.15, a fixed draw per block given ``seed``, independent of the batch
size), *every* chosen position is replaced by the mask token (no 80/10/10 split: the evaluation should measure the
model, not the noise of the corruption), and the metrics above are computed on the chosen positions against the
original tokens.

Models without an LM head raise a :class:`~neurospec.errors.NeurospecError` that names the metric that applies. For
head-less encoders (e.g. the bundled ``minilm-l6``) :func:`evaluate_representation` compares the final hidden states
with those of the unablated model (:func:`reference_states`): mean per-token cosine similarity, its complement
``cosine_distance`` (0 for the unablated model, the number to track in an ablation study) and the mean relative L2
change ``||h - h_ref|| / ||h_ref||``.

Memory: causal LMs whose logits are the output embedding applied to the base model's final hidden states (the
families of :data:`HIDDEN_PATH_FAMILIES` without a logit transform; tested against the full logits) are evaluated
from those hidden states through the head, ``chunk`` positions at a time, so no ``[batch, seq, vocab]`` tensor
exists: peak memory is ``batch * seq * hidden`` plus one ``chunk x vocab`` logits tensor (the reductions over it run
128 rows at a time, with the same result, so their temporaries are small). Other models (masked LMs,
other families) take the model's full logits, one batch at a time. Sums accumulate in float64.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from neurospec.errors import NeurospecError
from neurospec.models.digits import image_logits
from neurospec.models.loading import LoadedModel, head_of
from neurospec.models.placement import input_device

_CHUNK = 1024
_REDUCE_ROWS = 128  # rows of a chunk's logits reduced at a time (TokenCounts.update)

#: What the accuracy-like ``top1`` of each objective's metrics measures (every metrics dict names it as ``metric``).
METRIC_NAMES = {
    "causal": "next-token top-1",
    "masked": "masked-token top-1",
    "image-class": "class top-1",
    "representation": "representation similarity",
}


def most_frequent_tokens(blocks: torch.Tensor, n: int = 50) -> torch.Tensor:
    """The ``n`` most frequent token ids of ``blocks`` (``LongTensor[n_blocks, seq]``), most frequent first; equal
    counts are ordered by token id. Pass the task's *collection* split and give the result as ``skip_ids``."""
    flat = _check_blocks(blocks).reshape(-1)
    counts = torch.bincount(flat)
    order = torch.sort(counts, descending=True, stable=True).indices
    present = int((counts > 0).sum())
    return order[: min(n, present)]


def _check_blocks(blocks: torch.Tensor) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long:
        desc = f"{blocks.dtype} {tuple(blocks.shape)}" if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise NeurospecError(f"blocks must be a LongTensor[n_blocks, seq] of token ids, got {desc}")
    if blocks.numel() and int(blocks.min()) < 0:
        raise NeurospecError("blocks contain negative token ids")
    return blocks


def unwrap_model(model: Any) -> tuple[nn.Module, Any]:
    """``(module, tokenizer)`` of a :class:`~neurospec.models.loading.LoadedModel`, or ``(model, None)``."""
    if isinstance(model, LoadedModel):
        return model.model, model.tokenizer
    return model, None


def _input_device(model: nn.Module) -> torch.device:
    """Where the inputs go, also for a model spread over devices (:func:`neurospec.models.placement.input_device`)."""
    return input_device(model)


def has_lm_head(model: nn.Module) -> bool:
    """True for causal and masked language models (the models :func:`evaluate_lm` applies to)."""
    return head_of(model) in ("causal-lm", "masked-lm")


def target_rank(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank of each target among its row's logits, and whether the row is finite.

    ``logits``: ``[rows, n_classes]``; ``targets``: ``LongTensor[rows]``. Returns ``(rank, finite)``: ``rank`` is the
    number of *other* classes whose logit is ``>=`` the target's (ties count against the target) and ``finite`` is
    True where every logit of the row is finite. The target is in the top ``k`` iff ``finite & (rank < k)``: see
    :func:`topk_hits`.
    """
    tgt = logits.gather(1, targets[:, None])
    rank = (logits >= tgt).sum(dim=1) - 1  # the target itself is >= itself (unless NaN: then the row is not finite)
    finite = torch.isfinite(logits).all(dim=1)
    return rank, finite


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> torch.Tensor:
    """``BoolTensor[rows]``: the target is among the ``k`` highest logits of a finite row (see :func:`target_rank`)."""
    rank, finite = target_rank(logits, targets)
    return finite & (rank < k)


def warn_nonfinite(n: int, total: int, what: str = "positions") -> None:
    if n:
        warnings.warn(f"{n} of {total} {what} had NaN or infinite outputs; they count as wrong and make the loss "
                      "NaN or infinite (is the model overflowing in this dtype, or are all neurons of a layer "
                      "ablated?)", RuntimeWarning, stacklevel=3)


class TokenCounts:
    """Float64 sums of the next-token (or masked-token) metrics of :func:`evaluate_lm`, fed a batch at a time."""

    def __init__(self, topk: int, skip_ids: torch.Tensor | None, chunk: int = _CHUNK):
        self.topk = topk
        self.skip_ids = skip_ids
        self.chunk = chunk
        self.loss = 0.0
        self.top1 = 0
        self.topk_hits = 0
        self.n = 0
        self.nonfinite = 0
        self.skip_top1 = 0
        self.skip_n = 0

    def update(self, rows: torch.Tensor, targets: torch.Tensor, head: Any = None) -> None:
        """``rows``: logits ``[n, vocab]``, or with ``head`` final hidden states ``[n, hidden]`` that ``head`` maps
        to logits (one chunk of positions at a time); ``targets``: ``LongTensor[n]``."""
        skip = None if self.skip_ids is None else self.skip_ids.to(targets.device)
        for lo in range(0, targets.numel(), self.chunk):
            part = rows[lo : lo + self.chunk]
            lg = (part if head is None else head(part)).float()
            tg = targets[lo : lo + self.chunk]
            # The reductions run over slices of at least _REDUCE_ROWS rows of the chunk's logits (a short tail joins
            # the slice before it), so their temporaries are a fraction of the [chunk, vocab] logits. Every value is
            # per row, and a slice of that many rows takes the same per-row path as the whole chunk: the result is
            # bit for bit that of the whole chunk at once.
            cuts = list(range(0, tg.numel(), _REDUCE_ROWS))
            if len(cuts) > 1 and tg.numel() - cuts[-1] < _REDUCE_ROWS:
                cuts.pop()
            nll = []
            for a, b in zip(cuts, [*cuts[1:], tg.numel()], strict=True):
                lg_s, tg_s = lg[a:b], tg[a:b]
                rank, finite = target_rank(lg_s, tg_s)
                nll.append(torch.logsumexp(lg_s, dim=1) - lg_s.gather(1, tg_s[:, None])[:, 0])
                hit1 = finite & (rank < 1)
                self.top1 += int(hit1.sum())
                self.topk_hits += int((finite & (rank < self.topk)).sum())
                self.nonfinite += int((~finite).sum())
                if skip is not None:
                    keep = ~torch.isin(tg_s, skip)
                    self.skip_n += int(keep.sum())
                    self.skip_top1 += int((hit1 & keep).sum())
            self.loss += float(torch.cat(nll).double().sum())
            self.n += tg.numel()

    def compute(self, objective: str) -> dict:
        if self.n == 0:
            raise NeurospecError("no positions to evaluate (blocks too short, or no position was masked)")
        warn_nonfinite(self.nonfinite, self.n)
        loss = self.loss / self.n
        try:
            ppl = math.exp(loss)
        except OverflowError:
            ppl = math.inf
        skip_top1 = None
        if self.skip_ids is not None:
            skip_top1 = self.skip_top1 / self.skip_n if self.skip_n else math.nan
        return {
            "objective": objective,
            "metric": METRIC_NAMES[objective],
            "top1": self.top1 / self.n,
            f"top{self.topk}": self.topk_hits / self.n,
            "skip_top1": skip_top1,
            "loss": loss,
            "perplexity": ppl,
            "tokens": self.n,
            "skip_tokens": self.skip_n if self.skip_ids is not None else None,
            "nonfinite": self.nonfinite,
        }


def _special_ids(model: nn.Module, tokenizer: Any) -> torch.Tensor:
    ids: set[int] = set()
    if tokenizer is not None and getattr(tokenizer, "all_special_ids", None):
        ids |= set(tokenizer.all_special_ids)
    cfg = getattr(model, "config", None)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            ids.add(v)
    return torch.tensor(sorted(ids), dtype=torch.long).reshape(-1)


#: Causal-LM families whose logits are exactly ``output_embeddings(base_model(ids).last_hidden_state)``.
HIDDEN_PATH_FAMILIES = frozenset({"llama", "qwen2", "gemma", "gpt2", "gpt_neox", "opt"})
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def hidden_path(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(base, head)`` of a causal LM whose logits are ``head(base(ids).last_hidden_state)`` (a family of
    :data:`HIDDEN_PATH_FAMILIES` whose config sets no logit transform such as soft-capping), else ``None``: then
    the model's full logits are used."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in HIDDEN_PATH_FAMILIES:
        return None
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings()
    if base is None or base is model or not isinstance(head, nn.Linear):
        return None
    return base, head


def causal_batch(model: nn.Module, ids: torch.Tensor, counts: TokenCounts, path: tuple | None) -> None:
    """Add one batch of blocks ``ids`` (on the input device) to ``counts``: through ``path`` (:func:`hidden_path`)
    a chunk of positions at a time, or from the model's full logits when ``path`` is ``None``."""
    targets = ids[:, 1:].reshape(-1)
    if path is None:
        logits = model(input_ids=ids, use_cache=False).logits
        counts.update(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.to(logits.device))
        return
    base, head = path
    h = base(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    h = h.reshape(-1, h.shape[-1]).to(head.weight.device)
    counts.update(h, targets.to(h.device), head=head)


@torch.no_grad()
def evaluate_lm(
    model: Any,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    skip_ids: torch.Tensor | None = None,
    topk: int = 10,
    mask_token_id: int | None = None,
    mlm_prob: float = 0.15,
    seed: int = 0,
    special_ids: torch.Tensor | None = None,
    chunk: int = _CHUNK,
    full_logits: bool = False,
) -> dict:
    """Next-token (causal LM) or masked-token (masked LM) metrics of ``model`` on ``blocks``; see the module doc.

    ``model``: a Hugging Face model with an LM head, or a :class:`~neurospec.models.loading.LoadedModel` (whose
    tokenizer then supplies the mask token and special tokens). ``blocks``: ``LongTensor[n_blocks, seq]``.
    ``mask_token_id``, ``mlm_prob``, ``seed`` and ``special_ids`` (never masked; default: the tokenizer's special
    tokens, or the config's pad/bos/eos/sep/cls ids) apply to masked LMs only. ``chunk``: positions per logits
    chunk; ``full_logits=True`` always takes the model's full logits (the reference the chunked path is tested
    against).
    Returns ``{objective, metric, top1, top{k}, skip_top1, loss, perplexity, tokens, skip_tokens, nonfinite}``.
    """
    model, tokenizer = unwrap_model(model)
    blocks = _check_blocks(blocks)
    if batch_size < 1 or topk < 1 or chunk < 1:
        raise NeurospecError(f"batch_size, topk and chunk must be >= 1, got {batch_size}, {topk} and {chunk}")
    if not has_lm_head(model):
        raise NeurospecError(_no_lm_head_message(model))
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab is not None and blocks.numel() and int(blocks.max()) >= vocab:
        raise NeurospecError(f"blocks hold token id {int(blocks.max())}, but the model's vocabulary has {vocab}")
    if skip_ids is not None:
        skip_ids = torch.as_tensor(skip_ids, dtype=torch.long).reshape(-1)
    counts = TokenCounts(topk, skip_ids, chunk)
    device = _input_device(model)
    if head_of(model) == "causal-lm":
        if blocks.shape[1] < 2:
            raise NeurospecError("causal-LM evaluation needs blocks of at least 2 tokens")
        path = None if full_logits else hidden_path(model)
        for lo in range(0, blocks.shape[0], batch_size):
            causal_batch(model, blocks[lo : lo + batch_size].to(device), counts, path)
        return counts.compute("causal")
    if mask_token_id is None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
    if mask_token_id is None:
        raise NeurospecError(
            f"{type(model).__name__} is a masked LM: pass mask_token_id= (tokenizer.mask_token_id) for the masked "
            "evaluation"
        )
    if not 0.0 < mlm_prob <= 1.0:
        raise NeurospecError(f"mlm_prob must lie in (0, 1], got {mlm_prob}")
    if special_ids is None:
        special_ids = _special_ids(model, tokenizer)
    special_ids = torch.cat([torch.as_tensor(special_ids, dtype=torch.long).reshape(-1), torch.tensor([mask_token_id])])
    chosen = mlm_positions(blocks, special_ids, mlm_prob=mlm_prob, seed=seed)
    for lo in range(0, blocks.shape[0], batch_size):
        ids = blocks[lo : lo + batch_size]
        sel = chosen[lo : lo + batch_size]
        if not sel.any():
            continue
        inp = ids.masked_fill(sel, mask_token_id).to(device)
        logits = model(input_ids=inp).logits
        counts.update(logits[sel.to(device)], ids[sel].to(device))
    return counts.compute("masked")


def mlm_positions(blocks: torch.Tensor, special_ids: torch.Tensor, *, mlm_prob: float = 0.15, seed: int = 0) -> torch.Tensor:
    """``BoolTensor[n_blocks, seq]``: the positions a masked-LM evaluation masks (seeded; special tokens never)."""
    u = torch.rand(blocks.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u < mlm_prob) & ~torch.isin(blocks, special_ids)


def _no_lm_head_message(model: nn.Module) -> str:
    name = type(model).__name__
    if head_of(model) in ("image-classification", "sequence-classification"):
        return f"{name} is a classifier, not a language model: use classification accuracy, not evaluate_lm"
    return (
        f"{name} has no language-model head, so next-token and masked-token metrics do not apply. For a head-less "
        "encoder use evaluate_representation(model, blocks, reference_states(model, blocks)) (reference taken "
        "before ablating), or load a checkpoint that has an LM head (load_model(..., head='masked-lm'))"
    )


# ------------------------------------------------------------------------------------------------ representation


def _final_hidden(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    base = getattr(model, "base_model", model)
    key = "pixel_values" if batch.is_floating_point() else "input_ids"
    out = base(**{key: batch})
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        raise NeurospecError(f"{type(base).__name__} returns no last_hidden_state; evaluate_representation needs one")
    return h


def _check_inputs(inputs: torch.Tensor) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise NeurospecError("inputs must be a tensor: LongTensor[n, seq] token ids or FloatTensor[n, ...] pixels")
    return inputs if inputs.is_floating_point() else _check_blocks(inputs)


@torch.no_grad()
def reference_states(model: Any, inputs: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """Final hidden states ``[n, seq, hidden]`` (float32, on the CPU) of the *unablated* model: the reference of
    :func:`evaluate_representation`. Memory: ``n * seq * hidden * 4`` bytes."""
    model, _ = unwrap_model(model)
    inputs = _check_inputs(inputs)
    device = _input_device(model)
    parts = [
        _final_hidden(model, inputs[lo : lo + batch_size].to(device)).float().cpu()
        for lo in range(0, inputs.shape[0], batch_size)
    ]
    return torch.cat(parts)


@torch.no_grad()
def evaluate_representation(
    model: Any, inputs: torch.Tensor, reference: torch.Tensor, *, batch_size: int = 8
) -> dict:
    """How far the final hidden states moved from ``reference`` (:func:`reference_states` of the unablated model).

    ``inputs``: ``LongTensor[n, seq]`` token ids (or pixel values for vision encoders). Per token ``t``:
    ``cos_t = cos(h_t, ref_t)`` and ``rel_t = ||h_t - ref_t|| / ||ref_t||``; returns their means
    ``{cosine, cosine_distance (= 1 - cosine), rel_l2, tokens, nonfinite}``. Tokens whose hidden state holds a NaN
    or infinity are counted in ``nonfinite`` and score cosine 0 (``rel_l2`` becomes NaN or infinite).
    """
    model, _ = unwrap_model(model)
    inputs = _check_inputs(inputs)
    if reference.shape[0] != inputs.shape[0]:
        raise NeurospecError(f"reference holds {reference.shape[0]} inputs, but {inputs.shape[0]} inputs were given")
    device = _input_device(model)
    cos_sum = rel_sum = 0.0
    n = nonfinite = 0
    for lo in range(0, inputs.shape[0], batch_size):
        h = _final_hidden(model, inputs[lo : lo + batch_size].to(device)).float()
        ref = reference[lo : lo + batch_size].to(h.device, torch.float32)
        if h.shape != ref.shape:
            raise NeurospecError(f"hidden states {tuple(h.shape)} do not match the reference {tuple(ref.shape)}")
        h, ref = h.reshape(-1, h.shape[-1]).double(), ref.reshape(-1, ref.shape[-1]).double()
        finite = torch.isfinite(h).all(dim=-1)
        cos = F.cosine_similarity(h, ref, dim=-1, eps=1e-12)
        cos_sum += float(torch.where(finite, cos, torch.zeros_like(cos)).sum())
        rel = (h - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
        rel_sum += float(rel.sum())
        nonfinite += int((~finite).sum())
        n += h.shape[0]
    if n == 0:
        raise NeurospecError("no inputs to evaluate")
    warn_nonfinite(nonfinite, n, "tokens")
    cosine = cos_sum / n
    return {"cosine": cosine, "cosine_distance": 1.0 - cosine, "rel_l2": rel_sum / n, "tokens": n,
            "nonfinite": nonfinite}


@torch.no_grad()
def image_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on images ``x`` with classes ``y`` (evaluation mode; restores the mode), by the
    one rule of :func:`topk_hits` (ties and non-finite rows count as wrong)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int(topk_hits(image_logits(model, x[i:i + batch_size]).float(), y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)

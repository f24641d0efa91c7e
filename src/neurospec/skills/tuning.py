"""Skill neurons beyond prompt tuning: learn the task another way that leaves every neuron's weights frozen, then
perturb the skill neurons (found with prompts) in the adapted model.

Methods (:data:`TUNING_METHODS`), both on a deep copy of the model (the caller's model is never changed):

- ``lora``: a LoRA adapter (peft, rank 8, alpha 16, no dropout) on every linear module of each block's attention
  (query/key/value and output projections), injected in place so module paths stay the same; after training
  the adapter is merged into those weights and the peft layers are replaced by plain linears again;
- ``bias``: the biases of the attention modules only (BitFit restricted to attention); a model whose attention
  has no bias (Llama-style) is an error that says to use ``lora``.

The MLP (the input projections that make the neurons and the down projection that reads them) is never trained,
so a neuron's response function stays the one the skill neurons were found in; only what reaches it changes.
Training: the hard-prompt layout and readout of :mod:`neurospec.skills.prompting` (with the probe readout, a new
linear head is trained along), Adam (lr 1e-3, eps 1e-6, betas (0.9, 0.98)), 0.6% linear warm-up then linear decay,
clipping 1.0, the epoch with the best dev accuracy, model in evaluation mode, seeds from sha256.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from neurospec.data.labelled import LabelledTask
from neurospec.errors import NeurospecError
from neurospec.models.linear import is_linear
from neurospec.models.loading import LoadedModel, model_fingerprint
from neurospec.models.sites import find_sites
from neurospec.skills.predictivity import seed_of
from neurospec.skills.prompting import Prompt, PromptedModel

TUNING_METHODS = ("lora", "bias")


@dataclass(frozen=True)
class TuningConfig:
    method: str = "lora"
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 16
    rank: int = 8
    alpha: int = 16
    warmup: float = 0.006
    clip: float = 1.0
    max_steps: int | None = None  # stop early after this many steps (tests, quick looks)

    def __post_init__(self) -> None:
        if self.method not in TUNING_METHODS:
            raise NeurospecError(f"tuning method must be one of {TUNING_METHODS}, got {self.method!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.rank < 1:
            raise NeurospecError("tuning epochs, batch size and LoRA rank must be positive")


@dataclass
class Tuned:
    """The adapted copy (a plain model again), a prompted view of it, and how training went."""

    loaded: LoadedModel
    pm: PromptedModel
    method: str
    trained: list[str]
    dev_accuracy: float
    losses: list[float]


def attention_modules(loaded: LoadedModel, model: nn.Module | None = None) -> list[str]:
    """Dotted paths of every linear module inside each block's attention (the subtree that holds the attention
    site's reading module, next to the MLP's)."""
    model = model if model is not None else loaded.model
    names = dict(model.named_modules())
    out = []
    mlp = {s.layer: s.module for s in loaded.sites.of_kind("mlp") if s.expert is None}
    for s in loaded.sites.of_kind("attn"):
        other = mlp.get(s.layer)
        if other is None:
            continue
        a, b = s.module.split("."), other.split(".")
        n = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        root = ".".join(a[: n + 1])
        out += [p for p, m in names.items() if (p == root or p.startswith(root + ".")) and is_linear(m)]
    if not out:
        raise NeurospecError("found no attention projections in this model to adapt")
    return out


def check_tunable(loaded: LoadedModel, method: str) -> None:
    """Raise, before any work, if ``method`` has nothing to train in this model."""
    if method not in TUNING_METHODS:
        raise NeurospecError(f"tuning method must be one of {TUNING_METHODS}, got {method!r}")
    if method == "bias" and all(loaded.model.get_submodule(p).bias is None for p in attention_modules(loaded)):
        raise NeurospecError(_NO_BIAS)


_NO_BIAS = "this model's attention has no bias to tune: use the lora method (--beyond lora)"


def _merge_lora(model: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())


def tune_model(pm: PromptedModel, task: LabelledTask, prompt: Prompt | None, *, seed: int = 0,
               config: TuningConfig | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> Tuned:
    """Train ``config.method`` on a copy of ``pm``'s model for ``task`` (module docstring); ``progress(label,
    step, total)`` hears every optimiser step."""
    cfg = config or TuningConfig()
    loaded = pm.loaded
    model = copy.deepcopy(loaded.model).eval()
    targets = attention_modules(loaded, model)
    for p in model.parameters():
        p.requires_grad_(False)
    base_seed = seed_of("tuning", cfg.method, seed, task.fingerprint, loaded.fingerprint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_seed)
        if cfg.method == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                               target_modules=targets, bias="none"), model)
            model.eval()
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            for path in targets:
                bias = model.get_submodule(path).bias
                if bias is not None:
                    bias.requires_grad_(True)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        if not trained:
            raise NeurospecError(_NO_BIAS)
        view = dataclasses.replace(loaded, model=model)
        tpm = PromptedModel(view, pm.n_classes, readout=pm.readout,
                            verbaliser=None if pm.verbaliser is None else pm.verbaliser.tolist(),
                            max_tokens=pm.max_tokens)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # trained in float32 whatever the model's dtype
            p.data = p.data.float()
        if tpm.readout == "probe":
            params += list(tpm.new_probe().float().parameters())
    items, labels = task.split("train")
    dev_items, dev_labels = task.split("dev")
    steps = math.ceil(len(labels) / cfg.batch_size) * cfg.epochs
    total = steps if cfg.max_steps is None else min(cfg.max_steps, steps)
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-6, betas=(0.9, 0.98))
    sched = get_linear_schedule_with_warmup(opt, max(1, round(cfg.warmup * total)), total)
    order = torch.Generator().manual_seed(base_seed)
    losses: list[float] = []
    best = (-1.0, [p.detach().clone() for p in params])
    step = 0
    for _epoch in range(cfg.epochs):
        perm = torch.randperm(len(labels), generator=order)
        for i in range(0, len(labels), cfg.batch_size):
            if step >= total:
                break
            idx = perm[i : i + cfg.batch_size]
            batch = items[idx] if isinstance(items, torch.Tensor) else [items[j] for j in idx.tolist()]
            y = torch.as_tensor(labels[idx.numpy()], device=loaded.device)
            loss = torch.nn.functional.cross_entropy(tpm.logits(batch, prompt).float(), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if progress is not None:
                progress(f"{cfg.method} tuning {task.name}", step, total)
        with torch.no_grad():
            acc = tpm.accuracy(dev_items, dev_labels, prompt, cfg.batch_size)
        if acc > best[0]:
            best = (acc, [p.detach().clone() for p in params])
        if step >= total:
            break
    with torch.no_grad():
        for p, v in zip(params, best[1], strict=True):
            p.copy_(v)
    dtype = loaded.dtype
    for p in model.parameters():
        p.requires_grad_(False)
        p.data = p.data.to(dtype)
    if cfg.method == "lora":
        _merge_lora(model)
    adapted = dataclasses.replace(
        loaded, model=model, name=f"{loaded.name} ({cfg.method}-tuned on {task.name})", sites=find_sites(model),
        fingerprint=model_fingerprint(model),
        preprocessing=[*loaded.preprocessing, f"{cfg.method} tuning on {task.name}, seed {seed}"])
    tpm.loaded = adapted
    return Tuned(adapted, tpm, cfg.method, trained, best[0], losses)

"""Soft prompts: ``P`` trainable vectors (peft prompt tuning) learned on the frozen model, saved and reused.

Training follows the published recipe: Adam (lr 1e-3, eps 1e-6, betas (0.9, 0.98)), a linear warm-up over 0.6% of
the steps then linear decay, gradient clipping at 1.0, cross-entropy on the class logits of the readout
(:mod:`neurospec.skills.prompting`), the checkpoint with the best dev accuracy (first best on ties). Vectors start
from N(0, (1/30)^2). For masked LMs the first prompt position is the mask token's embedding (fixed) and the other
``P - 1`` are trained; with the probe readout the linear head is trained along with the prompt. The model stays in
evaluation mode (no dropout) and its weights never change: their ``requires_grad`` flags are switched off during
training and restored afterwards. Everything random (initialisation, example order) is seeded from sha256 of the
seed, the task and the model fingerprint.

Files (one directory per task and seed): ``adapter_model.safetensors`` (``prompt_embeddings`` ``[P', d]``, the
trained vectors, as peft writes them) and ``adapter_config.json`` (peft's ``PromptTuningConfig``), ``probe.safetensors``
for the probe readout, and ``skills_prompt.json`` (the training settings, the model and task fingerprints, dev
accuracy per epoch, losses). Running again with the same model, task and settings loads the saved prompt instead of
training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from neurospec.data.labelled import LabelledTask
from neurospec.errors import NeurospecError
from neurospec.record.store import atomic_write_json
from neurospec.skills.predictivity import seed_of
from neurospec.skills.prompting import Prompt, PromptedModel

PROMPT_FILE = "skills_prompt.json"
SCHEMA = 1


@dataclass(frozen=True)
class SoftPromptConfig:
    length: int = 16
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 16
    warmup: float = 0.006
    clip: float = 1.0
    init_std: float = 1 / 30
    max_steps: int | None = None  # stop early after this many steps (tests, quick looks)

    def __post_init__(self) -> None:
        if self.length < 1 or self.epochs < 1 or self.batch_size < 1:
            raise NeurospecError("soft prompt length, epochs and batch size must be positive")


@dataclass
class SoftPrompt:
    prompt: Prompt
    seed: int
    dev_accuracy: float
    losses: list[float]
    reused: bool
    path: Path | None


def _peft_config(cfg: SoftPromptConfig, n_trained: int, d: int):
    from peft import PromptTuningConfig, TaskType

    return PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=n_trained, token_dim=d,
                              num_transformer_submodules=1, prompt_tuning_init="RANDOM")


def _fixed_prefix(pm: PromptedModel) -> torch.Tensor:
    """Prompt vectors that are not trained: the mask token's embedding for masked LMs, else none."""
    emb = pm.loaded.model.get_input_embeddings()
    if pm.loaded.head == "masked-lm" and pm.readout == "lm":
        mask_id = pm.loaded.tokenizer.mask_token_id
        if mask_id is None:
            raise NeurospecError("this masked LM's tokenizer has no mask token: soft prompts need it")
        return emb.weight[mask_id : mask_id + 1].detach()
    return emb.weight[:0].detach()


def _key(pm: PromptedModel, task: LabelledTask, cfg: SoftPromptConfig, seed: int) -> dict:
    return {"schema": SCHEMA, "model": pm.loaded.fingerprint, "task": task.fingerprint, "seed": seed,
            "readout": pm.readout, "verbaliser": None if pm.verbaliser is None else pm.verbaliser.tolist(),
            "max_tokens": pm.max_tokens, "config": asdict(cfg)}


def load_soft_prompt(pm: PromptedModel, path: Path, key: dict) -> SoftPrompt | None:
    """The prompt saved at ``path`` if it was trained with ``key``'s model, task and settings, else None."""
    meta_path = path / PROMPT_FILE
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key:
        return None
    from safetensors.torch import load_file

    trained = load_file(str(path / "adapter_model.safetensors"))["prompt_embeddings"]
    fixed = _fixed_prefix(pm)
    vectors = torch.cat([fixed.cpu(), trained.to(fixed.dtype)]).to(pm.loaded.device)
    if pm.readout == "probe":
        probe = load_file(str(path / "probe.safetensors"))
        head = pm.new_probe()
        with torch.no_grad():
            head.weight.copy_(probe["weight"])
            head.bias.copy_(probe["bias"])
    return SoftPrompt(Prompt(vectors), key["seed"], meta["dev_accuracy"], meta["losses"], True, path)


def train_soft_prompt(pm: PromptedModel, task: LabelledTask, *, seed: int = 0,
                      config: SoftPromptConfig | None = None, out: str | Path | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> SoftPrompt:
    """Train (or, if ``out`` holds a matching one, load) a soft prompt for ``task`` on ``pm``'s frozen model.
    ``progress(label, step, total)`` hears every optimiser step."""
    from peft.tuners.prompt_tuning import PromptEmbedding
    from transformers import get_linear_schedule_with_warmup

    cfg = config or SoftPromptConfig()
    if task.kind != "text":
        raise NeurospecError("soft prompts are for text tasks; image tasks use the class-token position")
    key = _key(pm, task, cfg, seed)
    path = Path(out) if out is not None else None
    if path is not None:
        found = load_soft_prompt(pm, path, key)
        if found is not None:
            return found
    model = pm.loaded.model
    emb = model.get_input_embeddings()
    fixed = _fixed_prefix(pm)
    n_trained = cfg.length - fixed.shape[0]
    if n_trained < 1:
        raise NeurospecError(f"soft prompt length {cfg.length} leaves no trainable vector")
    peft_cfg = _peft_config(cfg, n_trained, emb.weight.shape[1])
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    base_seed = seed_of("soft-prompt", seed, task.fingerprint, pm.loaded.fingerprint)
    items, labels = task.split("train")
    dev_items, dev_labels = task.split("dev")
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    losses: list[float] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base_seed)
            module = PromptEmbedding(peft_cfg, emb).to(device=pm.loaded.device, dtype=torch.float32)
            torch.nn.init.normal_(module.embedding.weight, std=cfg.init_std)
            params = list(module.parameters())
            if pm.readout == "probe":
                params += list(pm.new_probe().float().parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-6, betas=(0.9, 0.98))
        sched = get_linear_schedule_with_warmup(opt, max(1, round(cfg.warmup * total)), total)
        index = torch.arange(n_trained, device=pm.loaded.device)
        order_gen = torch.Generator().manual_seed(base_seed)

        def current() -> Prompt:
            return Prompt(torch.cat([fixed.to(emb.weight.dtype), module(index).to(emb.weight.dtype)]))

        best = (-1.0, module.embedding.weight.detach().clone(), _probe_state(pm))
        step = 0
        for _epoch in range(cfg.epochs):
            perm = torch.randperm(len(labels), generator=order_gen)
            for i in range(0, len(labels), cfg.batch_size):
                if step >= total:
                    break
                idx = perm[i : i + cfg.batch_size]
                batch = [items[j] for j in idx.tolist()]
                y = torch.as_tensor(labels[idx.numpy()], device=pm.loaded.device)
                logits = pm.logits(batch, current())
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                step += 1
                if progress is not None:
                    progress(f"soft prompt {task.name} seed {seed}", step, total)
            with torch.no_grad():
                acc = pm.accuracy(dev_items, dev_labels, current(), cfg.batch_size)
            if acc > best[0]:
                best = (acc, module.embedding.weight.detach().clone(), _probe_state(pm))
            if step >= total:
                break
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    dev_acc, weights, probe_state = best
    if probe_state is not None:
        pm.probe.load_state_dict(probe_state)
    vectors = torch.cat([fixed.to(emb.weight.dtype), weights.to(emb.weight.dtype)]).detach()
    if path is not None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({"prompt_embeddings": weights.cpu().contiguous()}, str(path / "adapter_model.safetensors"))
        atomic_write_json(path / "adapter_config.json", peft_cfg.to_dict())
        if probe_state is not None:
            save_file({k: v.cpu().contiguous() for k, v in probe_state.items()}, str(path / "probe.safetensors"))
        atomic_write_json(path / PROMPT_FILE, {"key": key, "dev_accuracy": dev_acc, "losses": losses,
                                               "steps": len(losses)})
    return SoftPrompt(Prompt(vectors), seed, dev_acc, losses, False, path)


def _probe_state(pm: PromptedModel) -> dict | None:
    if pm.readout != "probe" or pm.probe is None:
        return None
    return {k: v.detach().clone() for k, v in pm.probe.state_dict().items()}

"""How a classification example meets the model: prompt vectors, their positions, and the class logits.

A :class:`Prompt` is ``P`` vectors in the model's embedding space: a hard prompt is the embeddings of a fixed text
(:func:`hard_prompt`), a soft prompt trained vectors (:mod:`neurospec.skills.soft`). :class:`PromptedModel` lays
out each example as

- encoders (bidirectional attention): ``[prompt P vectors] + tokens(sentence)``, right-padded; the prompt holds
  positions ``0..P-1`` and the prediction is read at position 0;
- decoders (causal attention): ``tokens(sentence) + [prompt P vectors]``, left-padded; the prompt holds the last
  ``P`` positions and the prediction is read at the last one. A causal model's positions *before* the sentence
  cannot see it, so the published layout (prompt first) would leave every prompt-position neuron blind to the
  label; this is where neurospec differs from the published layout (an encoder, RoBERTa);
- images (ViT): no prompt; the one "prompt position" is the class token (position 0).

The prediction (``readout``) is, by model head:

- ``lm``: causal or masked LM: the LM logits at the read position restricted to one verbaliser token per class
  (for masked LMs the read position holds the mask token's embedding);
- ``model-head``: an image or sequence classifier whose labels are the task's classes: its own logits;
- ``probe``: anything else (e.g. ``minilm-l6``, which has no LM head): a linear head on the final hidden state at
  the read position, fit on frozen features of the training split (or trained with a soft prompt).

Dimensions: ``batch`` examples, ``seq`` padded positions, ``P`` prompt positions, ``width`` neurons of a site,
``d`` hidden size, ``C`` classes.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neurospec.errors import NeurospecError
from neurospec.models.loading import LoadedModel
from neurospec.models.sites import Site

READOUTS = ("lm", "model-head", "probe")
DEFAULT_MAX_TOKENS = 64


@dataclass
class Prompt:
    """``vectors`` ``[P, d]`` placed with each example; ``text`` for hard prompts, ``None`` for soft ones."""

    vectors: Tensor
    text: str | None = None

    @property
    def length(self) -> int:
        return int(self.vectors.shape[0])


def is_decoder(loaded: LoadedModel) -> bool:
    return loaded.head == "causal-lm" or bool(getattr(loaded.model.config, "is_decoder", False))


def default_readout(loaded: LoadedModel, n_classes: int) -> str:
    if loaded.head in ("causal-lm", "masked-lm"):
        return "lm"
    if loaded.head in ("image-classification", "sequence-classification") and int(
        getattr(loaded.model.config, "num_labels", -1)
    ) == n_classes:
        return "model-head"
    return "probe"


def verbaliser_ids(tokenizer, words: Sequence[str], *, decoder: bool) -> list[int]:
    """One token id per class word; a word that is not exactly one token is an error that shows its tokens.

    For decoders a leading space is tried first (the word follows the prompt text), then the bare word.
    """
    ids = []
    for word in words:
        tried = []
        for form in ([" " + word, word] if decoder else [word]):
            toks = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(toks) == 1:
                ids.append(int(toks[0]))
                break
            tried.append((form, tokenizer.convert_ids_to_tokens(toks)))
        else:
            shown = "; ".join(f"{f!r} -> {t}" for f, t in tried)
            raise NeurospecError(
                f"verbaliser word {word!r} is not a single token of this tokenizer ({shown}); choose another "
                "word for this class with --verbaliser CLASS=WORD (a short common word usually is one token)"
            )
    if len(set(ids)) != len(ids):
        raise NeurospecError(f"verbaliser words {list(words)} share a token; give each class its own word")
    return ids


def hard_prompt(loaded: LoadedModel, text: str) -> Prompt:
    """The embeddings of ``text``'s tokens (no special tokens) as a prompt; for masked LMs the mask token first."""
    tok = loaded.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if loaded.head == "masked-lm":
        ids = [tok.mask_token_id, *ids]
    if not ids:
        raise NeurospecError(f"the prompt text {text!r} has no tokens; give a non-empty --template")
    emb = loaded.model.get_input_embeddings()
    with torch.no_grad():
        vectors = emb(torch.tensor(ids, device=loaded.device)).detach().clone()
    return Prompt(vectors, text)


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


class PromptedModel:
    """A loaded model with a prompt layout and a readout (module docstring). The model is never changed."""

    def __init__(self, loaded: LoadedModel, n_classes: int, *, readout: str | None = None,
                 verbaliser: Sequence[int] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.loaded = loaded
        self.n_classes = n_classes
        self.readout = readout or default_readout(loaded, n_classes)
        if self.readout not in READOUTS:
            raise NeurospecError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if self.readout == "lm" and (verbaliser is None or len(verbaliser) != n_classes):
            raise NeurospecError("the lm readout needs one verbaliser token per class")
        self.verbaliser = torch.tensor(list(verbaliser), dtype=torch.long) if verbaliser is not None else None
        self.decoder = is_decoder(loaded)
        self.max_tokens = max_tokens
        self.probe: nn.Linear | None = None

    # ------------------------------------------------------------------------------------------- inputs
    def _text_inputs(self, texts: Sequence[str], prompt: Prompt) -> tuple[dict, Tensor, int]:
        tok, model = self.loaded.tokenizer, self.loaded.model
        emb = model.get_input_embeddings()
        device = self.loaded.device
        enc = tok(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_tokens)["input_ids"]
        vec = prompt.vectors.to(device=device, dtype=emb.weight.dtype)
        P, d = vec.shape
        L = P + max(len(e) for e in enc)
        embeds = torch.zeros(len(enc), L, d, dtype=vec.dtype, device=device)
        mask = torch.zeros(len(enc), L, dtype=torch.long, device=device)
        for b, ids in enumerate(enc):
            t = emb(torch.tensor(ids, dtype=torch.long, device=device)) if ids else vec[:0]
            row = torch.cat([t, vec]) if self.decoder else torch.cat([vec, t])
            n = row.shape[0]
            if self.decoder:
                embeds[b, L - n :] = row
                mask[b, L - n :] = 1
            else:
                embeds[b, :n] = row
                mask[b, :n] = 1
        kw: dict = {"inputs_embeds": embeds, "attention_mask": mask}
        if self.decoder and _accepts(model.forward, "position_ids"):
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        positions = torch.arange(L - P, L) if self.decoder else torch.arange(P)
        read = L - 1 if self.decoder else 0
        return kw, positions, read

    def inputs(self, items, prompt: Prompt | None) -> tuple[dict, Tensor, int]:
        """``(model keyword arguments, prompt positions [P], read position)`` of a batch of items."""
        if isinstance(items, Tensor):
            return {"pixel_values": items.to(self.loaded.device, self.loaded.dtype)}, torch.arange(1), 0
        if prompt is None:
            raise NeurospecError("text tasks need a prompt (hard or soft)")
        return self._text_inputs(items, prompt)

    # ------------------------------------------------------------------------------------------- forward
    def run_body(self, items, prompt: Prompt | None) -> Tensor:
        """Run the body (no head) on a batch; returns the final hidden states ``[batch, seq, d]``. While it runs,
        :attr:`current_positions` holds the batch's prompt positions (read by :func:`capture` hooks)."""
        kw, positions, _ = self.inputs(items, prompt)
        body = _body(self.loaded.model)
        if "position_ids" in kw and not _accepts(body.forward, "position_ids"):
            del kw["position_ids"]
        self.current_positions = positions
        return body(**kw).last_hidden_state

    def features(self, items, prompt: Prompt | None) -> Tensor:
        """Final hidden state at the read position ``[batch, d]`` (for the probe)."""
        kw, _, read = self.inputs(items, prompt)
        body = _body(self.loaded.model)
        if "position_ids" in kw and not _accepts(body.forward, "position_ids"):
            del kw["position_ids"]
        out = body(**kw)
        return out.last_hidden_state[:, read]

    def logits(self, items, prompt: Prompt | None) -> Tensor:
        """Class logits ``[batch, C]``."""
        model = self.loaded.model
        if self.readout == "probe":
            if self.probe is None:
                raise NeurospecError("the probe readout has no trained head yet: fit_probe first")
            feats = self.features(items, prompt)
            return self.probe(feats.to(self.probe.weight.dtype))
        kw, _, read = self.inputs(items, prompt)
        if self.readout == "model-head":
            return model(**kw).logits.float()
        if self.decoder and _accepts(model.forward, "logits_to_keep"):
            logits = model(**kw, logits_to_keep=1).logits[:, -1]
        else:
            logits = model(**kw).logits[:, read]
        return logits[:, self.verbaliser.to(logits.device)].float()

    def fit_probe(self, items, labels, prompt: Prompt | None, batch_size: int = 16) -> None:
        """Fit the linear head on frozen features of ``items`` (multinomial logistic regression, scikit-learn)."""
        from sklearn.linear_model import LogisticRegression

        with torch.no_grad():
            feats = torch.cat([self.features(_take(items, i, batch_size), prompt).float().cpu()
                               for i in range(0, len(labels), batch_size)])
        clf = LogisticRegression(max_iter=2000).fit(feats.numpy(), labels)
        probe = nn.Linear(feats.shape[1], self.n_classes)
        with torch.no_grad():
            coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
            bias = torch.as_tensor(clf.intercept_, dtype=torch.float32)
            if self.n_classes == 2:  # binary: one row for class 1 vs class 0
                coef, bias = torch.cat([-coef / 2, coef / 2]), torch.cat([-bias / 2, bias / 2])
            probe.weight.copy_(coef)
            probe.bias.copy_(bias)
        self.probe = probe.to(self.loaded.device)

    def new_probe(self) -> nn.Linear:
        """A fresh trainable head (seeded by the caller) for soft-prompt training with the probe readout."""
        self.probe = nn.Linear(self.loaded.sites.hidden_size, self.n_classes).to(self.loaded.device)
        return self.probe

    @torch.no_grad()
    def accuracy(self, items, labels, prompt: Prompt | None, batch_size: int = 16) -> float:
        correct = 0
        for i in range(0, len(labels), batch_size):
            pred = self.logits(_take(items, i, batch_size), prompt).argmax(-1).cpu()
            correct += int((pred == torch.as_tensor(labels[i : i + batch_size])).sum())
        return correct / max(1, len(labels))


def _body(model: nn.Module) -> nn.Module:
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) else model


def _take(items, start: int, n: int):
    return items[start : start + n]


@contextlib.contextmanager
def capture(model: nn.Module, sites: Sequence[Site], positions: Callable[[], Tensor],
            sink: Callable[[str, Tensor], None]) -> Iterator[None]:
    """While open, every forward calls ``sink(site, acts [batch, P, width])`` with each site's input at the
    positions returned by ``positions()`` (read at forward time). Hooks are removed on exit."""
    handles = []

    def make(site: Site):
        def hook(_module, args):
            x = args[0]
            sink(site.name, x[:, positions().to(x.device)].detach())

        return hook

    try:
        for s in sites:
            handles.append(model.get_submodule(s.module).register_forward_pre_hook(make(s)))
        yield
    finally:
        for h in handles:
            h.remove()

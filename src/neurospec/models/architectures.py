"""Where each model family keeps its neuron sites.

A :class:`Family` names, relative to one transformer block, the linear module that reads the MLP neurons, the one
that reads the attention neurons, and the MLP input projections. The block list is found by its dotted-path suffix.
Families are looked up by ``config.model_type``; a structural fallback handles unregistered models whose blocks look
like a transformer's, and anything else gets an :class:`~neurospec.errors.ArchitectureError` that says how to
register it with :func:`register_family`.

Mixture-of-experts families also name the fused experts module (``experts``) and, where they have one, the shared
expert's down projection (``shared_expert``); each routed expert becomes its own MLP site (see
:mod:`neurospec.models.experts`). A layer without the experts module (Qwen2-MoE's dense layers) falls back to
``mlp_reader``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from neurospec.errors import ArchitectureError
from neurospec.models.experts import check_fused_experts, is_fused_experts
from neurospec.models.linear import is_linear, linear_dims
from neurospec.models.sites import SHARED, Site, Sites, set_site_resolver, site_name


@dataclass(frozen=True)
class Family:
    """How to find the sites of one model family (all paths are relative to one block)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str  # dotted suffix of the ModuleList of blocks, e.g. "layers" or "encoder.layer"
    mlp_reader: str  # module whose input is the MLP neurons, e.g. "mlp.down_proj"
    attn_reader: str  # module whose input is the concatenated head outputs, e.g. "self_attn.o_proj"
    mlp_inputs: tuple[str, ...]  # MLP input projections, e.g. ("mlp.gate_proj", "mlp.up_proj")
    experts: str | None = None  # fused routed experts of a mixture-of-experts layer, e.g. "mlp.experts"
    shared_expert: str | None = None  # the shared expert's down projection, e.g. "mlp.shared_expert.down_proj"
    shared_inputs: tuple[str, ...] = ()  # the shared expert's input projections


_FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Register a model family. Raises if its name or one of its model types is already taken."""
    if not replace:
        if family.name in _FAMILIES:
            raise ValueError(f"family {family.name!r} is already registered")
        taken = [t for t in family.model_types if t in _BY_MODEL_TYPE]
        if taken:
            raise ValueError(f"model types {taken} already belong to family {_BY_MODEL_TYPE[taken[0]].name!r}")
    _FAMILIES[family.name] = family
    for t in family.model_types:
        _BY_MODEL_TYPE[t] = family
    return family


def families() -> dict[str, Family]:
    return dict(_FAMILIES)


register_family(
    Family(
        "llama",
        ("llama", "mistral", "mixtral_dense", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
         "smollm3", "phi3", "granite", "cohere", "stablelm"),
        "layers",
        "mlp.down_proj",
        "self_attn.o_proj",
        ("mlp.gate_proj", "mlp.up_proj"),
    )
)
register_family(Family("gpt2", ("gpt2",), "h", "mlp.c_proj", "attn.c_proj", ("mlp.c_fc",)))
register_family(
    Family(
        "gpt_neox", ("gpt_neox",), "layers", "mlp.dense_4h_to_h", "attention.dense", ("mlp.dense_h_to_4h",)
    )
)
register_family(Family("opt", ("opt",), "layers", "fc2", "self_attn.out_proj", ("fc1",)))
register_family(
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        "layer",
        "output.dense",
        "attention.output.dense",
        ("intermediate.dense",),
    )
)

register_family(Family("vit", ("vit", "deit"), "layers", "mlp.fc2", "attention.o_proj", ("mlp.fc1",)))

# Mixture-of-experts families: fused routed experts; `mlp_reader` serves layers that have a dense MLP instead.
register_family(Family("mixtral", ("mixtral",), "layers", "mlp.down_proj", "self_attn.o_proj",
                       ("mlp.gate_proj", "mlp.up_proj"), experts="mlp.experts"))
register_family(Family("olmoe", ("olmoe",), "layers", "mlp.down_proj", "self_attn.o_proj",
                       ("mlp.gate_proj", "mlp.up_proj"), experts="mlp.experts"))
register_family(Family("qwen2_moe", ("qwen2_moe",), "layers", "mlp.down_proj", "self_attn.o_proj",
                       ("mlp.gate_proj", "mlp.up_proj"), experts="mlp.experts",
                       shared_expert="mlp.shared_expert.down_proj",
                       shared_inputs=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")))


def _config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ArchitectureError(
            f"{type(model).__name__} has no `config`: neurospec needs a Hugging Face transformers model "
            "(PreTrainedModel) to find its neuron sites"
        )
    return getattr(cfg, "text_config", None) or cfg


def _find_blocks(model: nn.Module, suffix: str) -> tuple[str, nn.ModuleList] | None:
    parts = suffix.split(".")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name.split(".")[-len(parts):] == parts:
            return name, mod
    return None


def _n_heads(cfg) -> int | None:
    for attr in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _hidden_size(cfg) -> int | None:
    for attr in ("hidden_size", "n_embd", "d_model", "embed_dim"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _optional(block: nn.Module, rel: str | None) -> nn.Module | None:
    if rel is None:
        return None
    try:
        return block.get_submodule(rel)
    except AttributeError:
        return None


def _expert_sites(family: Family, prefix: str, i: int, block: nn.Module, experts: nn.Module) -> list[Site]:
    """One MLP site per routed expert of block ``i``, then the shared expert's site if the family has one."""
    path = f"{prefix}.{i}.{family.experts}"
    n, width, _ = check_fused_experts(experts, path)
    sites = [Site(site_name(i, "mlp", e), "mlp", i, width, path, expert=e, param=f"{path}.down_proj")
             for e in range(n)]
    shared = _optional(block, family.shared_expert)
    if shared is not None:
        if not is_linear(shared):
            raise ArchitectureError(f"{prefix}.{i}.{family.shared_expert} is a {type(shared).__name__}, not linear")
        inputs = tuple(f"{prefix}.{i}.{r}" for r in family.shared_inputs if _optional(block, r) is not None)
        sites.append(Site(site_name(i, "mlp", SHARED), "mlp", i, linear_dims(shared)[0],
                          f"{prefix}.{i}.{family.shared_expert}", inputs=inputs, shared_expert=True))
    return sites


def _build(model: nn.Module, family: Family, prefix: str, blocks: nn.ModuleList, cfg) -> Sites:
    n_heads = _n_heads(cfg)
    sites: list[Site] = []
    for i, block in enumerate(blocks):
        for kind, rel in (("mlp", family.mlp_reader), ("attn", family.attn_reader)):
            experts = _optional(block, family.experts) if kind == "mlp" else None
            if experts is not None:
                sites.extend(_expert_sites(family, prefix, i, block, experts))
                continue
            try:
                mod = block.get_submodule(rel)
            except AttributeError:
                raise ArchitectureError(
                    f"family {family.name!r}: block {prefix}.{i} has no module {rel!r}; "
                    "the model does not match its registered family (register a Family for it)"
                ) from None
            if not is_linear(mod):
                raise ArchitectureError(f"{prefix}.{i}.{rel} is a {type(mod).__name__}, not a linear module")
            width, _ = linear_dims(mod)
            heads = d_head = None
            inputs: tuple[str, ...] = ()
            if kind == "attn" and n_heads:
                if width % n_heads:
                    raise ArchitectureError(f"attention width {width} is not a multiple of {n_heads} heads")
                heads, d_head = n_heads, width // n_heads
            if kind == "mlp":
                found = []
                for r in family.mlp_inputs:
                    try:
                        block.get_submodule(r)
                    except AttributeError:
                        continue
                    found.append(f"{prefix}.{i}.{r}")
                inputs = tuple(found)
            sites.append(Site(site_name(i, kind), kind, i, width, f"{prefix}.{i}.{rel}", heads, d_head, inputs))
    hidden = _hidden_size(cfg) or linear_dims(model.get_submodule(sites[0].module))[1]
    return Sites(family.name, tuple(sites), hidden)


def _structural_family(blocks: nn.ModuleList, hidden: int | None) -> Family | None:
    """Guess a family from one block: the attention reader is the last linear inside a submodule named like
    attention that writes the hidden size; the MLP reader is the last linear outside it that narrows to the hidden
    size; MLP inputs are the linears outside attention that widen to the MLP width."""
    block = blocks[0]
    linears = [(n, m) for n, m in block.named_modules() if n and is_linear(m)]
    if not linears or hidden is None:
        return None

    def in_attn(name: str) -> bool:
        return any(p in ("attn", "attention", "self_attn", "self_attention") for p in name.split("."))

    attn = [n for n, m in linears if in_attn(n) and linear_dims(m)[1] == hidden]
    mlp_readers = [n for n, m in linears if not in_attn(n) and linear_dims(m)[1] == hidden and linear_dims(m)[0] > hidden]
    if not attn or not mlp_readers:
        return None
    mlp_reader = mlp_readers[-1]
    width = linear_dims(block.get_submodule(mlp_reader))[0]
    inputs = tuple(n for n, m in linears if not in_attn(n) and linear_dims(m) == (hidden, width))
    return Family("structural", (), "", mlp_reader, attn[-1], inputs)


def resolve_sites(model: nn.Module) -> Sites:
    cfg = _config(model)
    model_type = getattr(cfg, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is not None:
        found = _find_blocks(model, family.blocks)
        if found is None:
            raise ArchitectureError(
                f"model type {model_type!r} (family {family.name!r}) should have a ModuleList of blocks named "
                f"'*.{family.blocks}', but {type(model).__name__} has none"
            )
        return _build(model, family, found[0], found[1], cfg)
    # Structural fallback: the longest ModuleList of identical blocks.
    candidates = [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1
    ]
    if candidates:
        prefix, blocks = max(candidates, key=lambda nm: len(nm[1]))
        fused = [n for n, m in blocks[0].named_modules() if is_fused_experts(m)]
        if fused:
            raise ArchitectureError(
                f"model type {model_type!r} ({type(model).__name__}) is a mixture-of-experts model whose experts are "
                f"fused into 3-D weights ({prefix}.0.{fused[0]}); no linear module reads an expert's neurons, so the "
                "structural fallback cannot find them. If its experts hold `gate_up_proj` [E, 2*width, hidden] and "
                "`down_proj` [E, hidden, width] like Mixtral's, register the family: neurospec.models.register_family("
                f"Family(name, ({model_type!r},), blocks='layers', mlp_reader='mlp.down_proj', "
                f"attn_reader='self_attn.o_proj', mlp_inputs=(), experts={fused[0]!r}))"
            )
        guess = _structural_family(blocks, _hidden_size(cfg))
        if guess is not None:
            return _build(model, guess, prefix, blocks, cfg)
    known = ", ".join(sorted(_BY_MODEL_TYPE))
    raise ArchitectureError(
        f"cannot find the neuron sites of model type {model_type!r} ({type(model).__name__}). neurospec looked for a "
        f"registered family (model types: {known}) and then for a list of transformer blocks each holding an "
        "attention submodule with an output projection and an MLP with a down projection. Register the family: "
        "neurospec.models.register_family(Family(name, (model_type,), blocks='layers', mlp_reader='mlp.down_proj', "
        "attn_reader='self_attn.o_proj', mlp_inputs=('mlp.up_proj',)))"
    )


set_site_resolver(resolve_sites)

"""Plain MLP stacks (a module without a transformers ``config`` whose ``nn.Linear`` layers chain, such as an
``nn.Sequential`` of linear layers and activations): the family ``plain-mlp`` beside the transformers families of
:mod:`neurospec.models.architectures`.

Hidden layer ``h`` is the site ``layers.h.mlp``: the input of linear layer ``h + 1`` (the activation of linear layer
``h``'s output), with linear layer ``h`` as its input projection. Ablation, recording hooks and MoEfication then work
on it as on a transformer.
"""

from __future__ import annotations

from torch import nn

from neurospec.errors import ArchitectureError
from neurospec.models.sites import Site, Sites, find_sites, site_name

PLAIN_MLP = "plain-mlp"


def is_plain_mlp(model: nn.Module) -> bool:
    """True for a module without a transformers ``config`` (its sites come from :func:`plain_mlp_sites`)."""
    return getattr(model, "config", None) is None


def plain_mlp_sites(model: nn.Module) -> Sites:
    """Sites of a plain stack of linear layers: hidden layer ``h`` = the input of linear layer ``h + 1``."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise ArchitectureError(
            f"{type(model).__name__} has {len(linears)} linear layer(s); a plain MLP needs at least one hidden layer"
        )
    sites = []
    for h, ((name_in, lin), (name_out, nxt)) in enumerate(zip(linears, linears[1:], strict=False)):
        if lin.out_features != nxt.in_features:
            raise ArchitectureError(f"linear layers {name_in} and {name_out} do not chain: not a plain MLP stack")
        sites.append(Site(site_name(h, "mlp"), "mlp", h, lin.out_features, name_out, inputs=(name_in,)))
    return Sites(PLAIN_MLP, tuple(sites), int(linears[0][1].in_features))


def model_sites(model: nn.Module) -> Sites:
    """The sites of any supported model: a plain MLP stack, or a transformer of a registered or recognised family."""
    return plain_mlp_sites(model) if is_plain_mlp(model) else find_sites(model)

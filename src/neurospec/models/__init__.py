"""Models: loading (hub ids, local directories, .gguf files, bundled aliases) and their neuron sites."""

from neurospec.models.architectures import Family, families, register_family
from neurospec.models.sites import NeuronId, Site, Sites, find_sites

__all__ = ["Family", "families", "register_family", "NeuronId", "Site", "Sites", "find_sites"]

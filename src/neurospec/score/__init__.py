"""Neuron scorers: a registry of functions from recorded statistics to one score per neuron."""

from neurospec.score.selective import SCORERS, register_scorer, score_neurons

__all__ = ["SCORERS", "register_scorer", "score_neurons"]

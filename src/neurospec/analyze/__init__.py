"""Analyses over neuron sets and clusters: overlaps, chance baselines, p-values, importance, alignment."""

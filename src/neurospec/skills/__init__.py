"""Skill neurons (METHODS.md section 4): neurons whose activation at the prompt positions predicts a task's label.

- ``prompting``: prompt vectors (hard or soft), the input layout and the class readout of any model;
- ``predictivity``: streaming accumulators, predictivity, aggregation over prompt runs, per-layer top-p selection;
- ``collect``: the two passes (training means, dev counts) over a labelled task;
- ``perturb``: accuracy under noise or zeroing of neuron sets, random same-per-layer-count controls, p-values,
  and task similarity;
- ``soft``: soft prompts trained with peft prompt tuning on the frozen model, saved and reused.
"""

"""Figures (matplotlib, PNG + SVG) and the self-contained HTML report of a run."""

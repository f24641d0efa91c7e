"""The README's method tables, rendered from the registries (scorers, ablation methods, clusterers, sparsity
methods, architecture families). ``python -m neurospec.cli.docs README.md`` rewrites the tables between their ``<!-- registry:NAME -->``
markers; a test checks that the README holds exactly what this renders."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _rows(header: tuple[str, str], rows) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{_cell(a)}` | {_cell(b)} |" for a, b in rows]
    return "\n".join(lines)


def tables() -> dict[str, str]:
    """``{registry name: markdown table}``."""
    from neurospec.cluster import METHODS
    from neurospec.intervene.ablate import ablation_methods
    from neurospec.models.architectures import families
    from neurospec.score.selective import SCORERS
    from neurospec.sparsity import methods

    return {
        "scorers": _rows(("score", "formula"), ((s.name, s.formula) for s in SCORERS.values())),
        "ablations": _rows(("ablation", "what it does"),
                           ((m.name, m.description) for m in ablation_methods().values())),
        "clusterers": _rows(("clusterer", "graphs"),
                            ((m.name, f"{', '.join(m.graphs)} (default {m.default_graph}): {m.description}")
                             for m in METHODS.values())),
        "sparsity": _rows(("sparsity method", "what it does"),
                          ((m.name, m.description) for m in methods().values())),
        "families": _rows(("architecture family", "Hugging Face model types"),
                          ((f.name, ", ".join(f.model_types)) for f in families().values())),
    }


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- registry:{name} -->\n)(.*?)(\n<!-- /registry:{name} -->)", re.S)


def read_tables(text: str) -> dict[str, str]:
    """The tables of a README text, by registry name."""
    return {name: m.group(2) for name in tables() if (m := _block(name).search(text))}


def render(text: str) -> str:
    """``text`` with every registry table replaced by its rendering."""
    for name, table in tables().items():
        text = _block(name).sub(lambda m, t=table: m.group(1) + t + m.group(3), text)
    return text


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text()))

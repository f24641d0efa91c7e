"""The ``neurospec`` command: a thin typer + rich layer over the Python API."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="neurospec",
    help="Find which neurons of a transformer specialise in which task, and what ablating them does.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from neurospec.cli import ablation_cmds, cluster_cmds, foundation, sparsity_cmds, tasks_cmds  # noqa: F401  (commands register themselves on `app`)


def main() -> None:
    from neurospec.cli.common import tune_allocator

    tune_allocator()
    _register()
    app()

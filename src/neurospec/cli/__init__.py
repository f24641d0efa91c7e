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
    from neurospec.cli import (  # noqa: F401  (commands register themselves on `app`)
        ablation_cmds,
        cluster_cmds,
        foundation,
        skills_cmds,
        sparsity_cmds,
        tasks_cmds,
        wasserstein_cmds,
    )


def main() -> None:
    """The ``neurospec`` entry point. Each command handles its own errors (``cli.common.handle_errors``); this
    catches what escapes them (say, a failing import), with the same rules: a user error is one line and exit
    code 2, anything else a traceback and a line asking for a report."""
    import sys

    from neurospec.cli.common import report_exception, tune_allocator

    try:
        tune_allocator()
        _register()
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        sys.exit(report_exception(e))

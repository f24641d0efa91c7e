"""The ``neurospec`` command: a thin typer + rich layer over the Python API.

Modules, named after what the user does: :mod:`.inspect` (models, tasks, sites), :mod:`.record`,
:mod:`.selectivity` (prune, taskmap), :mod:`.ablation` (evaluate, ablate), :mod:`.clusters` (cluster,
specialization, align, route), :mod:`.zoo`, :mod:`.run` (the main job, report), :mod:`.skills`, :mod:`.sparsity`, :mod:`.wasserstein`.
They register their commands on :data:`neurospec.cli.app.app`; the options they share are in :mod:`.options`.
"""

from __future__ import annotations

from neurospec.cli.app import app

COMMAND_MODULES = ("inspect", "record", "selectivity", "ablation", "clusters", "zoo", "run", "skills", "sparsity", "wasserstein")

__all__ = ["COMMAND_MODULES", "app", "main"]


def _register() -> None:
    """Import the command modules (each registers its commands on ``app``); importing them is cheap (no torch)."""
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"neurospec.cli.{name}")


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

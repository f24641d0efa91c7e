"""The typer application every command module registers its commands on (kept apart from ``cli/__init__`` so that
command modules import it without importing the package that imports them).

Help texts that list the names of a registry (scorers, ablation methods, clusterers, sparsity methods) hold a
placeholder ``{registry:NAME}``; :class:`Command` fills it in from :data:`HELP` only when help is shown, so that
starting the command line does not import the registries (and torch) they live beside.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import typer
from typer.core import TyperCommand

HELP: dict[str, Callable[[], str]] = {}
_PLACEHOLDER = re.compile(r"\{registry:([a-z_]+)\}")


def help_text(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register the function that renders the placeholder ``{registry:NAME}`` of a help text."""

    def deco(fn: Callable[[], str]) -> Callable[[], str]:
        HELP[name] = fn
        return fn

    return deco


def fill(text: str | None) -> str | None:
    """``text`` with its ``{registry:NAME}`` placeholders rendered."""
    if not text:
        return text
    return _PLACEHOLDER.sub(lambda m: HELP[m.group(1)](), text)


class Command(TyperCommand):
    """A typer command whose help texts are completed from the registries when help is formatted."""

    def format_help(self, ctx, formatter) -> None:
        self.help = fill(self.help)
        for p in self.params:
            if getattr(p, "help", None):
                p.help = fill(p.help)
        return super().format_help(ctx, formatter)


app = typer.Typer(
    name="neurospec",
    help="Find which neurons of a transformer specialise in which task, and what ablating them does.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

zoo_app = typer.Typer(help="Small vision models trained here on scikit-learn's digits (image classes as tasks).",
                      no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


def command(name: str, on: typer.Typer = app):
    """``app.command(name)`` with :class:`Command` (registry placeholders in help texts)."""
    return on.command(name, cls=Command)

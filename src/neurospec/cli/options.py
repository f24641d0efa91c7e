"""Options shared by the commands: one name, one meaning and one default each.

Budgets: ``--tokens`` is always the number of tokens *recorded* per task (statistics, selectivity scores, mean
offsets), ``--eval-tokens`` always the number of tokens *evaluated* per task (metrics before and after an
intervention); ``--seq-len`` is the length of every sequence. Commands that evaluate but record nothing
(``evaluate``, ``ablate``) still accept their former ``--tokens`` (the evaluation budget) with a deprecation note on
stderr. Each function returns a fresh ``typer.Option`` (typer keeps state on option objects, so none is reused).
"""

from __future__ import annotations

import typer

TOKENS = 4_096
EVAL_TOKENS = 1_024
SEQ_LEN = 256
BATCH_SIZE = 8

MODEL_HELP = "bundled alias (see `neurospec models`), model directory, .gguf file or hub id"
ALLOW_PICKLE_HELP = ("also load pickled PyTorch weights (.bin) when a model directory has no safetensors; unpickling "
                     "can run code, so only for models you trust")
THREADS_HELP = ("torch/BLAS/OpenMP threads (default 1: on a busy 2-core machine one thread was 7x faster than two for "
                "these many small products); 0 leaves torch's setting")


def model(help: str = MODEL_HELP, default=...):
    return typer.Option(default, "--model", "-m", help=help)


def tokens(what: str = "statistics"):
    return typer.Option(TOKENS, "--tokens", help=f"tokens recorded per task ({what})")


def eval_tokens(what: str = ""):
    return typer.Option(EVAL_TOKENS, "--eval-tokens",
                        help="tokens evaluated per task" + (f" ({what})" if what else ""))


def deprecated_tokens():
    """The former ``--tokens`` of commands that only evaluate: now ``--eval-tokens`` (hidden from the help)."""
    return typer.Option(None, "--tokens", hidden=True, help="deprecated: use --eval-tokens")


def seq_len():
    return typer.Option(SEQ_LEN, "--seq-len", help="tokens per sequence")


def batch_size(default: int = BATCH_SIZE):
    return typer.Option(default, "--batch-size", help="sequences per forward pass")


def device():
    return typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps or auto (device_map=auto)")


def dtype():
    return typer.Option(None, "--dtype", help="float32 (default), bfloat16, float16")


def seed(help: str | None = None):
    return typer.Option(0, "--seed", help=help)


def threads():
    return typer.Option(1, "--threads", help=THREADS_HELP)


def allow_pickle():
    return typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP)


def force(help: str = "replace results of another command or configuration in --out"):
    return typer.Option(False, "--force", help=help)


def out(help: str | None = None, default=...):
    return typer.Option(default, "--out", "-o", help=help)


def json_():
    return typer.Option(False, "--json", help="machine-readable output on stdout")


def eval_budget(eval_tokens: int, old_tokens: int | None) -> int:
    """The evaluation budget of a command whose ``--tokens`` became ``--eval-tokens``: the old flag still works,
    with a note on stderr; both at once is an error."""
    from neurospec.cli.common import err
    from neurospec.errors import NeurospecError

    if old_tokens is None:
        return eval_tokens
    if eval_tokens != EVAL_TOKENS:
        raise NeurospecError("give --eval-tokens only (--tokens here is its deprecated old name)")
    err.print("[yellow]deprecated:[/] --tokens of this command is the evaluation budget; use --eval-tokens "
              f"{old_tokens} (--tokens now always means tokens recorded per task)", highlight=False,
              soft_wrap=True)
    return old_tokens


# ------------------------------------------------------------------ help texts read from the registries (lazily)

from neurospec.cli.app import help_text  # noqa: E402


@help_text("scorers")
def _scorers() -> str:
    from neurospec.score.selective import SCORERS

    return "; ".join(f"{s.name}: {s.formula}" for s in SCORERS.values())


def _ablation_list(names) -> str:
    from neurospec.intervene.ablate import get_ablation

    return "; ".join(f"{n} ({get_ablation(n).description})" for n in names)


@help_text("study_ablations")
def _study_ablations() -> str:
    return _ablation_list(study_ablations())


@help_text("fold_ablations")
def _fold_ablations() -> str:
    return _ablation_list(fold_ablations())


@help_text("prune_ablations")
def _prune_ablations() -> str:
    from neurospec.experiments.selective import ABLATIONS

    return _ablation_list(ABLATIONS)


@help_text("specialization_ablations")
def _specialization_ablations() -> str:
    from neurospec.evaluate.site_ablation import ABLATIONS

    return _ablation_list(ABLATIONS)


@help_text("clusterers")
def _clusterers() -> str:
    from neurospec.cluster import METHODS

    return "; ".join(f"{m.name} (graphs: {', '.join(m.graphs)}; default {m.default_graph})" for m in METHODS.values())


@help_text("zoo_kinds")
def _zoo_kinds() -> str:
    from neurospec.models.digits import KINDS

    return ", ".join(KINDS)


@help_text("sparsity_methods")
def _sparsity_methods() -> str:
    from neurospec.sparsity import methods

    return "; ".join(f"{m.name} ({m.description})" for m in methods().values())


def study_ablations() -> list[str]:
    """The ablation methods the command line can run in a study: those whose values come from a reference run."""
    from neurospec.intervene.ablate import study_methods

    return list(study_methods())


def fold_ablations() -> list[str]:
    """The methods that fold into weights (constants per neuron), among :func:`study_ablations`."""
    from neurospec.intervene.ablate import get_ablation

    return [m for m in study_ablations() if not get_ablation(m).per_input]

"""The registries are the one place that names scorers, ablation methods, clusterers and sparsity methods: the
command line's help, the README's tables and the configs' checks read them."""

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from neurospec.cli import _register, app
from neurospec.cli.app import fill
from neurospec.errors import NeurospecError

_register()
README = Path(__file__).resolve().parents[1] / "README.md"


def option_help(command: list[str], option: str) -> str:
    """The rendered help text of one option of a (sub)command."""
    cmd = typer.main.get_command(app)
    for name in command:
        cmd = cmd.commands[name]
    (param,) = [p for p in cmd.params if option in getattr(p, "opts", ())]
    return fill(param.help)


def listed(text: str) -> list[str]:
    """The names of an "a (...); b (...)" or "a: ...; b: ..." list in a help text."""
    return re.findall(r"(?:^|[:,]\s|;\s)([a-z][a-z_-]*)(?::| \()", text)


def registries():
    from neurospec.cluster import METHODS
    from neurospec.intervene.ablate import ablation_methods, get_ablation, study_methods
    from neurospec.models.architectures import families
    from neurospec.score.selective import SCORERS
    from neurospec.sparsity import methods

    return {
        "scorers": list(SCORERS),
        "ablations": list(ablation_methods()),
        "study": list(study_methods()),
        "fold": [m for m in study_methods() if not get_ablation(m).per_input],
        "clusterers": list(METHODS),
        "sparsity": list(methods()),
        "families": list(families()),
    }


@pytest.mark.parametrize(("command", "option", "registry"), [
    (["prune"], "--score", "scorers"),
    (["taskmap"], "--score", "scorers"),
    (["specialization"], "--score", "scorers"),
    (["ablate"], "--methods", "study"),
    (["ablate"], "--method", "fold"),
    (["cluster"], "--method", "clusterers"),
    (["sparsify"], "--method", "sparsity"),
])
def test_help_lists_exactly_the_registry(command, option, registry):
    text = option_help(command, option)
    assert "{registry:" not in text
    body = text.split("): ", 1)[1] if registry == "study" else text.split(": ", 1)[1]
    assert listed(body) == registries()[registry], text


def test_registered_scorer_appears_in_the_shown_help(monkeypatch):
    """A scorer registered at run time shows up in `prune --help` (the help is read from the registry)."""
    from neurospec.score import selective

    monkeypatch.setitem(selective.SCORERS, "mine", selective.Scorer("mine", selective.SCORERS["abs"].fn, "my ratio"))
    r = CliRunner().invoke(app, ["prune", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0 and "mine: my ratio" in r.stdout, r.stdout


def test_readme_tables_are_the_registries():
    from neurospec.cli.docs import read_tables, tables

    assert read_tables(README.read_text()) == tables(), "run `python -m neurospec.cli.docs README.md`"
    text = README.read_text()
    for registry, names in registries().items():
        if registry in ("study", "fold"):
            continue
        block = read_tables(text)[registry]
        assert re.findall(r"^\| `([^`]+)` \|", block, re.M) == names


@pytest.mark.parametrize("build", [
    lambda: __import__("neurospec.experiments.selective", fromlist=["x"]).PruneConfig(score="nope"),
    lambda: __import__("neurospec.experiments.taskmap", fromlist=["x"]).TaskMapConfig(score="nope"),
    lambda: __import__("neurospec.experiments.specialization", fromlist=["x"]).SpecializationConfig(score="nope"),
    lambda: __import__("neurospec.experiments.main", fromlist=["x"]).RunConfig(score="nope"),
], ids=["PruneConfig", "TaskMapConfig", "SpecializationConfig", "RunConfig"])
def test_configs_refuse_an_unknown_score(build):
    from neurospec.score.selective import SCORERS

    with pytest.raises(NeurospecError, match=f"unknown score 'nope'; choose one of {', '.join(SCORERS)}"):
        build()


def test_every_method_and_graph_has_a_clusterer_and_dispatch_goes_through_it(monkeypatch):
    import neurospec.cluster as cl
    from neurospec.experiments import clusters

    assert sorted(cl.CLUSTERERS) == sorted((m.name, g) for m in cl.METHODS.values() for g in m.graphs)
    calls = []

    def fake(target, sites, cfg, step):
        calls.append((cfg.method, cfg.graph, sites))
        return {"layers.0.mlp": [0, 1]}, None, "per_layer", {}

    monkeypatch.setitem(cl.CLUSTERERS, ("spectral", "correlation"),
                        cl.Clusterer("spectral", "correlation", fake, ("k",)))

    class Target:
        spec = "stub"
        analysis_kind = "lm"

        def mlp_sites(self, layers):
            return ["layers.0.mlp"]

        def describe(self):
            return {"name": "stub"}

    res = clusters.cluster(Target(), clusters.ClusterConfig(method="spectral", graph="correlation"))
    assert calls == [("spectral", "correlation", ["layers.0.mlp"])] and res.method == "spectral"
    with pytest.raises(ValueError, match="not a registered method and graph"):
        cl.register_clusterer(cl.Clusterer("spectral", "params", fake))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ablation_methods": ("zero", "nope")}, "unknown ablation method 'nope'"),
    ({"ablation_methods": ("value",)}, "takes constants from the caller"),
    ({"ablation_kind": "heads"}, "ablation_kind must be one of"),
    ({"eval_tokens": 0}, "eval_tokens must be a positive integer"),
    ({"prune_frac": 0}, "prune_frac must be in"),
])
def test_run_config_checks_its_options_before_any_work(kwargs, match):
    from neurospec.experiments.main import RunConfig

    with pytest.raises(NeurospecError, match=match):
        RunConfig(**kwargs)

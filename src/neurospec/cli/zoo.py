"""`neurospec zoo train`: small vision models trained here on scikit-learn's digits."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from neurospec.cli import options as opt
from neurospec.cli.app import command, zoo_app
from neurospec.cli.common import check_seed, claim_out, emit, handle_errors

out = Console()


@command("train", on=zoo_app)
@handle_errors
def zoo_train_cmd(
    kind: str = typer.Argument(..., help="model to train: {registry:zoo_kinds}"),
    out_dir: Path = opt.out(),
    seed: int = opt.seed(),
    epochs: int = typer.Option(None, help="training epochs (default: the model's, 30 for the MLP, 40 for the ViT)"),
    force: bool = opt.force("write into an --out that holds something else"),
    json_: bool = opt.json_(),
) -> None:
    """Train a digits model (seeded, about a minute at most on one CPU core) and save it to --out."""
    from neurospec.errors import NeurospecError
    from neurospec.experiments import zoo

    trainers = {"digits-mlp": zoo.train_digits_mlp, "digits-vit": zoo.train_digits_vit}
    if kind not in trainers:
        raise NeurospecError(f"unknown zoo model {kind!r}; choose one of {', '.join(zoo.KINDS)}")
    if epochs is not None and epochs < 1:
        raise NeurospecError(f"epochs must be >= 1, got {epochs}")
    check_seed(seed)
    claim_out(out_dir, "zoo train", force)
    t0 = time.perf_counter()
    model = trainers[kind](seed=seed, **({} if epochs is None else {"epochs": epochs}))
    zoo.save(model, out_dir)
    payload = {"kind": kind, "seed": seed, "test_accuracy": model.test_accuracy,
               "train_accuracy": model.train_accuracy, "out": str(out_dir),
               "seconds": round(time.perf_counter() - t0, 2)}
    emit(payload, json_, lambda: out.print(
        f"{kind} (seed {seed}): test accuracy {model.test_accuracy:.4f}, train {model.train_accuracy:.4f}; "
        f"saved to {out_dir}"))

"""Shared pieces of the command line: JSON output, errors, progress bars on stderr, model and task options."""

from __future__ import annotations

import contextvars
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from neurospec.allocator import tune_allocator  # noqa: F401 - the command line's entry point calls it from here

err = Console(stderr=True)


def emit(obj: Any, as_json: bool, human: Callable[[], None] | None = None) -> None:
    """Machine-readable output on stdout with ``--json``; otherwise the human rendering."""
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()
    elif human is not None:
        human()


INTERNAL_ERROR = "neurospec: internal error, please report it with the traceback above"


def _os_error_text(e: OSError) -> str:
    if e.strerror and e.filename is not None:
        names = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{e.strerror}: {names}"
    return e.strerror or str(e) or type(e).__name__


def report_exception(e: BaseException) -> int:
    """Print an exception the way the command line does and return the exit code.

    User errors (:class:`~neurospec.errors.NeurospecError`, an ``OSError`` such as a full disk or a denied
    permission, running out of memory) print one line and give 2; anything else is a bug: its traceback, then a line
    asking for a report, and 1.
    """
    from neurospec.errors import NeurospecError

    if isinstance(e, NeurospecError):
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    if isinstance(e, OSError):
        err.print(f"[bold red]error:[/] {escape(_os_error_text(e))}", highlight=False, soft_wrap=True)
        return 2
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch's (CUDA) out of memory
        first = (str(e).splitlines() or [""])[0]
        err.print(f"[bold red]error:[/] out of memory{': ' + escape(first) if first else ''}; lower --batch-size or "
                  "--seq-len, or use a smaller --dtype", highlight=False, soft_wrap=True)
        return 2
    import traceback

    sys.stderr.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    sys.stderr.write(INTERNAL_ERROR + "\n")
    sys.stderr.flush()
    return 1


def handle_errors(fn: Callable) -> Callable:
    """The top-level handler of each command: user errors are one clear line on stderr and exit code 2, anything
    else a traceback with a line saying it is a bug (exit code 1); typer's and click's own exits pass through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _options.set(dict(kwargs))
        try:
            return fn(*args, **kwargs)
        except _passthrough():
            raise
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: finished work is saved; run the same command again to resume")
            raise typer.Exit(130) from None
        except Exception as e:
            raise typer.Exit(report_exception(e)) from None
        finally:
            _options.reset(token)

    return wrapper


# the options of the command that runs (typer passes every option as a keyword), for its --out claim
_options: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("neurospec_options", default=None)


def _passthrough() -> tuple[type[BaseException], ...]:
    """typer's (and click's) own exits and usage errors, which typer reports itself."""
    usage = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    return (typer.Exit, typer.Abort, *usage)


# ------------------------------------------------------------------------------------ option checks (before work)

DTYPES = ("float32", "bfloat16", "float16")


def _fail(message: str) -> None:
    from neurospec.errors import NeurospecError

    raise NeurospecError(message)


def check_int(option: str, value: int | None, minimum: int = 1) -> None:
    """``value`` (when given) must be an integer >= ``minimum``."""
    if value is not None and value < minimum:
        _fail(f"{option} must be {'a positive integer' if minimum == 1 else f'>= {minimum}'}, got {value}")


def check_seed(value: int | None, option: str = "--seed") -> None:
    if value is not None and value < 0:
        _fail(f"{option} must be a non-negative integer, got {value}")


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """Comma-separated non-negative integers, at least one."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        _fail(f"{option} must be comma-separated non-negative integers (e.g. 0,1,2), got {text!r}")
    if len(set(seeds)) != len(seeds):
        _fail(f"{option} names a seed more than once: {text!r}")
    return seeds


def check_fraction(option: str, value: float | None, *, zero_ok: bool = False) -> None:
    """``value`` in (0, 1] (or [0, 1] with ``zero_ok``)."""
    if value is None:
        return
    if not (0 <= value <= 1) or (value == 0 and not zero_ok):
        _fail(f"{option} must be in {'[0, 1]' if zero_ok else '(0, 1]'}, got {value}")


def check_choice(option: str, value: str | None, choices) -> None:
    if value is not None and value not in choices:
        _fail(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")


def check_dtype(dtype: str | None) -> None:
    check_choice("--dtype", dtype, DTYPES)


def check_device(device: str | None) -> None:
    """``None``, ``auto`` (needs a GPU), or a torch device this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    if device is None:
        return
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            _fail("--device auto spreads a model over GPUs, and no CUDA GPU is visible: use --device cpu")
        return

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        _fail(f"unknown --device {device!r}; use cpu, cuda, cuda:N, mps or auto (device_map=auto)")
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            _fail(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            _fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                  f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
        return
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            _fail(f"--device {device}: MPS is not available on this machine; use --device cpu")
        return
    _fail(f"unsupported --device {device!r}; use cpu, cuda, cuda:N, mps or auto")


def check_model_options(device: str | None, dtype: str | None) -> None:
    """A known dtype, a device this machine has, and a dtype that device runs (float16 is refused on the CPU; see
    :mod:`neurospec.models.placement`)."""
    from neurospec.models.placement import check_dtype_for_device

    check_dtype(dtype)
    check_device(device)
    check_dtype_for_device(dtype, device)


def check_scorer(name: str | None, option: str = "--score") -> None:
    """A scorer of the registry (:data:`neurospec.score.selective.SCORERS`)."""
    from neurospec.score.selective import check_score

    if name is not None:
        check_score(name, option)


def check_ablation_methods(names, option: str, allowed=None) -> None:
    """Every name is a registered ablation method (and among ``allowed`` when given)."""
    from neurospec.intervene.ablate import ablation_methods

    known = list(allowed) if allowed is not None else list(ablation_methods())
    if not names:
        _fail(f"{option} names no ablation method; choose from {', '.join(known)}")
    for n in names:
        check_choice(option, n, known)


def check_tasks(specs, option: str = "--task") -> None:
    """Parse every task spec (bad names and options fail here, before a model is loaded) and refuse the same name
    twice or names that differ only by case."""
    from neurospec.data.images import image_task
    from neurospec.data.tasks import check_task_names, parse_task_spec

    names = []
    for s in specs or ():
        img = image_task(s) if isinstance(s, str) else None
        names.append(img.name if img is not None else parse_task_spec(s).name)
    check_task_names(names)


# ----------------------------------------------------------------------------------- result directories, models


def _model_dir(model: str) -> Path | None:
    """The directory a model spec loads from (a model directory, a .gguf file's folder, a bundled package)."""
    from neurospec.models import loading

    bundled = getattr(loading, "BUNDLED", {})
    if model in bundled:
        try:
            p = Path(loading._package_path(bundled[model]))
        except Exception:  # a bundled package that is not installed: load_model says so later
            return None
    else:
        p = Path(model).expanduser()
    if p.is_file():
        p = p.parent
    return p.resolve() if p.exists() else None


def check_save_dir(save: Path | None, *, model: str, force: bool, option: str = "--save",
                   out_dir: Path | None = None) -> None:
    """A directory a model is saved into must be new or empty (unless ``force``), and never the directory the
    model is loaded from nor the command's --out."""
    if save is None:
        return
    save = Path(save).expanduser()
    target = save.resolve()
    src = _model_dir(model)
    if src is not None and target == src:
        _fail(f"{option} {save} is the directory the model is loaded from; saving there would overwrite the "
              "original model: choose another directory")
    if out_dir is not None and target == Path(out_dir).expanduser().resolve():
        _fail(f"{option} {save} is also --out (the results directory); save the model elsewhere")
    if save.exists() and not save.is_dir():
        _fail(f"{option} {save} exists and is not a directory: choose another directory")
    if save.is_dir() and any(save.iterdir()) and not force:
        _fail(f"{option} {save} is not empty; choose a new or empty directory, or add --force to write into it")


_NOT_CONFIG = {"json_", "force", "out_dir", "device", "threads", "save", "allow_pickle"}


def _normal(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def command_config(exclude=()) -> dict:
    """The configuration of the running command: its options as given (defaults included), without those that do
    not change its results (output flags, --force, --out, --device, --threads, --save, --allow-pickle). A model
    given as a local path is recorded by its absolute path."""
    params = _options.get() or {}
    cfg = {k: _normal(v) for k, v in params.items() if k not in _NOT_CONFIG and k not in set(exclude)}
    model = cfg.get("model")
    if isinstance(model, str) and Path(model).expanduser().exists():
        cfg["model"] = str(Path(model).expanduser().resolve())
    return cfg


def set_config(**values: Any) -> None:
    """Record resolved option values (a default filled in, a deprecated flag mapped to its new name) in the running
    command's configuration, so that its --out claim does not depend on how the user spelled them."""
    params = _options.get()
    if params is not None:
        params.update(values)


def claim_out(out_dir: Path, command: str, force: bool, exclude=()) -> Path:
    """Claim ``--out`` for this command and configuration (:func:`neurospec.record.layout.claim_out_dir`)."""
    from neurospec.record.layout import claim_out_dir

    return claim_out_dir(out_dir, command, command_config(exclude), force=force)


def load_model_cli(model: str, *, device: str | None = None, dtype: str | None = None, allow_pickle: bool = False):
    """``load_model`` for the commands; ``--allow-pickle`` is passed on when this ``load_model`` takes it."""
    from neurospec.models.loading import load_model

    return load_model(model, device=device, dtype=dtype, **pickle_kwargs(load_model, allow_pickle))


def pickle_kwargs(fn: Callable, allow_pickle: bool) -> dict:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {"allow_pickle": allow_pickle} if "allow_pickle" in params else {}


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


ESTIMATE_ABOVE_S = 30.0  # estimates of shorter work are not printed


def print_estimate(command: str, seconds: float, detail: str) -> None:
    """Say on stderr, before long work starts, how long it will take (off with ``NEUROSPEC_NO_PROGRESS``, and for
    work expected to take under :data:`ESTIMATE_ABOVE_S` seconds)."""
    if os.environ.get("NEUROSPEC_NO_PROGRESS") or seconds < ESTIMATE_ABOVE_S:
        return
    minutes = seconds / 60
    about = f"{max(1, round(minutes))} minute{'s' if round(minutes) > 1 else ''}" if minutes < 90 else \
        f"{minutes / 60:.1f} hours"
    err.print(f"{command}: this takes about {about} on this machine ({detail})", highlight=False, markup=False,
              soft_wrap=True)


def forward_throughput(loaded: Any, seq_len: int) -> float | None:
    """Tokens per second of the model's forward pass, timed on one sequence of ``seq_len`` random token ids after a
    two-token pass that warms up (the machine as it is now, load included); ``None`` for a model that does not read
    token ids."""
    import time

    import torch

    config = getattr(loaded.model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab or getattr(loaded, "analysis_kind", None) == "image":
        return None
    device = next(loaded.model.parameters()).device
    ids = torch.randint(0, int(vocab), (1, max(2, int(seq_len))), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded.model(input_ids=ids[:, :2].to(device))  # the first pass reads the weights in (a cached model is mapped)
        t0 = time.perf_counter()
        loaded.model(input_ids=ids.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return ids.numel() / max(seconds, 1e-9)


FORWARD_OVERHEAD = 1.3  # evaluating (metrics) and recording (statistics) against the bare forward pass, measured
# on SmolLM2-135M on 2 CPU cores: 0.75x and 0.9x its tokens/s


def estimate_forward(command: str, loaded: Any, seq_len: int, tokens: int, detail: str = "") -> None:
    """:func:`print_estimate` of work that costs about ``tokens`` forward-pass tokens, at the throughput
    :func:`forward_throughput` measures now divided by :data:`FORWARD_OVERHEAD` (nothing measured or printed with
    ``NEUROSPEC_NO_PROGRESS``)."""
    if os.environ.get("NEUROSPEC_NO_PROGRESS"):
        return
    rate = forward_throughput(loaded, seq_len)
    if rate is None:
        return
    print_estimate(command, FORWARD_OVERHEAD * tokens / rate,
                   f"about {tokens:,} forward-pass tokens at {rate:,.0f} tokens/s"
                   + (f"; {detail}" if detail else ""))


class LogLines:
    """Progress as plain lines on stderr, for when stderr is not a terminal (batch jobs write logs): one line when a
    label starts, when it finishes, and at most every ``every`` seconds in between (``NEUROSPEC_PROGRESS_EVERY``,
    default 60), each with done/total, the elapsed time and an estimate of the time left."""

    def __init__(self, unit: str = "", every: float | None = None):
        self.unit = unit
        self.every = float(os.environ.get("NEUROSPEC_PROGRESS_EVERY", 60)) if every is None else every
        self._start: dict[str, tuple[float, int, int]] = {}
        self._done: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._label: dict[str, str] = {}

    def __call__(self, label: str, done: int, total: int, key: str | None = None) -> None:
        """``key``: what the timer follows (default: the label); counted steps whose label names the current step
        pass one key for all of them, so elapsed time and time left cover the whole count."""
        import time

        now = time.monotonic()
        key = label if key is None else key
        start = self._start.get(key)
        if (start is None or start[2] != total or done < self._done.get(key, 0)
                or (done == 0 and label != self._label.get(key))):
            # a new count under the same key (a phase with another total, one that starts over, or another label
            # at 0): a new timer, so that the rate and time of the earlier phase do not leak into this one
            self._start[key] = (now, done, total)
            self._done[key] = done
            self._label.pop(key, None)
        elif done < total and now - self._last.get(key, 0.0) < self.every and label == self._label.get(key):
            self._done[key] = done
            return
        self._last[key] = now
        self._label[key] = label
        self._done[key] = done
        t0, d0, _ = self._start[key]
        elapsed = now - t0
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        line = f"{label}: {done:,}/{total:,}{' ' + self.unit if self.unit else ''}{pct}, {_duration(elapsed)} elapsed"
        if done >= total:
            line += ", done"
        elif done > d0 and elapsed > 0:
            line += f", about {_duration((total - done) * elapsed / (done - d0))} left"
        err.print(line, highlight=False, markup=False, soft_wrap=True)


class _Bar:
    """Progress on stderr, off when ``NEUROSPEC_NO_PROGRESS`` is set: a rich display (subclasses draw it) when stderr
    is a terminal, otherwise :class:`LogLines`."""

    unit = ""

    def __init__(self, enabled: bool, *columns):
        from rich.progress import Progress as RichProgress

        self.enabled = enabled and not os.environ.get("NEUROSPEC_NO_PROGRESS")
        self.log = None if err.is_terminal else LogLines(self.unit)
        self._bar = RichProgress(*columns, console=err, transient=False)

    @property
    def live(self) -> bool:
        return self.enabled and self.log is None

    def __enter__(self):
        if self.live:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self._bar.__exit__(*exc)


class Progress(_Bar):
    """One bar per label with tokens/s, driven by ``(label, done, total)`` callbacks (recording, evaluation)."""

    unit = "tokens"

    def __init__(self, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        super().__init__(enabled, TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("tokens"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
        self._tasks: dict[str, int] = {}
        self._t0: dict[str, tuple[float, int]] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        import time

        if not self.enabled:
            return
        if self.log is not None:
            return self.log(label, done, total)
        now = time.perf_counter()
        if label not in self._tasks:
            self._tasks[label] = self._bar.add_task(label, total=total, completed=done, rate="")
            self._t0[label] = (now, done)
            return
        t0, d0 = self._t0[label]
        rate = f"{(done - d0) / (now - t0):,.0f} tok/s" if now > t0 else ""
        self._bar.update(self._tasks[label], completed=done, total=total, rate=rate)


class Steps(_Bar):
    """One bar for counted steps (ablations, shuffles) whose label changes, driven by ``(label, done, total)``."""

    def __init__(self, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        super().__init__(enabled, TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn())
        self._task: int | None = None

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.log is not None:
            return self.log(label, done, total, key="steps")
        if self._task is None:
            self._task = self._bar.add_task(label, total=total, completed=done)
        else:
            self._bar.update(self._task, description=label, completed=done, total=total)


def finish_distributed() -> None:
    """Leave the process group (see :func:`neurospec.record.distributed.leave_process_group`)."""
    from neurospec.record.distributed import leave_process_group

    leave_process_group()


def init_distributed(device: str | None = None) -> str | None:
    """Join the process group when started by torchrun; returns this rank's device (see
    :func:`neurospec.record.distributed.join_process_group`)."""
    from neurospec.record.distributed import join_process_group

    return join_process_group(device)

"""What the model fingerprint costs: sha256 over every byte of every weight of SmolLM2-135M.

Loads the model once, then times :func:`neurospec.models.loading.model_fingerprint` ``--repeats`` times with the
default thread count and with one thread, and prints the medians with the machine's CPU model::

    python benchmarks/fingerprint_speed.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import neurospec
    from neurospec.models import loading

    loaded = neurospec.load_model(args.model)
    state = loaded.model.state_dict()
    distinct = {t.untyped_storage().data_ptr(): t for t in state.values()}  # tied weights are read once
    n_bytes = sum(t.numel() * t.element_size() for t in distinct.values())
    arms = {}
    real_cpu_count = os.cpu_count
    for name, cpus in (("default", None), ("one_thread", 1)):
        if cpus is not None:
            os.cpu_count = lambda c=cpus: c
        try:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fp = loading.model_fingerprint(loaded.model)
                times.append(time.perf_counter() - t0)
        finally:
            os.cpu_count = real_cpu_count
        assert fp == loaded.fingerprint
        arms[name] = {"median_s": round(statistics.median(times), 3), "times_s": [round(t, 3) for t in times]}
    res = {
        "model": args.model,
        "bytes": n_bytes,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **arms,
    }
    print(json.dumps(res, indent=2) if args.json else res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])

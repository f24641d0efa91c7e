#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md in one command: every CPU benchmark, one after the other (never two at once:
# they time the machine), each JSON written to DIR (default benchmarks/out). Run it on a quiet machine:
#     bash benchmarks/cpu_suite.sh [DIR]
# Recording and the selective-pruning step run twice: with glibc's thresholds pinned as the command line pins them
# (tune_allocator) and with glibc's defaults; recording a third time on the torch reference path (no kernels).
# About 35 minutes on 2 cores of a 2026 server CPU (peak memory last, each arm in a fresh process).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DIR="${1:-benchmarks/out}"
mkdir -p "$DIR"
export NEUROSPEC_NO_PROGRESS=1
PIN=(env MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296)
DEFAULT=(env -u MALLOC_MMAP_THRESHOLD_ -u MALLOC_TRIM_THRESHOLD_ NEUROSPEC_NO_MALLOPT=1)

run() {  # run NAME CMD...: one benchmark, its JSON to DIR/NAME.json, a line on stderr
  local name=$1
  shift
  echo "cpu_suite: $name" >&2
  local t0=$SECONDS
  "$@" > "$DIR/$name.json"
  echo "cpu_suite: $name done in $((SECONDS - t0)) s" >&2
}

run record_pinned "${PIN[@]}" "$PY" benchmarks/record_overhead.py --json --repeats 3
run record_default "${DEFAULT[@]}" "$PY" benchmarks/record_overhead.py --json --repeats 3
run record_pinned_torch "${PIN[@]}" "$PY" benchmarks/record_overhead.py --json --repeats 3 --no-kernels
run prune_pinned "${PIN[@]}" "$PY" benchmarks/prune_speed.py --json --repeats 3
run prune_default "${DEFAULT[@]}" "$PY" benchmarks/prune_speed.py --json --repeats 3
run sparsity "${PIN[@]}" "$PY" benchmarks/sparsity_speed.py --json --repeats 2
run wasserstein "${PIN[@]}" "$PY" benchmarks/wasserstein_speed.py --json --repeats 3
run skills "${PIN[@]}" "$PY" benchmarks/skills_speed.py --json --repeats 3
run memory "$PY" benchmarks/memory_peak.py --json --tokens 8192 --eval-tokens 4096
echo "cpu_suite: JSON in $DIR" >&2

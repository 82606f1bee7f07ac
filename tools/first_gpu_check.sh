#!/usr/bin/env bash
# First run on a GPU node: confirm or refute what the code claims about GPUs, one PASS/FAIL/SKIP line per check.
#
#   tools/first_gpu_check.sh [--quick] [--only NAME[,NAME...]] [--jobs N] [--keep] [--json FILE]
#   tools/first_gpu_check.sh --list              # the check names
#
# Needs: one CUDA GPU (>= 40 GB; 80 GB or more leaves room for the concurrent tiny runs), the GPU environment
# (`make env-gpu`: the CUDA torch, optionally transformer-engine / flash-attn / apex), ~10 GB free under $TMPDIR, and
# about ten minutes. Nothing is downloaded: the data, checkpoints and models are synthetic and built on the spot.
# Without CUDA it runs as a CPU smoke test (GPU-only checks print SKIP with the reason); --quick takes ~1-2 minutes.
#
# Reading the output: a "[  t s] STATUS name detail" line as each check finishes, then a summary in fixed order:
#   PASS  the claim holds on this node; the detail gives the numbers it was judged by (errors vs tolerances,
#         memory, step time, sync counts)
#   FAIL  refuted (or the run crashed): the detail says what differed, or quotes the error and names the log file
#   SKIP  could not be checked here, and why (no CUDA, Transformer Engine not installed, ...) -- never a pass
# Exit status 1 if any check failed; the work directory with every process's log is then kept and printed.
# README.md ("First GPU node") says what each line checks and what to do when it fails.
#
# PY selects the interpreter (default: the repository's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec "$PY" tools/first_gpu_check.py "$@"

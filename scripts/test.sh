#!/usr/bin/env bash
# Set up a virtualenv on Python 3.12 (from .python-version) and run lint + the test suite.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh test
.venv/bin/ruff check .
# Bytecode caching on, even where the environment turns it off: every gateway and sandbox the
# suite starts (~100) would otherwise compile teegate's sources again (~0.15 s of CPU each), and
# each pytest process its test modules (~6 s). __pycache__/ is in .gitignore.
unset PYTHONDONTWRITEBYTECODE
# Two workers (pytest-xdist): most tests wait on their gateway and sandbox processes, so two
# test processes keep both cores busy. loadfile: a module's tests, and so its module-scoped
# processes, stay on one worker; no-loadscope-reorder: files go out in collection order, so
# the two one-test bench files (the longest tests) start early instead of being left to the end.
# Arguments given here come after, so "-n 0" runs everything in this one process.
.venv/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"

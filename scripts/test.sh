#!/usr/bin/env bash
# Set up a virtualenv on Python 3.12 (from .python-version) and run lint + the test suite.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/pytest -q "$@"

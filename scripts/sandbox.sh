#!/usr/bin/env bash
# Set up (first run only takes a while) and start the local sandbox:
# a simulated confidential upstream plus the gateway in front of it. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh sandbox
exec .venv/bin/teegate sandbox "$@"

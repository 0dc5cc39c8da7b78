#!/usr/bin/env bash
# Create .venv with the pinned Python (3.12, see .python-version) and install teegate into it.
# Sourced by scripts/sandbox.sh (teegate alone) and by scripts/test.sh as `setup.sh test` (the
# test extra, then the system packages the tests use: scripts/setup-test-deps.sh). Safe to run
# again (it only updates).
set -euo pipefail
want="$(cat .python-version)"
py=""
for candidate in "python${want%.*}" "$HOME/.pyenv/versions/$want/bin/python" python3; do
  if command -v "$candidate" >/dev/null 2>&1 \
     && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    py="$candidate"; break
  fi
done
if [ -z "$py" ] && command -v pyenv >/dev/null 2>&1; then
  pyenv install -s "$want" && py="$(pyenv root)/versions/$want/bin/python"
fi
[ -n "$py" ] || { echo "teegate needs Python 3.12 (see .python-version)" >&2; exit 1; }
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  rm -rf .venv
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
if [ "${1:-}" = test ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
  bash scripts/setup-test-deps.sh
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi

#!/usr/bin/env bash
# Create .venv with the pinned Python (3.12, see .python-version) and install teegate into it.
# Sourced by scripts/test.sh and scripts/sandbox.sh; safe to run again (it only updates).
set -euo pipefail
# The PostgreSQL ledger's tests start a throwaway PostgreSQL (15+) cluster (tests/support/postgres.py):
# install the server binaries (and its 'postgres' user) when missing. Only where apt exists and
# we are root (CI, the dev container); elsewhere the tests say what is missing.
if [ -z "${TEEGATE_PG_BIN:-}" ] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
   && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
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
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# The Node clients of tests/compat (openai for Node, the Vercel AI SDK), from the committed lock
# file. Their tests fail, never skip, without Node: install it from Debian's packages if missing.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "warning: node/npm missing; tests/compat's Node rows will fail" >&2
  fi
fi
# node_modules/.installed-lock: the lock file it was installed from (npm ci only when it changed).
compat_node=tests/compat/node
if command -v npm >/dev/null 2>&1 \
   && ! cmp -s "$compat_node/package-lock.json" "$compat_node/node_modules/.installed-lock"; then
  (cd "$compat_node" && npm ci --no-audit --no-fund --loglevel=error >/dev/null \
     && cp package-lock.json node_modules/.installed-lock)
fi
# The dashboard's browser tests (tests/dashboard/) drive Debian's chromium through Playwright;
# Playwright's own browser download is never used (the network refuses it). Only when missing.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium is missing and cannot be installed here (apt-get install chromium);" \
         "the dashboard's browser tests will be skipped" >&2
  fi
fi

#!/usr/bin/env bash
# System packages the test suite uses, installed from Debian's packages only when missing (one
# `apt-get update` at most), then the Node clients of tests/compat from their lock file.
# Run by scripts/setup.sh test; the tests that need one of these fail, never skip, under CI.
#   postgresql  the PostgreSQL ledger's throwaway cluster (tests/support/postgres.py)
#   nodejs npm  openai for Node and the Vercel AI SDK (tests/compat)
#   chromium    the dashboard's browser tests, driven by Playwright (never its own browser download)
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
if [ -z "${TEEGATE_PG_BIN:-}" ] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  missing+=(postgresql)
fi
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing ${missing[*]} (apt-get install ${missing[*]}, as root);" \
         "the tests that use them will fail" >&2
  fi
fi
# node_modules/.installed-lock: the lock file it was installed from (npm ci only when it changed).
compat_node=tests/compat/node
if command -v npm >/dev/null 2>&1 \
   && ! cmp -s "$compat_node/package-lock.json" "$compat_node/node_modules/.installed-lock"; then
  (cd "$compat_node" && npm ci --no-audit --no-fund --loglevel=error >/dev/null \
     && cp package-lock.json node_modules/.installed-lock)
fi

#!/usr/bin/env bash
# Install everything and run the whole test suite: ruff, the browser client's
# unit tests (node), then pytest in both configurations:
#   1. real: MariaDB (shards split over two databases) and Redis;
#   2. embedded: SQLite and the in-process layer.
# Extra arguments go to pytest (for example: scripts/test.sh -k login).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\033[1m[test]\033[0m %s\n' "$*"; }

PUSH_CREATE_DATABASES="pushsite pushsite_shard_a pushsite_shard_b" scripts/setup.sh --dev

say "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

say "node: the browser client's unit tests"
node --test tests/js/*.test.mjs

export PUSH_ENV=test
run_pytest() {  # label, then env assignments for that configuration
  local label=$1; shift
  say "pytest: $label"
  local rc=0
  env "$@" .venv/bin/python -m pytest -p no:cacheprovider "${PYTEST_ARGS[@]}" || rc=$?
  if [[ $rc -eq 5 ]]; then
    say "pytest collected no tests in the $label configuration: that is a failure"; exit 1
  fi
  if [[ $rc -ne 0 ]]; then
    say "pytest failed in the $label configuration (exit $rc)"; exit "$rc"
  fi
}
PYTEST_ARGS=("$@")

run_pytest "MariaDB + Redis" \
  DATABASE_URL=mysql://root@127.0.0.1:3306/pushsite \
  PUSH_SHARD_DATABASE_URLS=mysql://root@127.0.0.1:3306/pushsite_shard_a,mysql://root@127.0.0.1:3306/pushsite_shard_b \
  REDIS_URL=redis://127.0.0.1:6379/15

run_pytest "embedded (SQLite + in-process)" -u DATABASE_URL -u REDIS_URL -u CELERY_BROKER_URL \
  PUSH_VAR_DIR="$(mktemp -d)"

say "all configurations passed"

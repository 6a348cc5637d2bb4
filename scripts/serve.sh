#!/usr/bin/env bash
# Install everything and run pushsite: daphne serving /ws/push/, the push API
# and the Django admin on http://127.0.0.1:8000, database migrated.
#   scripts/serve.sh              MariaDB + Redis (started if stopped)
#   scripts/serve.sh --embedded   SQLite + in-process layer, for a first look
# Environment: see docs/configuration in README.md; HOST and PORT pick the address.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\033[1m[serve]\033[0m %s\n' "$*"; }

if [[ "${1:-}" == "--embedded" ]]; then
  unset DATABASE_URL REDIS_URL
  scripts/setup.sh
else
  export DATABASE_URL=${DATABASE_URL:-mysql://root@127.0.0.1:3306/pushsite}
  export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
  scripts/setup.sh
fi
export PUSH_ENV=${PUSH_ENV:-local}

say "migrating the database and creating the shard tables"
.venv/bin/python manage.py migrate --noinput
.venv/bin/python manage.py init_push_tables
if [[ "$PUSH_ENV" == "local" ]]; then
  .venv/bin/python manage.py ensure_admin
fi

HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
say "pushsite on http://$HOST:$PORT (WebSocket ws://$HOST:$PORT/ws/push/, admin /admin/)"
exec .venv/bin/daphne -b "$HOST" -p "$PORT" --proxy-headers pushsite.asgi:application

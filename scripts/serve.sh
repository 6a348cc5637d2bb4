#!/usr/bin/env bash
# Install everything, migrate the database and run the whole service under one
# supervisor (honcho, deploy/Procfile.local), each process's log lines prefixed
# with its name; Ctrl-C or SIGTERM stops all of them, and so does one dying:
#   daphne       ws://HOST:PORT/ws/push/, the admin, the demo   (PORT, default 8000)
#   API node     http://HOST:API_PORT/api/ (uvicorn)            (API_PORT, default 8100)
#   Celery worker (push jobs, periodic runs) and beat (schedules in the database)
#
#   scripts/serve.sh              MariaDB + Redis (started if stopped)
#   scripts/serve.sh --nginx      the same, plus nginx on http://HOST:NGINX_PORT (default 8080)
#                                 serving /ws/ and /api/ at one address
#   scripts/serve.sh --embedded   one daphne process on PORT: SQLite, in-process layer,
#                                 jobs inline; for a first look
# HOST (default 127.0.0.1) is the interface they bind; every other setting is an
# environment variable (README.md, Configuration).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\033[1m[serve]\033[0m %s\n' "$*"; }

EMBEDDED=0
NGINX_SITE=0
for arg in "$@"; do
  case "$arg" in
    --embedded) EMBEDDED=1 ;;
    --nginx) NGINX_SITE=1 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) say "unknown option: $arg (see --help)"; exit 2 ;;
  esac
done
if ((EMBEDDED && NGINX_SITE)); then
  say "--embedded is one process; --nginx needs the full service"; exit 2
fi

HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
API_PORT=${API_PORT:-8100}
NGINX_PORT=${NGINX_PORT:-8080}
# host:port, with an IPv6 address in brackets.
address() { if [[ $1 == *:* ]]; then echo "[$1]:$2"; else echo "$1:$2"; fi; }

if ((EMBEDDED)); then
  unset DATABASE_URL REDIS_URL CELERY_BROKER_URL PUSH_SHARD_DATABASE_URLS
  export PUSH_JOBS=inline
  scripts/setup.sh
else
  export DATABASE_URL=${DATABASE_URL:-mysql://root@127.0.0.1:3306/pushsite}
  export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
  if ((NGINX_SITE)); then scripts/setup.sh --nginx; else scripts/setup.sh; fi
fi
export PUSH_ENV=${PUSH_ENV:-local}

say "migrating the database and creating the shard tables"
.venv/bin/python manage.py migrate --noinput
.venv/bin/python manage.py init_push_tables
if [[ "$PUSH_ENV" == "local" ]]; then
  .venv/bin/python manage.py ensure_admin
fi

if ((EMBEDDED)); then
  say "pushsite on http://$(address "$HOST" "$PORT") (WebSocket ws://$(address "$HOST" "$PORT")/ws/push/, admin /admin/)"
  exec .venv/bin/daphne -b "$HOST" -p "$PORT" pushsite.asgi:application
fi

# beat only queues what is registered; registering keeps edits made in the admin.
say "registering the periodic schedules"
.venv/bin/python manage.py schedules register

export HOST API_PORT
export WS_PORT=$PORT
# /api/push/config is answered by the API node, whose own address is not where
# sockets go: it names nginx's address with --nginx, else daphne's.
case "$HOST" in 0.0.0.0 | :: | "") public_host=$(hostname -f 2>/dev/null || hostname) ;; *) public_host=$HOST ;; esac
processes=(web api worker beat)
if ((NGINX_SITE)); then
  # Not NGINX: nginx reads that variable for inherited sockets.
  NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
  var_dir=${PUSH_VAR_DIR:-var}
  [[ $var_dir == /* ]] || var_dir="$(pwd)/$var_dir"
  NGINX_PREFIX="$var_dir/nginx"
  export NGINX_BIN NGINX_PREFIX
  # The nodes bind HOST; nginx reaches a wildcard address on loopback.
  case "$HOST" in 0.0.0.0 | :: | "") upstream_host=127.0.0.1 ;; *) upstream_host=$HOST ;; esac
  mkdir -p "$NGINX_PREFIX"
  # The shipped site, adapted: one node of each kind on this machine's ports,
  # plain HTTP on NGINX_PORT, daphne serving /static/ (PUSH_SERVE_STATIC), and
  # Host with its port ($http_host), which Django's CSRF check compares with
  # the Origin of an admin login.
  # Every change must match once: a changed site fails here, not in a browser.
  SITE_IN=deploy/nginx/pushsite.conf SITE_OUT="$NGINX_PREFIX/site.conf" \
    LISTEN="$(address "$HOST" "$NGINX_PORT")" NODE="$(address "$upstream_host" "$PORT")" \
    API="$(address "$upstream_host" "$API_PORT")" .venv/bin/python - <<'EOF'
import os
import re
from pathlib import Path

site = Path(os.environ["SITE_IN"]).read_text()
for pattern, replacement in [
    (r"(upstream pushsite_nodes \{\n    ip_hash;\n)(?:    server .*\n)+", rf"\g<1>    server {os.environ['NODE']};\n"),
    (r"(upstream pushsite_api \{\n)(?:    server .*\n)+", rf"\g<1>    server {os.environ['API']};\n"),
    (r"server \{\n    listen 80;\n(?:.*\n)*?\}\n\n", ""),
    (r"    listen 443 ssl http2( backlog=\d+);\n    listen \[::\]:443 ssl http2 backlog=\d+;\n", rf"    listen {os.environ['LISTEN']}\g<1>;\n"),
    (r"(?:    ssl_.*\n)+", ""),
    (r"    location /static/ \{\n(?:.*\n)*?    \}\n\n", ""),
]:
    site, count = re.subn(pattern, replacement, site)
    assert count == 1, f"deploy/nginx/pushsite.conf changed: {pattern!r} matched {count} times"
site, count = re.subn(r"proxy_set_header Host \$host;", "proxy_set_header Host $http_host;", site)
assert count == 3, f"deploy/nginx/pushsite.conf changed: {count} Host headers"
Path(os.environ["SITE_OUT"]).write_text(site)
EOF
  # Paths under the prefix, so nginx needs no root-owned file; as root its
  # workers stay root to read them.
  user_line=""
  if ((EUID == 0)); then user_line="user root;"; fi
  cat >"$NGINX_PREFIX/nginx.conf" <<EOF
daemon off;
worker_processes 1;
$user_line
pid $NGINX_PREFIX/nginx.pid;
error_log stderr warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $NGINX_PREFIX/body;
    proxy_temp_path $NGINX_PREFIX/proxy;
    fastcgi_temp_path $NGINX_PREFIX/fastcgi;
    uwsgi_temp_path $NGINX_PREFIX/uwsgi;
    scgi_temp_path $NGINX_PREFIX/scgi;
    include $NGINX_PREFIX/site.conf;
}
EOF
  "$NGINX_BIN" -p "$NGINX_PREFIX" -e stderr -c "$NGINX_PREFIX/nginx.conf" -t -q
  processes+=(nginx)
  export PUSH_WS_PUBLIC_URL=${PUSH_WS_PUBLIC_URL:-ws://$(address "$public_host" "$NGINX_PORT")/ws/push/}
  say "nginx on http://$(address "$HOST" "$NGINX_PORT"): /ws/push/ and pages to daphne, /api/ to the API node"
else
  export PUSH_WS_PUBLIC_URL=${PUSH_WS_PUBLIC_URL:-ws://$(address "$public_host" "$PORT")/ws/push/}
fi

say "daphne on http://$(address "$HOST" "$PORT") (WebSocket /ws/push/, admin /admin/, demo /demo/)"
say "API node on http://$(address "$HOST" "$API_PORT")/api/ (clients' config: /api/push/config)"
say "Celery worker and beat; Ctrl-C stops everything"
# exec: honcho is this process, so a SIGTERM sent to serve.sh reaches it. Its
# environment is this one (--env /dev/null): the migrations ran with it, and a
# stray .env must not point the processes at another database.
exec .venv/bin/honcho start --env /dev/null -f deploy/Procfile.local "${processes[@]}"

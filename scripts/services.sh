#!/usr/bin/env bash
# Start MariaDB and Redis when they are installed but stopped, and wait for them.
set -euo pipefail
say() { printf '\033[1m[services]\033[0m %s\n' "$*"; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

wait_for() {  # name, seconds, command...
  local name=$1 seconds=$2; shift 2
  for _ in $(seq "$((seconds * 5))"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  say "$name did not come up in ${seconds}s"; return 1
}

mariadb_up() { mysqladmin --protocol=tcp -h127.0.0.1 -P3306 -uroot ping; }
if ! mariadb_up >/dev/null 2>&1; then
  say "starting MariaDB"
  as_root mkdir -p /run/mysqld
  as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_for MariaDB 60 mariadb_up
fi

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; }
if ! redis_up >/dev/null 2>&1; then
  say "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis 20 redis_up
fi

# Root over TCP with no password is how this machine's MariaDB is set up for
# development; a database URL with credentials works the same way.
for db in ${PUSH_CREATE_DATABASES:-pushsite}; do
  mysql --protocol=tcp -h127.0.0.1 -uroot -e \
    "CREATE DATABASE IF NOT EXISTS \`$db\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
done

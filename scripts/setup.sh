#!/usr/bin/env bash
# Install everything pushsite needs on a Debian machine and make sure MariaDB
# and Redis are running. Idempotent: a second run only checks.
#   scripts/setup.sh            runtime packages
#   scripts/setup.sh --dev      runtime + test/lint packages (and nginx)
#   scripts/setup.sh --nginx    runtime packages and nginx (scripts/serve.sh --nginx)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

DEV=0
NGINX=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 NGINX=1 ;;
    --nginx) NGINX=1 ;;
    *) say "unknown option: $arg (use --dev or --nginx)"; exit 2 ;;
  esac
done

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    say "need root for: $*"; return 1; fi
}

# --- Debian packages (mysqlclient needs headers and a compiler) -------------
PACKAGES=(default-libmysqlclient-dev build-essential pkg-config python3-dev python3-venv)
command -v mariadbd >/dev/null 2>&1 || [[ -x /usr/sbin/mariadbd ]] || PACKAGES+=(mariadb-server)
command -v redis-server >/dev/null 2>&1 || PACKAGES+=(redis-server)
if ((DEV)); then
  # Browser tests drive Debian's Chromium through its chromedriver (nothing is
  # downloaded); the client's unit tests run on Node's own test runner.
  PACKAGES+=(chromium chromium-driver)
  # The two-node test runs a real nginx in front of daphne over wss.
  PACKAGES+=(openssl)
  # A real Prometheus (and promtool) scrapes the nodes; Sentinel fails Redis over.
  PACKAGES+=(prometheus redis-sentinel)
  command -v node >/dev/null 2>&1 || PACKAGES+=(nodejs)
fi
((NGINX)) && PACKAGES+=(nginx)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq </dev/null
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
fi

# --- Python virtual environment ---------------------------------------------
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $($PYTHON --version)"
  $PYTHON -m venv .venv
fi
REQ=requirements.txt
((DEV)) && REQ=requirements-dev.txt
# The stamp names the requirements' hash and the set installed (1: dev, which
# includes the runtime set), so a runtime run after a dev install (serve.sh
# after test.sh) installs nothing; a dev run after a runtime one adds the rest.
hash=$(cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)
stamp=".venv/.installed-$hash-$DEV"
if [[ ! -f ".venv/.installed-$hash-1" && ! -f "$stamp" ]]; then
  say "installing Python packages from $REQ"
  .venv/bin/python -m pip install -q --disable-pip-version-check -U pip </dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$REQ" </dev/null
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# --- services ----------------------------------------------------------------
scripts/services.sh

#!/usr/bin/env bash
# README's test command: install what the tests need, then run them all.
#
# The tests use real parts: Debian's Chromium (browser tests), redis-server
# (the Redis-backed room and the benchmark's reference), nginx (the
# load-balanced deployment) and a C compiler (the load generator).  Missing
# Debian packages are installed with apt-get (as root, or through sudo);
# Python packages go into .venv.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v redis-server >/dev/null || need+=(redis-server)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need+=(nginx)
command -v cc >/dev/null || need+=(gcc)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q "${need[@]}"
fi

python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/pytest "$@"

#!/usr/bin/env bash
# Set up a fresh machine: Debian tools the tests and demo use, then a virtualenv
# with tlscache installed (editable) and its development tools.
# --tests: also the servers the tests start (memcached, Redis, Apache httpd).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ "${1:-}" = "--tests" ]; then
  # The stores' and the mixed farm's tests start real servers of each kind.
  command -v memcached >/dev/null 2>&1 || [ -x /usr/bin/memcached ] || need+=(memcached)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
  command -v apache2 >/dev/null 2>&1 || [ -x /usr/sbin/apache2 ] || need+=(apache2)
  # Go's TLS client resumes only by ticket: the shared ticket keys are tested with it.
  command -v go >/dev/null 2>&1 || [ -x /usr/lib/go/bin/go ] || need+=(golang-go)
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing Debian packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "bootstrap: please install these packages first: ${need[*]}" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating the virtualenv .venv/"
  "$PY" -m venv .venv
fi
stamp=.venv/.tlscache-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # pip prints one line per package it collects and installs: a first run takes about a minute.
  echo "bootstrap: [1/2] upgrading pip in .venv/"
  .venv/bin/python -m pip install --upgrade pip
  echo "bootstrap: [2/2] installing tlscache (editable) with its farm, dev and uvloop extras"
  .venv/bin/python -m pip install -e '.[dev,farm,uvloop]'
  touch "$stamp"
  echo "bootstrap: .venv/ is ready"
fi

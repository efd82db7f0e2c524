#!/usr/bin/env bash
# Installs Debian's PostgreSQL server binaries for tests/test_postgres_store.py, which starts its own
# throwaway server (initdb + pg_ctl in a temp dir). Idempotent: does nothing when initdb is there.
# Prints one line.
set -euo pipefail
find_initdb() {
  command -v initdb 2>/dev/null && return 0
  ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 | grep . && return 0
  return 1
}
if found=$(find_initdb); then
  echo "install_postgres: $("$found" --version 2>/dev/null || echo "$found") already installed"
  exit 0
fi
source "$(dirname "$0")/apt.sh"
# Only the binaries are wanted: no system cluster, no service (the tests run their own server).
need_root install_postgres postgresql
"${SUDO[@]}" mkdir -p /etc/postgresql-common
[ -e /etc/postgresql-common/createcluster.conf ] ||
  echo "create_main_cluster = false" | "${SUDO[@]}" tee /etc/postgresql-common/createcluster.conf >/dev/null
apt_install install_postgres --no-install-recommends postgresql
found=$(find_initdb) || { echo "install_postgres: installed, but initdb was not found" >&2; exit 1; }
echo "install_postgres: installed $("$found" --version)"

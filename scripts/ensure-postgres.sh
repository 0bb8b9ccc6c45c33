#!/usr/bin/env bash
# Makes sure a PostgreSQL server is installed for the PgLock tests (they
# start a throwaway cluster of their own; see
# crates/interlock/tests/support/pg.rs). Installs the distribution's package
# when missing and running as root; never starts, stops or touches a system
# cluster (the package may start one on port 5432: it is left alone).
#
# Exit status: 0 when initdb is available; 1 when it is missing and cannot be
# installed here (with CI=true the caller treats that as a failure; outside
# CI the PG tests then skip, loudly).
set -euo pipefail

have_server() {
  [ -n "${INTERLOCK_PG_BIN:-}" ] && [ -x "$INTERLOCK_PG_BIN/initdb" ] && return 0
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && return 0
  command -v initdb >/dev/null 2>&1
}

if have_server; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "ensure-postgres: installing the distribution's postgresql package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q postgresql >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    apt-get install -y -q postgresql >/dev/null
  }
fi
if have_server; then
  exit 0
fi
echo "ensure-postgres: no PostgreSQL server (initdb) found; install the 'postgresql' package" >&2
exit 1

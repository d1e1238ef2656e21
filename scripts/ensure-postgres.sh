#!/usr/bin/env bash
# Makes sure PostgreSQL's server binaries are there: the PostgreSQL participant's
# tests (tests/tests/postgres.rs) and `decree bench --baseline postgres` start
# throwaway servers with initdb and pg_ctl.
#
#   scripts/ensure-postgres.sh            check, install Debian's postgresql if missing
#   scripts/ensure-postgres.sh --check [ROOT]
#                                         only look (under ROOT, default /): prints
#                                         "found DIR" and exits 0, or "missing" and
#                                         exits 1; installs nothing
#
# It looks where the tests do (cluster/src/postgres.rs): $DECREE_PG_BIN, then
# pg_ctl on PATH, then /usr/lib/postgresql/<version>/bin; a directory counts only
# if it holds all of initdb, pg_ctl and postgres. As root the servers run as the
# `postgres` user (PostgreSQL refuses root), so that user and runuser must exist.
set -euo pipefail

# Prints the first directory under root $1 that holds the server binaries, or nothing.
find_pg_bin() {
  local root=${1%/} dir
  local -a dirs=()
  shopt -s nullglob
  if [ -n "${DECREE_PG_BIN:-}" ]; then
    dirs=("$root$DECREE_PG_BIN")
  else
    if [ -z "$root" ] && command -v pg_ctl >/dev/null 2>&1; then
      dirs+=("$(dirname "$(command -v pg_ctl)")")
    fi
    # Newest version first, as the tests choose.
    while IFS= read -r dir; do dirs+=("$dir"); done < <(printf '%s\n' "$root"/usr/lib/postgresql/*/bin | sort -rV)
  fi
  for dir in "${dirs[@]}"; do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ] && { printf '%s\n' "$dir"; return 0; }
  done
  return 0
}

. "$(dirname "$0")/lib.sh"
if [ "${1:-}" = "--check" ]; then
  report_found find_pg_bin "${2:-}"
  exit
fi

if [ -z "$(find_pg_bin "")" ]; then
  if ! apt_install "the PostgreSQL participant's tests start throwaway servers" postgresql; then
    say "PostgreSQL's server binaries (initdb, pg_ctl, postgres) are missing; install them (Debian/Ubuntu: sudo apt-get install postgresql, or set DECREE_PG_BIN) and run make again"
    exit 1
  fi
  [ -n "$(find_pg_bin "")" ] || { say "postgresql installed, but no directory holds initdb, pg_ctl and postgres; set DECREE_PG_BIN"; exit 1; }
fi
if [ "$(id -u)" = 0 ]; then
  command -v runuser >/dev/null 2>&1 || { say "running as root, PostgreSQL's test servers are started with runuser, which is missing (package util-linux)"; exit 1; }
  id postgres >/dev/null 2>&1 || { say "running as root, PostgreSQL's test servers run as the user postgres, which does not exist (the postgresql package creates it)"; exit 1; }
fi

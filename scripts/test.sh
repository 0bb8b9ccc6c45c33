#!/usr/bin/env bash
# THE test command (README's quick start, CI): every test, Rust and Python.
#
# Makes (or reuses) a virtual environment at .venv with python3, installs
# maturin, pytest, ruff and python/requirements-test.txt into it, builds the
# package into it (a debug `maturin develop`, sharing target/ with cargo),
# makes sure a PostgreSQL server is installed (scripts/ensure-postgres.sh:
# the distribution's package, as root), then runs `cargo test --workspace`,
# ruff and pytest. Exits non-zero on any
# failure; pytest collecting no tests counts as a failure.
#
# INTERLOCK_TEST_SKIP_CARGO=1 skips `cargo test --workspace` (for a quick
# Python-only round); CI never sets it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

venv="$root/.venv"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  step "python: make the virtual environment .venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.interlock-requirements"
want=$(cat python/requirements-test.txt 2>/dev/null; echo "maturin>=1.5,<2 pytest ruff")
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  step "python: install maturin, pytest, ruff and python/requirements-test.txt"
  "$py" -m pip install --disable-pip-version-check -q --upgrade pip
  "$py" -m pip install --disable-pip-version-check -q "maturin>=1.5,<2" pytest ruff \
    -r python/requirements-test.txt
  printf '%s' "$want" > "$stamp"
fi

step "python: build interlock into .venv (maturin develop, debug)"
VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" "$venv/bin/maturin" develop -q \
  --manifest-path crates/interlock-py/Cargo.toml

if [ "${INTERLOCK_TEST_SKIP_CARGO:-0}" != 1 ]; then
  step "postgres: a server for the PgLock tests (installed when missing)"
  # The tests start a throwaway cluster of their own. In CI a missing server
  # is a failure; elsewhere the PgLock tests skip, saying so loudly.
  if ! ./scripts/ensure-postgres.sh; then
    if [ "${CI:-}" = true ]; then
      exit 1
    fi
    echo "*** WARNING: no PostgreSQL server: the PgLock tests will be SKIPPED ***" >&2
  fi
  step "rust: cargo test --workspace"
  cargo test --workspace
fi

step "python: ruff check + ruff format --check"
"$venv/bin/ruff" check python/
"$venv/bin/ruff" format --check python/

step "python: pytest python/tests"
# Exit code 5 is pytest's "no tests collected": a failure here.
"$py" -m pytest -q python/tests "$@"

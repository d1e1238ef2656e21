#!/usr/bin/env bash
# Makes sure libclang is there: the rocksdb crate generates its bindings with
# bindgen, which loads libclang at build time. Installs Debian's libclang-dev
# when it is missing and we may (root, or passwordless sudo); otherwise stops
# with a one-line instruction.
set -euo pipefail

have_libclang() {
  [ -n "${LIBCLANG_PATH:-}" ] && return 0
  local candidate
  for candidate in /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/*/libclang*.so* /usr/local/lib/libclang*.so*; do
    [ -e "$candidate" ] && return 0
  done
  return 1
}

have_libclang && exit 0

install() {
  echo "decree: installing libclang-dev (needed to build the RocksDB bindings)"
  "$@" apt-get update -qq
  "$@" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
}

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  install
elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  install sudo
else
  echo "decree: libclang is missing; install it (Debian/Ubuntu: sudo apt-get install libclang-dev) and run make again" >&2
  exit 1
fi
have_libclang || { echo "decree: libclang-dev installed, but no libclang*.so found; set LIBCLANG_PATH" >&2; exit 1; }

#!/usr/bin/env bash
# Makes sure bindgen can load libclang: the rocksdb crate generates its bindings
# with bindgen at build time, and bindgen loads libclang through clang-sys.
#
#   scripts/ensure-libclang.sh            check /, install libclang-dev if missing
#   scripts/ensure-libclang.sh --check [ROOT]
#                                         only look (under ROOT, default /): prints
#                                         "found PATH" and exits 0, or "missing"
#                                         and exits 1; installs nothing
#
# The check looks for exactly what clang-sys looks for (its build/common.rs and
# build/dynamic.rs): the file names libclang.so, libclang-*.so, libclang.so.* and
# libclang-*.so.*, minus any name containing "-cpp." (Debian's libclang-cpp14,
# the C++ interface library, is not libclang), in $LIBCLANG_PATH when it is set,
# else in the directories clang-sys searches on Linux. Installing uses Debian's
# libclang-dev (root, or passwordless sudo); otherwise it stops with a one-line
# instruction. After an install it looks again and fails if still missing.
set -euo pipefail

# Prints the first libclang that bindgen would accept under root $1, or nothing.
find_libclang() {
  local root=${1%/} dir name
  local -a dirs=()
  shopt -s nullglob
  if [ -n "${LIBCLANG_PATH:-}" ]; then
    # A path to the file itself, or to the directory that holds it.
    if [ -f "$root$LIBCLANG_PATH" ]; then
      dirs=("$(dirname "$root$LIBCLANG_PATH")")
    else
      dirs=("$root$LIBCLANG_PATH")
    fi
  else
    if command -v llvm-config >/dev/null 2>&1 && [ -z "$root" ]; then
      local prefix
      prefix=$(llvm-config --prefix 2>/dev/null || true)
      [ -n "$prefix" ] && dirs+=("$prefix/bin" "$prefix/lib" "$prefix/lib64")
    fi
    local IFS=:
    for dir in ${LD_LIBRARY_PATH:-}; do
      [ -n "$dir" ] && dirs+=("$root$dir")
    done
    unset IFS
    dirs+=("$root"/usr/lib* "$root"/usr/lib*/* "$root"/usr/lib*/*/*
      "$root"/usr/local/lib* "$root"/usr/local/lib*/* "$root"/usr/local/lib*/*/*
      "$root"/usr/local/llvm*/lib*)
  fi
  for dir in "${dirs[@]}"; do
    [ -d "$dir" ] || continue
    for name in "$dir"/libclang.so "$dir"/libclang-*.so "$dir"/libclang.so.* "$dir"/libclang-*.so.*; do
      case "${name##*/}" in *-cpp.*) continue ;; esac
      [ -e "$name" ] && { printf '%s\n' "$name"; return 0; }
    done
  done
  return 0
}

. "$(dirname "$0")/lib.sh"
if [ "${1:-}" = "--check" ]; then
  report_found find_libclang "${2:-}"
  exit
fi

[ -n "$(find_libclang "")" ] && exit 0

if ! apt_install "libclang is missing; bindgen needs it to build the RocksDB bindings" libclang-dev; then
  say "libclang is missing; install it (Debian/Ubuntu: sudo apt-get install libclang-dev, or set LIBCLANG_PATH) and run make again"
  exit 1
fi
found=$(find_libclang "")
[ -n "$found" ] || { say "libclang-dev installed, but bindgen would still find no libclang.so; set LIBCLANG_PATH"; exit 1; }
say "libclang is $found"

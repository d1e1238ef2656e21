#!/usr/bin/env bash
# Tests the set-up checks of scripts/ against temporary trees, so that what this
# machine happens to have installed does not decide the result. `make test` runs it.
#
#   scripts/test-prereqs.sh
#
# It also runs the libclang case against a copy of the check with the glob it
# once had (`libclang*.so*`, which takes Debian's libclang-cpp for libclang) and
# requires that copy to fail: a test that cannot tell the two apart proves nothing.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

# expect WANT_EXIT WANT_OUTPUT_PREFIX DESCRIPTION COMMAND...
expect() {
  local want_rc=$1 want_out=$2 what=$3
  shift 3
  local out rc
  out=$(env -u LIBCLANG_PATH -u LD_LIBRARY_PATH -u DECREE_PG_BIN "$@" 2>&1)
  rc=$?
  if [ "$rc" = "$want_rc" ] && [[ "$out" == "$want_out"* ]]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAIL: $what: exit $rc, said: $out (wanted exit $want_rc, \"$want_out...\")"
  fi
}

tree() { local t="$work/$1"; mkdir -p "$t"; echo "$t"; }
touch_in() { local root=$1; shift; for f in "$@"; do mkdir -p "$root/$(dirname "$f")"; : >"$root/$f"; done; }

# --- libclang
libclang="$here/ensure-libclang.sh"
cpp_only=$(tree cpp-only)
touch_in "$cpp_only" usr/lib/llvm-14/lib/libclang-cpp.so.14 usr/lib/x86_64-linux-gnu/libclang-cpp.so.14 \
  usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
expect 1 missing "only libclang-cpp.so.14 present" bash "$libclang" --check "$cpp_only"
versioned=$(tree versioned)
touch_in "$versioned" usr/lib/x86_64-linux-gnu/libclang-cpp.so.14 usr/lib/x86_64-linux-gnu/libclang-14.so.1
expect 0 "found $versioned/usr/lib/x86_64-linux-gnu/libclang-14.so.1" "libclang-14.so.1 present" \
  bash "$libclang" --check "$versioned"
plain=$(tree plain)
touch_in "$plain" usr/lib/llvm-14/lib/libclang-cpp.so.14 usr/lib/llvm-14/lib/libclang.so.1
expect 0 "found $plain/usr/lib/llvm-14/lib/libclang.so.1" "libclang.so.1 present" bash "$libclang" --check "$plain"
local_lib=$(tree local)
touch_in "$local_lib" usr/local/lib/libclang.so
expect 0 "found $local_lib/usr/local/lib/libclang.so" "libclang.so in /usr/local/lib" bash "$libclang" --check "$local_lib"
expect 1 missing "an empty tree" bash "$libclang" --check "$(tree empty)"
custom=$(tree custom)
touch_in "$custom" opt/clang/lib/libclang.so.18
expect 0 "found $custom/opt/clang/lib/libclang.so.18" "LIBCLANG_PATH names the directory" \
  env LIBCLANG_PATH=/opt/clang/lib bash "$libclang" --check "$custom"
expect 1 missing "LIBCLANG_PATH set: only it is searched" env LIBCLANG_PATH=/opt/clang/lib bash "$libclang" --check "$versioned"
# The old glob took libclang-cpp for libclang: this test must tell them apart.
old="$work/ensure-libclang-old-glob.sh"
cp "$here/lib.sh" "$work/lib.sh"
sed 's#"$dir"/libclang.so "$dir"/libclang-\*.so "$dir"/libclang.so.\* "$dir"/libclang-\*.so.\*#"$dir"/libclang*.so*#; /\*-cpp\.\*) continue/d' \
  "$libclang" >"$old"
if cmp -s "$libclang" "$old"; then
  failed=$((failed + 1))
  echo "FAIL: could not make the old-glob copy of ensure-libclang.sh (its patterns changed: update this test)"
else
  expect 0 found "the old glob takes libclang-cpp.so.14 for libclang (the check's test catches it)" \
    bash "$old" --check "$cpp_only"
fi

# --- PostgreSQL
postgres="$here/ensure-postgres.sh"
pg=$(tree pg)
touch_in "$pg" usr/lib/postgresql/15/bin/initdb usr/lib/postgresql/15/bin/pg_ctl usr/lib/postgresql/15/bin/postgres
chmod +x "$pg"/usr/lib/postgresql/15/bin/*
expect 0 "found $pg/usr/lib/postgresql/15/bin" "initdb, pg_ctl and postgres present" bash "$postgres" --check "$pg"
client_only=$(tree pg-client)
touch_in "$client_only" usr/lib/postgresql/15/bin/psql usr/lib/postgresql/15/bin/pg_ctl
chmod +x "$client_only"/usr/lib/postgresql/15/bin/*
expect 1 missing "client binaries only (no initdb, no postgres)" bash "$postgres" --check "$client_only"
expect 1 missing "no PostgreSQL" bash "$postgres" --check "$(tree pg-none)"

# --- Python
python="$here/ensure-python-grpc.sh"
stub="$work/python-without-venv"
printf '#!/bin/sh\n# a python3 whose venv/ensurepip modules are missing\nexit 1\n' >"$stub"
chmod +x "$stub"
expect 1 "missing: $stub's venv module" "python3 without its venv module" \
  env DECREE_PYTHON="$stub" DECREE_VENV="$work/no-venv" bash "$python" --check
expect 1 "missing: no-such-python" "no python3" \
  env DECREE_PYTHON=no-such-python DECREE_VENV="$work/no-venv" bash "$python" --check
fake_venv="$work/fake-venv"
mkdir -p "$fake_venv/bin"
printf '#!/bin/sh\nexit 0\n' >"$fake_venv/bin/python"
chmod +x "$fake_venv/bin/python"
expect 0 ready "a venv whose python imports grpc" env DECREE_VENV="$fake_venv" bash "$python" --check

# --- Chromium (the console's browser test)
chromium="$here/ensure-chromium.sh"
browser=$(tree chromium)
touch_in "$browser" usr/bin/chromium usr/bin/chromedriver
chmod +x "$browser"/usr/bin/*
expect 0 "found $browser/usr/bin/chromedriver" "chromium and chromedriver present" bash "$chromium" --check "$browser"
driverless=$(tree chromium-only)
touch_in "$driverless" usr/bin/chromium
chmod +x "$driverless"/usr/bin/chromium
expect 1 missing "chromium without chromium-driver" bash "$chromium" --check "$driverless"
expect 1 missing "no chromium" bash "$chromium" --check "$(tree chromium-none)"

echo "prereqs: $passed passed, $failed failed"
[ "$failed" = 0 ]

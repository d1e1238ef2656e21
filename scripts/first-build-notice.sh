#!/usr/bin/env bash
# Says, once, before a build that will compile RocksDB's C++ from scratch, that the
# wait is long and expected, so a quiet terminal is not taken for a hang.
set -euo pipefail
target="${CARGO_TARGET_DIR:-target}"
for built in "$target"/release/deps/liblibrocksdb_sys-*.rlib; do
  [ -e "$built" ] && exit 0
done
echo "decree: first build: compiling RocksDB's C++ (about 15 minutes on two cores, once; later builds reuse it from $target)"

# decree: `make demo` runs the demo, `make test` runs the tests. Both first make
# sure the build prerequisites are there (scripts/ensure-*.sh: each looks for what
# is really needed, installs it with apt-get when it may, or says what to install).
#
# Builds use one profile (--release) so RocksDB's C++ compiles once for both.
# Set CARGO_TARGET_DIR to keep builds between checkouts.

CARGO ?= cargo
TARGET_DIR = $(if $(CARGO_TARGET_DIR),$(CARGO_TARGET_DIR),target)
VENV = $(if $(DECREE_VENV),$(DECREE_VENV),$(HOME)/.cache/decree/venv)

# Ended outcomes and tombstones pruned all the time: the crash matrix and the
# chaos test must hold with it (the servers read these environment variables).
AGGRESSIVE_RETENTION = DECREE_RETAIN_ENDED=50 DECREE_RETAIN_ENDED_MS=10000 DECREE_PRUNE_INTERVAL_MS=50 \
	DECREE_TOMBSTONES=50 DECREE_TOMBSTONE_AGE_MS=5000

.PHONY: demo test build prereqs test-prereqs lint fmt clippy

demo: prereqs
	$(CARGO) run --release --bin decree -- demo

test: prereqs test-prereqs
	@bash scripts/ensure-python-grpc.sh
	@bash scripts/ensure-postgres.sh
	@bash scripts/ensure-chromium.sh
	$(CARGO) build --release --workspace --bins --examples
	@echo "decree: the Python SDK's own tests (sdk/python/tests), against the binaries just built"
	DECREE_BIN=$(TARGET_DIR)/release/decree $(VENV)/bin/python -m pytest -q -p no:cacheprovider sdk/python/tests
	$(CARGO) test --release --workspace
	@echo "decree: the crash matrix and chaos again, pruning aggressively (every process reads these)"
	$(AGGRESSIVE_RETENTION) $(CARGO) test --release -p decree-tests --test crash --test chaos

build: prereqs
	$(CARGO) build --release --workspace

lint: fmt clippy

fmt:
	$(CARGO) fmt --all -- --check

clippy: prereqs
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# The rocksdb crate generates its bindings with bindgen, which needs libclang.
prereqs:
	@command -v $(CARGO) >/dev/null 2>&1 || { echo "decree: cargo is missing; install Rust from https://rustup.rs" >&2; exit 1; }
	@bash scripts/ensure-libclang.sh
	@bash scripts/first-build-notice.sh

# The set-up checks themselves, against temporary trees.
test-prereqs:
	@bash scripts/test-prereqs.sh

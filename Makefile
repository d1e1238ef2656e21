# decree: `make demo` runs the demo, `make test` runs the tests. Both first make
# sure the build prerequisites are there.
#
# Builds use one profile (--release) so RocksDB's C++ compiles once for both.
# Set CARGO_TARGET_DIR to keep builds between checkouts.

CARGO ?= cargo

.PHONY: demo test build prereqs lint fmt clippy

demo: prereqs
	$(CARGO) run --release --bin decree -- demo

test: prereqs
	$(CARGO) build --release --bin decree
	$(CARGO) test --release --workspace

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
	@if ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/x86_64-linux-gnu/libclang*.so* /usr/lib/aarch64-linux-gnu/libclang*.so* >/dev/null 2>&1 || [ -n "$$LIBCLANG_PATH" ]; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "decree: installing libclang-dev (needed to build RocksDB bindings)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		echo "decree: installing libclang-dev (needed to build RocksDB bindings)"; \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null; \
	else \
		echo "decree: libclang is missing; install it (Debian/Ubuntu: sudo apt-get install libclang-dev) and run make again" >&2; \
		exit 1; \
	fi

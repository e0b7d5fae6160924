# Build, test, demo and benchmark mihomo-connections-tracker. `make` alone lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# Reproducible builds: use the committed lock file when there is one.
LOCKED := $(if $(wildcard Cargo.lock),--locked)
NAME := mihomo-connections-tracker
MUSL := x86_64-unknown-linux-musl
MUSL_BIN := target/$(MUSL)/release/$(NAME)
HOST_BIN := target/release/$(NAME)
# apt-get needs root; use sudo when we are not.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

DEMO_DIR := target/demo
DEMO_SIM_PORT := 19090
DEMO_API_PORT := 18080
DEMO_CONNECTIONS := 300

.PHONY: help test musl cross demo bench fuzz fmt clippy clean

help:
	@echo "Targets:"
	@echo "  make test     build and run every test (cargo test$(if $(LOCKED), $(LOCKED)))"
	@echo "  make musl     static release binary for $(MUSL) (installs the rustup target and musl-tools if missing)"
	@echo "  make cross    static aarch64 binary (+ armv7 via CROSS_TARGETS; cargo-zigbuild), the aarch64 one tested under qemu-aarch64"
	@echo "  make demo     simulated mihomo on 127.0.0.1:$(DEMO_SIM_PORT) + master on http://127.0.0.1:$(DEMO_API_PORT); Ctrl-C stops both"
	@echo "  make bench    release build (musl when possible) and every performance figure with its target"
	@echo "                (MCT_BENCH_SECS=N shortens the 60 s tracking and load runs)"
	@echo "  make fuzz     each cargo-fuzz target (tests/fuzz) for FUZZ_SECS=$(FUZZ_SECS) s on nightly (installs cargo-fuzz if missing);"
	@echo "                a crash is saved under tests/fuzz/artifacts/: add it to tests/fuzz/corpus/<target>/ and fix"
	@echo "  make fmt      cargo fmt"
	@echo "  make clippy   cargo clippy on every target, warnings are errors"
	@echo "  make clean    cargo clean"

# Headless Chromium + chromedriver for tests/it/dashboard.rs; apt-get update only when the install fails.
APT_INSTALL = DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium chromium-driver

.PHONY: browser-deps
browser-deps:
	@if command -v chromedriver >/dev/null 2>&1 && [ -x /usr/bin/chromium ]; then :; else \
		echo "+ apt-get install chromium chromium-driver"; \
		$(APT_INSTALL) || { $(SUDO) apt-get update && $(APT_INSTALL); }; \
	fi

test: browser-deps
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust 1.80+ (https://rustup.rs)" >&2; exit 1; }
	@# the metrics test checks our output with the reference Prometheus parser
	@python3 -c 'import prometheus_client' 2>/dev/null || { echo "+ pip install prometheus-client"; python3 -m pip install --quiet prometheus-client; }
	$(CARGO) test $(LOCKED)

musl:
	@if ! rustup target list --installed 2>/dev/null | grep -qx '$(MUSL)'; then \
		echo "+ rustup target add $(MUSL)"; rustup target add $(MUSL); fi
	@if ! command -v musl-gcc >/dev/null; then \
		echo "+ apt-get install -y musl-tools"; \
		$(SUDO) apt-get install -y musl-tools || { $(SUDO) apt-get update && $(SUDO) apt-get install -y musl-tools; }; fi
	$(CARGO) build $(LOCKED) --release --no-default-features --target $(MUSL)
	@echo "$(MUSL_BIN): $$(stat -c %s $(MUSL_BIN)) bytes"


# armv7-unknown-linux-musleabihf builds the same way where rustup can fetch its std (it cannot on our CI
# machines: its download answers 404): make cross CROSS_TARGETS="aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf"
CROSS_TARGETS ?= aarch64-unknown-linux-musl

# Router CPUs. The bundled SQLite needs a C cross compiler: zig (PyPI `ziglang`) through cargo-zigbuild.
cross:
	@command -v cargo-zigbuild >/dev/null || { echo "+ pip install ziglang cargo-zigbuild"; python3 -m pip install --quiet ziglang cargo-zigbuild; }
	@for t in $(CROSS_TARGETS); do rustup target list --installed | grep -qx $$t || { echo "+ rustup target add $$t"; rustup target add $$t; }; done
	@command -v qemu-aarch64 >/dev/null || { echo "+ apt-get install qemu-user"; $(SUDO) apt-get install -y qemu-user || { $(SUDO) apt-get update && $(SUDO) apt-get install -y qemu-user; }; }
	@for t in $(CROSS_TARGETS); do echo "+ cargo zigbuild --release --target $$t"; $(CARGO) zigbuild $(LOCKED) --release --no-default-features --target $$t; done
	@for t in $(CROSS_TARGETS); do echo "target/$$t/release/$(NAME): $$(stat -c %s target/$$t/release/$(NAME)) bytes"; done
	MCT_CROSS_BIN=$$(realpath target/aarch64-unknown-linux-musl/release/$(NAME)) MCT_CROSS_RUNNER=qemu-aarch64 \
		$(CARGO) test $(LOCKED) --test it cross -- --ignored

demo:
	$(CARGO) build $(LOCKED) --release
	@mkdir -p $(DEMO_DIR)
	@bin=$(HOST_BIN); api=http://127.0.0.1:$(DEMO_API_PORT)/api/v1; \
	$$bin simulate --listen-host 127.0.0.1 --listen-port $(DEMO_SIM_PORT) \
		--connections $(DEMO_CONNECTIONS) --churn-percent 1 & sim=$$!; \
	stop_sim() { kill $$sim 2>/dev/null || return 0; \
		for i in $$(seq 50); do kill -0 $$sim 2>/dev/null || return 0; sleep 0.1; done; kill -9 $$sim 2>/dev/null || true; }; \
	trap stop_sim EXIT; \
	trap 'exit 130' INT TERM; \
	for i in $$(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$(DEMO_SIM_PORT)) 2>/dev/null && break; \
		kill -0 $$sim 2>/dev/null || { echo "the simulator did not start" >&2; exit 1; }; sleep 0.1; done; \
	echo; \
	echo "Simulated mihomo: ws://127.0.0.1:$(DEMO_SIM_PORT)/connections ($(DEMO_CONNECTIONS) connections, 1 % churn/s)"; \
	echo "Master API:       $$api   (database $(DEMO_DIR)/demo.db)"; \
	echo "Try, in another terminal:"; \
	echo "  curl $$api/health"; \
	echo "  curl '$$api/stats?type=summary'"; \
	echo "  curl '$$api/stats?type=group&group_by=host&limit=10'"; \
	echo "  curl '$$api/stats?type=group&group_by=chains'"; \
	echo "  curl '$$api/stats?type=timeseries&interval=minute&metric=total'"; \
	echo "  curl '$$api/connections?limit=5&sort_by=download'"; \
	echo "  curl '$$api/agents'"; \
	echo "Ctrl-C stops both."; \
	echo; \
	$$bin master --database $(DEMO_DIR)/demo.db --listen-host 127.0.0.1 --listen-port $(DEMO_API_PORT) \
		--mihomo-host 127.0.0.1 --mihomo-port $(DEMO_SIM_PORT) --log-level debug

bench:
	@if $(MAKE) --no-print-directory musl; then \
		bin=$(MUSL_BIN); export MCT_SIZE_BIN=$(MUSL_BIN); \
	else \
		echo "musl build failed: benchmarking the host build (no size figure)" >&2; \
		$(CARGO) build $(LOCKED) --release; bin=$(HOST_BIN); \
	fi; \
	for t in $(CROSS_TARGETS); do f=target/$$t/release/$(NAME); \
		if [ -f $$f ]; then echo "binary size, $$t (make cross): $$(stat -c %s $$f) bytes"; \
		else echo "binary size, $$t: not built (make cross)"; fi; done; \
	MCT_BIN=$$(realpath $$bin) $(CARGO) bench $(LOCKED) --bench figures

# Fuzzing: the snapshot parser + diff and the API's query parameters (tests/fuzz, a crate of its own). New inputs
# go to target/fuzz-corpus/; the committed corpus (tests/fuzz/corpus/) seeds each run and `make test` replays it.
FUZZ_SECS ?= 60
FUZZ_TARGETS := snapshot params

fuzz:
	@rustup toolchain list | grep -q '^nightly' || { echo "+ rustup toolchain install nightly"; rustup toolchain install nightly --profile minimal; }
	@command -v cargo-fuzz >/dev/null || { echo "+ cargo install cargo-fuzz"; $(CARGO) install cargo-fuzz --locked; }
	@for t in $(FUZZ_TARGETS); do mkdir -p target/fuzz-corpus/$$t; \
		echo "+ cargo +nightly fuzz run $$t for $(FUZZ_SECS) s"; \
		$(CARGO) +nightly fuzz run $$t --fuzz-dir tests/fuzz target/fuzz-corpus/$$t tests/fuzz/corpus/$$t \
			-- -max_total_time=$(FUZZ_SECS) -max_len=4096; \
	done

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy $(LOCKED) --all-targets -- -D warnings

clean:
	$(CARGO) clean

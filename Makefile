# weft — the two commands of the quick start are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
DEMO_DIR := $(CURDIR)/.weft-demo
DEMO_SOCKET := $(DEMO_DIR)/run/weftd.sock
WEFT := $(CURDIR)/target/debug/weft --socket $(DEMO_SOCKET)
PREFIX ?= /usr/local

.PHONY: check-layers fuzz-check all build toolchain deps tools vsock-device assets fmt clippy test demo demo-stop install clean bench fuzz-campaign reliability

all: build

## deps: Debian packages weft needs (run as root on Debian 12)
deps:
	bash scripts/install-deps.sh

## tools: cargo tools the test suite uses, and rust-vmm's vhost-device-vsock (guests'
## vsock where the kernel has no vhost-vsock; weftd finds it in PATH)
tools: vsock-device
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked

## vsock-device: rust-vmm's vhost-device-vsock, through which guests' DPAs reach weftd on
## hosts without kernel vhost-vsock
vsock-device:
	@command -v vhost-device-vsock >/dev/null || $(CARGO) install vhost-device-vsock --version 0.3.0 --locked

build: toolchain
	$(CARGO) build --workspace --bins

## toolchain: weft needs Rust >= 1.80 with rustfmt and clippy (rustup's stable)
toolchain:
	@command -v $(CARGO) >/dev/null || { echo "make: cargo not found; install Rust >= 1.80 with rustup (https://rustup.rs), then run make again" >&2; exit 1; }

## assets: the test guest (Debian cloud kernel + busybox initramfs), cached under target/
assets: build
	$(CARGO) run -q --bin weft-guest-assets

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## check-layers: module cycles, forbidden crate edges, oversized files, unexplained sleeps in
## tests (scripts/check-layers; not yet part of `make test`: the agent's modules still form
## a cycle)
check-layers:
	python3 scripts/check-layers

## fuzz-check: the fuzz targets still compile against the crates they fuzz (a plain
## `cargo check`, no sanitizer build; fuzz/README.md says how to run them)
fuzz-check:
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) check --locked --bins

## test: everything CI checks
# Steps run in order even under make -j: each needs the one before.
test:
	$(MAKE) deps
	$(MAKE) tools
	$(MAKE) fmt
	$(MAKE) clippy
	bash scripts/test-check-layers
	$(MAKE) check-layers
	$(MAKE) fuzz-check
	$(MAKE) assets
	$(CARGO) nextest run --workspace --profile ci

## demo: start weftd on ./.weft-demo, boot the demo guest, show it
demo: deps vsock-device build assets
	bash scripts/demo.sh start

## demo-stop: stop the demo guest and weftd, remove ./.weft-demo
demo-stop:
	bash scripts/demo.sh stop

## bench: weft against its peers, same run, medians and ratios (see docs/benchmarks.md)
bench:
	python3 -m pip install --quiet qemu.qmp
	$(CARGO) run --release -p weft-integration --bin weft-bench -- qmp
	$(CARGO) run --release -p weft-integration --bin weft-bench -- launch
	command -v restic >/dev/null && command -v borg >/dev/null || { apt-get update && apt-get install -y restic borgbackup; }
	$(CARGO) run --release -p weft-integration --bin weft-bench -- backup --rounds 5 --breakdown
	$(CARGO) build --release -p weft -p weft-client --bins && $(CARGO) run --release -p weft-integration --bin weft-bench -- weave
	$(CARGO) build --release -p weft-blockdev --bin weft-blk && $(CARGO) run --release -p weft-integration --bin weft-bench -- blk --rounds 5
	$(CARGO) run --release -p weft-integration --bin weft-bench -- compose --rounds 10
	$(CARGO) run --release -p weft-integration --bin weft-bench -- provenance --rounds 5

## reliability: the crash, disk-full and fuzz campaign, outside `make test` (kills and
## disk full: about 10 minutes on 2 cores; fuzzing: 30 CPU-minutes per target, resumed
## where the last run stopped); figures in docs/reliability.md. SEED=N replays a run,
## KILLS=N sets the number of kills (50). Every part runs; the target fails if any found
## a problem.
KILLS ?= 50
reliability:
	$(MAKE) deps
	$(MAKE) tools
	$(MAKE) assets
	$(CARGO) build -p weft-integration --bin weft-reliability
	rc=0; \
	$(CARGO) run -q -p weft-integration --bin weft-reliability -- kills --kills $(KILLS) $(if $(SEED),--seed $(SEED)) || rc=1; \
	$(CARGO) run -q -p weft-integration --bin weft-reliability -- disk-full $(if $(SEED),--seed $(SEED)) || rc=1; \
	$(MAKE) fuzz-campaign || rc=1; \
	exit $$rc

install: toolchain
	$(CARGO) build --release -p weft --bins -p weft-blockdev --bin weft-blk
	install -D -m 0755 target/release/weftd $(DESTDIR)$(PREFIX)/bin/weftd
	install -D -m 0755 target/release/weft $(DESTDIR)$(PREFIX)/bin/weft
	install -D -m 0755 target/release/weft-blk $(DESTDIR)$(PREFIX)/bin/weft-blk
	install -D -m 0644 systemd/weftd.service $(DESTDIR)/etc/systemd/system/weftd.service
	install -D -m 0644 systemd/weft.conf $(DESTDIR)/usr/lib/tmpfiles.d/weft.conf
	test -e $(DESTDIR)/etc/weft/weftd.toml || install -D -m 0644 systemd/weftd.toml.example $(DESTDIR)/etc/weft/weftd.toml

clean:
	$(CARGO) clean
	rm -rf $(DEMO_DIR)

## fuzz-campaign: every cargo-fuzz target until it has 30 CPU-minutes, two at a time, at
## nice 19 (resumes; results in fuzz/campaign.tsv; FUZZ_ARGS="--budget 120" for a short run)
fuzz-campaign:
	bash fuzz/campaign.sh $(FUZZ_ARGS)

# ShellWeGo: the two commands a person needs are `make demo` and `make test`.
.PHONY: setup demo test test-unit test-agent-real build install lint bench

CARGO ?= cargo

## Install everything the agent and its tests need on this host (idempotent, root).
setup:
	bash scripts/setup.sh

## The optimized agent (and the demo's image builder): what the demo and `install` run.
build:
	$(CARGO) build --release --locked -p shellwego-agent -p shellwego-testkit --bins

## Install the optimized agent as /usr/local/bin/shellwego (root).
install: build
	install -m 0755 $${CARGO_TARGET_DIR:-target}/release/shellwego /usr/local/bin/shellwego

## Set up the host and run the product's main job.
demo: setup build
	bash scripts/demo.sh

## Set up the host and run the whole test suite (unit, property and real-hardware tests).
test: setup
	$(CARGO) test --workspace --locked --no-fail-fast

## The agent's real-VM tests (root, /dev/kvm), one at a time.
test-agent-real: setup
	$(CARGO) test -p shellwego-agent --locked --test firecracker_real --test guest_boot --test snapshot_real --test gauntlet_real \
		--test cli_real --test secrets_real --test bluegreen_real --test crash_real --test isolation_real --test isolation_fence_real \
		--test isolation_connections_real --test executor_real --test replicas_real --test scale_to_zero_real --test snapshot_start_real -- --test-threads=1

## Only the pure tests (no root, KVM or ZFS needed).
test-unit:
	$(CARGO) test --workspace --locked --lib

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

bench: setup
	$(CARGO) bench --workspace --locked

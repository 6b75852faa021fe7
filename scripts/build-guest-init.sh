#!/usr/bin/env bash
# Builds the guest init (shellwego-init) as a static binary and prints its path on the
# last line. Cargo's own caching makes a rebuild with nothing changed take a moment.
# With arguments PACKAGE BIN it builds that binary the same way (the tests' guest apps:
# `build-guest-init.sh shellwego-testkit swg-counter`).
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}/guest-static"
triple=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static -C strip=symbols" CARGO_TARGET_DIR="$target_dir" \
  cargo build --quiet --release --locked -p "${1:-shellwego-guest}" --bin "${2:-shellwego-init}" --target "$triple" >&2 \
  || { echo "static build of ${2:-shellwego-init} failed (see above)" >&2; exit 1; }
bin="$target_dir/$triple/release/${2:-shellwego-init}"
# A static binary has no program interpreter.
if readelf -l "$bin" | grep -q INTERP; then echo "$bin is not statically linked" >&2; exit 1; fi
echo "$bin"

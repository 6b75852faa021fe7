#!/usr/bin/env bash
# Builds the guest init (shellwego-init) as a static binary and prints its path on the
# last line. Cargo's own caching makes a rebuild with nothing changed take a moment.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}/guest-static"
triple=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static -C strip=symbols" CARGO_TARGET_DIR="$target_dir" \
  cargo build --quiet --release --locked -p shellwego-guest --target "$triple" >&2 \
  || { echo "guest init build failed (see above)" >&2; exit 1; }
bin="$target_dir/$triple/release/shellwego-init"
# A static binary has no program interpreter.
if readelf -l "$bin" | grep -q INTERP; then echo "guest init at $bin is not statically linked" >&2; exit 1; fi
echo "$bin"

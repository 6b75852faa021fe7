#!/usr/bin/env bash
# The product's main job: deploy the example app. Run through `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CARGO_TARGET_DIR:-target}/debug/shellwego

echo "== shellwego doctor"
"$bin" doctor || true
echo
echo "== shellwego validate -f examples/hello.toml"
"$bin" validate -f examples/hello.toml
echo
cat <<'MSG'
Not there yet: the agent daemon and `shellwego apply` (pull, rootfs, network, microVM,
health check) land with the end-to-end issue. Today this command sets up the host, checks
it with `doctor`, and validates the example app's spec against this host.
MSG

#!/usr/bin/env bash
# The product's main job on this host (run through `make demo`, as root): make sure a ZFS
# pool and the agent are there, deploy examples/hello.toml (Alpine with a tiny web server)
# and fetch its page.
#
# This machine reaches no public registry, so the demo serves the example image from a
# local registry (127.0.0.1:5055) that this script fills; on a connected host an app spec
# names any image, e.g. docker.io's.
#
#   SHELLWEGO_NETNS=NAME  run the agent (bridge, TAPs, VMs) inside that network namespace,
#                         created if missing, instead of the host's own
set -euo pipefail
cd "$(dirname "$0")/.."
# The optimized build (`make build`): the demo shows production speed.
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/shellwego
DEMO_IMAGE_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/swg-demo-image
NS=${SHELLWEGO_NETNS:-}
POOL=${SHELLWEGO_POOL:-shellwego}
POOL_DIR=/var/lib/shellwego-pool
RUN=${SHELLWEGO_RUN_DIR:-/run/shellwego}
REGISTRY=127.0.0.1:5055
export SHELLWEGO_INSECURE_REGISTRIES=$REGISTRY
step() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo failed at step "%s": %s\n' "$1" "$2" >&2; exit 1; }
inns() { if [ -n "$NS" ]; then ip netns exec "$NS" "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] || die "privileges" "run as root (sudo make demo)"
mkdir -p "$RUN"

if [ -n "$NS" ] && ! ip netns list | grep -qw "$NS"; then
  ip netns add "$NS" && ip -n "$NS" link set lo up
fi

step "ZFS pool $POOL"
if ! zpool list "$POOL" >/dev/null 2>&1; then
  if ! zpool list >/dev/null 2>&1; then
    [ -e /dev/zfs ] && die "zfs" "the ZFS module is loaded but zpool does not answer"
    echo "starting zfs-fuse (no ZFS kernel module on this host)"
    setsid zfs-fuse --no-daemon --no-kstat-mount -o big_writes >/var/log/shellwego-zfs-fuse.log 2>&1 < /dev/null &
    echo $! > "$RUN/zfs-fuse.pid"
    for _ in $(seq 1 100); do zpool list >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  mkdir -p "$POOL_DIR"
  if [ -f "$POOL_DIR/pool.img" ]; then
    zpool import -d "$POOL_DIR" -o cachefile=none "$POOL" || die "zfs" "cannot import $POOL from $POOL_DIR"
  else
    truncate -s 16G "$POOL_DIR/pool.img"
    zpool create -o cachefile=none -m none "$POOL" "$POOL_DIR/pool.img" || die "zfs" "cannot create pool $POOL"
  fi
fi
zpool list -H -o name,health "$POOL"

step "local registry $REGISTRY with the example image"
answers() { inns curl -fsS -o /dev/null "http://$REGISTRY/v2/"; }
if ! answers 2>/dev/null; then
  mkdir -p /var/lib/shellwego-demo-registry
  cat > /var/lib/shellwego-demo-registry/config.yml <<CONF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: /var/lib/shellwego-demo-registry/data
  delete:
    enabled: true
http:
  addr: $REGISTRY
CONF
  inns setsid docker-registry serve /var/lib/shellwego-demo-registry/config.yml >/var/log/shellwego-demo-registry.log 2>&1 < /dev/null &
  echo $! > "$RUN/demo-registry.pid"
  for _ in $(seq 1 100); do answers 2>/dev/null && break; sleep 0.1; done
fi
layout=$("$DEMO_IMAGE_BIN" | tail -n1) || die "demo image" "could not build the example image"
inns skopeo copy --quiet --dest-tls-verify=false "oci:$layout:1" "docker://$REGISTRY/shellwego/hello:1" \
  || die "push" "skopeo could not push the example image"

step "agent"
if ! "$BIN" ps >/dev/null 2>&1; then
  SHELLWEGO_NETNS=$NS SHELLWEGO_LOG=info setsid "$BIN" agent >>/var/log/shellwego-agent.log 2>&1 < /dev/null &
  echo $! > "$RUN/agent.pid"
  for _ in $(seq 1 300); do "$BIN" ps >/dev/null 2>&1 && break; sleep 0.2; done
  "$BIN" ps >/dev/null 2>&1 || die "agent" "the agent did not start; see /var/log/shellwego-agent.log"
fi
echo "agent running (log: /var/log/shellwego-agent.log)"

step "shellwego apply -f examples/hello.toml"
"$BIN" apply -f examples/hello.toml

step "shellwego ps"
"$BIN" ps

ip=$("$BIN" ps --json | python3 -c 'import json,sys; a=[x for x in json.load(sys.stdin) if x["name"]=="hello"][0]; print([v for v in a["vms"] if v["health"]=="Healthy"][0]["ip"])')
step "GET http://$ip:8080/"
inns curl -fsS --max-time 30 "http://$ip:8080/"

cat <<MSG

The app runs. Try:
  $BIN logs hello
  $BIN exec hello -- cat /etc/alpine-release
Remove it with:
  $BIN rm hello
Stop the agent with: kill \$(cat $RUN/agent.pid)   (VMs keep running; a restarted agent re-attaches)
MSG

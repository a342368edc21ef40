#!/usr/bin/env bash
# Builds a Linux 7.2 kernel with LUO/KHO, BPF, BTF and kprobes for luotrace's
# real-kernel lane (make vm-kernel).  Source: Debian unstable's
# linux-source-7.2, fetched with apt using its own sources list and state
# directory (the machine's apt configuration is left alone).  The result is
# cached outside the repository, keyed by source version and config hash:
#   $LUOTRACE_VM_CACHE/kernel-<version>-<hash>/bzImage   (default /var/cache/luotrace)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${LUOTRACE_VM_CACHE:-/var/cache/luotrace}
pkg=linux-source-7.2
jobs=${JOBS:-$(nproc)}
mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian unstable main" \
  > "$cache/apt/sources.list"
APT=(-o "Dir::Etc::sourcelist=$cache/apt/sources.list" -o Dir::Etc::sourceparts=/dev/null
     -o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache=$cache/apt/cache")

note() { echo "vm-kernel: $*" >&2; }

deb=$(ls "$cache"/${pkg}_*_all.deb 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$deb" ]; then
  note "fetching $pkg from Debian unstable (about 164 MB)"
  apt-get "${APT[@]}" update -q >/dev/null
  (cd "$cache" && apt-get "${APT[@]}" download "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2)
  deb=$(ls "$cache"/${pkg}_*_all.deb | sort -V | tail -1)
fi
version=$(dpkg-deb -f "$deb" Version)
src="$cache/src-$version"
if [ ! -f "$src/Makefile" ]; then
  note "unpacking $pkg $version"
  rm -rf "$src" "$cache/unpack"
  dpkg-deb -x "$deb" "$cache/unpack"
  mkdir -p "$src"
  tar -xaf "$cache"/unpack/usr/src/linux-source-7.2.tar.* -C "$src" --strip-components=1
  rm -rf "$cache/unpack"
fi
frag="$src/tools/testing/selftests/liveupdate/config"
hash=$(cat "$here/luo.config" "$frag" "$src/kernel/configs/kvm_guest.config" | sha256sum | cut -c1-12)
out="$cache/kernel-$version-$hash"

# The kernel's own LUO selftests, built against this tree's uapi headers.
selftests() {
  [ -x "$out/selftests/liveupdate" ] && return 0
  note "building tools/testing/selftests/liveupdate"
  make -s -C "$src" O="$out/build" headers_install
  mkdir -p "$out/selftests"
  make -s -C "$src/tools/testing/selftests/liveupdate" OUTPUT="$out/selftests" \
    KHDR_INCLUDES="-isystem $out/build/usr/include" >&2
}

if [ -f "$out/bzImage" ]; then
  selftests
  note "cached: $out/bzImage"
  echo "$out"
  exit 0
fi
mkdir -p "$out/build"
note "configuring (defconfig + kvm_guest.config + selftests/liveupdate/config + workloads/vm/luo.config)"
make -s -C "$src" O="$out/build" defconfig
(cd "$src" && scripts/kconfig/merge_config.sh -m -O "$out/build" "$out/build/.config" \
   kernel/configs/kvm_guest.config "$frag" "$here/luo.config" >/dev/null)
make -s -C "$src" O="$out/build" olddefconfig
for opt in LIVEUPDATE KEXEC_HANDOVER MEMFD_CREATE DEBUG_INFO_BTF KPROBES IKHEADERS NET_9P_VIRTIO; do
  grep -q "^CONFIG_$opt=y" "$out/build/.config" || { note "CONFIG_$opt did not stick"; exit 1; }
done
note "building bzImage with $jobs jobs (about an hour on 2 cores; progress in $out/build.log)"
start=$(date +%s)
if ! nice make -C "$src" O="$out/build" -j"$jobs" bzImage > "$out/build.log" 2>&1; then
  tail -30 "$out/build.log" >&2
  exit 1
fi
cp "$out/build/arch/x86/boot/bzImage" "$out/bzImage"
cp "$out/build/.config" "$out/config"
note "built in $(( $(date +%s) - start )) s: $out/bzImage"
selftests
echo "$out"

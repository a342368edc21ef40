#!/usr/bin/env bash
# Builds a Linux 7.2 kernel with LUO/KHO, KVM, BPF, BTF and kprobes for
# luotrace's real-kernel lane (make vm-kernel), with one patch series
# applied: SERIES (default seed) names workloads/vm/series/$SERIES, a list of
# patches from workloads/vm/patches/ (the guest_memfd LUO handler under review
# as one revision has it, and what it needs; each patch's header says what it
# adds and which revision's facts it follows).
#
# Source: Debian unstable's linux-source-7.2, fetched with apt using its own
# sources list and state directory (the machine's apt configuration is left
# alone).  Everything lives under $LUOTRACE_VM_CACHE (default
# /var/cache/luotrace):
#   src-<version>/              the pristine source, never modified
#   tree-<version>/             the patched source; a file is rewritten only
#                               when its patched content changes, so make
#                               rebuilds only what an edited patch touches
#   build-<version>-<config>/   the O= build tree (one cold build, ~40 min on
#                               2 cores; then incremental)
#   kernel-<version>-<config>-<series>-<patches>/bzImage, config, selftests/
#                               the result, keyed by config and patch hashes:
#                               each series' kernel is kept, and switching
#                               series rebuilds only what its patches touch
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
series=${SERIES:-seed}
[ -f "$here/series/$series" ] || { note "no series '$series' (have: $(ls "$here/series" | tr '\n' ' '))"; exit 1; }
patches=()
while read -r p; do
  case "$p" in ''|'#'*) continue ;; esac
  [ -f "$here/patches/$p" ] || { note "series $series names $p, which is not in workloads/vm/patches"; exit 1; }
  patches+=("$here/patches/$p")
done < "$here/series/$series"
cfghash=$(cat "$here/luo.config" "$frag" "$src/kernel/configs/kvm_guest.config" | sha256sum | cut -c1-12)
phash=$( (echo "$version"; cat /dev/null "${patches[@]}") | sha256sum | cut -c1-12)
build="$cache/build-$version-$cfghash"
tree="$cache/tree-$version"
out="$cache/kernel-$version-$cfghash-$series-$phash"

# The kernel's own LUO selftests, built against this tree's uapi headers.
selftests() {
  [ -x "$out/selftests/liveupdate" ] && return 0
  note "building tools/testing/selftests/liveupdate"
  make -s -C "$tree" O="$build" headers_install
  rm -rf "$out/selftests" && mkdir -p "$out/selftests"
  make -s -C "$tree/tools/testing/selftests/liveupdate" OUTPUT="$out/selftests" \
    KHDR_INCLUDES="-isystem $build/usr/include" >&2
}

if [ -f "$out/bzImage" ]; then
  selftests
  note "cached: $out/bzImage"
  echo "$out"
  exit 0
fi

# Patched tree: the pristine source hard-linked into a stage, the series
# applied there (patch(1) writes a new file, so the pristine copy is left
# alone), then synced into the tree by content: unchanged files keep their
# time stamps, and a file a patch no longer touches goes back to pristine
# with a new time stamp, so make sees every change and nothing else.
stage="$cache/stage-$version"
rm -rf "$stage"
cp -al "$src" "$stage"
for p in "${patches[@]}"; do
  note "applying $(basename "$p")"
  patch -d "$stage" -p1 -s -N --no-backup-if-mismatch -r - < "$p" >&2 || {
    note "$(basename "$p") does not apply to $pkg $version"; exit 1; }
done
if [ -d "$tree" ]; then
  rsync -rl --checksum --delete --exclude=/.luotrace-patches "$stage/" "$tree/"
else
  cp -a "$stage" "$tree"
fi
rm -rf "$stage"
printf '%s\n' "${patches[@]##*/}" > "$tree/.luotrace-patches"

mkdir -p "$build"
note "configuring (defconfig + kvm_guest.config + selftests/liveupdate/config + workloads/vm/luo.config)"
if [ ! -f "$build/.config.base" ]; then
  make -s -C "$tree" O="$build" defconfig
  cp "$build/.config" "$build/.config.base"
fi
# Merged from the same base every time, so an option a patch's Kconfig adds
# (LIVEUPDATE_GUEST_MEMFD) sticks once that patch is there.
(cd "$tree" && scripts/kconfig/merge_config.sh -m -O "$build" "$build/.config.base" \
   kernel/configs/kvm_guest.config "$frag" "$here/luo.config" >/dev/null)
make -s -C "$tree" O="$build" olddefconfig
need="LIVEUPDATE KEXEC_HANDOVER MEMFD_CREATE DEBUG_INFO_BTF KPROBES IKHEADERS NET_9P_VIRTIO KVM KVM_AMD MEMORY_FAILURE"
grep -qs '^config LIVEUPDATE_GUEST_MEMFD' "$tree/kernel/liveupdate/Kconfig" "$tree/virt/kvm/Kconfig" &&
  need="$need LIVEUPDATE_GUEST_MEMFD"
for opt in $need; do
  grep -q "^CONFIG_$opt=y" "$build/.config" || { note "CONFIG_$opt did not stick"; exit 1; }
done
if [ -f "$build/vmlinux" ]; then
  note "building bzImage incrementally with $jobs jobs (progress in $build/build.log)"
else
  note "building bzImage with $jobs jobs (about 40 minutes on 2 cores; progress in $build/build.log)"
fi
start=$(date +%s)
if ! nice make -C "$tree" O="$build" -j"$jobs" bzImage > "$build/build.log" 2>&1; then
  grep -E 'error|warning' "$build/build.log" | head -20 >&2
  tail -30 "$build/build.log" >&2
  exit 1
fi
mkdir -p "$out"
cp "$build/arch/x86/boot/bzImage" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
cp "$build/.config" "$out/config"
printf '%s\n' "${patches[@]##*/}" > "$out/patches"
echo "$series" > "$out/series"
note "built in $(( $(date +%s) - start )) s: $out/bzImage"
selftests
echo "$out"

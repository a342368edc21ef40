#!/usr/bin/env bash
# make vmtest: boot the cached LUO kernel under QEMU TCG with the host's root
# filesystem visible (virtme-ng), run workloads/vm/inside.py as root inside it,
# then assert on the results from the host (tests/vm_lane.py).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
kdir=$(bash "$repo/workloads/vm/build-kernel.sh")
out=${LUOTRACE_VM_OUT:-/tmp/luotrace-vmtest}
rm -rf "$out" && mkdir -p "$out"
start=$(date +%s)
# Nested KVM fails on these machines ("KVM internal error"): software emulation.
"$repo/.venv/bin/vng" --run "$kdir/bzImage" --disable-kvm --cpus 2 --memory 4G --user root \
  --rwdir "$out" --qemu-opts "-cpu max" \
  --exec "cd $repo && $repo/.venv/bin/python -m workloads.vm.inside $out $kdir" || true
echo "vmtest: guest run took $(( $(date +%s) - start )) s" >&2
LUOTRACE_VM_OUT="$out" "$repo/.venv/bin/pytest" -q "$repo/tests/vm_lane.py"

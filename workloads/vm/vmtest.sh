#!/usr/bin/env bash
# make vmtest: boot the cached LUO kernel under QEMU TCG with the host's root
# filesystem visible (virtme-ng), run workloads/vm/inside.py as root inside it,
# then assert on the results from the host (tests/vm_lane.py).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
kdir=$(bash "$repo/workloads/vm/build-kernel.sh")
out=${LUOTRACE_VM_OUT:-/tmp/luotrace-vmtest}
rm -rf "$out" && mkdir -p "$out"
# The guest sees $out (shared read/write), not the host cache: selftests, and
# the bzImage it kexecs into (twice: see workloads/vm/inside.py).
cp -r "$kdir/selftests" "$out/selftests" && cp "$kdir/bzImage" "$out/bzImage"
# The guest runs a snapshot of the working tree, not the tree itself: a 20-minute
# lane reads its Python files live over 9p, and an edit made meanwhile would
# mix two versions in one run.
src=${LUOTRACE_VM_SRC:-/tmp/luotrace-vmtest-src}
rsync -a --delete --exclude /.venv --exclude /.git "$repo/" "$src/"
start=$(date +%s)
export PATH="$repo/.venv/bin:$PATH"
. "$repo/workloads/vm/boot.sh"
# A boot under TCG now and then dies before userspace (an int3 oops while the
# kernel patches its own text, a TCG race): such a run is retried once; a
# failure after the script started is a result and is not retried.
for attempt in 1 2; do
  boot_guest "$kdir" "$out" "$out/console.log" \
    "cd $src && LUOTRACE_VM_ONLY=${LUOTRACE_VM_ONLY:-all} $repo/.venv/bin/python -m workloads.vm.inside $out $out"
  [ -s "$out/boots.txt" ] && break
  echo "vmtest: the guest died before running the tests (attempt $attempt); console: $out/console.log" >&2
  cp "$out/console.log" "$out/console-failed-boot-$attempt.log"
done
echo "vmtest: guest run took $(( $(date +%s) - start )) s" >&2
# The same guest_memfd scenarios on the reference model, here, beside the kernel's.
if [ "${LUOTRACE_VM_ONLY:-all}" != kexec ]; then
  "$repo/.venv/bin/python" -m workloads.vm.model_vs_kernel "$out" || true
fi
LUOTRACE_VM_OUT="$out" "$repo/.venv/bin/pytest" -q "$repo/tests/vm_lane.py"

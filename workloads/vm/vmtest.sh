#!/usr/bin/env bash
# make vmtest: boot the cached LUO kernel under QEMU TCG with the host's root
# filesystem visible (virtme-ng), run workloads/vm/inside.py as root inside it,
# then assert on the results from the host (tests/vm_lane.py).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
kdir=$(bash "$repo/workloads/vm/build-kernel.sh")
out=${LUOTRACE_VM_OUT:-/tmp/luotrace-vmtest}
rm -rf "$out"
# The guest sees $out (shared read/write), not the host cache: selftests, and
# the bzImage it kexecs into (twice: see workloads/vm/inside.py).
mkdir -p "$out" && cp -r "$kdir/selftests" "$out/selftests" && cp "$kdir/bzImage" "$out/bzImage"
# The guest runs a snapshot of the working tree, not the tree itself: a 20-minute
# lane reads its Python files live over 9p, and an edit made meanwhile would
# mix two versions in one run.
src=${LUOTRACE_VM_SRC:-/tmp/luotrace-vmtest-src}
rsync -a --delete --exclude /.venv --exclude /.git "$repo/" "$src/"
start=$(date +%s)
export PATH="$repo/.venv/bin:$PATH"
. "$repo/workloads/vm/boot.sh"
# A boot under TCG now and then dies of the emulation: before userspace, or
# of an int3 oops while the kernel patches its own text (a static key flipped
# at the start of boot 2 or 3: "Oops: int3" at __schedule+0x413, a TCG
# cross-modifying-code race, not luotrace).  Such a run is started again from
# the beginning, once (its state went with the dead kernel); any other
# failure is a result and is not retried.
fresh_out() {
  mkdir -p "$out" && cp -r "$kdir/selftests" "$out/selftests" && cp "$kdir/bzImage" "$out/bzImage"
}
for attempt in 1 2; do
  boot_guest "$kdir" "$out" "$out/console.log" \
    "cd $src && LUOTRACE_VM_ONLY=${LUOTRACE_VM_ONLY:-all} $repo/.venv/bin/python -m workloads.vm.inside $out $out"
  if [ -s "$out/boots.txt" ] && ! grep -q "Oops: int3" "$out/console.log"; then break; fi
  [ "$attempt" = 2 ] && break
  echo "vmtest: the emulation killed the guest (attempt $attempt, boot $(wc -l < "$out/boots.txt" 2>/dev/null || echo 0) of 3); starting again; console kept as console-failed-$attempt.log" >&2
  cp "$out/console.log" "/tmp/luotrace-console-failed-$attempt.log"
  rm -rf "$out" && fresh_out
  mv "/tmp/luotrace-console-failed-$attempt.log" "$out/console-failed-$attempt.log"
done
echo "vmtest: guest run took $(( $(date +%s) - start )) s" >&2
# The same guest_memfd scenarios on the reference model, here, beside the kernel's.
if [ "${LUOTRACE_VM_ONLY:-all}" != kexec ]; then
  "$repo/.venv/bin/python" -m workloads.vm.model_vs_kernel "$out" || true
fi
LUOTRACE_VM_OUT="$out" "$repo/.venv/bin/pytest" -q "$repo/tests/vm_lane.py"

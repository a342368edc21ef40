#!/usr/bin/env bash
# make vmtest-ab A=seed B=latest: the same workload on two series' kernels
# (workloads/vm/ab.py inside each), then luotrace compare of the two sides per
# size (--json and a plot) and the race check per side, asserted on the host
# by tests/vm_ab.py.  Results in $LUOTRACE_VM_AB_OUT (default /tmp/luotrace-ab).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
A=${A:-seed} B=${B:-latest}
[ "$A" != "$B" ] || { echo "vmtest-ab: A and B are both $A: name two series" >&2; exit 1; }
out=${LUOTRACE_VM_AB_OUT:-/tmp/luotrace-ab}
rm -rf "$out" && mkdir -p "$out"
src=${LUOTRACE_VM_SRC:-/tmp/luotrace-vmtest-src}
rsync -a --delete --exclude /.venv --exclude /.git "$repo/" "$src/"
export PATH="$repo/.venv/bin:$PATH"
. "$repo/workloads/vm/boot.sh"
start=$(date +%s)
for side in "$A" "$B"; do
  kdir=$(SERIES=$side bash "$repo/workloads/vm/build-kernel.sh")
  echo "vmtest-ab: $side: booting $kdir" >&2
  t0=$(date +%s)
  # A guest under TCG now and then dies (before userspace, and once here in
  # the middle of a side's run): the side is run again once, from the start,
  # and the dead run's console kept.
  for attempt in 1 2; do
    rm -rf "$out/$side" && mkdir -p "$out/$side" && cp "$kdir/bzImage" "$out/$side/bzImage"  # what it kexecs into
    boot_guest "$kdir" "$out" "$out/console-$side.log" "cd $src && $repo/.venv/bin/python -m workloads.vm.ab $out $side"
    [ -s "$out/$side/done.json" ] && break
    cp "$out/console-$side.log" "$out/console-$side-failed-$attempt.log"
    echo "vmtest-ab: $side: the guest died before finishing (attempt $attempt); console: $out/console-$side-failed-$attempt.log" >&2
  done
  echo "vmtest-ab: $side: guest run took $(( $(date +%s) - t0 )) s" >&2
done
for size in 64M 256M; do
  "$repo/.venv/bin/luotrace" compare "$out/$A/bench-$size.luo" "$out/$B/bench-$size.luo" \
    --json --plot "$out/compare-$size.png" > "$out/compare-$size.json" || true
  "$repo/.venv/bin/luotrace" compare "$out/$A/bench-$size.luo" "$out/$B/bench-$size.luo" > "$out/compare-$size.txt" || true
done
# the old kernel's half of the update: preserve and, where the series has the op, luo_freeze
"$repo/.venv/bin/luotrace" compare "$out/$A/update-1.luo" "$out/$B/update-1.luo" --json > "$out/compare-update.json" || true
"$repo/.venv/bin/luotrace" compare "$out/$A/update-1.luo" "$out/$B/update-1.luo" > "$out/compare-update.txt" || true
for side in "$A" "$B"; do
  "$repo/.venv/bin/luotrace" report --json "$out/$side/scenarios.luo" > "$out/$side/scenarios-report.json" || true
  # the same scenarios on the reference model built as that side's revision
  model="$repo/workloads/model/luo_model"; [ "$side" = latest ] && model="$model-latest"
  "$repo/.venv/bin/python" -m workloads.vm.model_vs_kernel --ab "$out/$side" --model "$model" \
    > "$out/$side/model-vs-kernel.txt" 2>&1 || true
done
echo "vmtest-ab: both sides in $(( $(date +%s) - start )) s" >&2
LUOTRACE_VM_AB_OUT="$out" A="$A" B="$B" "$repo/.venv/bin/pytest" -q -s "$repo/tests/vm_ab.py"

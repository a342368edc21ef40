#!/usr/bin/env bash
# make vmbench-retrieve: the retrieve benchmark on the lane's kernel (QEMU TCG):
# a 256 MiB and a 1 GiB guest_memfd kept across each kexec and retrieved in the
# next boot, untraced and traced (folio mode, --folio-latency), interleaved,
# LUOTRACE_RB_REPS of each (default 3: ten boots); then the medians, ratios and
# the BPF share of the retrieve (workloads/vm/retrieve_bench.py).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
kdir=$(bash "$repo/workloads/vm/build-kernel.sh")
out=${LUOTRACE_RB_OUT:-/tmp/luotrace-vmbench-retrieve}
rm -rf "$out" && mkdir -p "$out"
cp "$kdir/bzImage" "$out/bzImage"
# a snapshot of the tree, as vmtest.sh takes one
src=${LUOTRACE_RB_SRC:-/tmp/luotrace-vmbench-retrieve-src}
rsync -a --delete --exclude /.venv --exclude /.git "$repo/" "$src/"
start=$(date +%s)
export PATH="$repo/.venv/bin:$PATH"
. "$repo/workloads/vm/boot.sh"
# A boot under TCG now and then dies (an int3 oops while the kernel patches its
# text): boot again, up to 4 times; the stage file says where the run was, and
# the retrieve whose files died with that boot is counted as lost.
for attempt in 1 2 3 4 5; do
  boot_guest "$kdir" "$out" "$out/console.log" \
    "cd $src && LUOTRACE_RB_REPS=${LUOTRACE_RB_REPS:-3} $repo/.venv/bin/python -m workloads.vm.retrieve_bench $out $out"
  [ -f "$out/rb-done" ] && break
  echo "vmbench-retrieve: the guest died at stage $(cat "$out/rb-stage" 2>/dev/null || echo 0) (attempt $attempt)" >&2
  cp "$out/console.log" "$out/console-died-$attempt.log"
done
echo "vmbench-retrieve: guest run took $(( $(date +%s) - start )) s" >&2
LUOTRACE_RB_REPS=${LUOTRACE_RB_REPS:-3} "$repo/.venv/bin/python" -m workloads.vm.retrieve_bench --summary "$out"

#!/usr/bin/env bash
# make vmtest-ab A=seed B=latest [BOOTS=3]: the same workload on two series'
# kernels, booted in turn A B A B ... BOOTS times each (workloads/vm/ab.py
# inside each boot), then luotrace compare of the two sides per size with
# the boot as the unit (--json and a plot), the race check and the update
# across a kexec per side, asserted on the host by tests/vm_ab.py.
# A=B is an A/A: the same kernel on both sides, which must call nothing; its
# spread between boots is the noise floor an A/B is read against.
# Results in $LUOTRACE_VM_AB_OUT (default /tmp/luotrace-ab).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
A=${A:-seed} B=${B:-latest} BOOTS=${BOOTS:-3}
out=${LUOTRACE_VM_AB_OUT:-/tmp/luotrace-ab}
rm -rf "$out" && mkdir -p "$out/A" "$out/B"
src=${LUOTRACE_VM_SRC:-/tmp/luotrace-vmtest-src}
rsync -a --delete --exclude /.venv --exclude /.git "$repo/" "$src/"
export PATH="$repo/.venv/bin:$PATH"
. "$repo/workloads/vm/boot.sh"
start=$(date +%s)
declare -A series=([A]="$A" [B]="$B") kdir
for side in A B; do
  kdir[$side]=$(SERIES=${series[$side]} bash "$repo/workloads/vm/build-kernel.sh")
  cp "${kdir[$side]}/bzImage" "$out/$side/bzImage"  # what a side's first boot kexecs into
done
echo "vmtest-ab: A=$A B=$B, $BOOTS boots a side, interleaved" > "$out/boots.txt"
for boot in $(seq 1 "$BOOTS"); do
  for side in A B; do
    # A guest under TCG now and then dies: the boot is run again once; a boot
    # that dies twice is said (deaths.txt) and the rest compares without it.
    for attempt in 1 2; do
      t0=$(date +%s)
      rm -rf "$out/$side/boot-$boot"
      [ "$boot" = 1 ] && rm -f "$out/$side/stage" "$out/$side/done.json"
      boot_guest "${kdir[$side]}" "$out" "$out/console-$side-$boot.log" \
        "cd $src && $repo/.venv/bin/python -m workloads.vm.ab $out $side ${series[$side]} $boot"
      ok=$([ -s "$out/$side/boot-$boot/done.json" ] && { [ "$boot" != 1 ] || [ -s "$out/$side/done.json" ]; } && echo 1 || true)
      echo "$side ${series[$side]} boot $boot attempt $attempt: $([ -n "$ok" ] && echo ok || echo died) in $(( $(date +%s) - t0 )) s" \
        | tee -a "$out/boots.txt" >&2
      [ -n "$ok" ] && break
      cp "$out/console-$side-$boot.log" "$out/console-$side-$boot-failed-$attempt.log"
      [ "$attempt" = 2 ] && echo "side $side (${series[$side]}) boot $boot: the guest died twice; compared without it" \
        | tee -a "$out/deaths.txt" >&2
    done
  done
done
lt="$repo/.venv/bin/luotrace"
for size in 64M 256M; do
  recs=$(ls "$out"/A/boot-*/bench-$size.luo "$out"/B/boot-*/bench-$size.luo 2>/dev/null || true)
  [ -n "$recs" ] || continue
  # shellcheck disable=SC2086
  "$lt" compare $recs --by side --json --plot "$out/compare-$size.png" > "$out/compare-$size.json" || true
  # shellcheck disable=SC2086
  "$lt" compare $recs --by side > "$out/compare-$size.txt" 2>&1 || true
done
# the old kernel's half of the update: preserve and, where the series has the op, luo_freeze
if [ -s "$out/A/update-1.luo" ] && [ -s "$out/B/update-1.luo" ]; then
  "$lt" compare "$out/A/update-1.luo" "$out/B/update-1.luo" --json > "$out/compare-update.json" || true
  "$lt" compare "$out/A/update-1.luo" "$out/B/update-1.luo" > "$out/compare-update.txt" 2>&1 || true
fi
for side in A B; do
  [ -s "$out/$side/scenarios.luo" ] || continue
  "$lt" report --json "$out/$side/scenarios.luo" > "$out/$side/scenarios-report.json" || true
  # the same scenarios on the reference model built as that side's revision
  model="$repo/workloads/model/luo_model"; [ "${series[$side]}" = latest ] && model="$model-latest"
  "$repo/.venv/bin/python" -m workloads.vm.model_vs_kernel --ab "$out/$side" --model "$model" \
    > "$out/$side/model-vs-kernel.txt" 2>&1 || true
done
echo "vmtest-ab: $BOOTS boots a side in $(( $(date +%s) - start )) s" | tee -a "$out/boots.txt" >&2
LUOTRACE_VM_AB_OUT="$out" A="$A" B="$B" BOOTS="$BOOTS" "$repo/.venv/bin/pytest" -q -s "$repo/tests/vm_ab.py"

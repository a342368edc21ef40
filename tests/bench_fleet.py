"""Fleet scale benchmark (`make bench-fleet`): 1,000 hosts x 10 updates,
simulated, exported to the Parquet dataset and queried by `luotrace fleet`.

The fleet: ten pools of hosts (label ``pool`` a..j); each host's first five
updates run patch v3 (kernel 7.2.13-v3), the last five v4; on pool j, v4's
fill pass is 15 % slower.  A recording in 97 fails a file, one in 89 has
holes.  Printed: export rate (recordings/s, rows/s) against reading the same
recordings' reports alone (the same run's baseline), dataset size per
update, summary time and peak RSS at a tenth of the fleet and at all of it
(the ratio is what says memory is bounded), and whether `fleet compare`
finds pool j's slowed fill pass and nothing on a pool that was not slowed.

    python -m tests.bench_fleet [HOSTS]   (default 1000; needs no root)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import List, Tuple

from tracer.fleet import dataset
from tracer.analysis.replay import replay
from tracer.analysis.simulate import SimSpec, simulate

from .bench import REPO, _peak_mib

UPDATES = 10
POOLS = "abcdefghij"
T0 = 1_796_000_000 * 10 ** 9
DAY = 86400 * 10 ** 9


def _one(args: Tuple[str, int, int]) -> str:
    d, host, k = args
    i = host * UPDATES + k
    pool = POOLS[host % len(POOLS)]
    patch = "v3" if k < UPDATES // 2 else "v4"
    path = os.path.join(d, f"h{host:04d}-u{k}.luo")
    simulate(SimSpec(files=4, size=64 << 20, seed=i, hostname=f"host{host:04d}", kernel=f"7.2.13-{patch}",
                     labels={"patch": patch, "pool": pool}, started_ns=T0 + k * DAY + host * 10 ** 9,
                     errors=1 if i % 97 == 0 else 0, anomalies=["holes"] if i % 89 == 0 else [],
                     phase_scale={"fill_pass": 1.15} if pool == "j" and patch == "v4" else {}),
             path, progress=lambda s: None)
    return path


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _s, ns in os.walk(path) for n in ns)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True, cwd=REPO)


def main() -> None:
    hosts = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    jobs = min(4, os.cpu_count() or 1)
    rows: List[str] = []
    with tempfile.TemporaryDirectory(prefix="luotrace-fleet-bench-") as tmp:
        rec_dir = os.path.join(tmp, "rec")
        os.makedirs(rec_dir)
        n = hosts * UPDATES
        print(f"luotrace fleet bench: {hosts} hosts x {UPDATES} updates = {n} recordings, {jobs} jobs", flush=True)
        t = time.perf_counter()
        with ProcessPoolExecutor(jobs) as pool:
            paths = list(pool.map(_one, [(rec_dir, h, k) for h in range(hosts) for k in range(UPDATES)], chunksize=64))
        sim_s = time.perf_counter() - t
        print(f"  simulated in {sim_s:.1f} s", file=sys.stderr, flush=True)
        # baseline: the reports alone, as export reads them (same process count)
        t = time.perf_counter()
        with ProcessPoolExecutor(jobs) as pool:
            for _ in pool.map(replay, paths, chunksize=64):
                pass
        base_s = time.perf_counter() - t
        tenth = os.path.join(tmp, "ds-tenth")
        dataset.export(tenth, paths[: n // 10], jobs=jobs)
        root = os.path.join(tmp, "ds")
        t = time.perf_counter()
        res = dataset.export(root, paths, jobs=jobs)
        exp_s = time.perf_counter() - t
        total_rows = sum(res.rows.values())
        again = time.perf_counter()
        res2 = dataset.export(root, paths[:1000], jobs=jobs)
        again = time.perf_counter() - again
        size = _du(root)
        rows.append(f"export {n} recordings: {exp_s:.1f} s = {n / exp_s:.0f} recordings/s, {total_rows / exp_s:,.0f} rows/s "
                    f"({total_rows:,} rows in {res.parts} parts); reading their reports alone {base_s:.1f} s: "
                    f"ratio {exp_s / base_s:.2f}")
        rows.append("  rows: " + ", ".join(f"{t} {k:,}" for t, k in res.rows.items()))
        rows.append(f"  again (1,000 already there): {again:.2f} s, {res2.added} added")
        rows.append(f"dataset: {size / 2 ** 20:.1f} MiB, {size / n / 1024:.2f} KiB per update "
                    f"(the recordings: {_du(rec_dir) / n / 1024:.1f} KiB each)")
        s1, m1 = _peak_mib(["fleet", tenth, "--json"])
        s10, m10 = _peak_mib(["fleet", root, "--json"])
        rows.append(f"fleet summary (by kernel): {n // 10} updates {s1:.2f} s, peak RSS {m1} MiB; {n} updates {s10:.2f} s, "
                    f"peak RSS {m10} MiB: ratio {m10 / m1:.2f} for 10x the data")
        sp, mp = _peak_mib(["fleet", root, "--by", "patch", "--json"])
        rows.append(f"fleet summary --by patch (label): {sp:.2f} s, peak RSS {mp} MiB")
        found = []
        for pool_name in ("j", "a"):
            where = f"u.labels['pool'] = '{pool_name}'"
            sc, mc = _peak_mib(["fleet", "compare", root, "--by", "patch", "v3", "v4", "--where", where, "--json"])
            r = _cli("fleet", "compare", root, "--by", "patch", "v3", "v4", "--where", where, "--json")
            changed = json.loads(r.stdout)["changed"]
            found.append((pool_name, changed))
            rows.append(f"fleet compare --by patch v3 v4 --where pool={pool_name}: changed {changed or 'nothing'} "
                        f"({sc:.2f} s, peak RSS {mc} MiB)")
        r = _cli("fleet", "compare", root, "--by", "patch", "v3", "v4", "--json")
        if r.returncode not in (0, 3):
            raise RuntimeError(f"fleet compare failed: {r.stderr.strip()[-300:]}")
        whole = json.loads(r.stdout)
        fill = [x for x in whole["phases"] if x["phase"] == "fill_pass"][0]
        rows.append(f"fleet compare --by patch v3 v4, the whole fleet: changed {whole['changed'] or 'nothing'} "
                    f"(fill_pass {100 * fill['delta']:+.1f} %: pool j's 15 % diluted over ten pools, under the 3 % floor)")
        ok = found[0][1] == ["guest_memfd/fill_pass"] and found[1][1] == []
        rows.append(f"slowed hosts found: {'yes' if ok else 'NO'} (pool j: fill_pass; pool a: nothing)")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

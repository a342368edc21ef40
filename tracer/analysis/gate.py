"""The CI gate (`--fail-on error,anomaly,lost`): what in a report fails a
script, one phrase per kind found.  `record`, `report` and `top` share it."""
from __future__ import annotations

from typing import List, Sequence


FAIL_ON = ("error", "anomaly", "lost")


def failures(rep: dict, kinds: Sequence[str]) -> List[str]:
    """What in REP fails a CI gate (`--fail-on`), one phrase per kind found."""
    out = []
    t = rep.get("totals") or {}
    if "error" in kinds:
        errs = [f for f in rep.get("files", []) if f.get("result") == "error" or f.get("errno")]
        n = max(len(errs), (t.get("files_by_result") or {}).get("error", 0))
        if n:
            names = sorted({f["errno"] for f in errs if f.get("errno")})
            out.append(f"{n} file(s) failed" + (f" ({', '.join(names)})" if names else ""))
    if "anomaly" in kinds and t.get("anomalies"):
        out.append(f"{sum(t['anomalies'].values())} anomal{'y' if sum(t['anomalies'].values()) == 1 else 'ies'} "
                   f"({', '.join(sorted(t['anomalies']))})")
    if "lost" in kinds and (rep.get("events") or {}).get("lost"):
        out.append(f"{rep['events']['lost']} event(s) lost")
    return out

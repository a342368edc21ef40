"""Anomaly rules for what cannot happen on this machine's kernel, fed with
fabricated map rows and events (fake kernel data, as the names say): large
folios on a guest_memfd (6.18 guest_memfd allocates order-0 folios only) and
pfn resolution through vmemmap (needs the patched kernel's kho_preserve_folio).
Everything else is covered by real runs in test_model.py."""
from __future__ import annotations

import numpy as np

from tracer import catalog
from tracer.aggregator import Aggregator
from tracer.events import EV_ENTRY, EV_INSTANT, EV_RETURN, EVENT_DTYPE
from tracer.report import build

GMEM = catalog.HANDLERS["guest_memfd"]


def ev(probe, kind, ts, ino, ret=0, a0=0, a1=0, a2=0, dev=16, tid=100):
    e = np.zeros(1, dtype=EVENT_DTYPE)
    e["probe"], e["kind"], e["ts"], e["ino"], e["dev"], e["handler"] = catalog.PROBE_IDS[probe], kind, ts, ino, dev, GMEM
    e["ret"], e["a0"], e["a1"], e["a2"], e["tid"] = ret, a0, a1, a2, tid
    return e


def preserved_file(ino=7, size=1 << 20, folios=256):
    return np.concatenate([
        ev("gmem_preserve", EV_ENTRY, 1000, ino, a0=size, a1=3),
        ev("gmem_freeze_inode", EV_INSTANT, 1010, ino, a0=1),
        ev("gmem_walk", EV_RETURN, 1100, ino, a0=folios, a1=0, a2=50),
        ev("gmem_walk", EV_RETURN, 1500, ino, a0=folios, a1=1, a2=300),
        ev("gmem_preserve", EV_RETURN, 1600, ino, a0=0xdead000, a2=600),
    ])


def report_for(events, maps, mode="folio"):
    agg = Aggregator(mode)
    agg.feed(events)
    agg.finish(maps)
    return build(agg, {"mode": mode}, None)


def test_large_folios_fake_kernel_population_rows():
    maps = {"population": [{"ino": 7, "dev": 16, "handler": GMEM, "added": 256, "deleted": 0, "large": 4,
                            "max_order": 9, "deleted_frozen": 0}], "folio_stats": [], "folio_hist": []}
    rep = report_for(preserved_file(), maps)
    (f,) = rep["files"]
    assert [a["code"] for a in f["anomalies"]] == ["large_folios"]
    assert "order up to 9" in f["anomalies"][0]["detail"]


def test_pfn_zero_fake_kernel_counters():
    maps = {"folio_stats": [{"ino": 7, "dev": 16, "handler": GMEM, "preserved": 256, "preserve_errors": 0,
                             "unpreserved": 0, "restored": 0, "discarded": 0, "pfn_zero": 1,
                             "preserve_ns": 1000, "pfn_unknown": 0}], "folio_hist": [], "population": []}
    rep = report_for(preserved_file(), maps)
    assert [a["code"] for a in rep["files"][0]["anomalies"]] == ["pfn_zero"]


def test_clean_fake_kernel_file_has_no_anomaly_and_batching_does_not_matter():
    events = preserved_file()
    maps = {"folio_stats": [], "folio_hist": [], "population": []}
    whole = report_for(events, maps, mode="light")
    agg = Aggregator("light")
    for i in range(len(events)):
        agg.feed(events[i:i + 1])
    agg.finish(maps)
    assert build(agg, {"mode": "light"}, None) == whole
    (f,) = whole["files"]
    assert f["anomalies"] == [] and f["result"] == "ok" and f["folios_preserved"] == 256


def test_unknown_probe_ids_are_ignored_not_fatal():
    bad = ev("gmem_preserve", EV_ENTRY, 5, 9)
    bad["probe"] = 999
    rep = report_for(np.concatenate([bad, preserved_file()]), {})
    assert len(rep["files"]) == 1

"""Anomaly rules for what cannot happen on this machine's kernel, fed with
fabricated map rows and events (fake kernel data, as the names say): large
folios on a guest_memfd (6.18 guest_memfd allocates order-0 folios only) and
pfn resolution through vmemmap (needs the patched kernel's kho_preserve_folio).
Everything else is covered by real runs in test_model.py."""
from __future__ import annotations

import numpy as np

from tracer.probes import catalog
from tracer.analysis.aggregator import Aggregator
from tracer.probes.events import EV_ENTRY, EV_INSTANT, EV_RETURN, EVENT_DTYPE
from tracer.analysis.report import build

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


# ---- LUO asks every handler about every file (fake kernel events: the
# patched kernel registers the guest_memfd handler before memfd's) ----

MEMFD = catalog.HANDLERS["memfd"]
TMPFS, GMEM_FS, EXT4 = 0x01021994, 0x474D454D, 0xEF53


def asked(probe, handler, ts, ino, verdict, magic, tid=100):
    a = ev(probe, EV_ENTRY, ts, ino, a1=magic, tid=tid)
    r = ev(probe, EV_RETURN, ts + 10, ino, ret=verdict, a2=10, tid=tid)
    a["handler"] = r["handler"] = handler
    return [a, r]


def luo_call(ts, token, ret, inner, tid=100):
    entry = ev("luo_preserve_file", EV_ENTRY, ts, 0, a0=token, a1=5, a2=0x5E55, tid=tid)
    ret_ev = ev("luo_preserve_file", EV_RETURN, ts + 900, 0, ret=ret, a2=900, tid=tid)
    return np.concatenate([entry, *inner, ret_ev])


def test_memfd_asked_of_the_guest_memfd_handler_first_fake_kernel():
    memfd = [*asked("gmem_can_preserve", GMEM, 1010, 40, 0, TMPFS), *asked("memfd_can_preserve", MEMFD, 1030, 40, 1, TMPFS)]
    pres = [ev("memfd_preserve", EV_ENTRY, 1100, 40, a0=4096), ev("memfd_preserve", EV_RETURN, 1800, 40, a0=0xbeef, a2=700)]
    for e in pres:
        e["handler"] = MEMFD
    rep = report_for(luo_call(1000, 0x101, 0, memfd + pres), {})
    assert [(f["handler"], f["result"]) for f in rep["files"]] == [("memfd", "ok")]


def test_private_guest_memfd_no_handler_takes_is_rejected_once_fake_kernel():
    refused = [*asked("gmem_can_preserve", GMEM, 1010, 41, 0, GMEM_FS), *asked("memfd_can_preserve", MEMFD, 1030, 41, 0, GMEM_FS)]
    rep = report_for(luo_call(1000, 0x102, -2, refused), {})
    (f,) = rep["files"]
    assert (f["handler"], f["result"], f["errno"]) == ("guest_memfd", "rejected", "ENOENT")
    assert [p["name"] for p in f["phases"]] == ["can_preserve"]


def test_file_of_no_handlers_kind_is_rejected_once_fake_kernel():
    refused = [*asked("gmem_can_preserve", GMEM, 1010, 42, 0, EXT4), *asked("memfd_can_preserve", MEMFD, 1030, 42, 0, EXT4)]
    rep = report_for(luo_call(1000, 0x103, -2, refused), {})
    assert [(f["inode"], f["result"], f["errno"]) for f in rep["files"]] == [(42, "rejected", "ENOENT")]


def test_a_cancelled_sessions_address_reused_is_a_new_session_fake_kernel():
    """The kernel frees a closed session and the next one may get its memory
    (seen on the VM lane): same luo_file_set address, two sessions."""
    def one(ts, ino):
        pres = [ev("gmem_preserve", EV_ENTRY, ts + 50, ino, a0=4096), ev("gmem_preserve", EV_RETURN, ts + 90, ino, a2=40)]
        return np.concatenate([luo_call(ts, 0x201, 0, [*asked("gmem_can_preserve", GMEM, ts + 10, ino, 1, GMEM_FS), *pres]),
                               ev("luo_unpreserve_files", EV_INSTANT, ts + 1000, 0, a2=0x5E55)])
    rep = report_for(np.concatenate([one(1000, 50), one(5000, 51)]), {})
    assert [(s["id"], s["files"], s["cancelled"]) for s in rep["sessions"]] == [(1, [50], True), (2, [51], True)]
    assert [f["session"] for f in rep["files"]] == [1, 2]

"""Rebuilds, from the event stream and the final BPF map dumps, a timeline
per preserved file and per LUO session.

The aggregator is fed events in arrival order, in batches of any size, and
gives the same result whatever the batching: the live run and the replay of
its recording feed it the same records.  Per-folio records (trace mode) are
counted vectorised; only lifecycle records go through Python one by one.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Set, Tuple

import numpy as np

from tracer.probes import catalog
from tracer.kernel.abi import EVENT_DTYPE, SER_DEV
from tracer.probes.catalog import FILE_HANDLER_IDS, HANDLER_LIST, HANDLER_NAMES
from tracer.probes.events import EV_ENTRY, EV_INSTANT, EV_RETURN, EVF_A0_UNKNOWN, EVF_A1_UNKNOWN, EVF_KEY_UNKNOWN, errno_name

Key = Tuple[int, int, int]  # (handler, dev, ino)

_PER_FOLIO = np.array([p.per_folio and p.kind != "tracepoint" for p in catalog.PROBES], dtype=bool)
# a walk probe -> its phase names for pass 1 and pass 2 (the catalog's handlers)
_WALK_PHASE = {h.walk_probe: h.walk for h in HANDLER_LIST if h.walk_probe}
EVIDENCE_MAX = 64  # page-cache changes kept per file as anomaly evidence (all are counted)
# Memory is bounded by these, whatever a recording claims: files followed (the
# BPF side tracks 4096), phases kept per file, calls in flight per thread,
# kexec instants.  What falls beyond a bound is counted and reported.
FILES_MAX = 16384
PHASES_MAX = 64
TIDS_MAX = 65536
KEXEC_MAX = 64
RETIRED_REMEMBERED = 4096  # keys of forgotten files whose late events are ignored
# A file's result once nothing more happens to it (until it is preserved again);
# "ok" is preserved and waiting for the kexec.
FINAL_RESULTS = ("retrieved", "discarded", "cancelled", "rejected", "error")


@dataclass
class Phase:
    name: str
    start_ns: int
    duration_ns: int
    ret: int = 0
    parent: Optional[str] = None
    count: Optional[int] = None

    def to_json(self, base: int) -> dict:
        d = {"name": self.name, "start_ns": self.start_ns - base, "duration_ns": self.duration_ns}
        if self.parent:
            d["parent"] = self.parent
        if self.ret:
            d["errno"] = errno_name(self.ret)
        if self.count is not None:
            d["count"] = self.count
        return d


@dataclass
class FileState:
    key: Key
    first_ts: int
    size: Optional[int] = None
    flags: Optional[int] = None
    session: Optional[int] = None
    token: Optional[int] = None
    fd: Optional[int] = None
    phases: List[Phase] = field(default_factory=list)
    result: str = "none"
    errno: Optional[str] = None
    failed_phase: Optional[str] = None
    ser: Optional[int] = None
    count_pass: Optional[int] = None
    fill_count: Optional[int] = None
    fill_ret: Optional[int] = None
    freeze_log: List[Tuple[int, int]] = field(default_factory=list)
    frozen_changes: List[Tuple[int, str, int, int, int]] = field(default_factory=list)  # first EVIDENCE_MAX
    frozen_adds: int = 0
    retrieved: bool = False
    retrieved_inode: Optional[int] = None
    vm_token: Optional[int] = None
    # where the VM token was asked for: luo_freeze (the seed revision's freeze
    # op) or preserve (later revisions); and the errno when the lookup failed
    vm_token_in: Optional[str] = None
    vm_token_errno: Optional[str] = None
    can_preserve: Optional[bool] = None
    streamed: Dict[str, int] = field(default_factory=dict)
    open_calls: Dict[str, int] = field(default_factory=dict)
    phases_dropped: int = 0
    counted: str = "none"  # the result last seen by Aggregator.finish (finished files are counted once)

    def add_phase(self, p: Phase) -> None:
        if len(self.phases) >= PHASES_MAX:
            self.phases_dropped += 1
            return
        self.phases.append(p)

    @property
    def handler(self) -> str:
        return HANDLER_NAMES.get(self.key[0], "unknown")

    def fail(self, phase: str, ret: int) -> None:
        if self.errno is None:
            self.errno = errno_name(ret)
            self.failed_phase = phase
        self.result = "error"


@dataclass
class Session:
    id: int  # ordinal in order of appearance; handle = the kernel's luo_file_set pointer
    handle: int = 0
    files: Dict[Key, None] = field(default_factory=dict)  # an ordered set
    freeze_start: Optional[int] = None
    freeze_ns: Optional[int] = None
    freeze_ret: Optional[int] = None
    cancelled: bool = False


# The record as little-endian 64-bit words (tracer/kernel/abi.py's layout): the
# inode's word and, next to it, the one holding dev and handler.
EVENT_WORDS = EVENT_DTYPE.itemsize // 8
_OFF = {k: EVENT_DTYPE.fields[k][1] for k in ("ino", "dev", "handler")}  # type: ignore[index]
_W_INO, _W_DEV_HANDLER = _OFF["ino"] // 8, _OFF["dev"] // 8
assert _OFF["ino"] % 8 == 0 and _W_DEV_HANDLER == _W_INO + 1 and _OFF["handler"] == _OFF["dev"] + 4


_SLICE = 4096  # records checked at a time: 256 KiB, in cache for the second and third look


def _scan(rows: np.ndarray) -> Tuple[int, bool]:
    """The latest timestamp, and whether every record has the first one's
    probe, inode, dev and handler (the usual batch of a trace: one file's
    folios).  Word compares over cache-sized slices, no copy of a field."""
    if not rows.flags.c_contiguous:
        return int(rows["ts"].max()), len(rows) < 2
    w = rows.view(np.uint64).reshape(len(rows), EVENT_WORDS)
    probe = rows["probe"]
    ino, dev_handler, p0 = w[0, _W_INO], w[0, _W_DEV_HANDLER], probe[0]
    last, same = 0, True
    for s in range(0, len(rows), _SLICE):
        part = w[s:s + _SLICE]
        last = max(last, int(part[:, 0].max()))
        same = same and bool((part[:, _W_INO] == ino).all() and (part[:, _W_DEV_HANDLER] == dev_handler).all()
                             and (probe[s:s + _SLICE] == p0).all())
    return last, same


def _put(d: dict, key, value, limit: int = TIDS_MAX) -> None:
    """d[key] = value, the oldest entry evicted at LIMIT: calls whose return
    never came (a crafted stream, a crash) must not accumulate."""
    if key not in d and len(d) >= limit:
        d.pop(next(iter(d)))
    d[key] = value


class Aggregator:
    def __init__(self, mode: str, clock_base_ns: int = 0, max_files: int = FILES_MAX):
        self.mode = mode
        self.base = clock_base_ns
        self.max_files = max_files
        self.files: Dict[Key, FileState] = {}  # in order of first appearance
        self.untracked_files = 0  # files first seen when max_files were followed: counted, not followed
        self.untracked_events = 0  # their records
        self._retired: Set[Key] = set()  # files forgotten (folded into totals by serve) ...
        self._retired_order: Deque[Key] = deque()  # ... remembered for a while: late events are ignored
        self.retired: dict = {}  # tracer.analysis.totals.Totals as JSON: what the forgotten files and sessions count
        self.retired_files = 0
        self.retired_sessions = 0
        self.finished: Dict[Tuple[int, str], int] = {}  # (handler, final result) -> files that reached it
        self.ser_map: Dict[Tuple[int, int], Key] = {}  # (handler, ser handle) -> file
        self.sessions: Dict[int, Session] = {}  # by handle: the latest session at that address
        self.all_sessions: List[Session] = []  # the kernel reuses a freed session's memory for a new one
        self._freezing: Dict[int, int] = {}  # tid -> session handle
        self.pending_session: Dict[int, Tuple[int, int, int]] = {}  # tid -> (session, token, fd)
        self.last_file: Dict[int, Key] = {}  # tid -> file of the last handler op entered
        # LUO asks every registered handler's can_preserve in turn: a "no" only
        # rejects the file if no handler takes it, settled when luo_preserve_file
        # returns.  tid -> the "no"s so far, and the superblock magic of the
        # can_preserve call in progress.
        self._refused: Dict[int, List[Tuple[Key, int, int, Optional[int]]]] = {}
        self._asked_magic: Dict[int, Optional[int]] = {}
        self.received = 0
        self.per_folio_received = 0
        self.streamed: Dict[Tuple[int, int, int, int], int] = {}  # (handler, dev, ino, probe) -> records
        self.unknown_key = 0
        self.last_ts = 0
        self.maps: Optional[dict] = None
        self.kexec_ts: List[int] = []  # kernel_kexec entries: the jump to the next kernel

    # ---- feeding ----

    def feed(self, batch: np.ndarray) -> int:
        """Apply BATCH; returns its latest timestamp (0 when empty), which
        the scan over it found anyway."""
        if not len(batch):
            return 0
        self.received += len(batch)
        last, one_file = _scan(batch)
        self.last_ts = max(self.last_ts, last)
        p0 = int(batch["probe"][0])
        if one_file and p0 < len(_PER_FOLIO) and _PER_FOLIO[p0]:
            self._count_streamed(batch, one_file=True)  # the usual batch of a trace: one file's folios, no copy
            return last
        probes = batch["probe"].astype(np.intp)
        valid = probes < len(_PER_FOLIO)
        folio_mask = np.zeros(len(batch), dtype=bool)
        folio_mask[valid] = _PER_FOLIO[probes[valid]]
        # Keep arrival order: per-folio runs between lifecycle records are
        # counted vectorised, each lifecycle record is applied in its place.
        prev = 0
        for i in np.flatnonzero(~folio_mask & valid).tolist():
            if i > prev:
                self._count_run(batch[prev:i], folio_mask[prev:i])
            self._lifecycle(batch[i])
            prev = i + 1
        if prev < len(batch):
            self._count_run(batch[prev:], folio_mask[prev:])
        return last

    def _count_run(self, seg: np.ndarray, mask: np.ndarray) -> None:
        """The per-folio records of SEG (a run between lifecycle records):
        all of it, usually, without a copy."""
        if mask.all():
            self._count_streamed(seg)
        elif mask.any():
            self._count_streamed(seg[mask])

    def in_update(self) -> bool:
        """Whether a file is being preserved, or is preserved and waits for
        the kexec: when guest_memfd population matters (a folio added to a
        frozen file is lost to the next kernel)."""
        return any(st.result == "ok" or st.open_calls for st in self.files.values()
                   if st.key[0] in FILE_HANDLER_IDS)

    def _count_streamed(self, rows: np.ndarray, one_file: bool = False) -> None:
        """Per-folio records arrive through their own ring buffer, so they may
        overtake the lifecycle record of their file: count them by raw key and
        attribute them at the end."""
        self.per_folio_received += len(rows)
        if one_file or _scan(rows)[1]:  # the usual block: one file's folios
            r = rows[0]
            groups = [(int(r["ino"]), (int(r["handler"]) << 48) | (int(r["probe"]) << 32) | int(r["dev"]), len(rows))]
        else:
            ino = rows["ino"]
            # handler (8 bits), probe (16) and dev (32) packed beside the inode number
            key2 = (rows["handler"].astype(np.uint64) << np.uint64(48)) | \
                (rows["probe"].astype(np.uint64) << np.uint64(32)) | rows["dev"].astype(np.uint64)
            order = np.lexsort((key2, ino))
            i_s, k_s = ino[order], key2[order]
            starts = np.r_[0, np.flatnonzero((i_s[1:] != i_s[:-1]) | (k_s[1:] != k_s[:-1])) + 1]
            counts = np.diff(np.r_[starts, len(rows)])
            groups = list(zip(i_s[starts].tolist(), k_s[starts].tolist(), counts.tolist()))
        for i, k2, n in groups:
            k = (int(k2 >> 48), int(k2 & 0xFFFFFFFF), int(i), int((k2 >> 32) & 0xFFFF))
            if k not in self.streamed and len(self.streamed) >= 4 * self.max_files:
                self.untracked_events += int(n)  # per-folio records of more files than are followed
                continue
            self.streamed[k] = self.streamed.get(k, 0) + int(n)

    def _file(self, key: Key, ts: int) -> Optional[FileState]:
        """The file's state, created on first sight; None (counted) beyond max_files."""
        st = self.files.get(key)
        if st is None:
            if key in self._retired:
                self.untracked_events += 1
                return None
            if len(self.files) >= self.max_files:
                self.untracked_files += 1
                self.untracked_events += 1
                return None
            st = self.files[key] = FileState(key, ts)
        return st

    def forget(self, keys: List[Key]) -> None:
        """Drop files whose rows were folded into totals (a long-running serve):
        their ser handles and streamed counts go too; late events are ignored."""
        gone = set(keys)
        for k in keys:
            self.files.pop(k, None)
            self._retired.add(k)
            self._retired_order.append(k)
        while len(self._retired_order) > RETIRED_REMEMBERED:
            self._retired.discard(self._retired_order.popleft())
        self.ser_map = {sk: k for sk, k in self.ser_map.items() if k not in gone}
        self.streamed = {sk: n for sk, n in self.streamed.items() if sk[:3] not in gone}
        for s in self.all_sessions:
            for k in gone & s.files.keys():
                del s.files[k]

    def _resolve(self, key: Key, ts: int = 0, create: bool = False) -> Optional[FileState]:
        """Map a serialized-data handle back to its file; else the file itself."""
        h, dev, ino = key
        if dev == SER_DEV:
            target = self.ser_map.get((h, ino))
            return self.files.get(target) if target else None
        if key in self.files:
            return self.files[key]
        return self._file(key, ts) if create else None

    def _lifecycle(self, ev) -> None:
        probe = catalog.PROBES[int(ev["probe"])]
        role = probe.role
        kind = int(ev["kind"])
        ts = int(ev["ts"])
        tid = int(ev["tid"])
        key: Key = (int(ev["handler"]), int(ev["dev"]), int(ev["ino"]))
        ret = int(ev["ret"])
        if role.startswith("session_"):
            self._session_event(role, kind, ev, tid, ts)
            return
        if role == "kexec":
            if len(self.kexec_ts) < KEXEC_MAX:
                self.kexec_ts.append(ts)
            return
        if int(ev["flags"]) & EVF_KEY_UNKNOWN:
            self.unknown_key += 1
            return
        if role == "can_preserve":
            self._can_preserve(kind, ev, key, tid, ts, ret)
            return
        create = key[1] != SER_DEV and key[0] in FILE_HANDLER_IDS
        st = self._resolve(key, ts, create=create)
        if st is None:
            if not create:  # else counted as untracked by _file
                self.unknown_key += 1
            return
        if kind == EV_ENTRY:
            st.open_calls[probe.name] = ts
            if role == "preserve":
                _put(self.last_file, tid, st.key)
                if not int(ev["flags"]) & EVF_A0_UNKNOWN:
                    st.size = int(ev["a0"])
                if not int(ev["flags"]) & EVF_A1_UNKNOWN:
                    st.flags = int(ev["a1"])
                pend = self.pending_session.get(tid)
                if pend:
                    self._join_session(st, pend)
            return
        if kind == EV_INSTANT:
            if role == "freeze_inode":
                if len(st.freeze_log) < EVIDENCE_MAX:
                    st.freeze_log.append((ts, int(ev["a0"])))
            elif role in ("pop_add", "pop_delete"):
                st.frozen_adds += role == "pop_add"
                if len(st.frozen_changes) >= EVIDENCE_MAX:
                    return  # a guest filling a frozen file must not fill our memory: count, keep the first
                st.frozen_changes.append((ts, "add" if role == "pop_add" else "delete",
                                          int(ev["a0"]), int(ev["a1"]), int(ev["a2"])))
            return
        # EV_RETURN
        st.open_calls.pop(probe.name, None)
        dur = int(ev["a2"])
        start = ts - dur
        if role == "preserve":
            if self._op_phase(st, "preserve", start, dur, ret):
                st.result = "ok"
                st.ser = int(ev["a0"])
                _put(self.ser_map, (st.key[0], st.ser), st.key, 4 * self.max_files)
        elif role == "walk":
            fill = int(ev["a1"])
            name = _WALK_PHASE[probe.name][1 if fill else 0]
            st.add_phase(Phase(name, start, dur, ret, parent="preserve", count=int(ev["a0"])))
            if fill:
                st.fill_count, st.fill_ret = int(ev["a0"]), ret
            else:
                st.count_pass = int(ev["a0"])
        elif role == "vmalloc":
            st.add_phase(Phase("vmalloc", start, dur, ret, parent="preserve"))
        elif role == "luo_freeze":
            self._op_phase(st, "luo_freeze", start, dur, ret)
        elif role == "token":
            st.vm_token_in = next((catalog.BY_NAME[n].role for n in st.open_calls
                                   if catalog.BY_NAME[n].role in ("preserve", "luo_freeze")), None)
            if ret == 0:
                st.vm_token, st.vm_token_errno = int(ev["a0"]), None
            else:
                st.vm_token_errno = errno_name(ret)
        elif role == "unpreserve":
            st.add_phase(Phase("unpreserve", start, dur))
            if st.result != "error":
                st.result = "cancelled"
        elif role == "retrieve":
            if self._op_phase(st, "retrieve", start, dur, ret):
                st.retrieved = True
                st.retrieved_inode = int(ev["a0"]) or None
                st.result = "retrieved"
        elif role == "finish":
            st.add_phase(Phase("finish", start, dur))
            if not st.retrieved and st.result != "error":
                st.result = "discarded"

    def _can_preserve(self, kind: int, ev, key: Key, tid: int, ts: int, ret: int) -> None:
        if kind == EV_ENTRY:
            _put(self._asked_magic, tid, None if int(ev["flags"]) & EVF_A1_UNKNOWN else int(ev["a1"]))
            return
        if kind != EV_RETURN:
            return
        magic = self._asked_magic.pop(tid, None)
        dur = int(ev["a2"])
        if ret & 0xFF:  # this handler takes the file
            st = self._file(key, ts - dur)
            if st is None:
                return
            st.can_preserve = True
            st.add_phase(Phase("can_preserve", ts - dur, dur))
            _put(self.last_file, tid, key)
            self._refused.pop(tid, None)
        elif tid in self.pending_session:
            refused = self._refused.get(tid)
            if refused is None:
                refused = []
                _put(self._refused, tid, refused)
            if len(refused) < PHASES_MAX:  # one per registered handler in a real run
                refused.append((key, ts - dur, dur, magic))
        else:  # asked outside luo_preserve_file (not seen): the "no" stands
            self._reject(key, ts - dur, dur)

    def _reject(self, key: Key, start: int, dur: int) -> Optional[FileState]:
        st = self._file(key, start)
        if st is None:
            return None
        st.can_preserve = False
        st.add_phase(Phase("can_preserve", start, dur))
        st.result = "rejected"
        return st

    def _settle_refusals(self, tid: int, ret: int) -> Optional[Key]:
        """luo_preserve_file returned: if no handler took the file, it is
        rejected once, by the handler whose kind of file it is (its
        superblock's magic), else by the last one asked."""
        refused = self._refused.pop(tid, [])
        if ret >= 0 or not refused:
            return None
        own = [r for r in refused
               if r[3] is not None and r[3] in catalog.FS_MAGIC.get(HANDLER_NAMES.get(r[0][0], ""), ())]
        key, start, dur, _ = (own or refused)[-1]
        st = self._reject(key, start, dur)
        return st.key if st else None

    @staticmethod
    def _op_phase(st: FileState, name: str, start: int, dur: int, ret: int) -> bool:
        """Record a handler op's phase; a negative return fails the file. True if it succeeded."""
        st.add_phase(Phase(name, start, dur, ret))
        if ret < 0:
            st.fail(name, ret)
            return False
        return True

    def _join_session(self, st: FileState, pend: Tuple[int, int, int]) -> None:
        """PEND: (session handle, token, fd) of the luo_preserve_file call that offered ST."""
        sess = self._session(pend[0])
        st.session, st.token, st.fd = sess.id, pend[1], pend[2]
        sess.files[st.key] = None

    def _session(self, handle: int, fresh: bool = False) -> Session:
        """The session at HANDLE (its luo_file_set's address); with FRESH, a new
        one if the session last seen there was cancelled, since its memory then
        went back to the allocator and the next session may get it."""
        s = self.sessions.get(handle)
        if s is None or (fresh and s.cancelled):
            s = Session(len(self.all_sessions) + 1, handle)
            if len(self.all_sessions) >= self.max_files:
                return s  # beyond the bound: used for this event, not kept
            _put(self.sessions, handle, s, self.max_files)
            self.all_sessions.append(s)
        return s

    def _session_event(self, role: str, kind: int, ev, tid: int, ts: int) -> None:
        if role == "session_preserve":
            if kind == EV_ENTRY:
                _put(self.pending_session, tid, (int(ev["a2"]), int(ev["a0"]), int(ev["a1"])))
                self.last_file.pop(tid, None)
                self._refused.pop(tid, None)
                self._session(int(ev["a2"]), fresh=True)
            elif kind == EV_RETURN:
                pend = self.pending_session.pop(tid, None)
                ret = int(ev["ret"])
                key = self.last_file.pop(tid, None)
                if key is None:
                    key = self._settle_refusals(tid, ret)
                    if key is not None and pend:  # refused: it still belongs to the session userspace named
                        self._join_session(self.files[key], pend)
                if ret < 0 and key in self.files and self.files[key].errno is None:
                    # LUO refused the file (no handler, or can_preserve said no): the errno
                    # userspace got comes from luo_preserve_file
                    st = self.files[key]
                    st.errno, st.failed_phase = errno_name(ret), "luo_preserve_file"
                    if st.result == "none":
                        st.result = "error"
        elif role == "session_freeze":
            if kind == EV_ENTRY:
                self._session(int(ev["a2"])).freeze_start = ts
                _put(self._freezing, tid, int(ev["a2"]))
            elif kind == EV_RETURN:
                handle = self._freezing.pop(tid, None)
                if handle is not None and handle in self.sessions:
                    s = self.sessions[handle]
                    s.freeze_ns = int(ev["a2"])
                    s.freeze_ret = int(ev["ret"])
        elif role == "session_cancel":
            self._session(int(ev["a2"])).cancelled = True

    # ---- the end ----

    def finish(self, maps: Optional[dict]) -> None:
        """Fold in map dumps (per-file folio counters, population).  Idempotent:
        a live scrape calls it with each fresh dump, the end with the final one."""
        self.maps = maps or {}
        for st in self.files.values():
            st.streamed = {}
            if st.result != st.counted:  # a monotonic count of files reaching a final result
                if st.result in FINAL_RESULTS:
                    k = (st.key[0], st.result)
                    self.finished[k] = self.finished.get(k, 0) + 1
                st.counted = st.result
        for (h, dev, ino, probe), n in sorted(self.streamed.items()):
            found = self._resolve((h, dev, ino), create=dev != SER_DEV and h in FILE_HANDLER_IDS)
            if found is not None:
                st = found
                name = catalog.PROBES[probe].name
                st.streamed[name] = st.streamed.get(name, 0) + n
        for row in self.maps.get("population", []):
            key = (row["handler"], row["dev"], row["ino"])
            self._file(key, 0)

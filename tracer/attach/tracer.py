"""The BCC side of a run: compiles the program text tracer.probes.program
assembles, loads and attaches it (or adopts the set kept from the last start),
reads the rings and maps, and detaches everything on the way out, whatever
happened.  Also the verifier check of every kernel-side program."""
from __future__ import annotations

import ctypes as ct
import mmap
import select
import time
from typing import Callable, Dict, List, Optional, Tuple

from tracer.attach import bpf_cache
from tracer.base.errors import LuotraceError
from tracer.kernel import host as kernel
from tracer.probes import catalog
from tracer.probes.catalog import Probe
from tracer.probes.events import EVENT_SIZE
from tracer.probes.layout import Layout
from tracer.probes.plan import (Options, ProbeStatus, _check_ringbuf_pages, _required_missing, apply_folio_source,
                                plan, select_handlers)
from tracer.probes.program import COUNTER_NAMES, build_program


DETACH_THREADS = 2


def detach_all(b, progress: Callable[[str], None] = lambda s: None) -> int:
    """Detach every probe of BCC object B from a pool of threads, saying
    how far it got every second.

    A uprobe's detach waits in the kernel for grace periods (about 0.15 s
    each here); BCC's calls release the GIL, so waits that can overlap do,
    though the kernel serialises most of it (30 uprobes: 4.5 s, against 5.3 s
    one by one).  Two at a time: a process cannot exit before its threads'
    system calls return, so every detach in flight is time a second Ctrl-C
    (quit_now) waits for; with thirty in flight that was 2.8 s.  BCC's own
    cleanup() then finds nothing left but the maps.  Returns how many probes
    were detached."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    jobs = [(b.detach_uprobe_event, k) for k in list(getattr(b, "uprobe_fds", {}))]
    jobs += [(b.detach_kprobe_event, k) for k in list(getattr(b, "kprobe_fds", {}))]
    jobs += [(b.detach_tracepoint, k) for k in list(getattr(b, "tracepoint_fds", {}))]
    jobs += [(b.detach_kfunc, k) for k in list(getattr(b, "kfunc_entry_fds", {}))]
    jobs += [(b.detach_kretfunc, k) for k in list(getattr(b, "kfunc_exit_fds", {}))]
    if len(jobs) < 2:
        return len(jobs)

    def one(job) -> None:
        fn, key = job
        try:
            fn(key)
        except Exception:  # noqa: BLE001 - cleanup() tries again, one by one
            pass

    with ThreadPoolExecutor(max_workers=DETACH_THREADS, thread_name_prefix="luotrace-detach") as pool:
        said = time.monotonic()
        for done, _ in enumerate(as_completed([pool.submit(one, j) for j in jobs]), 1):
            if time.monotonic() - said >= 1.0 and done < len(jobs):
                progress(f"luotrace: detaching: {done}/{len(jobs)} probes")
                said = time.monotonic()
    return len(jobs)


class Tracer:
    """Loaded and attached BPF programs for one run.  Use as a context manager:
    leaving it detaches everything, whatever happened."""

    def __init__(self, opts: Options, layout: Layout, on_bytes: Callable[[bytes], None],
                 before_compile: Callable[[], None] = lambda: None):
        from bcc import BPF  # imported late: doctor and report work without BCC

        _check_ringbuf_pages(opts.lifecycle_ringbuf_pages, "--lifecycle-ringbuf-pages")
        _check_ringbuf_pages(opts.folio_ringbuf_pages, "--folio-ringbuf-pages")
        self.opts = opts
        self.layout = layout
        statuses = select_handlers(plan(opts), opts)
        self.folio_source, self.folio_source_why = apply_folio_source(statuses, opts, layout)
        missing = _required_missing(statuses, opts)
        if missing:
            where = f"model {opts.model}" if opts.model else f"kernel {kernel.release()}"
            raise LuotraceError(f"required probe {missing.symbol} ({missing.handler}) cannot be attached in {where}: "
                                f"{missing.reason or missing.status}",
                                "check `luotrace doctor`; pass --handler to trace fewer handlers")
        self.statuses = statuses
        probes = [catalog.BY_NAME[s.name] for s in statuses if s.status == "planned"]
        if not probes:
            raise LuotraceError("no probe could be attached", "check `luotrace doctor`")
        self.population = any(p.kind == "tracepoint" for p in probes)
        if self.population:
            why = kernel.ensure_tracefs()
            if why:
                raise LuotraceError(f"tracefs is not usable: {why}", "mount debugfs and tracefs (run `make setup`)")
        from tracer.kernel.backing import choose
        self.backing = choose(opts.gmem)
        self.gmem_dev = self._gmem_dev(statuses) if self.population else None
        self._on_bytes = on_bytes
        self._standby: List[Probe] = []  # population probes attached only during an update
        self._on_demand = False  # "update" policy in force: population counts only cover the windows
        self.population_live = opts.population != "update"
        self.population_windows: List[List[int]] = []  # [on, off] CLOCK_MONOTONIC ns, "update" policy
        self.reused = False  # programs loaded by an earlier start, opened from their pins
        self.cache_note = ""  # kept programs refused or dropped, and why: one line for the user
        self._slot: Optional[bpf_cache.Slot] = None
        before_compile()
        self.bpf = self._compile(BPF, probes)
        try:
            self._fill_layout_maps()
            self._attach(probes)
            self._open_ringbuf()
        except (KeyboardInterrupt, SystemExit):
            self.close()
            raise
        except BaseException as e:
            if not self.reused:
                self.close()
                raise
            # a kept set that verified but does not work: never the run's end
            slot, self._slot = self._slot, None
            self.close()
            self._slot = slot  # still claimed: the fresh compile is kept in it
            if slot is not None:
                slot.drop()
            self.cache_note = f"the programs kept by an earlier start did not work ({type(e).__name__}: " \
                              f"{str(e)[:120]}); dropped and compiled afresh"
            self.reused = False
            self.bpf = self._compile(BPF, probes, reuse=False)  # the slot stays claimed for _keep
            try:
                self._fill_layout_maps()
                self._attach(probes)
                self._open_ringbuf()
            except BaseException:
                self.close()
                raise
        try:
            self._keep()
        except BaseException:
            self.close()
            raise

    def _compile(self, BPF, probes: List[Probe], reuse: bool = True):
        """Compile and load; fentry programs attach while loading, so a kernel
        that refuses them makes every fentry probe fall back to kprobe."""
        prog = build_program(self.opts, self.layout, probes, {s.name: s.strategy for s in self.statuses},
                             self.gmem_dev)
        self.source, self.cflags = prog.text, prog.cflags
        if reuse and bpf_cache.enabled():
            try:
                self._slot = bpf_cache.Slot.claim(bpf_cache.key(self.source, self.cflags))
            except OSError as e:  # tracer.base.private.Unsafe: state that is not root's alone
                self.cache_note = f"programs are not kept between starts: {e}"
                self._slot = None
            adopted = self._slot.adopt(BPF) if self._slot else None
            if self._slot is not None and self._slot.dropped:
                self.cache_note = self._slot.dropped
            if adopted is not None:
                self.reused = True
                return adopted
        try:
            return BPF(text=self.source, cflags=self.cflags)
        except Exception as e:
            fentry = [s for s in self.statuses if s.strategy == "fentry"]
            if not fentry or self.opts.strategy == "fentry" or not kernel.kprobes_enabled():
                raise
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            for s in fentry:
                s.strategy, s.reason = "kprobe", f"fentry failed ({why}); fell back to kprobe"
            prog = build_program(self.opts, self.layout, probes, {s.name: s.strategy for s in self.statuses},
                                 self.gmem_dev)
            self.source = prog.text
            if self._slot is not None:  # the slot was claimed for the fentry text
                self._slot.release()
                self._slot = None
            return BPF(text=self.source, cflags=self.cflags)

    def _keep(self) -> None:
        """After a compile whose every planned probe attached: keep the loaded
        programs for the next start (tracer/attach/bpf_cache.py).  Never fails the run."""
        if self._slot is None or self.reused:
            return
        if any(s.status == "failed" for s in self.statuses):
            return
        try:
            self._slot.keep(self.bpf)
        except OSError:
            self._slot.drop()

    def _fill_layout_maps(self) -> None:
        """Where each handler's ser struct keeps nr_folios, from its folios
        member (the folio-array walk's commit reads it)."""
        if self.folio_source != "array":
            return
        t = self.bpf["fser_nr_delta"]
        for h, (nr, folios) in self.layout.ser.items():
            t[ct.c_int(catalog.HANDLERS[h])] = ct.c_int64(nr - folios)

    def _gmem_dev(self, statuses: List[ProbeStatus]) -> Optional[int]:
        """The dev_t of the superblock the guest_memfd files live on (the
        stand-in ramfs where they are stand-ins), compiled into the
        population filter; found by creating a file there."""
        if self.opts.gmem_dev is not None:
            return self.opts.gmem_dev
        from tracer.kernel.kvm import GmemError
        from tracer.kernel.backing import gmem_superblock_dev
        try:
            return gmem_superblock_dev(self.backing)
        except (GmemError, OSError) as e:
            for s in statuses:
                if s.handler == "population" and s.status == "planned":
                    s.status, s.reason = "skipped", f"no guest_memfd superblock: {e}"
            return None

    def _attach(self, probes: List[Probe]) -> None:
        by_name = {s.name: s for s in self.statuses}
        b = self.bpf
        for p in probes:
            st = by_name[p.name]
            if p.kind == "tracepoint":
                if st.status == "planned":
                    st.status = "attached"  # BCC attaches TRACEPOINT_PROBE functions when loading
                    if self.opts.population == "update":
                        b.detach_tracepoint(p.symbol)  # until an update starts: population_on()
                        self._standby.append(p)
                        self._on_demand = True
                else:
                    b.detach_tracepoint(p.symbol)
                continue
            if st.strategy == "fentry":
                st.status = "attached"  # BCC attaches kfunc__/kretfunc__ programs when loading
                continue
            try:
                if st.strategy == "uprobe":
                    b.attach_uprobe(name=self.opts.model, sym=p.symbol, fn_name=p.entry_fn)
                    if p.return_fn:
                        b.attach_uretprobe(name=self.opts.model, sym=p.symbol, fn_name=p.return_fn)
                else:
                    b.attach_kprobe(event=p.symbol, fn_name=p.entry_fn)
                    if p.return_fn:
                        b.attach_kretprobe(event=p.symbol, fn_name=p.return_fn)
                st.status = "attached"
            except Exception as e:  # BCC raises plain Exception
                st.status, st.reason = "failed", str(e).splitlines()[0]
                if p.required:
                    raise LuotraceError(f"attaching {st.strategy} to {p.symbol} failed: {st.reason}",
                                        "check `luotrace doctor`") from None
        if not any(s.status == "attached" for s in self.statuses):
            raise LuotraceError("no probe could be attached", "check `luotrace doctor`")

    @property
    def population_on_demand(self) -> bool:
        """Whether the poll loop attaches and detaches the population
        tracepoints ("update" policy; no longer once an attach failed)."""
        return bool(self._standby)

    def population_on(self) -> bool:
        """Attach the population tracepoints ("update" policy); True if it
        did.  A failure is said by the caller and ends the policy (the run
        goes on without population), never the run."""
        if self.population_live or not self._standby:
            return False
        try:
            for p in self._standby:
                self.bpf.attach_tracepoint(tp=p.symbol, fn_name=p.entry_fn)
        except Exception as e:  # BCC raises plain Exception
            for p in self._standby:
                if p.symbol.encode() in self.bpf.tracepoint_fds:
                    self.bpf.detach_tracepoint(p.symbol)
            self._standby = []
            raise LuotraceError(f"attaching the population tracepoints failed: {str(e).splitlines()[0]}",
                                "population is not traced for the rest of this run") from None
        self.population_live = True
        self.population_windows.append([time.monotonic_ns(), 0])
        return True

    def population_off(self) -> bool:
        """Detach them again once no file is in an update; True if it did."""
        if not self.population_live or not self._standby:
            return False
        for p in self._standby:
            self.bpf.detach_tracepoint(p.symbol)
        self.population_live = False
        self.population_windows[-1][1] = time.monotonic_ns()
        return True

    def _open_ringbuf(self) -> None:
        """Read the ring buffers ourselves (tracer/attach/ringbuf.py), a block at a
        time, and wait on them with epoll: no Python call per event."""
        from tracer.attach.ringbuf import RingReader
        rings = [("events", self.opts.lifecycle_ringbuf_pages)]
        if self.opts.mode == "trace":
            rings.append(("folio_events", self.opts.folio_ringbuf_pages))
        self._rings = [RingReader(self.bpf[name].get_fd(), pages * mmap.PAGESIZE, EVENT_SIZE) for name, pages in rings]
        if self.reused:  # what the last run's programs wrote after its final drain is not this run's
            for r in self._rings:
                r.skip()
        self._epoll: Optional[select.epoll] = select.epoll()
        for r in self._rings:
            self._epoll.register(r.fd, select.EPOLLIN)

    def poll(self, timeout_ms: int = 100) -> None:
        from tracer.attach.ringbuf import wait
        wait(self._epoll, bool(self.drain()), timeout_ms / 1000.0)
        self.drain()

    def drain(self) -> int:
        """Hand every record now in the ring buffers to the consumer; how many bytes."""
        got = 0
        for r in self._rings:
            raw = r.consume()
            if raw:
                got += len(raw)
                self._on_bytes(raw)
        return got

    # ---- maps, read at the end (and by exporters at scrape) ----

    def counters(self) -> Dict[str, int]:
        t = self.bpf["luo_counters"]
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            out[name] = int(sum(t[ct.c_int(i)]))
        return out

    def dump_maps(self) -> dict:
        b = self.bpf
        dump: dict = {"counters": self.counters(), "folio_stats": [], "folio_hist": [], "population": []}
        if self.opts.mode != "light":  # kho.c (per-folio maps) is compiled in folio and trace modes
            try:
                for k, v in b["folio_stats"].items():
                    row = {"ino": k.ino, "dev": k.dev, "handler": k.handler}
                    row.update({f: getattr(v, f) for f, _ in v._fields_})
                    dump["folio_stats"].append(row)
                for k, v in b["folio_preserve_duration_seconds"].items():
                    dump["folio_hist"].append({"ino": k.key.ino, "dev": k.key.dev, "handler": k.key.handler,
                                               "slot": k.slot, "count": v.value})
            except KeyError:
                pass
        if self.population:
            rows: Dict[tuple, dict] = {}

            def add(k, v) -> None:
                key = (k.ino, k.dev, k.handler)
                row = rows.setdefault(key, {"ino": k.ino, "dev": k.dev, "handler": k.handler,
                                            **{f: 0 for f, _ in v._fields_}})
                for f, _ in v._fields_:
                    val = getattr(v, f)
                    row[f] = max(row[f], val) if f == "max_order" else row[f] + val

            for k, v in b["population"].items():
                add(k, v)
            for c in b["pop_cache"][ct.c_int(0)]:  # per-CPU counts not yet folded in
                if c.key.ino or c.key.dev:
                    add(c.key, c.v)
            dump["population"] = [r for r in rows.values() if r["added"] or r["deleted"]]
        dump["population_attached"] = bool(self.population and self.gmem_dev is not None)
        if self.folio_source:
            dump["folio_source"] = self.folio_source
        if self._on_demand:  # also after a failed attach ended it: the counts are still partial
            dump["population_policy"] = "update"
            dump["population_windows"] = [list(w) for w in self.population_windows]
        for key in ("folio_stats", "folio_hist", "population"):
            dump[key].sort(key=lambda r: tuple(r.values()))
        return dump

    def forget(self, keys: List[Tuple[int, int, int]]) -> None:
        """Delete the per-file rows of KEYS (handler, dev, ino) from every BPF
        map that holds them: the files a long-running serve has folded into
        its totals, so that the maps (MAX_FILES entries) never fill."""
        want = set(keys)
        for name in ("folio_stats", "population", "frozen"):
            try:
                t = self.bpf[name]
            except KeyError:
                continue  # not compiled in this mode
            for h, dev, ino in keys:
                k = t.Key(ino=ino, dev=dev, handler=h)
                try:
                    del t[k]
                except KeyError:
                    pass
        try:
            hist = self.bpf["folio_preserve_duration_seconds"]
        except KeyError:
            return
        for k in [k for k in hist.keys() if (k.key.handler, k.key.dev, k.key.ino) in want]:
            try:
                del hist[k]
            except KeyError:
                pass

    def prog_stats(self) -> Dict[str, Dict[str, int]]:
        """Each program's runs, run time and skipped runs in this run (reused
        programs count from their load: what they counted before this run is
        taken off)."""
        out = {}
        base = getattr(self.bpf, "stats_base", {})
        for name, fn in getattr(self.bpf, "funcs", {}).items():
            n = name.decode() if isinstance(name, bytes) else name
            st = kernel.prog_stats(fn.fd)
            for k in ("run_time_ns", "run_cnt", "recursion_misses"):
                st[k] -= base.get(name, {}).get(k, 0)
            out[n] = st
        return out

    def close(self, progress: Callable[[str], None] = lambda s: None) -> None:
        for r in getattr(self, "_rings", []):
            r.close()
        self._rings = []
        ep = getattr(self, "_epoll", None)
        if ep is not None:
            ep.close()
            self._epoll = None
        b = getattr(self, "bpf", None)
        if b is not None:
            try:
                detach_all(b, progress)
                b.cleanup()
            finally:
                self.bpf = None
        slot = getattr(self, "_slot", None)
        if slot is not None:
            slot.release()
            self._slot = None

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def verify_kernel_programs(mode: str, layout: Layout) -> Dict[str, str]:
    """Load every kernel-side program of ``mode`` through the real verifier
    without attaching: proves they are valid on this kernel even where the
    traced symbols or CONFIG_KPROBES are absent.  Returns program -> result."""
    from bcc import BPF

    probes = [p for p in catalog.probes_for(mode) if p.kind != "tracepoint"]
    prog = build_program(Options(mode=mode), layout, probes, {})  # {}: kprobe entry points for all
    b = BPF(text=prog.text, cflags=prog.cflags)
    results = {}
    try:
        for p in probes:
            for fn in (p.entry_fn, p.return_fn):
                if fn:
                    b.load_func(fn, BPF.KPROBE)
                    results[fn] = "ok"
    finally:
        b.cleanup()
    return results



"""An always-on agent's memory after its programs are loaded.

BCC compiles the BPF C with clang and LLVM inside this process: their code
(~80 MiB of libLLVM and libclang-cpp pages) and the heap they grew stay
resident although nothing runs them again once the programs are in the
kernel.  Once tracing, the compiler's read-only pages are dropped from this
process (MADV_DONTNEED on a private read-only file mapping only unmaps them:
a later call faults them back in from the file, nothing is lost) and the
heap's free memory is returned to the kernel (glibc's malloc_trim)."""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

from tracer.kernel import host

MADV_DONTNEED = 4  # include/uapi/asm-generic/mman-common.h
# the compiler BCC loads: its code and read-only data, nothing of BCC's own
COMPILER = re.compile(r"/lib(LLVM|clang|clang-cpp)[-.][^/]*$")


def rss() -> Dict[str, int]:
    """This process's resident memory in KiB: VmRSS, RssAnon, RssFile, RssShmem."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])
    return out


def _droppable() -> List[Tuple[int, int]]:
    """The compiler's mappings whose every resident page is the file's own:
    read-only and with no anonymous (copied-on-write) page.  A RELRO
    segment is read-only too, but its pages were written by the dynamic
    linker (relocations): dropping them would bring back the file's
    unrelocated bytes, so a mapping holding any such page is kept."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                cur = None
                if len(head) >= 6 and "w" not in head[1] and COMPILER.search(head[5]):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    cur = (lo, hi)
            elif cur is not None and head and head[0] == "Anonymous:":
                if int(head[1]) == 0:
                    out.append(cur)
                cur = None
    return out


def release_compiler() -> int:
    """Drop the compiler's resident read-only pages and trim the heap;
    returns the KiB of RSS given back.  Never fails: a host without glibc or
    with another layout keeps its memory."""
    before = rss().get("VmRSS", 0)
    try:
        libc = host.libc()
        for lo, hi in _droppable():
            libc.madvise(lo, hi - lo, MADV_DONTNEED)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        return 0
    return max(0, before - rss().get("VmRSS", 0))

"""Where the members the BPF programs read live, for the code being traced.

Two sources give the same logical offsets:
- the running kernel's BTF (``kernel_layout``), for kprobe/fentry targets;
- the reference model's own ``--layout`` output (``model_layout``), for uprobes.
An offset that cannot be resolved is -1: the BPF side then marks the value
unknown instead of reading memory blindly.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from tracer.probes import catalog
from tracer.kernel import host as kernel
from tracer.kernel.btf import BTF, BTFError
from tracer.base.errors import LuotraceError

# logical name -> (struct, member path) in the kernel.  Sources: struct
# liveupdate_file_op_args (include/linux/liveupdate.h, Linux 7.2), struct file,
# inode, super_block, folio (include/linux/fs.h, mm_types.h), struct gmem_inode
# (virt/kvm/guest_memfd.c of kernels carrying the patch).
KERNEL_MEMBERS: Dict[str, Tuple[str, str]] = {
    "ARGS_FILE": ("liveupdate_file_op_args", "file"),
    "ARGS_SER": ("liveupdate_file_op_args", "serialized_data"),
    "FILE_INODE": ("file", "f_inode"),
    "INODE_INO": ("inode", "i_ino"),
    "INODE_SB": ("inode", "i_sb"),
    "INODE_SIZE": ("inode", "i_size"),
    "SB_DEV": ("super_block", "s_dev"),
    "SB_MAGIC": ("super_block", "s_magic"),
    "FOLIO_INDEX": ("folio", "index"),
}
LOGICAL = tuple(KERNEL_MEMBERS) + ("INODE_GMEM_FLAGS", "FOLIO_PFN")


@dataclass
class Layout:
    """Offsets plus how a folio pointer becomes a pfn."""

    source: str
    offsets: Dict[str, int]
    pfn_from_field: bool = False
    vmemmap_base_ptr: Optional[int] = None
    page_struct_size: int = 64
    notes: Dict[str, str] = field(default_factory=dict)
    # handler -> (offsetof nr_folios, offsetof folios) of the serialized folio
    # array it hands to kho_preserve_vmalloc, where its layout is the one the
    # BPF walk reads (16-byte entries, pfn in bits 0..51, index at 8)
    ser: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    page_offset_base_ptr: Optional[int] = None  # &page_offset_base: struct page * -> its direct-map address

    def unknown(self) -> Dict[str, str]:
        return {k: self.notes.get(k, "not resolved") for k, v in self.offsets.items() if v < 0}

    def cflags(self) -> list:
        flags = [f"-DOFF_{k}={v}" for k, v in sorted(self.offsets.items())]
        if self.pfn_from_field:
            flags.append("-DPFN_FROM_FIELD=1")
        elif self.vmemmap_base_ptr:
            flags.append(f"-DVMEMMAP_BASE_PTR={self.vmemmap_base_ptr:#x}ULL")
            flags.append(f"-DPAGE_STRUCT_SIZE={self.page_struct_size}")
            if self.page_offset_base_ptr:
                flags.append(f"-DPAGE_OFFSET_BASE_PTR={self.page_offset_base_ptr:#x}ULL")
        return flags

    def to_json(self) -> dict:
        return {"source": self.source, "offsets": dict(sorted(self.offsets.items())),
                "pfn": "field" if self.pfn_from_field else ("vmemmap" if self.vmemmap_base_ptr else "unknown"),
                "unknown": self.unknown(), "folio_arrays": {h: list(v) for h, v in sorted(self.ser.items())}}


def _kallsyms_addr(symbol: str, path: str = "/proc/kallsyms") -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == symbol:
                    addr = int(parts[0], 16)
                    return addr or None
    except OSError:
        return None
    return None


def kernel_layout(btf: BTF, kallsyms: str = "/proc/kallsyms") -> Layout:
    offsets: Dict[str, int] = {}
    notes: Dict[str, str] = {}
    for logical, (st, member) in KERNEL_MEMBERS.items():
        off = btf.offsetof(st, member)
        offsets[logical] = -1 if off is None else off
        if off is None:
            notes[logical] = f"struct {st} has no member {member} in this kernel's BTF"
    # GMEM_I(inode)->flags: container_of(inode, struct gmem_inode, vfs_inode)->flags
    fl, vi = btf.offsetof("gmem_inode", "flags"), btf.offsetof("gmem_inode", "vfs_inode")
    offsets["INODE_GMEM_FLAGS"] = -1 if fl is None or vi is None else fl - vi
    if offsets["INODE_GMEM_FLAGS"] < 0:
        notes["INODE_GMEM_FLAGS"] = "struct gmem_inode not in this kernel's BTF"
    offsets["FOLIO_PFN"] = -1
    base = _kallsyms_addr("vmemmap_base", kallsyms)
    if base is None:
        notes["FOLIO_PFN"] = "vmemmap_base not in /proc/kallsyms (needs CONFIG_KALLSYMS_ALL): pfn unknown"
    ser: Dict[str, Tuple[int, int]] = {}
    for h in catalog.HANDLER_LIST:
        if h.ser[0]:
            got = _kernel_ser(btf, *h.ser)
            if isinstance(got, str):
                notes[f"SER_{h.name}"] = got
            else:
                ser[h.name] = got
    return Layout("kernel BTF", offsets, vmemmap_base_ptr=base,
                  page_struct_size=btf.sizeof("page") or 64, notes=notes, ser=ser,
                  page_offset_base_ptr=_kallsyms_addr("page_offset_base", kallsyms))


FOLIO_SER_SIZE = 16  # struct <handler>_luo_folio_ser { u64 pfn:52; u64 flags:12; u64 index; } __packed


def _kernel_ser(btf: BTF, ser: str, folio_ser: str):
    """(offsetof nr_folios, offsetof folios) of SER when its entries are
    FOLIO_SER as the BPF walk reads them; else why not, as a string."""
    nr, folios = btf.offsetof(ser, "nr_folios"), btf.offsetof(ser, "folios")
    if nr is None or folios is None:
        return f"struct {ser} (nr_folios, folios) not in this kernel's BTF"
    tid = btf.structs.get(folio_ser)
    members = {m.name: m for m in btf.members(tid)} if tid is not None else {}
    pfn, index = members.get("pfn"), members.get("index")
    if btf.sizeof(folio_ser) != FOLIO_SER_SIZE or pfn is None or index is None \
            or pfn.bit_offset != 0 or pfn.bitfield_size != 52 or index.bit_offset != 64:
        return f"struct {folio_ser} is not {{pfn:52, flags:12, index}} in this kernel's BTF"
    return nr, folios


def model_layout(model_path: str) -> Layout:
    try:
        out = subprocess.run([model_path, "--layout"], capture_output=True, text=True, timeout=10, check=True)
        data = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise LuotraceError(f"cannot read the layout of {model_path}: {e}",
                            "pass the reference model built by `make model` (workloads/model/luo_model)")
    offsets = {k: int(data.get(k, -1)) for k in LOGICAL}
    ser = {h: (int(v[0]), int(v[1])) for h, v in data.get("SER", {}).items() if int(v[3]) == FOLIO_SER_SIZE}
    return Layout(f"model {model_path}", offsets, pfn_from_field=True, ser=ser)


def resolve_layout(model: Optional[str]) -> Layout:
    """The layout of what a run traces: the MODEL binary's, or the running kernel's BTF."""
    if model is not None:
        return model_layout(model)
    try:
        return kernel_layout(kernel.btf())
    except BTFError as e:
        raise LuotraceError(f"kernel BTF unusable: {e}", "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y") from None

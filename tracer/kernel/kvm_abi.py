"""KVM guest_memfd ABI facts used by the drivers.

Source: include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h,
include/uapi/linux/falloc.h, include/uapi/linux/magic.h and
include/uapi/asm-generic/mman-common.h, Linux 6.18 (the same values in 7.2).
The C twin is workloads/model/kvm_abi.h; tests/test_abi.py checks they agree.
"""
from __future__ import annotations

import struct

KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = 0xAE03  # _IO(KVMIO, 0x03)
KVM_CREATE_GUEST_MEMFD = 0xC040AED4  # _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
KVM_CAP_GUEST_MEMFD = 234  # > 0: KVM_CREATE_GUEST_MEMFD works on this KVM
KVM_CAP_VM_TYPES = 235  # bitmask of the VM types KVM_CREATE_VM takes
KVM_CAP_GUEST_MEMFD_FLAGS = 244
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1  # private memory: the guest_memfd LUO handler refuses its files
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

# struct kvm_create_guest_memfd { __u64 size; __u64 flags; __u64 reserved[6]; }
KVM_CREATE_GUEST_MEMFD_STRUCT = struct.Struct("<QQ6Q")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

MADV_HWPOISON = 100  # poison a page (CAP_SYS_ADMIN, CONFIG_MEMORY_FAILURE)

from tracer.base.units import PAGE_SIZE  # noqa: E402,F401 - the one page size, named here with the ABI it is part of

RAMFS_MAGIC = 0x858458F6  # include/uapi/linux/magic.h

# Where a host whose KVM makes no guest_memfd gets its stand-in guest_memfd
# files: one ramfs, shared by luotrace (its population filter is this
# superblock) and the reference model (its files are O_TMPFILEs in it).
# ramfs, not a memfd: shmem puts folios in its page cache without the
# filemap:mm_filemap_add_to_page_cache tracepoint, ramfs through
# filemap_add_folio as guest_memfd does, one order-0 folio per page.
STANDIN_DIR = "/run/luotrace/gmem-standin"
STANDIN_LOCK = "/run/luotrace/gmem-standin.lock"


def pack_create_guest_memfd(size: int, flags: int) -> bytearray:
    return bytearray(KVM_CREATE_GUEST_MEMFD_STRUCT.pack(size, flags, *([0] * 6)))

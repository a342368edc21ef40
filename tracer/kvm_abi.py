"""KVM guest_memfd ABI facts used by the drivers.

Source: include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h,
include/uapi/linux/falloc.h and include/uapi/asm-generic/mman-common.h,
Linux 6.18 (the same values in 7.2).
The C twin is workloads/model/kvm_abi.h; tests/test_abi.py checks they agree.
"""
from __future__ import annotations

import struct

KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = 0xAE03  # _IO(KVMIO, 0x03)
KVM_CREATE_GUEST_MEMFD = 0xC040AED4  # _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
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

PAGE_SIZE = 4096


def pack_create_guest_memfd(size: int, flags: int) -> bytearray:
    return bytearray(KVM_CREATE_GUEST_MEMFD_STRUCT.pack(size, flags, *([0] * 6)))

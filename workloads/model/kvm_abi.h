/* KVM guest_memfd ABI used by the reference model.
 *
 * Source: include/uapi/linux/kvm.h, Linux 6.18 (Debian 12's userspace headers
 * predate guest_memfd, so the few facts needed are restated here).  The Python
 * twin is tracer/kvm_abi.py; tests/test_abi.py checks the two agree.
 */
#ifndef LUO_MODEL_KVM_ABI_H
#define LUO_MODEL_KVM_ABI_H
#include <stdint.h>

#define KVM_CREATE_VM               0xAE01u      /* _IO(KVMIO, 0x01) */
#define KVM_CHECK_EXTENSION         0xAE03u      /* _IO(KVMIO, 0x03) */
#define KVM_CREATE_GUEST_MEMFD      0xC040AED4u  /* _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd) */
#define KVM_CAP_GUEST_MEMFD         234
#define KVM_CAP_GUEST_MEMFD_FLAGS   244
#define GUEST_MEMFD_FLAG_MMAP        (1ULL << 0)
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)

struct kvm_create_guest_memfd {
	uint64_t size;
	uint64_t flags;
	uint64_t reserved[6];
};

/* include/uapi/linux/falloc.h */
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE  0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

/* include/uapi/linux/magic.h: the superblocks of guest_memfd and memfd files */
#define GUEST_MEMFD_MAGIC 0x474d454d
#define TMPFS_MAGIC       0x01021994
#define RAMFS_MAGIC       0x858458f6

/* A host whose KVM makes no guest_memfd: the model's guest_memfd files are
 * O_TMPFILEs of one ramfs mounted here (shared with luotrace, whose
 * population filter is its superblock; tracer/kvm_abi.py says why ramfs). */
#define STANDIN_DIR  "/run/luotrace/gmem-standin"
#define STANDIN_LOCK "/run/luotrace/gmem-standin.lock"

/* include/linux/kho/abi/kvm.h of the guest_memfd LUO patch (v1) */
#define GUEST_MEMFD_LUO_FLAG_MMAP        (1ULL << 0)
#define GUEST_MEMFD_LUO_FLAG_INIT_SHARED (1ULL << 1)
#define GUEST_MEMFD_LUO_FOLIO_UPTODATE   (1ULL << 0)

#endif

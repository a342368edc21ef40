// SPDX-License-Identifier: GPL-2.0
/*
 * luo_model: a userspace reference model of the guest_memfd LUO handler.
 *
 * The functions below carry the kernel's names and call structure (patch
 * "guest_memfd preservation via LUO", virt/kvm/guest_memfd_luo.c, and the
 * mainline mm/memfd_luo.c) so that luotrace's BPF programs attach to them with
 * uprobes exactly as they would attach to the patched kernel with kprobes.
 * They work on real files: guest_memfds made through /dev/kvm and memfds,
 * pre-allocated with fallocate, their pfns read from /proc/self/pagemap.
 *
 * Faults can be injected per file; the model prints its own ground truth as
 * JSON so the tests can compare what luotrace saw with what really happened.
 *
 * Usage: luo_model [--json FILE] [--layout] [--pause-ms N] SESSION...
 *   SESSION = OUTCOME:FILE[,FILE...]
 *   OUTCOME = kexec | cancel | discard | keep
 *   FILE    = HANDLER:SIZE[:FAULT[=ARG]]   HANDLER = gmem | memfd
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "kvm_abi.h"

#define NOINLINE __attribute__((noinline, noclone, used))
#define PAGE_SZ 4096UL
#ifndef EHWPOISON
#define EHWPOISON 133
#endif
#define MAX_FILES 64
#define MAX_SESSIONS 16

/* Kernel-shaped structures.  Only the members luotrace reads need to exist;
 * their offsets are printed by --layout and handed to the BPF programs. */
struct super_block { uint32_t s_dev; uint32_t s_pad; uint64_t s_magic; };
struct address_space;
struct inode {
	uint64_t i_ino;
	struct super_block *i_sb;
	int64_t i_size;
	uint64_t flags;            /* GMEM_I(inode)->flags in the patch */
	struct address_space *i_mapping;
};
struct folio { uint64_t pfn; uint64_t index; uint32_t flags; uint32_t order; int hwpoison; };
struct address_space { struct inode *host; struct folio *folios; uint64_t nr; };
struct file;
struct kvm { int vm_fd; struct file *vm_file; bool has_private_mem; };
struct gmem_file { struct kvm *kvm; };
struct model_file;
struct file { struct inode *f_inode; void *private_data; struct model_file *mf; };
struct liveupdate_session { uint64_t id; char name[24]; };
struct liveupdate_file_op_args {
	void *handler;
	int retrieve_status;
	struct file *file;
	uint64_t serialized_data;
	void *private_data;
	struct liveupdate_session *session;
};
struct kho_vmalloc { uint64_t first; uint32_t total_pages; uint16_t flags; uint16_t order; } __attribute__((packed));
struct guest_memfd_luo_folio_ser { uint64_t pfn:52; uint64_t flags:12; uint64_t index; } __attribute__((packed));
struct guest_memfd_luo_ser {
	uint64_t size; uint64_t flags; uint64_t nr_folios; uint64_t vm_token;
	struct kho_vmalloc folios;
} __attribute__((packed));
struct memfd_luo_folio_ser { uint64_t pfn:52; uint64_t flags:12; uint64_t index; } __attribute__((packed));
struct memfd_luo_ser { uint64_t pos; uint64_t size; uint64_t nr_folios; struct kho_vmalloc folios; } __attribute__((packed));

enum fault {
	F_NONE, F_HWPOISON, F_ENOMEM, F_VMALLOC, F_TOKEN, F_PASS_MISMATCH,
	F_UNBALANCED_FREEZE, F_LEAK_UNWIND, F_LATE_FALLOC, F_PFN0, F_HOLES, F_PRIVATE,
};
static const char *const fault_names[] = {
	"none", "hwpoison", "enomem", "vmalloc_fail", "token_enoent", "pass_mismatch",
	"unbalanced_freeze", "leak_unwind", "late_fallocate", "pfn0", "holes", "private_vm",
};
/* The anomaly code each fault must produce in luotrace's report. */
static const char *const fault_anomaly[] = {
	NULL, NULL, NULL, NULL, NULL, "pass_count_mismatch",
	"freeze_unbalanced", "unwind_incomplete", "folio_added_while_frozen", "pfn_zero", "holes", NULL,
};

enum handler { H_GMEM, H_MEMFD };
static const char *const handler_names[] = { "guest_memfd", "memfd" };

/* Per-file model state and ground truth. */
struct model_file {
	enum handler handler;
	uint64_t size;
	enum fault fault;
	long fault_arg;
	int fd;
	char *map;
	struct super_block sb;
	struct inode inode;
	struct address_space mapping;
	struct file file;
	struct gmem_file gfile;
	struct liveupdate_file_op_args args;
	struct super_block rsb;         /* the file retrieve creates */
	struct inode rinode;
	struct file rfile;
	int preserved;
	uint64_t populated;
	uint64_t folios_preserved, folios_unpreserved, folios_restored, folios_discarded;
	int err;
	const char *failed_phase;
	const char *result;
	uint64_t retrieved_ino;
	int freeze_depth;
};

struct luo_file_set {
	struct liveupdate_session session;
	struct model_file *files[MAX_FILES];
	int n;
};

static struct kvm the_kvm;
static struct kvm private_kvm = { .has_private_mem = true };  /* a KVM_X86_SW_PROTECTED_VM's */
static struct file vm_file;
static struct model_file files[MAX_FILES];
static int nfiles;
static struct model_file *cur;           /* file the handler is working on */
static long pause_ns;

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("luo_model: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(2);
}

/* A short busy pause inside each phase so that durations are measurable even
 * with zero-cost stand-ins for the kernel's allocations. */
static void model_pause(void)
{
	struct timespec a, b;
	if (!pause_ns)
		return;
	clock_gettime(CLOCK_MONOTONIC, &a);
	do
		clock_gettime(CLOCK_MONOTONIC, &b);
	while ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec) < pause_ns);
}

static uint32_t kernel_dev(dev_t d)
{
	/* include/linux/kdev_t.h: MKDEV(ma, mi) = ma << 20 | mi (what tracepoints show) */
	return (uint32_t)((major(d) << 20) | minor(d));
}

/* ---- population: real folios of a real file ---- */

static uint64_t pagemap_pfn(int pm, void *addr)
{
	uint64_t ent = 0;
	off_t off = (off_t)((uintptr_t)addr / PAGE_SZ) * 8;
	if (pread(pm, &ent, 8, off) != 8)
		die("read /proc/self/pagemap: %s", strerror(errno));
	if (!(ent & (1ULL << 63)))
		return 0;
	return ent & ((1ULL << 55) - 1);
}

/* Rebuild the model page cache: the first `resident` bytes of the file were
 * allocated with fallocate (guest_memfd mappings do not answer mincore), the
 * rest is a hole.  Touching maps each existing folio; pagemap gives its pfn. */
static void scan_folios(struct model_file *mf, uint64_t resident)
{
	uint64_t npages = resident / PAGE_SZ, i;
	int pm = open("/proc/self/pagemap", O_RDONLY);
	if (pm < 0)
		die("open /proc/self/pagemap: %s", strerror(errno));
	free(mf->mapping.folios);
	mf->mapping.folios = calloc(npages ? npages : 1, sizeof(struct folio));
	for (i = 0; i < npages; i++) {
		volatile char *p = mf->map + i * PAGE_SZ;
		struct folio *f = &mf->mapping.folios[i];
		(void)*p;
		f->index = i;
		f->pfn = pagemap_pfn(pm, (void *)p);
		f->flags = 1;
	}
	mf->mapping.nr = npages;
	close(pm);
}

static int create_gmem(uint64_t size)
{
	struct kvm_create_guest_memfd g = { .size = size,
		.flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED };
	int fd = ioctl(the_kvm.vm_fd, KVM_CREATE_GUEST_MEMFD, &g);
	if (fd < 0)
		die("KVM_CREATE_GUEST_MEMFD(size=%llu, flags=MMAP|INIT_SHARED): %s",
		    (unsigned long long)size, strerror(errno));
	return fd;
}

static void open_file(struct model_file *mf)
{
	struct stat st;
	uint64_t alloc = mf->size;
	if (mf->handler == H_GMEM) {
		mf->fd = create_gmem(mf->size);
	} else {
		mf->fd = memfd_create("luo-model", 0);
		if (mf->fd < 0 || ftruncate(mf->fd, (off_t)mf->size))
			die("memfd: %s", strerror(errno));
		alloc = mf->size / 2;           /* memfd_luo pins every index: holes get filled */
	}
	if (mf->fault == F_HOLES)
		alloc = mf->size - (uint64_t)mf->fault_arg * PAGE_SZ;
	if (alloc && fallocate(mf->fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)alloc))
		die("fallocate(KEEP_SIZE, %llu): %s", (unsigned long long)alloc, strerror(errno));
	mf->map = mmap(NULL, mf->size, PROT_READ | PROT_WRITE, MAP_SHARED, mf->fd, 0);
	if (mf->map == MAP_FAILED)
		die("mmap: %s", strerror(errno));
	if (fstat(mf->fd, &st))
		die("fstat: %s", strerror(errno));
	mf->sb.s_dev = kernel_dev(st.st_dev);
	mf->sb.s_magic = mf->handler == H_GMEM ? GUEST_MEMFD_MAGIC : TMPFS_MAGIC;
	mf->inode.i_ino = st.st_ino;
	mf->inode.i_sb = &mf->sb;
	mf->inode.i_size = (int64_t)mf->size;
	mf->inode.flags = mf->handler == H_GMEM ? (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED) : 0;
	mf->inode.i_mapping = &mf->mapping;
	mf->mapping.host = &mf->inode;
	mf->gfile.kvm = mf->fault == F_PRIVATE ? &private_kvm : &the_kvm;
	if (mf->fault == F_PRIVATE)
		mf->inode.flags = 0;    /* a private VM's guest_memfd cannot be INIT_SHARED */
	mf->file.f_inode = &mf->inode;
	mf->file.private_data = &mf->gfile;
	mf->file.mf = mf;
	scan_folios(mf, alloc);
	mf->populated = mf->mapping.nr;
	if (mf->fault == F_PFN0 && mf->mapping.nr)
		mf->mapping.folios[0].pfn = 0;
	if (mf->fault == F_HWPOISON && (uint64_t)mf->fault_arg < mf->mapping.nr)
		mf->mapping.folios[mf->fault_arg].hwpoison = 1;
}

/* ---- KHO core (kernel/liveupdate/kexec_handover.c) ---- */

/* KHO preserves its own metadata pages through kho_preserve_folio too
 * (kho_alloc_preserve / kho_unpreserve_free in Linux 7.2): they are not the
 * file's data, so the ground truth does not count them. */
static int in_meta;
static struct folio meta_folio = { .pfn = 0x4242, .index = 0 };

NOINLINE int kho_preserve_folio(struct folio *folio)
{
	(void)folio;
	if (!in_meta)
		cur->folios_preserved++;
	return 0;
}

NOINLINE void kho_unpreserve_folio(struct folio *folio)
{
	(void)folio;
	if (!in_meta)
		cur->folios_unpreserved++;
}

NOINLINE struct folio *kho_restore_folio(uint64_t phys)
{
	static struct folio restored;
	restored.pfn = phys / PAGE_SZ;
	return &restored;
}

NOINLINE int kho_preserve_vmalloc(void *ptr, struct kho_vmalloc *kv)
{
	model_pause();
	if (cur->fault == F_VMALLOC || cur->fault == F_LEAK_UNWIND)
		return -ENOMEM;
	kv->first = (uint64_t)(uintptr_t)ptr;
	kv->total_pages = 1;
	return 0;
}

NOINLINE void kho_unpreserve_vmalloc(struct kho_vmalloc *kv) { kv->first = 0; }

NOINLINE void *kho_alloc_preserve(size_t size)
{
	void *mem = calloc(1, size);
	in_meta = 1;
	kho_preserve_folio(&meta_folio);
	in_meta = 0;
	return mem;
}

NOINLINE void kho_unpreserve_free(void *mem)
{
	in_meta = 1;
	kho_unpreserve_folio(&meta_folio);
	in_meta = 0;
	free(mem);
}

/* ---- LUO core (kernel/liveupdate/luo_file.c, luo_session.c) ---- */

NOINLINE int liveupdate_get_token_outgoing(struct liveupdate_session *s, struct file *file,
					   uint64_t *token)
{
	if (!file)
		return -ENOENT;
	*token = (s->id << 16) | (uint64_t)the_kvm.vm_fd;
	return 0;
}

/* ---- guest_memfd (virt/kvm/guest_memfd.c + guest_memfd_luo.c) ---- */

NOINLINE void kvm_gmem_freeze(struct inode *inode, bool freeze)
{
	(void)inode;
	cur->freeze_depth += freeze ? 1 : -1;
}

NOINLINE int kvm_gmem_luo_walk_folios(struct address_space *mapping, uint64_t end_index,
				      struct guest_memfd_luo_folio_ser *folios_ser,
				      uint64_t *out_count)
{
	uint64_t count = 0, i, nr = mapping->nr;
	int err = 0;

	model_pause();
	if (folios_ser && cur->fault == F_PASS_MISMATCH && nr)
		nr--;                           /* a folio vanished between the passes */
	for (i = 0; i < nr; i++) {
		struct folio *folio = &mapping->folios[i];
		if (folio->index >= end_index)
			break;
		if (folios_ser) {
			if (folio->hwpoison) {
				err = -EHWPOISON;
				goto out;
			}
			err = kho_preserve_folio(folio);
			if (err)
				goto out;
			folios_ser[count].pfn = folio->pfn;
			folios_ser[count].index = folio->index;
			folios_ser[count].flags = folio->flags ? GUEST_MEMFD_LUO_FOLIO_UPTODATE : 0;
		}
		count++;
	}
out:
	*out_count = count;
	return err;
}

/* As the patch: a guest_memfd, of a VM without private memory, whose mapping
 * has no large folios (the model's never does). */
NOINLINE bool kvm_gmem_luo_can_preserve(void *handler, struct file *file)
{
	struct gmem_file *gmem_file;

	(void)handler;
	if (file->f_inode->i_sb->s_magic != GUEST_MEMFD_MAGIC)
		return false;
	gmem_file = file->private_data;
	if (gmem_file->kvm->has_private_mem)
		return false;
	return true;
}

/* The reviewer's race: fallocate on the frozen inode.  Punch the last page and
 * allocate it again, through the real guest_memfd; the kernel's
 * filemap:mm_filemap_{delete_from,add_to}_page_cache tracepoints fire on it. */
static void late_fallocate(struct model_file *mf)
{
	uint64_t n = mf->fault_arg > 0 ? (uint64_t)mf->fault_arg : 1;  /* late_fallocate=N: the last N pages */
	off_t first;
	if (n * PAGE_SZ > mf->size)
		n = mf->size / PAGE_SZ;
	first = (off_t)(mf->size - n * PAGE_SZ);
	if (fallocate(mf->fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, first, (off_t)(n * PAGE_SZ)) ||
	    fallocate(mf->fd, FALLOC_FL_KEEP_SIZE, first, (off_t)(n * PAGE_SZ)))
		die("late fallocate: %s", strerror(errno));
	mf->populated += n;
}

NOINLINE int kvm_gmem_luo_preserve(struct liveupdate_file_op_args *args)
{
	struct guest_memfd_luo_folio_ser *folios_ser = NULL;
	struct inode *inode = args->file->f_inode;
	struct guest_memfd_luo_ser *ser;
	uint64_t count = 0, abi_flags = 0, end_index;
	int64_t size;
	int err = 0;

	kvm_gmem_freeze(inode, true);
	size = inode->i_size;
	if (!size || size % (int64_t)PAGE_SZ) {
		err = -EINVAL;
		goto err_unfreeze_inode;
	}
	if (inode->flags & ~(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)) {
		err = -EOPNOTSUPP;
		goto err_unfreeze_inode;
	}
	if (inode->flags & GUEST_MEMFD_FLAG_MMAP)
		abi_flags |= GUEST_MEMFD_LUO_FLAG_MMAP;
	if (inode->flags & GUEST_MEMFD_FLAG_INIT_SHARED)
		abi_flags |= GUEST_MEMFD_LUO_FLAG_INIT_SHARED;
	end_index = (uint64_t)size / PAGE_SZ;

	ser = kho_alloc_preserve(sizeof(*ser));
	if (!ser) {
		err = -ENOMEM;
		goto err_unfreeze_inode;
	}
	err = kvm_gmem_luo_walk_folios(inode->i_mapping, end_index, NULL, &count);
	if (err)
		goto err_free_ser;
	ser->size = (uint64_t)size;
	ser->flags = abi_flags;
	ser->nr_folios = count;
	ser->vm_token = 0;

	if (count > 0) {
		folios_ser = cur->fault == F_ENOMEM || cur->fault == F_UNBALANCED_FREEZE
			? NULL : calloc(count, sizeof(*folios_ser));        /* vcalloc */
		if (!folios_ser) {
			err = -ENOMEM;
			if (cur->fault == F_UNBALANCED_FREEZE) {
				kho_unpreserve_free(ser);
				return err;     /* the bug: leaves the inode frozen */
			}
			goto err_free_ser;
		}
		err = kvm_gmem_luo_walk_folios(inode->i_mapping, end_index, folios_ser, &count);
		if (err)
			goto err_unpreserve_unlocked;
		if (count != ser->nr_folios) {  /* WARN_ON_ONCE in the patch */
			err = -EINVAL;
			goto err_unpreserve_unlocked;
		}
	}
	if (cur->fault == F_LATE_FALLOC)
		late_fallocate(cur);
	if (count > 0) {
		err = kho_preserve_vmalloc(folios_ser, &ser->folios);
		if (err)
			goto err_unpreserve_unlocked;
	}
	args->serialized_data = (uint64_t)(uintptr_t)ser;
	args->private_data = folios_ser;
	return 0;

err_unpreserve_unlocked:
	for (long i = (long)count - 1; i >= (cur->fault == F_LEAK_UNWIND ? 1 : 0); i--)
		kho_unpreserve_folio(&inode->i_mapping->folios[i]);
	free(folios_ser);
err_free_ser:
	kho_unpreserve_free(ser);
err_unfreeze_inode:
	kvm_gmem_freeze(inode, false);
	return err;
}

NOINLINE int kvm_gmem_luo_freeze(struct liveupdate_file_op_args *args)
{
	struct guest_memfd_luo_ser *ser;
	struct gmem_file *gmem_file;
	struct file *kvm_file;
	uint64_t vm_token;
	int err;

	if (!args->serialized_data)
		return -EINVAL;
	ser = (struct guest_memfd_luo_ser *)(uintptr_t)args->serialized_data;
	gmem_file = args->file->private_data;
	kvm_file = cur->fault == F_TOKEN ? NULL : gmem_file->kvm->vm_file;
	model_pause();
	err = liveupdate_get_token_outgoing(args->session, kvm_file, &vm_token);
	if (err)
		return err;
	ser->vm_token = vm_token;
	return 0;
}

NOINLINE void kvm_gmem_luo_unpreserve(struct liveupdate_file_op_args *args)
{
	struct guest_memfd_luo_folio_ser *folios_ser = args->private_data;
	struct guest_memfd_luo_ser *ser;
	long i;

	if (!args->serialized_data)
		return;
	ser = (struct guest_memfd_luo_ser *)(uintptr_t)args->serialized_data;
	if (ser->nr_folios > 0)
		kho_unpreserve_vmalloc(&ser->folios);
	for (i = (long)ser->nr_folios - 1; i >= 0; i--) {
		if (!folios_ser[i].pfn)
			continue;
		kho_unpreserve_folio(&args->file->f_inode->i_mapping->folios[i]);
	}
	free(folios_ser);
	kho_unpreserve_free(ser);
	args->serialized_data = 0;
	kvm_gmem_freeze(args->file->f_inode, false);
}

/* New-kernel side: rebuild a guest_memfd from the preserved folios.  The model
 * cannot adopt the old pfns, so it allocates a fresh real file of the same size
 * and restores each preserved folio into it. */
NOINLINE int kvm_gmem_luo_retrieve(struct liveupdate_file_op_args *args)
{
	struct guest_memfd_luo_ser *ser = (struct guest_memfd_luo_ser *)(uintptr_t)args->serialized_data;
	struct guest_memfd_luo_folio_ser *folios_ser = args->private_data;
	struct model_file *mf = cur;
	struct stat st;
	int fd;

	fd = create_gmem(ser->size);
	if (fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)ser->size))
		die("retrieve fallocate: %s", strerror(errno));
	for (uint64_t i = 0; i < ser->nr_folios; i++) {
		if (kho_restore_folio(folios_ser[i].pfn * PAGE_SZ))
			mf->folios_restored++;
	}
	if (fstat(fd, &st) == 0) {
		mf->retrieved_ino = st.st_ino;
		mf->rsb.s_dev = kernel_dev(st.st_dev);
		mf->rsb.s_magic = mf->sb.s_magic;
		mf->rinode.i_ino = st.st_ino;
		mf->rinode.i_sb = &mf->rsb;
		mf->rinode.i_size = (int64_t)ser->size;
		mf->rfile.f_inode = &mf->rinode;
		args->file = &mf->rfile;
	}
	args->retrieve_status = 1;
	close(fd);
	return 0;
}

NOINLINE void kvm_gmem_luo_finish(struct liveupdate_file_op_args *args)
{
	struct guest_memfd_luo_ser *ser = (struct guest_memfd_luo_ser *)(uintptr_t)args->serialized_data;
	struct guest_memfd_luo_folio_ser *folios_ser = args->private_data;

	model_pause();
	if (!args->retrieve_status) {           /* discard: kvm_gmem_luo_discard_folios */
		for (uint64_t i = 0; i < ser->nr_folios; i++) {
			if (!folios_ser[i].pfn)
				continue;
			if (kho_restore_folio(folios_ser[i].pfn * PAGE_SZ))
				cur->folios_discarded++;
		}
	}
	free(folios_ser);
	kho_unpreserve_free(ser);
	args->serialized_data = 0;
}

/* ---- memfd (mm/memfd_luo.c) ---- */

NOINLINE void shmem_freeze(struct inode *inode, bool freeze)
{
	(void)inode;
	cur->freeze_depth += freeze ? 1 : -1;
}

/* shmem_file(file) && !i_nlink in mm/memfd_luo.c: a memfd's superblock is tmpfs. */
NOINLINE bool memfd_luo_can_preserve(void *handler, struct file *file)
{
	(void)handler;
	return file->f_inode->i_sb->s_magic == TMPFS_MAGIC;
}

NOINLINE int memfd_luo_preserve_folios(struct file *file, struct kho_vmalloc *kv,
				       struct memfd_luo_folio_ser **out, uint64_t *nr_foliosp)
{
	struct model_file *mf = file->mf;
	struct memfd_luo_folio_ser *folios_ser;
	uint64_t i, nr;
	int err;

	scan_folios(mf, mf->size);              /* memfd_pin_folios: holes get allocated */
	nr = mf->mapping.nr;
	*nr_foliosp = 0;
	folios_ser = mf->fault == F_ENOMEM ? NULL : calloc(nr ? nr : 1, sizeof(*folios_ser));
	if (!folios_ser)
		return -ENOMEM;
	for (i = 0; i < nr; i++) {
		err = kho_preserve_folio(&mf->mapping.folios[i]);
		if (err)
			goto err_unpreserve;
		folios_ser[i].pfn = mf->mapping.folios[i].pfn;
		folios_ser[i].index = mf->mapping.folios[i].index;
	}
	err = kho_preserve_vmalloc(folios_ser, kv);
	if (err)
		goto err_unpreserve;
	*out = folios_ser;
	*nr_foliosp = nr;
	return 0;
err_unpreserve:
	for (long j = (long)i - 1; j >= (mf->fault == F_LEAK_UNWIND ? 1 : 0); j--)
		kho_unpreserve_folio(&mf->mapping.folios[j]);
	free(folios_ser);
	return err;
}

NOINLINE int memfd_luo_preserve(struct liveupdate_file_op_args *args)
{
	struct inode *inode = args->file->f_inode;
	struct memfd_luo_folio_ser *folios_ser = NULL;
	struct memfd_luo_ser *ser;
	uint64_t nr = 0;
	int err;

	shmem_freeze(inode, true);
	ser = kho_alloc_preserve(sizeof(*ser));
	if (!ser) {
		err = -ENOMEM;
		goto err_unfreeze;
	}
	ser->size = (uint64_t)inode->i_size;
	err = memfd_luo_preserve_folios(args->file, &ser->folios, &folios_ser, &nr);
	if (err)
		goto err_free_ser;
	ser->nr_folios = nr;
	args->serialized_data = (uint64_t)(uintptr_t)ser;
	args->private_data = folios_ser;
	return 0;
err_free_ser:
	kho_unpreserve_free(ser);
err_unfreeze:
	if (cur->fault != F_UNBALANCED_FREEZE)
		shmem_freeze(inode, false);
	return err;
}

NOINLINE int memfd_luo_freeze(struct liveupdate_file_op_args *args)
{
	model_pause();
	return args->serialized_data ? 0 : -EINVAL;
}

NOINLINE void memfd_luo_unpreserve(struct liveupdate_file_op_args *args)
{
	struct memfd_luo_ser *ser = (struct memfd_luo_ser *)(uintptr_t)args->serialized_data;
	if (!ser)
		return;
	kho_unpreserve_vmalloc(&ser->folios);
	for (long i = (long)ser->nr_folios - 1; i >= 0; i--)
		kho_unpreserve_folio(&args->file->f_inode->i_mapping->folios[i]);
	free(args->private_data);
	kho_unpreserve_free(ser);
	args->serialized_data = 0;
	shmem_freeze(args->file->f_inode, false);
}

NOINLINE int memfd_luo_retrieve(struct liveupdate_file_op_args *args)
{
	struct memfd_luo_ser *ser = (struct memfd_luo_ser *)(uintptr_t)args->serialized_data;
	struct memfd_luo_folio_ser *folios_ser = args->private_data;
	for (uint64_t i = 0; i < ser->nr_folios; i++)
		if (kho_restore_folio(folios_ser[i].pfn * PAGE_SZ))
			cur->folios_restored++;
	args->retrieve_status = 1;
	return 0;
}

NOINLINE void memfd_luo_finish(struct liveupdate_file_op_args *args)
{
	struct memfd_luo_ser *ser = (struct memfd_luo_ser *)(uintptr_t)args->serialized_data;
	struct memfd_luo_folio_ser *folios_ser = args->private_data;
	model_pause();
	if (!args->retrieve_status)
		for (uint64_t i = 0; i < ser->nr_folios; i++)
			if (kho_restore_folio(folios_ser[i].pfn * PAGE_SZ))
				cur->folios_discarded++;
	free(folios_ser);
	kho_unpreserve_free(ser);
	args->serialized_data = 0;
}

/* ---- LUO file set: dispatch to the handler ops ---- */

/* LUO asks every registered handler about every file, in registration order:
 * on the patched kernel the KVM handlers (kvm_init) come before memfd's
 * (a late_initcall), so a memfd is offered to the guest_memfd handler first. */
static bool h_can_preserve(struct model_file *mf)
{
	if (kvm_gmem_luo_can_preserve(NULL, &mf->file))
		return true;
	return memfd_luo_can_preserve(NULL, &mf->file);
}

NOINLINE int luo_preserve_file(struct luo_file_set *set, uint64_t token, int fd)
{
	struct model_file *mf = NULL;
	int err;

	(void)token;
	for (int i = 0; i < nfiles; i++)
		if (files[i].fd == fd)
			mf = &files[i];
	if (!mf)
		return -EBADF;
	cur = mf;
	if (!h_can_preserve(mf)) {
		mf->err = -ENOENT;
		mf->failed_phase = "luo_preserve_file";
		mf->result = "rejected";
		return -ENOENT;
	}
	mf->args.file = &mf->file;
	mf->args.session = &set->session;
	err = mf->handler == H_GMEM ? kvm_gmem_luo_preserve(&mf->args) : memfd_luo_preserve(&mf->args);
	if (err) {
		mf->err = err;
		mf->failed_phase = "preserve";
		mf->result = "error";
		return err;
	}
	mf->preserved = 1;
	mf->result = "ok";
	set->files[set->n++] = mf;
	return 0;
}

NOINLINE int luo_file_freeze(struct luo_file_set *set, void *ser)
{
	(void)ser;
	for (int i = 0; i < set->n; i++) {
		struct model_file *mf = set->files[i];
		int err;
		cur = mf;
		err = mf->handler == H_GMEM ? kvm_gmem_luo_freeze(&mf->args) : memfd_luo_freeze(&mf->args);
		if (err) {
			mf->err = err;
			mf->failed_phase = "luo_freeze";
			mf->result = "error";
			return err;
		}
	}
	return 0;
}

NOINLINE void luo_file_unpreserve_files(struct luo_file_set *set)
{
	for (int i = set->n - 1; i >= 0; i--) {
		struct model_file *mf = set->files[i];
		cur = mf;
		if (mf->handler == H_GMEM)
			kvm_gmem_luo_unpreserve(&mf->args);
		else
			memfd_luo_unpreserve(&mf->args);
		if (!mf->err)
			mf->result = "cancelled";
	}
	set->n = 0;
}

/* kernel/kexec_core.c: the reboot into the next kernel; liveupdate_reboot()
 * freezes the sessions from here.  The model's "kernel" keeps running, so the
 * sessions after the first frozen one are handled in the same process. */
NOINLINE int kernel_kexec(void)
{
	__asm__ volatile("" ::: "memory");
	return 0;
}

static void retrieve_and_finish(struct luo_file_set *set, bool retrieve)
{
	for (int i = 0; i < set->n; i++) {
		struct model_file *mf = set->files[i];
		cur = mf;
		if (retrieve) {
			mf->args.file = NULL;
			mf->handler == H_GMEM ? kvm_gmem_luo_retrieve(&mf->args) : memfd_luo_retrieve(&mf->args);
		}
		if (mf->handler == H_GMEM)
			kvm_gmem_luo_finish(&mf->args);
		else
			memfd_luo_finish(&mf->args);
		mf->result = retrieve ? "retrieved" : "discarded";
	}
}

/* ---- scenario parsing and the ground truth ---- */

static uint64_t parse_size(const char *s)
{
	char *end;
	double v = strtod(s, &end);
	uint64_t mul = 1;
	if (end == s || v <= 0)
		die("bad size '%s' (want e.g. 4096, 64K, 8M, 1G)", s);
	switch (*end) {
	case 'k': case 'K': mul = 1ULL << 10; break;
	case 'm': case 'M': mul = 1ULL << 20; break;
	case 'g': case 'G': mul = 1ULL << 30; break;
	case '\0': break;
	default: die("bad size suffix in '%s'", s);
	}
	uint64_t bytes = (uint64_t)(v * (double)mul);
	if (bytes % PAGE_SZ)
		die("size '%s' is not a multiple of 4 KiB", s);
	return bytes;
}

static void parse_file(char *spec, struct model_file *mf)
{
	char *h = strtok(spec, ":"), *sz = strtok(NULL, ":"), *f = strtok(NULL, ":");
	if (!h || !sz)
		die("bad file spec (want HANDLER:SIZE[:FAULT[=ARG]])");
	if (!strcmp(h, "gmem"))
		mf->handler = H_GMEM;
	else if (!strcmp(h, "memfd"))
		mf->handler = H_MEMFD;
	else
		die("unknown handler '%s' (gmem or memfd)", h);
	mf->size = parse_size(sz);
	mf->fault = F_NONE;
	if (f) {
		char *eq = strchr(f, '=');
		if (eq)
			*eq++ = '\0';
		size_t k;
		for (k = 0; k < sizeof(fault_names) / sizeof(*fault_names); k++)
			if (!strcmp(f, fault_names[k]))
				break;
		if (k == sizeof(fault_names) / sizeof(*fault_names))
			die("unknown fault '%s'", f);
		mf->fault = (enum fault)k;
		mf->fault_arg = eq ? atol(eq) : (mf->fault == F_HOLES ? 16 : 0);
		if (mf->handler == H_MEMFD && mf->fault != F_NONE && mf->fault != F_ENOMEM &&
		    mf->fault != F_VMALLOC && mf->fault != F_LEAK_UNWIND)
			die("fault '%s' applies to gmem files only", f);
	}
	mf->result = "none";
}

static void json_file(FILE *o, struct model_file *mf, int session, const char *outcome, int last)
{
	char errname[16] = "";
	const char *anom = fault_anomaly[mf->fault];
	if (mf->err == -EHWPOISON) strcpy(errname, "EHWPOISON");
	else if (mf->err == -ENOMEM) strcpy(errname, "ENOMEM");
	else if (mf->err == -ENOENT) strcpy(errname, "ENOENT");
	else if (mf->err == -EINVAL) strcpy(errname, "EINVAL");
	else if (mf->err) snprintf(errname, sizeof(errname), "E%d", -mf->err);
	char populated[24] = "null";
	if (mf->handler == H_GMEM)      /* shmem folios bypass the filemap tracepoint */
		snprintf(populated, sizeof(populated), "%llu", (unsigned long long)mf->populated);
	fprintf(o, "    {\"session\": %d, \"outcome\": \"%s\", \"handler\": \"%s\", \"inode\": %llu, "
		"\"dev\": %u, \"size_bytes\": %llu, \"fault\": \"%s\", \"folios_populated\": %s, "
		"\"folios_preserved\": %llu, \"folios_unpreserved\": %llu, \"folios_restored\": %llu, "
		"\"folios_discarded\": %llu, \"result\": \"%s\", \"errno\": %s%s%s, \"failed_phase\": %s%s%s, "
		"\"freeze_depth\": %d, \"retrieved_inode\": %llu, \"anomalies\": [%s%s%s]}%s\n",
		session, outcome, handler_names[mf->handler], (unsigned long long)mf->inode.i_ino,
		mf->sb.s_dev, (unsigned long long)mf->size, fault_names[mf->fault],
		populated, (unsigned long long)mf->folios_preserved,
		(unsigned long long)mf->folios_unpreserved, (unsigned long long)mf->folios_restored,
		(unsigned long long)mf->folios_discarded, mf->result,
		errname[0] ? "\"" : "", errname[0] ? errname : "null", errname[0] ? "\"" : "",
		mf->failed_phase ? "\"" : "", mf->failed_phase ? mf->failed_phase : "null", mf->failed_phase ? "\"" : "",
		mf->freeze_depth, (unsigned long long)mf->retrieved_ino,
		anom ? "\"" : "", anom ? anom : "", anom ? "\"" : "", last ? "" : ",");
}

static void print_layout(void)
{
	/* Logical offsets luotrace's BPF programs need, the model's own layout;
	 * tracer/layout.py resolves the same names from kernel BTF. */
	printf("{\"ARGS_FILE\": %zu, \"ARGS_SER\": %zu, \"FILE_INODE\": %zu, \"INODE_INO\": %zu, "
	       "\"INODE_SB\": %zu, \"INODE_SIZE\": %zu, \"SB_DEV\": %zu, \"SB_MAGIC\": %zu, \"INODE_GMEM_FLAGS\": %zu, "
	       "\"FOLIO_INDEX\": %zu, \"FOLIO_PFN\": %zu}\n",
	       offsetof(struct liveupdate_file_op_args, file),
	       offsetof(struct liveupdate_file_op_args, serialized_data),
	       offsetof(struct file, f_inode), offsetof(struct inode, i_ino),
	       offsetof(struct inode, i_sb), offsetof(struct inode, i_size),
	       offsetof(struct super_block, s_dev), offsetof(struct super_block, s_magic),
	       offsetof(struct inode, flags),
	       offsetof(struct folio, index), offsetof(struct folio, pfn));
}

struct session_spec { const char *outcome; int first, n; };

int main(int argc, char **argv)
{
	static struct session_spec sessions[MAX_SESSIONS];
	static struct luo_file_set sets[MAX_SESSIONS];
	const char *json_path = NULL;
	int nsessions = 0, i;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--layout")) {
			print_layout();
			return 0;
		} else if (!strcmp(argv[i], "--json") && i + 1 < argc) {
			json_path = argv[++i];
		} else if (!strcmp(argv[i], "--pause-ms") && i + 1 < argc) {
			pause_ns = (long)(atof(argv[++i]) * 1e6);
		} else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			puts("usage: luo_model [--json FILE] [--pause-ms N] [--layout] OUTCOME:HANDLER:SIZE[:FAULT[=ARG]][,...] ...\n"
			     "  OUTCOME kexec|cancel|discard|keep; HANDLER gmem|memfd\n"
			     "  FAULT none|hwpoison=N|enomem|vmalloc_fail|token_enoent|pass_mismatch|\n"
			     "        unbalanced_freeze|leak_unwind|late_fallocate[=N]|pfn0|holes=N|private_vm");
			return 0;
		} else {
			char *spec = strdup(argv[i]), *colon = strchr(spec, ':'), *save = NULL, *tok;
			if (!colon || nsessions == MAX_SESSIONS)
				die("bad session '%s' (want OUTCOME:FILE[,FILE...])", argv[i]);
			*colon = '\0';
			if (strcmp(spec, "kexec") && strcmp(spec, "cancel") && strcmp(spec, "discard") && strcmp(spec, "keep"))
				die("unknown outcome '%s' (kexec, cancel, discard or keep)", spec);
			sessions[nsessions].outcome = spec;
			sessions[nsessions].first = nfiles;
			for (tok = strtok_r(colon + 1, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
				if (nfiles == MAX_FILES)
					die("too many files (max %d)", MAX_FILES);
				char *copy = strdup(tok);
				parse_file(copy, &files[nfiles++]);
			}
			sessions[nsessions].n = nfiles - sessions[nsessions].first;
			nsessions++;
		}
	}
	if (!nsessions)
		die("no session given (try: luo_model kexec:gmem:8M cancel:gmem:4M)");

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm: %s", strerror(errno));
	the_kvm.vm_fd = ioctl(kvm, KVM_CREATE_VM, 0);
	if (the_kvm.vm_fd < 0)
		die("KVM_CREATE_VM: %s", strerror(errno));
	the_kvm.vm_file = &vm_file;

	for (i = 0; i < nfiles; i++)
		open_file(&files[i]);

	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	bool kexec_started = false;
	for (int s = 0; s < nsessions; s++) {
		struct luo_file_set *set = &sets[s];
		struct session_spec *sp = &sessions[s];
		set->session.id = (uint64_t)s + 1;
		snprintf(set->session.name, sizeof(set->session.name), "model-%d", s + 1);
		for (i = sp->first; i < sp->first + sp->n; i++)
			luo_preserve_file(set, 0x1000 + (uint64_t)i, files[i].fd);
		if (!strcmp(sp->outcome, "cancel")) {
			luo_file_unpreserve_files(set);
			continue;
		}
		if (!kexec_started) {
			kernel_kexec();
			kexec_started = true;
		}
		if (luo_file_freeze(set, NULL)) {
			luo_file_unpreserve_files(set);  /* LUO cancels the session */
			continue;
		}
		if (!strcmp(sp->outcome, "kexec"))
			retrieve_and_finish(set, true);
		else if (!strcmp(sp->outcome, "discard"))
			retrieve_and_finish(set, false);
	}

	clock_gettime(CLOCK_MONOTONIC, &t1);

	FILE *o = stdout;
	if (json_path && !(o = fopen(json_path, "w")))
		die("open %s: %s", json_path, strerror(errno));
	fprintf(o, "{\"model\": \"luo_model\", \"sessions_ns\": %lld, \"files\": [\n",
		(long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	for (int s = 0; s < nsessions; s++)
		for (i = sessions[s].first; i < sessions[s].first + sessions[s].n; i++)
			json_file(o, &files[i], s + 1, sessions[s].outcome,
				  s == nsessions - 1 && i == sessions[s].first + sessions[s].n - 1);
	fprintf(o, "]}\n");
	if (o != stdout)
		fclose(o);
	return 0;
}

// SPDX-License-Identifier: GPL-2.0
/*
 * luo_model: the guest_memfd LUO file handler (patch "guest_memfd preservation
 * via LUO", virt/kvm/guest_memfd_luo.c, v1, and virt/kvm/guest_memfd.c), on
 * real guest_memfds made through /dev/kvm, or on their stand-ins where the
 * host's KVM makes none (gmem_file() in luo_model.c).
 *
 * Built with -DLUO_REVISION_LATEST (luo_model-latest), it is the series as
 * its later revisions have it (workloads/vm/series/latest): no freeze op,
 * preserve takes the VM token itself, can_preserve needs INIT_SHARED, the
 * unwind skips pfn 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../kvm_abi.h"
#include "../model.h"

struct gmem_file { struct kvm *kvm; };
struct guest_memfd_luo_folio_ser { uint64_t pfn:52; uint64_t flags:12; uint64_t index; } __attribute__((packed));
struct guest_memfd_luo_ser {
	uint64_t size; uint64_t flags; uint64_t nr_folios; uint64_t vm_token;
	struct kho_vmalloc folios;
} __attribute__((packed));

static struct kvm private_kvm = { .has_private_mem = true };  /* a KVM_X86_SW_PROTECTED_VM's */

static int gmem_create(struct model_file *mf, uint64_t *alloc)
{
	struct gmem_file *gfile = calloc(1, sizeof(*gfile));

	if (!gfile)
		die("out of memory");
	gfile->kvm = mf->fault == F_PRIVATE ? &private_kvm : &the_kvm;
	mf->file.private_data = gfile;
	/* a private VM's guest_memfd cannot be INIT_SHARED */
	mf->inode.flags = mf->fault == F_PRIVATE ? 0 : GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
	*alloc = mf->size;
	return gmem_file(mf->size);
}

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
	if (folios_ser && cur->fault == F_SLOW_FILL) {
		/* slow_fill=MS: the fill pass stalls MS ms before its first folio */
		struct timespec ts = { cur->fault_arg / 1000, (cur->fault_arg % 1000) * 1000000L };

		nanosleep(&ts, NULL);
	}
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
#ifdef LUO_REVISION_LATEST
	if (!gmem_file || !(file->f_inode->flags & GUEST_MEMFD_FLAG_INIT_SHARED))
		return false;
#endif
	if (gmem_file->kvm->has_private_mem)
		return false;
	return true;
}

/* The reviewer's race: fallocate on the frozen inode.  Punch the last page and
 * allocate it again, through the real guest_memfd (or its stand-in); the
 * kernel's filemap:mm_filemap_{delete_from,add_to}_page_cache tracepoints
 * fire on it. */
static void late_fallocate(struct model_file *mf)
{
	uint64_t n = mf->fault_arg > 0 ? (uint64_t)mf->fault_arg : 1;  /* late_fallocate=N: the last N pages */
	off_t first;
	if (n * PAGE_SZ > mf->size)
		n = mf->size / PAGE_SZ;
	first = (off_t)(mf->size - n * PAGE_SZ);
	gmem_punch(mf->fd, (uint64_t)first, n * PAGE_SZ, mf->size);
	gmem_alloc(mf->fd, (uint64_t)first, n * PAGE_SZ);
	mf->populated += n;
}

NOINLINE int kvm_gmem_luo_preserve(struct liveupdate_file_op_args *args)
{
	struct guest_memfd_luo_folio_ser *folios_ser = NULL;
	struct inode *inode = args->file->f_inode;
	struct guest_memfd_luo_ser *ser;
	uint64_t count = 0, abi_flags = 0, end_index, vm_token = 0;
	int64_t size;
	int err = 0;

#ifdef LUO_REVISION_LATEST
	struct gmem_file *gmem_file = args->file->private_data;

	/* the VM file must be in the session: -ENOENT before it is */
	err = liveupdate_get_token_outgoing(args->session,
					    cur->fault == F_TOKEN ? NULL : gmem_file->kvm->vm_file, &vm_token);
	if (err)
		return err;
#endif
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
	ser->vm_token = vm_token;

	if (count > 0) {
		folios_ser = cur->fault == F_ENOMEM || cur->fault == F_UNBALANCED_FREEZE
			? NULL : vcalloc(count, sizeof(*folios_ser));
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
	for (long i = (long)count - 1; i >= (cur->fault == F_LEAK_UNWIND ? 1 : 0); i--) {
#ifdef LUO_REVISION_LATEST
		if (!folios_ser[i].pfn)
			continue;
#endif
		kho_unpreserve_folio(&inode->i_mapping->folios[i]);
	}
	vfree(folios_ser);
err_free_ser:
	kho_unpreserve_free(ser);
err_unfreeze_inode:
	kvm_gmem_freeze(inode, false);
	return err;
}

#ifndef LUO_REVISION_LATEST
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
#endif

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
	vfree(folios_ser);
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
	struct guest_memfd_luo_folio_ser *folios_ser = NULL;
	struct model_file *mf = cur;
	struct stat st;
	int fd;

	if (ser->nr_folios) {
		folios_ser = kho_restore_vmalloc(&ser->folios);
		if (!folios_ser)
			return -EINVAL;
	}
	fd = gmem_file(ser->size);
	gmem_alloc(fd, 0, ser->size);
	for (uint64_t i = 0; i < ser->nr_folios; i++) {
		if (!folios_ser[i].pfn)
			continue;
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
	if (!args->retrieve_status && ser->nr_folios &&  /* discard: kvm_gmem_luo_discard_folios */
	    kho_restore_vmalloc(&ser->folios)) {
		for (uint64_t i = 0; i < ser->nr_folios; i++) {
			if (!folios_ser[i].pfn)
				continue;
			if (kho_restore_folio(folios_ser[i].pfn * PAGE_SZ))
				cur->folios_discarded++;
		}
	}
	vfree(folios_ser);
	kho_unpreserve_free(ser);
	args->serialized_data = 0;
}

static const struct model_handler guest_memfd = {
	.name = "guest_memfd", .spec = "gmem", .order = 10,  /* kvm_init, before memfd's late_initcall */
	.magic = GUEST_MEMFD_MAGIC,
	.faults = FAULT(F_HWPOISON) | FAULT(F_ENOMEM) | FAULT(F_VMALLOC) | FAULT(F_TOKEN) |
		  FAULT(F_PASS_MISMATCH) | FAULT(F_UNBALANCED_FREEZE) | FAULT(F_LEAK_UNWIND) |
		  FAULT(F_LATE_FALLOC) | FAULT(F_PFN0) | FAULT(F_HOLES) | FAULT(F_PRIVATE) |
		  FAULT(F_SLOW_FILL),
	.populated = true,
	.ser_nr = offsetof(struct guest_memfd_luo_ser, nr_folios),
	.ser_folios = offsetof(struct guest_memfd_luo_ser, folios),
	.ser_size = sizeof(struct guest_memfd_luo_ser),
	.folio_ser_size = sizeof(struct guest_memfd_luo_folio_ser),
	.create = gmem_create,
	.alloc = gmem_alloc,
	.can_preserve = kvm_gmem_luo_can_preserve,
	.preserve = kvm_gmem_luo_preserve,
#ifndef LUO_REVISION_LATEST
	.freeze = kvm_gmem_luo_freeze,
#endif
	.unpreserve = kvm_gmem_luo_unpreserve,
	.retrieve = kvm_gmem_luo_retrieve,
	.finish = kvm_gmem_luo_finish,
};
MODEL_HANDLER(guest_memfd);

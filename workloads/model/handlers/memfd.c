// SPDX-License-Identifier: GPL-2.0
/*
 * luo_model: the memfd LUO file handler (mainline mm/memfd_luo.c), on real
 * memfds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../kvm_abi.h"
#include "../model.h"

struct memfd_luo_folio_ser { uint64_t pfn:52; uint64_t flags:12; uint64_t index; } __attribute__((packed));
struct memfd_luo_ser {
	uint64_t pos; uint64_t size; uint32_t seals; uint32_t flags; uint64_t nr_folios;
	struct kho_vmalloc folios;
} __attribute__((packed));
#define MEMFD_LUO_FOLIO_DIRTY 1
#define MEMFD_LUO_FOLIO_UPTODATE 2

static int memfd_create_file(struct model_file *mf, uint64_t *alloc)
{
	int fd = memfd_create("luo-model", 0);

	if (fd < 0 || ftruncate(fd, (off_t)mf->size))
		die("memfd: %s", strerror(errno));
	*alloc = mf->size / 2;          /* memfd_luo pins every index: holes get filled */
	return fd;
}

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
	folios_ser = mf->fault == F_ENOMEM ? NULL : vcalloc(nr, sizeof(*folios_ser));
	if (!folios_ser)
		return -ENOMEM;
	for (i = 0; i < nr; i++) {
		err = kho_preserve_folio(&mf->mapping.folios[i]);
		if (err)
			goto err_unpreserve;
		folios_ser[i].pfn = mf->mapping.folios[i].pfn;
		folios_ser[i].flags = MEMFD_LUO_FOLIO_DIRTY | MEMFD_LUO_FOLIO_UPTODATE;
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
	vfree(folios_ser);
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
	vfree(args->private_data);
	kho_unpreserve_free(ser);
	args->serialized_data = 0;
	shmem_freeze(args->file->f_inode, false);
}

NOINLINE int memfd_luo_retrieve(struct liveupdate_file_op_args *args)
{
	struct memfd_luo_ser *ser = (struct memfd_luo_ser *)(uintptr_t)args->serialized_data;
	struct memfd_luo_folio_ser *folios_ser = NULL;

	if (ser->nr_folios) {
		folios_ser = kho_restore_vmalloc(&ser->folios);
		if (!folios_ser)
			return -EINVAL;
	}
	for (uint64_t i = 0; i < ser->nr_folios; i++)
		if (folios_ser[i].pfn && kho_restore_folio(folios_ser[i].pfn * PAGE_SZ))
			cur->folios_restored++;
	args->retrieve_status = 1;
	return 0;
}

NOINLINE void memfd_luo_finish(struct liveupdate_file_op_args *args)
{
	struct memfd_luo_ser *ser = (struct memfd_luo_ser *)(uintptr_t)args->serialized_data;
	struct memfd_luo_folio_ser *folios_ser = args->private_data;
	model_pause();
	if (!args->retrieve_status && ser->nr_folios && kho_restore_vmalloc(&ser->folios))
		for (uint64_t i = 0; i < ser->nr_folios; i++)
			if (folios_ser[i].pfn && kho_restore_folio(folios_ser[i].pfn * PAGE_SZ))
				cur->folios_discarded++;
	vfree(folios_ser);
	kho_unpreserve_free(ser);
	args->serialized_data = 0;
}

static const struct model_handler memfd = {
	.name = "memfd", .spec = "memfd", .order = 20,  /* a late_initcall */
	.magic = TMPFS_MAGIC,
	.faults = FAULT(F_ENOMEM) | FAULT(F_VMALLOC) | FAULT(F_LEAK_UNWIND),
	.populated = false,     /* shmem folios bypass the filemap tracepoint */
	.ser_nr = offsetof(struct memfd_luo_ser, nr_folios),
	.ser_folios = offsetof(struct memfd_luo_ser, folios),
	.ser_size = sizeof(struct memfd_luo_ser),
	.folio_ser_size = sizeof(struct memfd_luo_folio_ser),
	.create = memfd_create_file,
	.can_preserve = memfd_luo_can_preserve,
	.preserve = memfd_luo_preserve,
	.freeze = memfd_luo_freeze,
	.unpreserve = memfd_luo_unpreserve,
	.retrieve = memfd_luo_retrieve,
	.finish = memfd_luo_finish,
};
MODEL_HANDLER(memfd);

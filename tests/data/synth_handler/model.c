// SPDX-License-Identifier: GPL-2.0
/*
 * luo_model: a synthetic third LUO file handler, only for the test that proves
 * a handler is its catalog entry, its BPF and this file
 * (tests/test_new_handler.py).  Its files are memfds whose model superblock
 * carries its own magic, so memfd's can_preserve turns them down.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../model.h"

#define SYNTH_MAGIC 0x53594e54

struct synth_folio_ser { uint64_t pfn; uint64_t index; };
struct synth_ser { uint64_t size; uint64_t nr_folios; struct kho_vmalloc folios; struct synth_folio_ser *fs; };

static int synth_create(struct model_file *mf, uint64_t *alloc)
{
	int fd = memfd_create("luo-model-synth", 0);

	if (fd < 0 || ftruncate(fd, (off_t)mf->size))
		die("synth memfd: %s", strerror(errno));
	*alloc = mf->size;
	return fd;
}

NOINLINE bool synth_luo_can_preserve(void *handler, struct file *file)
{
	(void)handler;
	return file->f_inode->i_sb->s_magic == SYNTH_MAGIC;
}

NOINLINE int synth_luo_preserve_folios(struct address_space *mapping, struct synth_folio_ser *fs,
				       uint64_t *nr_foliosp)
{
	uint64_t i;
	int err;

	model_pause();
	for (i = 0; i < mapping->nr; i++) {
		err = kho_preserve_folio(&mapping->folios[i]);
		if (err)
			return err;
		fs[i].pfn = mapping->folios[i].pfn;
		fs[i].index = mapping->folios[i].index;
	}
	*nr_foliosp = i;
	return 0;
}

NOINLINE int synth_luo_preserve(struct liveupdate_file_op_args *args)
{
	struct address_space *mapping = args->file->f_inode->i_mapping;
	struct synth_ser *ser = kho_alloc_preserve(sizeof(*ser));
	int err;

	ser->size = (uint64_t)args->file->f_inode->i_size;
	ser->fs = vcalloc(mapping->nr, sizeof(*ser->fs));
	err = synth_luo_preserve_folios(mapping, ser->fs, &ser->nr_folios);
	if (!err)
		err = kho_preserve_vmalloc(ser->fs, &ser->folios);
	if (err) {
		for (long i = (long)ser->nr_folios - 1; i >= 0; i--)
			kho_unpreserve_folio(&mapping->folios[i]);
		vfree(ser->fs);
		kho_unpreserve_free(ser);
		return err;
	}
	args->serialized_data = (uint64_t)(uintptr_t)ser;
	return 0;
}

NOINLINE int synth_luo_freeze(struct liveupdate_file_op_args *args)
{
	model_pause();
	return args->serialized_data ? 0 : -EINVAL;
}

NOINLINE void synth_luo_unpreserve(struct liveupdate_file_op_args *args)
{
	struct synth_ser *ser = (struct synth_ser *)(uintptr_t)args->serialized_data;

	kho_unpreserve_vmalloc(&ser->folios);
	for (long i = (long)ser->nr_folios - 1; i >= 0; i--)
		kho_unpreserve_folio(&args->file->f_inode->i_mapping->folios[i]);
	vfree(ser->fs);
	kho_unpreserve_free(ser);
	args->serialized_data = 0;
}

NOINLINE int synth_luo_retrieve(struct liveupdate_file_op_args *args)
{
	struct synth_ser *ser = (struct synth_ser *)(uintptr_t)args->serialized_data;

	for (uint64_t i = 0; i < ser->nr_folios; i++)
		if (kho_restore_folio(ser->fs[i].pfn * PAGE_SZ))
			cur->folios_restored++;
	args->retrieve_status = 1;
	return 0;
}

NOINLINE void synth_luo_finish(struct liveupdate_file_op_args *args)
{
	struct synth_ser *ser = (struct synth_ser *)(uintptr_t)args->serialized_data;

	model_pause();
	if (!args->retrieve_status)
		for (uint64_t i = 0; i < ser->nr_folios; i++)
			if (kho_restore_folio(ser->fs[i].pfn * PAGE_SZ))
				cur->folios_discarded++;
	vfree(ser->fs);
	kho_unpreserve_free(ser);
	args->serialized_data = 0;
}

static const struct model_handler synth = {
	.name = "synth", .spec = "synth", .order = 30,
	.magic = SYNTH_MAGIC,
	.faults = FAULT(F_VMALLOC),
	.create = synth_create,
	.can_preserve = synth_luo_can_preserve,
	.preserve = synth_luo_preserve,
	.freeze = synth_luo_freeze,
	.unpreserve = synth_luo_unpreserve,
	.retrieve = synth_luo_retrieve,
	.finish = synth_luo_finish,
};
MODEL_HANDLER(synth);

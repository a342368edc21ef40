/* SPDX-License-Identifier: GPL-2.0 */
/*
 * luo_model: what the core (luo_model.c) shares with the file handlers
 * (handlers/<name>.c): the kernel-shaped structures luotrace's BPF reads, the
 * model's own per-file state and faults, KHO and LUO core calls, and the
 * handler table a handler registers itself in with MODEL_HANDLER().
 */
#ifndef LUO_MODEL_H
#define LUO_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define NOINLINE __attribute__((noinline, noclone, used))
#define PAGE_SZ 4096UL
#ifndef EHWPOISON
#define EHWPOISON 133
#endif

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
struct kvm { int vm_fd; struct file *vm_file; bool has_private_mem; };
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

enum fault {
	F_NONE, F_HWPOISON, F_ENOMEM, F_VMALLOC, F_TOKEN, F_PASS_MISMATCH,
	F_UNBALANCED_FREEZE, F_LEAK_UNWIND, F_LATE_FALLOC, F_PFN0, F_HOLES, F_PRIVATE, F_SLOW_FILL,
	NR_FAULTS
};
#define FAULT(f) (1U << (f))

struct model_handler;

/* Per-file model state and ground truth. */
struct model_file {
	const struct model_handler *handler;
	uint64_t size;
	enum fault fault;
	long fault_arg;
	int fd;
	char *map;
	struct super_block sb;
	struct inode inode;
	struct address_space mapping;
	struct file file;
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

/*
 * The backing of the model's guest_memfd files (luo_model.c): real ones made
 * through /dev/kvm, or, where the host's KVM makes none (or --gmem standin),
 * stand-ins: O_TMPFILEs of the ramfs at STANDIN_DIR, filled through faults.
 */
extern bool gmem_standin;
int gmem_file(uint64_t size);                           /* a new file SIZE long */
void gmem_alloc(int fd, uint64_t off, uint64_t len);    /* fallocate(KEEP_SIZE) */
void gmem_punch(int fd, uint64_t off, uint64_t len, uint64_t size); /* PUNCH_HOLE */

/*
 * A LUO file handler of the model: its operations carry the kernel's names so
 * that luotrace attaches to them as it would to the kernel's.  LUO offers a
 * file to every handler in registration order (lowest @order first).
 */
struct model_handler {
	const char *name;       /* the catalog's handler name (ground truth "handler") */
	const char *spec;       /* its name in a FILE spec on the command line */
	int order;
	uint64_t magic;         /* s_magic of its files' superblock */
	unsigned int faults;    /* FAULT(f) of every fault it models */
	bool populated;         /* its folios pass the filemap tracepoints (truth counts them) */
	/* Its serialized folio array, as --layout prints it for luotrace's walk
	 * of that array: offsetof(<ser>, nr_folios) and (<ser>, folios),
	 * sizeof(<folio_ser>); ser_size 0 = it hands no such array to KHO. */
	size_t ser_nr, ser_folios, ser_size, folio_ser_size;
	/* Makes the real file: returns its fd, sets *alloc to the bytes to fallocate
	 * and may set inode.flags and file.private_data. */
	int (*create)(struct model_file *mf, uint64_t *alloc);
	/* Allocates [off, off + len) of a file it made; NULL: fallocate(KEEP_SIZE). */
	void (*alloc)(int fd, uint64_t off, uint64_t len);
	bool (*can_preserve)(void *handler, struct file *file);
	int (*preserve)(struct liveupdate_file_op_args *args);
	int (*freeze)(struct liveupdate_file_op_args *args);    /* NULL: none (a revision dropped it) */
	void (*unpreserve)(struct liveupdate_file_op_args *args);
	int (*retrieve)(struct liveupdate_file_op_args *args);
	void (*finish)(struct liveupdate_file_op_args *args);
};

/* Registers a handler: the linker gathers these pointers between
 * __start_model_handlers and __stop_model_handlers, so a handler is one file. */
#define MODEL_HANDLER(h) \
	static const struct model_handler *const model_handler_##h \
	__attribute__((used, section("model_handlers"))) = &h

/* The model's core (luo_model.c). */
extern struct model_file *cur;          /* file the handler is working on */
extern struct kvm the_kvm;
void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
void model_pause(void);
uint32_t kernel_dev(uint64_t dev);
void scan_folios(struct model_file *mf, uint64_t resident);

/* KHO core (kernel/liveupdate/kexec_handover.c). */
int kho_preserve_folio(struct folio *folio);
void kho_unpreserve_folio(struct folio *folio);
struct folio *kho_restore_folio(uint64_t phys);
int kho_preserve_pages(void *page, unsigned long nr_pages);
int kho_preserve_vmalloc(void *ptr, struct kho_vmalloc *kv);
void kho_unpreserve_vmalloc(struct kho_vmalloc *kv);
void *kho_restore_vmalloc(struct kho_vmalloc *kv);
void *kho_restore_pages(uint64_t phys, unsigned long nr_pages);
void *kho_alloc_preserve(size_t size);
void kho_unpreserve_free(void *mem);

/* vcalloc()/vfree() (mm/vmalloc.c): whole zeroed pages, so that
 * kho_preserve_vmalloc hands them to KHO a page at a time as the kernel's does. */
void *vcalloc(size_t n, size_t size);
void vfree(void *ptr);

/* LUO core (kernel/liveupdate/luo_file.c). */
int liveupdate_get_token_outgoing(struct liveupdate_session *s, struct file *file, uint64_t *token);

#endif

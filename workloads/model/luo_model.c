// SPDX-License-Identifier: GPL-2.0
/*
 * luo_model: a userspace reference model of LUO with its file handlers.
 *
 * The functions carry the kernel's names and call structure (KHO and LUO core
 * here; each file handler in handlers/<name>.c: the guest_memfd patch's
 * virt/kvm/guest_memfd_luo.c, the mainline mm/memfd_luo.c) so that luotrace's
 * BPF programs attach to them with uprobes exactly as they would attach to the
 * patched kernel with kprobes.  They work on real files (guest_memfds made
 * through /dev/kvm, memfds) pre-allocated with fallocate, their pfns read from
 * /proc/self/pagemap.  Where the host's KVM makes no guest_memfd, the
 * guest_memfd files are stand-ins (a ramfs page-cache file each, filled
 * through faults) and the ground truth says so.
 *
 * Faults can be injected per file; the model prints its own ground truth as
 * JSON so the tests can compare what luotrace saw with what really happened.
 *
 * Usage: luo_model [--json FILE] [--layout] [--pause-ms N] [--gmem auto|real|standin] SESSION...
 *   SESSION = OUTCOME:FILE[,FILE...]
 *   OUTCOME = kexec | cancel | discard | keep
 *   FILE    = HANDLER:SIZE[:FAULT[=ARG]]   HANDLER = gmem | memfd | any handler registered
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
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "kvm_abi.h"
#include "model.h"

#define MAX_FILES 64
#define MAX_SESSIONS 16

static const char *const fault_names[NR_FAULTS] = {
	"none", "hwpoison", "enomem", "vmalloc_fail", "token_enoent", "pass_mismatch",
	"unbalanced_freeze", "leak_unwind", "late_fallocate", "pfn0", "holes", "private_vm", "slow_fill",
};
/* The anomaly code each fault must produce in luotrace's report. */
static const char *const fault_anomaly[NR_FAULTS] = {
	NULL, NULL, NULL, NULL, NULL, "pass_count_mismatch",
	"freeze_unbalanced", "unwind_incomplete", "folio_added_while_frozen", "pfn_zero", "holes", NULL, NULL,
};

struct luo_file_set {
	struct liveupdate_session session;
	struct model_file *files[MAX_FILES];
	int n;
};

struct kvm the_kvm;
struct model_file *cur;
static struct file vm_file;
static struct model_file files[MAX_FILES];
static int nfiles;
static long pause_ns;

/* The handlers MODEL_HANDLER() registered, in LUO's order. */
extern const struct model_handler *const __start_model_handlers[], *const __stop_model_handlers[];
static const struct model_handler *handlers[16];
static int nhandlers;

void die(const char *fmt, ...)
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
void model_pause(void)
{
	struct timespec a, b;
	if (!pause_ns)
		return;
	clock_gettime(CLOCK_MONOTONIC, &a);
	do
		clock_gettime(CLOCK_MONOTONIC, &b);
	while ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec) < pause_ns);
}

uint32_t kernel_dev(uint64_t d)
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
void scan_folios(struct model_file *mf, uint64_t resident)
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

static void open_file(struct model_file *mf)
{
	struct stat st;
	uint64_t alloc = mf->size;

	mf->fd = mf->handler->create(mf, &alloc);
	if (mf->fault == F_HOLES)
		alloc = mf->size - (uint64_t)mf->fault_arg * PAGE_SZ;
	if (alloc && mf->handler->alloc)
		mf->handler->alloc(mf->fd, 0, alloc);
	else if (alloc && fallocate(mf->fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)alloc))
		die("fallocate(KEEP_SIZE, %llu): %s", (unsigned long long)alloc, strerror(errno));
	mf->map = mmap(NULL, mf->size, PROT_READ | PROT_WRITE, MAP_SHARED, mf->fd, 0);
	if (mf->map == MAP_FAILED)
		die("mmap: %s", strerror(errno));
	if (fstat(mf->fd, &st))
		die("fstat: %s", strerror(errno));
	mf->sb.s_dev = kernel_dev(st.st_dev);
	mf->sb.s_magic = mf->handler->magic;
	mf->inode.i_ino = st.st_ino;
	mf->inode.i_sb = &mf->sb;
	mf->inode.i_size = (int64_t)mf->size;
	mf->inode.i_mapping = &mf->mapping;
	mf->mapping.host = &mf->inode;
	mf->file.f_inode = &mf->inode;
	mf->file.mf = mf;
	scan_folios(mf, alloc);
	mf->populated = mf->mapping.nr;
	if (mf->fault == F_PFN0 && mf->mapping.nr)
		mf->mapping.folios[0].pfn = 0;
	if (mf->fault == F_HWPOISON && (uint64_t)mf->fault_arg < mf->mapping.nr)
		mf->mapping.folios[mf->fault_arg].hwpoison = 1;
}

/* ---- guest_memfd backing: real, or a stand-in (model.h) ---- */

bool gmem_standin;
static char gmem_why[320];

/* Can this host make a default-type guest_memfd with MMAP|INIT_SHARED?  As
 * tracer/kernel/kvm.py's probe(): "" if so, else why not.  Leaves the VM open in
 * the_kvm.vm_fd where KVM_CREATE_VM works (its fd makes the VM token). */
static const char *gmem_probe(void)
{
	static char why[160];
	struct kvm_create_guest_memfd g = { .size = PAGE_SZ,
		.flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED };
	int kvm, flags, fd;

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		snprintf(why, sizeof(why), errno == ENOENT ? "no /dev/kvm (no KVM on this host)"
			 : "cannot open /dev/kvm: %s", strerror(errno));
		return why;
	}
	the_kvm.vm_fd = ioctl(kvm, KVM_CREATE_VM, 0);
	if (the_kvm.vm_fd < 0) {
		snprintf(why, sizeof(why), "KVM_CREATE_VM failed: %s", strerror(errno));
		return why;
	}
	if (ioctl(the_kvm.vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) <= 0)
		return "KVM_CAP_GUEST_MEMFD is 0: this host's KVM makes no guest_memfd";
	flags = ioctl(the_kvm.vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_FLAGS);
	if (flags < 0 || (flags & g.flags) != g.flags) {
		snprintf(why, sizeof(why), "this host's guest_memfd lacks MMAP|INIT_SHARED "
			 "(KVM_CAP_GUEST_MEMFD_FLAGS %#x)", flags < 0 ? 0 : flags);
		return why;
	}
	fd = ioctl(the_kvm.vm_fd, KVM_CREATE_GUEST_MEMFD, &g);
	if (fd < 0) {
		snprintf(why, sizeof(why), "KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED) failed: %s", strerror(errno));
		return why;
	}
	close(fd);
	return "";
}

/* --gmem CHOICE, else $LUOTRACE_GMEM, else auto: as tracer/kernel/backing.py's choose(). */
static void gmem_choose(const char *choice)
{
	const char *why;
	char source[64] = "--gmem";

	if ((!choice || !strcmp(choice, "auto")) && getenv("LUOTRACE_GMEM") &&
	    strcmp(getenv("LUOTRACE_GMEM"), "auto")) {
		choice = getenv("LUOTRACE_GMEM");
		snprintf(source, sizeof(source), "LUOTRACE_GMEM=%s", choice);
	}
	if (!choice)
		choice = "auto";
	if (strcmp(choice, "auto") && strcmp(choice, "real") && strcmp(choice, "standin"))
		die("bad guest_memfd backing '%s' (%s): auto, real or standin", choice, source);
	why = gmem_probe();
	if (!strcmp(choice, "standin")) {
		gmem_standin = true;
		snprintf(gmem_why, sizeof(gmem_why), "forced by %s%s%s", source,
			 *why ? "; besides, " : "; this host makes guest_memfds too", why);
	} else if (*why) {
		if (!strcmp(choice, "real"))
			die("real guest_memfds were asked for (%s) but %s", source, why);
		gmem_standin = true;
		snprintf(gmem_why, sizeof(gmem_why), "%s", why);
	}
}

/* A directory of root's alone, never a symlink or another user's: the
 * stand-in ramfs is mounted there. */
static void private_dir(const char *path)
{
	struct stat st;

	mkdir(path, 0700);
	if (lstat(path, &st))
		die("%s: %s", path, strerror(errno));
	if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid())
		die("%s is %s: refusing to use it; remove it", path,
		    S_ISLNK(st.st_mode) ? "a symlink" : !S_ISDIR(st.st_mode) ? "not a directory" :
		    "another user's directory");
	if ((st.st_mode & 0077) && chmod(path, 0700))
		die("chmod %s: %s", path, strerror(errno));
}

static int standin_dir(void)
{
	struct statfs sf;
	int lock, dir;

	private_dir("/run/luotrace");
	lock = open(STANDIN_LOCK, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (lock < 0 || flock(lock, LOCK_EX))
		die("lock %s: %s", STANDIN_LOCK, strerror(errno));
	private_dir(STANDIN_DIR);
	if ((statfs(STANDIN_DIR, &sf) || (unsigned long)sf.f_type != RAMFS_MAGIC) &&
	    mount("luotrace-gmem-standin", STANDIN_DIR, "ramfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0700"))
		die("mounting the guest_memfd stand-in ramfs on %s: %s", STANDIN_DIR, strerror(errno));
	close(lock);
	dir = open(STANDIN_DIR, O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
	if (dir < 0)
		die("open %s: %s", STANDIN_DIR, strerror(errno));
	return dir;
}

/* MemAvailable: ramfs pages are never swapped nor reclaimed, so a stand-in
 * larger than this would only end in the OOM killer. */
static uint64_t mem_available(void)
{
	unsigned long long kb = 0;
	char line[128];
	FILE *f = fopen("/proc/meminfo", "r");

	if (!f)
		return UINT64_MAX;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
			break;
	fclose(f);
	return kb ? kb * 1024 : UINT64_MAX;
}

int gmem_file(uint64_t size)
{
	struct kvm_create_guest_memfd g = { .size = size,
		.flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED };
	static int dir = -1;
	int fd;

	if (!gmem_standin) {
		fd = ioctl(the_kvm.vm_fd, KVM_CREATE_GUEST_MEMFD, &g);
		if (fd < 0)
			die("KVM_CREATE_GUEST_MEMFD(size=%llu, flags=MMAP|INIT_SHARED): %s",
			    (unsigned long long)size, strerror(errno));
		return fd;
	}
	if (size > mem_available() / 4 * 3)
		die("a %llu MiB guest_memfd stand-in does not fit this host's memory (%llu MiB available; "
		    "ramfs cannot be swapped): use a smaller size", (unsigned long long)(size >> 20),
		    (unsigned long long)(mem_available() >> 20));
	if (dir < 0)
		dir = standin_dir();
	fd = openat(dir, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (fd < 0 || ftruncate(fd, (off_t)size))
		die("a guest_memfd stand-in in %s: %s", STANDIN_DIR, strerror(errno));
	return fd;
}

/* A stand-in has no fallocate (ramfs): each page is faulted in through a
 * shared mapping, one order-0 folio each, as fallocate gives a guest_memfd. */
void gmem_alloc(int fd, uint64_t off, uint64_t len)
{
	volatile char *p;

	if (!len)
		return;
	if (!gmem_standin) {
		if (fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len))
			die("fallocate(KEEP_SIZE, %llu, %llu): %s", (unsigned long long)off,
			    (unsigned long long)len, strerror(errno));
		return;
	}
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)off);
	if (p == MAP_FAILED)
		die("mmap of a guest_memfd stand-in: %s", strerror(errno));
	for (uint64_t i = 0; i < len; i += PAGE_SZ)
		p[i] = 0;
	munmap((void *)p, len);
}

/* ramfs has no PUNCH_HOLE either: a stand-in's tail goes with a truncate. */
void gmem_punch(int fd, uint64_t off, uint64_t len, uint64_t size)
{
	if (!gmem_standin) {
		if (fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, (off_t)off, (off_t)len))
			die("fallocate(PUNCH_HOLE): %s", strerror(errno));
		return;
	}
	if (off + len != size)
		die("a guest_memfd stand-in can only punch its tail");
	if (ftruncate(fd, (off_t)off) || ftruncate(fd, (off_t)size))
		die("truncating a guest_memfd stand-in: %s", strerror(errno));
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

/* The model has no struct page: a page is named by its own address. */
NOINLINE int kho_preserve_pages(void *page, unsigned long nr_pages)
{
	(void)page;
	(void)nr_pages;
	__asm__ volatile("" ::: "memory");     /* not a const function: every call stays */
	return 0;
}

/* vcalloc's areas, for kho_preserve_vmalloc's find_vm_area() */
#define MAX_VM_AREAS 256
static struct { void *addr; size_t pages; } vm_areas[MAX_VM_AREAS];

void *vcalloc(size_t n, size_t size)
{
	size_t pages = (n * size + PAGE_SZ - 1) / PAGE_SZ;
	void *p;
	int i;

	if (!pages)
		pages = 1;
	for (i = 0; i < MAX_VM_AREAS && vm_areas[i].addr; i++)
		;
	if (i == MAX_VM_AREAS)
		die("vcalloc: more than %d areas", MAX_VM_AREAS);
	p = mmap(NULL, pages * PAGE_SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	vm_areas[i].addr = p;
	vm_areas[i].pages = pages;
	return p;
}

/* find_vm_area(): PTR's slot in vm_areas, or -1 */
static int find_vm_area(const void *ptr)
{
	for (int i = 0; ptr && i < MAX_VM_AREAS; i++)
		if (vm_areas[i].addr == ptr)
			return i;
	return -1;
}

void vfree(void *ptr)
{
	int i = find_vm_area(ptr);

	if (i >= 0) {
		munmap(ptr, vm_areas[i].pages * PAGE_SZ);
		vm_areas[i].addr = NULL;
	}
}

/* As the kernel's (kernel/liveupdate/kexec_handover.c): a chunk page holds
 * the next chunk's address and the addresses of up to KHO_VMALLOC_SIZE pages
 * of the area; it is preserved while still zero, then filled, and
 * kv->first names the first chunk.  The model's "physical address" of a
 * page is its own address. */
#define KHO_VMALLOC_SIZE ((PAGE_SZ - 8) / 8)
struct kho_vmalloc_chunk {
	uint64_t next;
	uint64_t phys[KHO_VMALLOC_SIZE];
};

static struct kho_vmalloc_chunk *new_vmalloc_chunk(struct kho_vmalloc_chunk *prev, struct kho_vmalloc *kv)
{
	struct kho_vmalloc_chunk *chunk = aligned_alloc(PAGE_SZ, PAGE_SZ);

	if (!chunk)
		return NULL;
	explicit_bzero(chunk, PAGE_SZ);        /* get_zeroed_page (a memset before free() may be elided) */
	kho_preserve_pages(chunk, 1);
	if (prev)
		prev->next = (uint64_t)(uintptr_t)chunk;
	else
		kv->first = (uint64_t)(uintptr_t)chunk;
	return chunk;
}

static void free_vmalloc_chunks(struct kho_vmalloc *kv)
{
	struct kho_vmalloc_chunk *chunk = (struct kho_vmalloc_chunk *)(uintptr_t)kv->first;

	while (chunk) {
		struct kho_vmalloc_chunk *next = (struct kho_vmalloc_chunk *)(uintptr_t)chunk->next;

		free(chunk);
		chunk = next;
	}
	kv->first = 0;
}

NOINLINE int kho_preserve_vmalloc(void *ptr, struct kho_vmalloc *kv)
{
	int area = find_vm_area(ptr);
	struct kho_vmalloc_chunk *chunk;
	size_t pages, i, idx = 0;

	model_pause();
	kv->first = 0;
	if (cur->fault == F_VMALLOC || cur->fault == F_LEAK_UNWIND)
		return -ENOMEM;
	if (area < 0)
		return -EINVAL;         /* not a vcalloc area */
	pages = vm_areas[area].pages;
	chunk = new_vmalloc_chunk(NULL, kv);
	if (!chunk)
		return -ENOMEM;
	for (i = 0; i < pages; i++) {
		kho_preserve_pages((char *)ptr + i * PAGE_SZ, 1);
		chunk->phys[idx] = (uint64_t)(uintptr_t)((char *)ptr + i * PAGE_SZ);
		if (++idx == KHO_VMALLOC_SIZE) {
			chunk = new_vmalloc_chunk(chunk, kv);
			if (!chunk) {
				free_vmalloc_chunks(kv);
				return -ENOMEM;
			}
			idx = 0;
		}
	}
	kv->total_pages = (uint32_t)pages;
	return 0;
}

NOINLINE void kho_unpreserve_vmalloc(struct kho_vmalloc *kv) { free_vmalloc_chunks(kv); }

NOINLINE void *kho_restore_pages(uint64_t phys, unsigned long nr_pages)
{
	(void)nr_pages;
	__asm__ volatile("" ::: "memory");
	return (void *)(uintptr_t)phys;
}

/* New kernel: each page of the area back, a chunk at a time, each chunk's
 * pages before the chunk page itself; the area is where it was (the model
 * does not remap it).  NULL when the chunks do not hold total_pages. */
NOINLINE void *kho_restore_vmalloc(struct kho_vmalloc *kv)
{
	struct kho_vmalloc_chunk *chunk = (struct kho_vmalloc_chunk *)(uintptr_t)kv->first;
	void *area = chunk ? (void *)(uintptr_t)chunk->phys[0] : NULL;
	uint32_t idx = 0;

	while (chunk) {
		for (size_t i = 0; i < KHO_VMALLOC_SIZE && chunk->phys[i]; i++) {
			kho_restore_pages(chunk->phys[i], 1);
			idx++;
		}
		kho_restore_pages((uint64_t)(uintptr_t)chunk, 1);
		chunk = (struct kho_vmalloc_chunk *)(uintptr_t)chunk->next;
	}
	free_vmalloc_chunks(kv);
	return idx == kv->total_pages ? area : NULL;
}

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
	*token = (s->id << 16) | (uint64_t)(the_kvm.vm_fd & 0xffff);
	return 0;
}

/* ---- guest_memfd (virt/kvm/guest_memfd.c + guest_memfd_luo.c) ---- */

/* ---- LUO file set: dispatch to the handler ops ---- */

/* LUO asks every registered handler about every file, in registration order:
 * on the patched kernel the KVM handlers (kvm_init) come before memfd's
 * (a late_initcall), so a memfd is offered to the guest_memfd handler first
 * (struct model_handler.order). */
static bool h_can_preserve(struct model_file *mf)
{
	for (int i = 0; i < nhandlers; i++)
		if (handlers[i]->can_preserve(NULL, &mf->file))
			return true;
	return false;
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
	err = mf->handler->preserve(&mf->args);
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

		if (!mf->handler->freeze)
			continue;       /* a revision without the op (LUO skips it) */
		cur = mf;
		err = mf->handler->freeze(&mf->args);
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
		mf->handler->unpreserve(&mf->args);
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
			mf->handler->retrieve(&mf->args);
		}
		mf->handler->finish(&mf->args);
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

/* Gathers the registered handlers in LUO's order. */
static void register_handlers(void)
{
	for (const struct model_handler *const *h = __start_model_handlers; h < __stop_model_handlers; h++) {
		int i = nhandlers++;

		if (nhandlers > (int)(sizeof(handlers) / sizeof(*handlers)))
			die("too many handlers");
		while (i > 0 && handlers[i - 1]->order > (*h)->order) {
			handlers[i] = handlers[i - 1];
			i--;
		}
		handlers[i] = *h;
	}
}

static const char *handler_specs(void)
{
	static char buf[256];
	size_t n = 0;

	buf[0] = '\0';
	for (int i = 0; i < nhandlers; i++)
		n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s%s", i ? "|" : "", handlers[i]->spec);
	return buf;
}

static void parse_file(char *spec, struct model_file *mf)
{
	char *h = strtok(spec, ":"), *sz = strtok(NULL, ":"), *f = strtok(NULL, ":");
	if (!h || !sz)
		die("bad file spec (want HANDLER:SIZE[:FAULT[=ARG]])");
	mf->handler = NULL;
	for (int i = 0; i < nhandlers; i++)
		if (!strcmp(h, handlers[i]->spec))
			mf->handler = handlers[i];
	if (!mf->handler)
		die("unknown handler '%s' (%s)", h, handler_specs());
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
		if (mf->fault != F_NONE && !(mf->handler->faults & FAULT(mf->fault)))
			die("fault '%s' does not apply to %s files", f, h);
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
	if (mf->handler->populated)
		snprintf(populated, sizeof(populated), "%llu", (unsigned long long)mf->populated);
	fprintf(o, "    {\"session\": %d, \"outcome\": \"%s\", \"handler\": \"%s\", \"inode\": %llu, "
		"\"dev\": %u, \"size_bytes\": %llu, \"fault\": \"%s\", \"folios_populated\": %s, "
		"\"folios_preserved\": %llu, \"folios_unpreserved\": %llu, \"folios_restored\": %llu, "
		"\"folios_discarded\": %llu, \"result\": \"%s\", \"errno\": %s%s%s, \"failed_phase\": %s%s%s, "
		"\"freeze_depth\": %d, \"retrieved_inode\": %llu, \"anomalies\": [%s%s%s]}%s\n",
		session, outcome, mf->handler->name, (unsigned long long)mf->inode.i_ino,
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
	const struct model_handler *const *h;
	int first = 1;

	/* Logical offsets luotrace's BPF programs need, the model's own layout;
	 * tracer/layout.py resolves the same names from kernel BTF. */
	printf("{\"ARGS_FILE\": %zu, \"ARGS_SER\": %zu, \"FILE_INODE\": %zu, \"INODE_INO\": %zu, "
	       "\"INODE_SB\": %zu, \"INODE_SIZE\": %zu, \"SB_DEV\": %zu, \"SB_MAGIC\": %zu, \"INODE_GMEM_FLAGS\": %zu, "
	       "\"FOLIO_INDEX\": %zu, \"FOLIO_PFN\": %zu, \"SER\": {",
	       offsetof(struct liveupdate_file_op_args, file),
	       offsetof(struct liveupdate_file_op_args, serialized_data),
	       offsetof(struct file, f_inode), offsetof(struct inode, i_ino),
	       offsetof(struct inode, i_sb), offsetof(struct inode, i_size),
	       offsetof(struct super_block, s_dev), offsetof(struct super_block, s_magic),
	       offsetof(struct inode, flags),
	       offsetof(struct folio, index), offsetof(struct folio, pfn));
	/* each handler's serialized folio array: [nr_folios, folios, sizeof ser, sizeof folio ser] */
	for (h = __start_model_handlers; h < __stop_model_handlers; h++) {
		if (!(*h)->ser_size)
			continue;
		printf("%s\"%s\": [%zu, %zu, %zu, %zu]", first ? "" : ", ", (*h)->name, (*h)->ser_nr,
		       (*h)->ser_folios, (*h)->ser_size, (*h)->folio_ser_size);
		first = 0;
	}
	printf("}}\n");
}

struct session_spec { const char *outcome; int first, n; };

int main(int argc, char **argv)
{
	static struct session_spec sessions[MAX_SESSIONS];
	static struct luo_file_set sets[MAX_SESSIONS];
	const char *json_path = NULL, *gmem = NULL;
	int nsessions = 0, i;

	register_handlers();

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--layout")) {
			print_layout();
			return 0;
		} else if (!strcmp(argv[i], "--json") && i + 1 < argc) {
			json_path = argv[++i];
		} else if (!strcmp(argv[i], "--gmem") && i + 1 < argc) {
			gmem = argv[++i];
		} else if (!strcmp(argv[i], "--pause-ms") && i + 1 < argc) {
			pause_ns = (long)(atof(argv[++i]) * 1e6);
		} else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			printf("usage: luo_model [--json FILE] [--pause-ms N] [--gmem auto|real|standin] [--layout]\n"
			       "                 OUTCOME:HANDLER:SIZE[:FAULT[=ARG]][,...] ...\n"
			       "  OUTCOME kexec|cancel|discard|keep; HANDLER %s\n"
			       "  --gmem  guest_memfd files: real (/dev/kvm), standin (ramfs files, where KVM makes\n"
			       "          no guest_memfd), auto (default; also $LUOTRACE_GMEM)\n", handler_specs());
			puts(			     "  FAULT none|hwpoison=N|enomem|vmalloc_fail|token_enoent|pass_mismatch|\n"
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

	the_kvm.vm_fd = -1;
	gmem_choose(gmem);
	if (gmem_standin)
		fprintf(stderr, "luo_model: guest_memfd files are stand-ins (ramfs page-cache files): %s\n", gmem_why);
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
	fprintf(o, "{\"model\": \"luo_model\", \"sessions_ns\": %lld, \"gmem\": {\"backing\": \"%s\", "
		"\"why\": %s%s%s}, \"files\": [\n",
		(long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec),
		gmem_standin ? "standin" : "guest_memfd", gmem_standin ? "\"" : "",
		gmem_standin ? gmem_why : "null", gmem_standin ? "\"" : "");
	for (int s = 0; s < nsessions; s++)
		for (i = sessions[s].first; i < sessions[s].first + sessions[s].n; i++)
			json_file(o, &files[i], s + 1, sessions[s].outcome,
				  s == nsessions - 1 && i == sessions[s].first + sessions[s].n - 1);
	fprintf(o, "]}\n");
	if (o != stdout)
		fclose(o);
	return 0;
}

/* luotrace: shared definitions of every BPF program.
 *
 * Compiled by BCC, after the ABI definitions generated from tracer/abi.py.
 * Everything that depends on the traced code is passed in by the loader
 * (tracer/loader.py) as -D constants:
 *   PROBE_<name>, HANDLER_*, ROLE_*   ids from tracer/catalog.py
 *   OFF_*                             struct member offsets, resolved from the
 *                                     running kernel's BTF or the reference
 *                                     model's own layout; -1 = unknown, never read
 *   PFN_FROM_FIELD / VMEMMAP_BASE_PTR, PAGE_STRUCT_SIZE   how a folio pointer gives its pfn
 *   LUO_USER                          target is a userspace binary (uprobes)
 *   MODE_FOLIO, MODE_TRACE, SAMPLE_EVERY, [FOLIO_]RINGBUF_PAGES, MAX_*  mode and bounds
 * Kernel struct layouts from headers are never used: installed headers need
 * not match the running kernel.
 */
#include <uapi/linux/ptrace.h>

#ifdef LUO_USER
#define LUO_READ(dst, src) bpf_probe_read_user(&(dst), sizeof(dst), (const void *)(src))
#else
#define LUO_READ(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), (const void *)(src))
#endif

/* EV_*, EVF_*, CNT_*, NR_COUNTERS, SER_DEV and struct luo_event come from
 * tracer/abi.py, which the loader puts in front of this file (bpf/abi.h is
 * the same text, for reading). */

/* The file identity: inode number and device, or a serialized-data handle
 * (dev == SER_DEV) on the retrieve side where no file exists yet. */
struct fkey {
	u64 ino;
	u32 dev;
	u32 handler;
};

struct inflight_v {
	u64 ts;
	struct fkey key;
	u64 ptr;
	u64 a0;
	u64 a1;
	u64 meta;
};

struct cur_v {
	struct fkey key;
	u32 role;
	u32 meta;       /* > 0 inside kho_alloc_preserve / kho_unpreserve_free: metadata, not data */
	u32 active;     /* run_stamp() during a handler operation, 0 between */
	u32 pad;
};

/* Lifecycle events have their own ring buffer, so a flood of per-folio
 * events (trace mode) can never push out a preserve or a freeze. */
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#ifdef MODE_TRACE
BPF_RINGBUF_OUTPUT(folio_events, FOLIO_RINGBUF_PAGES);
#endif
BPF_PERCPU_ARRAY(luo_counters, u64, NR_COUNTERS);
BPF_HASH(inflight, u64, struct inflight_v, MAX_INFLIGHT);
/* The handler operation running on a task (its file and role): per-folio KHO
 * calls made meanwhile are attributed to it.  Task local storage: found
 * without a hash walk on every folio, and it goes away with the task. */
BPF_TASK_STORAGE(cur_file, struct cur_v);
/* bpf_get_current_task_btf() (helper 158, Linux 5.11): task storage takes a BTF task pointer. */
static struct task_struct *(*luo_current_task_btf)(void) = (void *)158;
/* The run these programs serve: 0 after a fresh compile; a start that
 * reuses programs loaded before (tracer/bpf_cache.py) sets the next number
 * before it attaches them.  Task storage outlives a run and cannot be
 * emptied from userspace, so what a task keeps counts only when stamped with
 * this run's number + 1 (run_stamp). */
BPF_ARRAY(luo_run, u32, 1);

static __always_inline u32 run_stamp(void)
{
	int zero = 0;
	u32 *r = luo_run.lookup(&zero);
	return (r ? *r : 0) + 1;
}

BPF_HASH(frozen, struct fkey, u64, MAX_FILES);
BPF_ARRAY(nr_frozen, s64, 1);   /* entries in `frozen`: the population hot path skips the hash when 0 */

static __always_inline int any_frozen(void)
{
	int zero = 0;
	s64 *n = nr_frozen.lookup(&zero);
	return n && *n > 0;
}

static __always_inline void frozen_set(struct fkey *k, int on)
{
	int zero = 0;
	s64 *n = nr_frozen.lookup(&zero);
	if (on) {
		u64 one = 1;
		if (frozen.lookup(k) == 0 && frozen.update(k, &one) == 0 && n)
			__sync_fetch_and_add(n, 1);
	} else if (frozen.delete(k) == 0 && n) {
		__sync_fetch_and_add(n, -1);
	}
}

static __always_inline void count(int idx)
{
	u64 *v = luo_counters.lookup(&idx);
	if (v)
		*v += 1;
}

/* flags: 0 (adaptive wakeup) or BPF_RB_FORCE_WAKEUP (the consumer must see it now) */
static __always_inline void emit_flags(struct luo_event *e, u64 flags)
{
	if (events.ringbuf_output(e, sizeof(*e), flags) < 0)
		count(CNT_LOST);
	else
		count(CNT_EMITTED);
}

static __always_inline void emit(struct luo_event *e)
{
	emit_flags(e, 0);
}

#ifdef MODE_TRACE
static __always_inline void emit_folio(struct luo_event *e)
{
	if (folio_events.ringbuf_output(e, sizeof(*e), 0) < 0)
		count(CNT_FOLIO_LOST);
	else
		count(CNT_FOLIO_EMITTED);
}
#endif

static __always_inline void ev_init(struct luo_event *e, u16 probe, u8 kind)
{
	u64 id = bpf_get_current_pid_tgid();
	__builtin_memset(e, 0, sizeof(*e));
	e->ts = bpf_ktime_get_ns();
	e->tgid = id >> 32;
	e->tid = (u32)id;
	e->probe = probe;
	e->kind = kind;
}

static __always_inline void ev_key(struct luo_event *e, struct fkey *k)
{
	e->ino = k->ino;
	e->dev = k->dev;
	e->handler = k->handler;
}

static __always_inline u64 inflight_id(u16 probe)
{
	return (bpf_get_current_pid_tgid() << 32) | probe;
}

static __always_inline u64 read_ptr(u64 base, int off)
{
	u64 v = 0;
	if (off < 0 || !base)
		return 0;
	LUO_READ(v, base + off);
	return v;
}

/* inode pointer -> (ino, dev) */
static __always_inline int key_from_inode(u64 inode, struct fkey *k, u32 handler)
{
	u64 sb = 0;
	u32 dev = 0;
	k->handler = handler;
	if (OFF_INODE_INO < 0 || !inode)
		return -1;
	k->ino = read_ptr(inode, OFF_INODE_INO);
	if (OFF_INODE_SB >= 0 && OFF_SB_DEV >= 0) {
		sb = read_ptr(inode, OFF_INODE_SB);
		if (sb)
			LUO_READ(dev, sb + OFF_SB_DEV);
	}
	k->dev = dev;
	return 0;
}

static __always_inline u64 inode_of_file(u64 file)
{
	if (OFF_FILE_INODE < 0)
		return 0;
	return read_ptr(file, OFF_FILE_INODE);
}

/* folio pointer -> pfn; returns -1 when the layout gives no way to know. */
static __always_inline s64 folio_pfn(u64 folio)
{
#if defined(PFN_FROM_FIELD)
	u64 pfn = 0;
	if (OFF_FOLIO_PFN < 0 || !folio)
		return -1;
	LUO_READ(pfn, folio + OFF_FOLIO_PFN);
	return pfn & ((1ULL << 52) - 1);
#elif defined(VMEMMAP_BASE_PTR)
	u64 base = 0;
	if (!folio || bpf_probe_read_kernel(&base, sizeof(base), (const void *)VMEMMAP_BASE_PTR) || !base)
		return -1;
	return (folio - base) / PAGE_STRUCT_SIZE;
#else
	return -1;
#endif
}

static __always_inline struct cur_v *cur_get(void)
{
	u32 stamp = run_stamp();
	struct cur_v *c = cur_file.task_storage_get(luo_current_task_btf(), 0, 0);
	if (!c || c->active != stamp)
		return 0;
	/* keeps LLVM from folding the test into a select the verifier cannot follow */
	asm volatile("" : "+r"(c));
	return c;
}

static __always_inline void cur_set(struct fkey *k, u32 role)
{
	struct cur_v *c = cur_file.task_storage_get(luo_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!c) {
		count(CNT_INFLIGHT_FULL);
		return;
	}
	c->key = *k;
	c->role = role;
	c->meta = 0;
	c->active = run_stamp();
}

/* KHO preserves its own metadata pages with kho_preserve_folio too
 * (kho_alloc_preserve, Linux 7.2): count those apart from the file's data. */
static __always_inline void cur_meta(int delta)
{
	struct cur_v *c = cur_get();
	if (c)
		c->meta += delta;
}

static __always_inline void cur_clear(void)
{
	struct cur_v *c = cur_get();
	if (c)
		c->active = 0;
}

static __always_inline int inflight_put_meta(u16 probe, struct fkey *k, u64 ptr, u64 a0, u64 a1, u64 ts, u64 meta)
{
	u64 id = inflight_id(probe);
	struct inflight_v v = {};
	v.ts = ts;
	v.key = *k;
	v.ptr = ptr;
	v.a0 = a0;
	v.a1 = a1;
	v.meta = meta;
	if (inflight.update(&id, &v)) {
		count(CNT_INFLIGHT_FULL);
		return -1;
	}
	return 0;
}

static __always_inline int inflight_put(u16 probe, struct fkey *k, u64 ptr, u64 a0, u64 a1, u64 ts)
{
	return inflight_put_meta(probe, k, ptr, a0, a1, ts, 0);
}

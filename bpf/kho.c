/* luotrace: per-folio KHO probes (folio and trace modes).
 *
 * A 1 TiB guest has 268 M folios: counts and log2 latency histograms are kept
 * here, per file, and read by userspace at the end (or at scrape).  In trace
 * mode every SAMPLE_EVERY-th folio is also streamed as an event.
 */

struct folio_stats_v {
	u64 preserved;
	u64 preserve_errors;
	u64 unpreserved;
	u64 restored;
	u64 discarded;
	u64 pfn_zero;
	u64 preserve_ns;      /* exact sum for the histogram's _sum */
	u64 pfn_unknown;
	u64 meta_preserved;   /* KHO's own metadata pages (kho_alloc_preserve) */
	u64 meta_unpreserved;
	u64 array_walked;     /* successful preserves counted from the folio array */
	u64 array_unread;     /* ... of which some page could not be read: pfn_zero unknown */
	u64 unpreserve_unread;  /* cancels whose preserve's array walk was not seen whole: unpreserved unknown */
	u64 pfn_zero_last;    /* pfn 0 entries in the array of the file's last preserve, + 1 (0: not known) */
};

struct hist_key {
	struct fkey key;
	u64 slot;             /* bpf_log2l(ns): slot s holds values up to 2^s - 1 */
};

/* The kho_preserve_folio call in flight on a task, for its duration: task
 * local storage, so a folio costs no hash insert and delete (the in-flight
 * hash the lifecycle probes use); one call at a time per task. */
struct folio_call_v {
	struct fkey key;
	u64 ts;
	s64 pfn;
	u64 index;
	u32 meta;
	u32 busy;       /* run_stamp() while a call is in flight */
};
BPF_TASK_STORAGE(folio_call, struct folio_call_v);
BPF_HASH(folio_stats, struct fkey, struct folio_stats_v, MAX_FILES);
/* Allocated as keys come (a file's first folio in a log2 slot), not up front:
 * preallocated, its 262,144 slots held 24 MiB of kernel memory in every mode,
 * used only per call (--folio-latency, trace mode). */
BPF_F_TABLE("hash", struct hist_key, u64, folio_preserve_duration_seconds, MAX_FILES * 64, BPF_F_NO_PREALLOC);

static __always_inline struct folio_stats_v *stats_for(struct fkey *k)
{
	struct folio_stats_v zero = {};
	struct folio_stats_v *s = folio_stats.lookup_or_try_init(k, &zero);
	if (!s)
		count(CNT_MAP_FULL);
	return s;
}

static __always_inline int current_file(struct fkey *k, u32 *role, u32 *meta)
{
	struct cur_v *c = cur_get();
	if (!c) {
		k->handler = HANDLER_KHO;       /* a caller luotrace does not trace */
		count(CNT_UNATTRIBUTED);
		*role = 0;
		*meta = 0;
		return -1;
	}
	*k = c->key;
	*role = c->role;
	*meta = c->meta;
	return 0;
}

static __always_inline int sampled(void)
{
#if SAMPLE_EVERY > 1
	int idx = CNT_SAMPLE_TICK;
	u64 *t = luo_counters.lookup(&idx);
	if (t) {
		*t += 1;
		if (*t % SAMPLE_EVERY) {
			count(CNT_SAMPLED_OUT);
			return 0;
		}
	}
#endif
	return 1;
}

static __always_inline int kho_preserve_folio_entry_body(u64 *a)
{
	u64 folio = a[0];
	u32 role, meta;
	struct folio_call_v *c = folio_call.task_storage_get(luo_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!c) {
		count(CNT_INFLIGHT_FULL);
		return 0;
	}
	current_file(&c->key, &role, &meta);
	c->meta = meta;
	c->pfn = folio_pfn(folio);
	c->index = OFF_FOLIO_INDEX >= 0 ? read_ptr(folio, OFF_FOLIO_INDEX) : 0;
	c->busy = run_stamp();
	c->ts = bpf_ktime_get_ns();
	return 0;
}

static __always_inline int kho_preserve_folio_return_body(u64 rc)
{
	struct folio_call_v *c = folio_call.task_storage_get(luo_current_task_btf(), 0, 0);
	struct folio_stats_v *s;
	struct hist_key hk = {};
	u64 now = bpf_ktime_get_ns(), delta;
	int ret = (int)rc;
	if (!c || c->busy != run_stamp())
		return 0;
	c->busy = 0;
	delta = now - c->ts;
	s = stats_for(&c->key);
	if (c->meta) {
		if (s && !ret)
			__sync_fetch_and_add(&s->meta_preserved, 1);
		return 0;
	}
	if (s) {
		if (ret) {
			__sync_fetch_and_add(&s->preserve_errors, 1);
		} else {
			__sync_fetch_and_add(&s->preserved, 1);
			if (c->pfn == 0)
				__sync_fetch_and_add(&s->pfn_zero, 1);
			if (c->pfn < 0)
				__sync_fetch_and_add(&s->pfn_unknown, 1);
		}
		__sync_fetch_and_add(&s->preserve_ns, delta);
	}
	hk.key = c->key;
	hk.slot = bpf_log2l(delta);
	folio_preserve_duration_seconds.increment(hk);
#ifdef MODE_TRACE
	if (sampled()) {
		struct luo_event e;
		ev_init(&e, PROBE_kho_preserve_folio, EV_RETURN);
		e.ts = now;
		ev_key(&e, &c->key);
		e.ret = ret;
		e.a0 = (u64)c->pfn;
		e.a1 = c->index;
		e.a2 = delta;
		emit_folio(&e);
	}
#endif
	return 0;
}

static __always_inline int folio_release(u16 probe, s64 pfn)
{
	struct fkey k = {};
	u32 role, meta;
	struct folio_stats_v *s;
	current_file(&k, &role, &meta);
	s = stats_for(&k);
	if (s && meta) {
		if (probe == PROBE_kho_unpreserve_folio)
			__sync_fetch_and_add(&s->meta_unpreserved, 1);
		return 0;
	}
	if (s) {
		if (probe == PROBE_kho_unpreserve_folio)
			__sync_fetch_and_add(&s->unpreserved, 1);
		else if (role == ROLE_FINISH)
			__sync_fetch_and_add(&s->discarded, 1);
		else
			__sync_fetch_and_add(&s->restored, 1);
	}
#ifdef MODE_TRACE
	if (sampled()) {
		struct luo_event e;
		ev_init(&e, probe, EV_INSTANT);
		ev_key(&e, &k);
		e.a0 = (u64)pfn;
		emit_folio(&e);
	}
#endif
	return 0;
}

static __always_inline int kho_unpreserve_folio_entry_body(u64 *a)
{
	return folio_release(PROBE_kho_unpreserve_folio, folio_pfn(a[0]));
}

static __always_inline int kho_restore_folio_entry_body(u64 *a)
{
	/* kho_restore_folio(phys_addr_t phys) */
	return folio_release(PROBE_kho_restore_folio, (s64)(a[0] >> 12));
}

#ifdef FOLIO_ARRAY
/* Folio mode without a program per folio.  Both handlers build an array of
 * {pfn:52, flags:12, index} entries, one per preserved folio, and hand it to
 * kho_preserve_vmalloc(array, &ser->folios), which preserves it a page at a
 * time through kho_preserve_pages: one program run there reads a page and
 * checks its 256 entries.  The count is ser->nr_folios, read when the
 * handler's preserve returns 0 (memfd sets it only after the walk).  KHO's own
 * chunk pages pass kho_preserve_pages too, zeroed when they do: told
 * apart by their first words (an array page has distinct indexes).
 * The array's last page is padded with zero entries (vcalloc): the pages
 * read hold 256 * pages entries, and the pfn 0 count drops the padding. */
#define FSER_PER_PAGE 256
#define FSER_PFN_MASK ((1ULL << 52) - 1)

struct fser_walk_v {
	u64 kv;         /* &ser->folios while a walk is open or done, else 0 */
	u64 pages;      /* array pages read */
	u64 pfn_zero;   /* entries with pfn 0 in them, padding included */
	u32 open;       /* WALK_PRESERVE inside kho_preserve_vmalloc, WALK_RESTORE inside kho_restore_vmalloc */
	u32 unread;     /* pages that could not be read */
	u64 chunk;      /* restore: the next KHO chunk page's address (not an array page) */
	u64 nr;         /* restore: ser->nr_folios, read while ser is there */
	u32 restored;   /* restore: a walk awaits its retrieve's or finish's return */
	u32 run;        /* run_stamp() of the run that opened it */
};
enum { WALK_PRESERVE = 1, WALK_RESTORE = 2 };
struct fser_page_v {
	u64 w[FSER_PER_PAGE * 2];
};
BPF_TASK_STORAGE(fser_walk, struct fser_walk_v);

/* this task's walk, if this run opened it */
static __always_inline struct fser_walk_v *walk_get(void)
{
	u32 stamp = run_stamp();
	struct fser_walk_v *w = fser_walk.task_storage_get(luo_current_task_btf(), 0, 0);
	if (!w || w->run != stamp)
		return 0;
	asm volatile("" : "+r"(w));     /* as cur_get() */
	return w;
}
BPF_PERCPU_ARRAY(fser_page, struct fser_page_v, 1);
/* handler id -> offsetof(ser, nr_folios) - offsetof(ser, folios); 0 = unknown.
 * Filled by the loader from the layout (kernel BTF or the model's). */
BPF_ARRAY(fser_nr_delta, s64, 16);

static __always_inline void fser_open(u64 kv)
{
	struct fser_walk_v *w;
	if (!cur_get())
		return;
	w = fser_walk.task_storage_get(luo_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!w) {
		count(CNT_INFLIGHT_FULL);
		return;
	}
	w->kv = kv;
	w->pages = 0;
	w->pfn_zero = 0;
	w->unread = 0;
	w->restored = 0;
	w->run = run_stamp();
	w->open = WALK_PRESERVE;
}

static __always_inline void fser_close(u64 rc)
{
	struct fser_walk_v *w = walk_get();
	if (!w)
		return;
	w->open = 0;
	if ((int)rc)
		w->kv = 0;
}

/* An array page read: its entries with pfn 0 counted, the one check per
 * folio (a load, a mask and a compare: about a microsecond a page natively,
 * tens under the lane's emulation). */
static __always_inline void fser_count_page(struct fser_walk_v *w, struct fser_page_v *p)
{
	u64 zero = 0;
	int i;
#pragma clang loop unroll_count(8)
	for (i = 0; i < FSER_PER_PAGE; i++)
		zero += (p->w[2 * i] & FSER_PFN_MASK) == 0;
	w->pages += 1;
	w->pfn_zero += zero;
}

/* struct page * -> the page's direct-map address, from its pfn as a folio
 * pointer gives it (the model names a page by its address) */
static __always_inline u64 page_address(u64 page)
{
#ifdef LUO_USER
	return page;
#elif defined(PAGE_OFFSET_BASE_PTR)
	u64 direct = 0;
	s64 pfn = folio_pfn(page);
	if (pfn < 0 || bpf_probe_read_kernel(&direct, 8, (const void *)PAGE_OFFSET_BASE_PTR))
		return 0;
	return direct + (u64)pfn * 4096;
#else
	return 0;
#endif
}

/* kho_preserve_pages(page, nr_pages) */
static __always_inline int kho_vmalloc_page_entry_body(u64 *a)
{
	struct fser_walk_v *w = walk_get();
	struct fser_page_v *p;
	u64 addr;
	int k = 0;
	if (!w || w->open != WALK_PRESERVE)
		return 0;
	addr = page_address(a[0]);
	p = fser_page.lookup(&k);
	if (a[1] != 1 || !addr || !p) {
		w->unread += 1;
		return 0;
	}
	if (LUO_READ(p->w, addr)) {
		w->unread += 1;
		return 0;
	}
	/* KHO's chunk page is all zeros; an array page's first two entries
	 * have distinct indexes, so one of its first four words is not zero. */
	if (!(p->w[0] | p->w[1] | p->w[2] | p->w[3]))
		return 0;
	fser_count_page(w, p);
	return 0;
}

static __always_inline void fser_commit(struct fkey *k, u64 rc)
{
	struct fser_walk_v *w = walk_get();
	struct folio_stats_v *s;
	u32 h = k->handler;
	s64 *delta;
	u64 nr = 0, slots, kv;
	if ((int)rc) {
		if (w)
			w->kv = 0;
		return;
	}
	s = stats_for(k);
	if (!s)
		return;
	kv = w ? w->kv : 0;
	s->pfn_zero_last = 0;
	if (!kv) {              /* no array handed over: no folio (an empty file) */
		__sync_fetch_and_add(&s->array_walked, 1);
		s->pfn_zero_last = 1;
		return;
	}
	w->kv = 0;
	delta = fser_nr_delta.lookup(&h);
	if (!delta || !*delta) {
		__sync_fetch_and_add(&s->array_unread, 1);
		return;
	}
	LUO_READ(nr, kv + *delta);
	slots = w->pages * FSER_PER_PAGE;
	__sync_fetch_and_add(&s->array_walked, 1);
	__sync_fetch_and_add(&s->preserved, nr);
	if (w->unread || slots < nr || w->pfn_zero < slots - nr) {
		__sync_fetch_and_add(&s->array_unread, 1);
	} else {
		__sync_fetch_and_add(&s->pfn_zero, w->pfn_zero - (slots - nr));
		s->pfn_zero_last = w->pfn_zero - (slots - nr) + 1;
	}
}

/* The new kernel, the same way: retrieve and discard (finish) take the file's
 * array back with kho_restore_vmalloc(&ser->folios), which restores it through
 * kho_restore_pages, a chunk at a time: the chunk's array pages, then the
 * chunk page itself, whose address is the preservation's first (then each
 * chunk's next).  A program run per array page counts its pfn 0 entries; the
 * op's return adds ser->nr_folios less those (the folios the handler hands
 * back, pfn 0 skipped) to the file's restored or discarded folios. */
static __always_inline u64 phys_address(u64 phys)
{
#ifdef LUO_USER
	return phys;            /* the model names a page by its address */
#elif defined(PAGE_OFFSET_BASE_PTR)
	u64 direct = 0;
	if (bpf_probe_read_kernel(&direct, 8, (const void *)PAGE_OFFSET_BASE_PTR))
		return 0;
	return direct + phys;
#else
	return 0;
#endif
}

/* kho_restore_vmalloc(preservation) */
static __always_inline int kho_restore_vmalloc_entry_body(u64 *a)
{
	struct cur_v *c = cur_get();
	struct fser_walk_v *w;
	u32 h;
	s64 *delta;
	if (!c || (c->role != ROLE_RETRIEVE && c->role != ROLE_FINISH))
		return 0;
	w = fser_walk.task_storage_get(luo_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!w) {
		count(CNT_INFLIGHT_FULL);
		return 0;
	}
	h = c->key.handler;
	delta = fser_nr_delta.lookup(&h);
	w->kv = a[0];
	w->chunk = 0;
	w->nr = 0;
	w->pages = 0;
	w->pfn_zero = 0;
	w->unread = 0;
	w->restored = 0;
	w->run = run_stamp();
	if (!delta || !*delta || LUO_READ(w->nr, a[0] + *delta) || LUO_READ(w->chunk, a[0]))
		w->unread = 1;
	w->open = WALK_RESTORE;
	return 0;
}

static __always_inline int kho_restore_vmalloc_return_body(u64 rc)
{
	struct fser_walk_v *w = walk_get();
	if (!w || w->open != WALK_RESTORE)
		return 0;
	w->open = 0;
	w->restored = rc ? 1 : 0;       /* NULL: the array did not come back, no folio either */
	return 0;
}

/* kho_restore_pages(phys, nr_pages) */
static __always_inline int kho_restore_array_page_entry_body(u64 *a)
{
	struct fser_walk_v *w = walk_get();
	struct fser_page_v *p;
	u64 addr, next = 0;
	int k = 0;
	if (!w || w->open != WALK_RESTORE)
		return 0;
	addr = phys_address(a[0]);
	if (a[0] == w->chunk) {         /* KHO's chunk page: where the next one is */
		if (!addr || LUO_READ(next, addr))
			w->unread += 1;
		w->chunk = next;
		return 0;
	}
	p = fser_page.lookup(&k);
	if (a[1] != 1 || !addr || !p || LUO_READ(p->w, addr)) {
		w->unread += 1;
		return 0;
	}
	fser_count_page(w, p);
	return 0;
}

/* the retrieve or finish whose array that was returns */
static __always_inline void frestore_commit(struct fkey *k)
{
	struct fser_walk_v *w = walk_get();
	struct cur_v *c = cur_get();
	struct folio_stats_v *s;
	u64 slots, n;
	if (!w || !w->restored)
		return;
	w->restored = 0;
	s = stats_for(k);
	if (!s || !c)
		return;
	slots = w->pages * FSER_PER_PAGE;
	if (w->unread || slots < w->nr || w->pfn_zero < slots - w->nr) {
		__sync_fetch_and_add(&s->array_unread, 1);
		return;
	}
	n = w->nr - (w->pfn_zero - (slots - w->nr));
	if (c->role == ROLE_FINISH)
		__sync_fetch_and_add(&s->discarded, n);
	else
		__sync_fetch_and_add(&s->restored, n);
}

/* A cancel, on the old kernel: the handler's unpreserve gives its array
 * back with kho_unpreserve_vmalloc(&ser->folios), then unpreserves each
 * folio whose entry's pfn is not 0.  KHO releases the array's pages in a
 * static function, with no call per page to trace, and the array is the one
 * its preserve handed over (preserved memory, unchanged until now), whose
 * pfn 0 entries that preserve's walk counted (pfn_zero_last).  So one program
 * run here: the file's unpreserved folios are ser->nr_folios, read now, less
 * those; unknown (unpreserve_unread) when that walk was not seen or not read
 * whole. */
static __always_inline void funpreserve_count(u64 kv)
{
	struct cur_v *c = cur_get();
	struct folio_stats_v *s;
	u64 nr = 0, zeros;
	s64 *delta;
	u32 h;
	if (!c || c->role != ROLE_UNPRESERVE)
		return;
	s = stats_for(&c->key);
	if (!s)
		return;
	h = c->key.handler;
	delta = fser_nr_delta.lookup(&h);
	zeros = s->pfn_zero_last;
	if (!delta || !*delta || !zeros || LUO_READ(nr, kv + *delta) || nr < zeros - 1) {
		__sync_fetch_and_add(&s->unpreserve_unread, 1);
		return;
	}
	__sync_fetch_and_add(&s->unpreserved, nr - (zeros - 1));
}
#endif

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
	u32 busy;
};
BPF_TASK_STORAGE(folio_call, struct folio_call_v);
BPF_HASH(folio_stats, struct fkey, struct folio_stats_v, MAX_FILES);
BPF_HASH(folio_preserve_duration_seconds, struct hist_key, u64, MAX_FILES * 64);

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
	c->busy = 1;
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
	if (!c || !c->busy)
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

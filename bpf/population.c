/* luotrace: guest_memfd population through the kernel's filemap tracepoints
 * (folio and trace modes).
 *
 * Only inodes on the guest_memfd superblock (GMEM_DEV, found by the loader
 * before compiling) count.  Per inode: folios added and removed, and how many were
 * large (order > 0: can_preserve refuses such a file).  A folio added to an
 * inode that a handler froze is the race the patch review points at: each is
 * streamed as an event with its evidence.  Removals from a frozen inode are
 * only counted: a preserved file that is finally closed (its kexec never
 * came) is truncated folio by folio, which is no race.
 */

struct pop_v {
	u64 added;
	u64 deleted;
	u64 large;
	u64 max_order;
	u64 deleted_frozen;
};

BPF_HASH(population, struct fkey, struct pop_v, MAX_FILES);

/* A file is populated by one thread, folio after folio: each CPU keeps the
 * counts of the inode it saw last and folds them into `population` only when
 * the inode changes.  The hot path is then one array lookup and a compare;
 * userspace adds what is still cached here when it reads the counts. */
struct pop_cache_v {
	struct fkey key;
	struct pop_v v;
};
BPF_PERCPU_ARRAY(pop_cache, struct pop_cache_v, 1);

static __always_inline void pop_flush(struct pop_cache_v *c)
{
	struct pop_v zero = {}, *p;
	if (!c->key.ino && !c->key.dev)
		return;
	p = population.lookup_or_try_init(&c->key, &zero);
	if (!p)
		count(CNT_MAP_FULL);
	if (p) {
		__sync_fetch_and_add(&p->added, c->v.added);
		__sync_fetch_and_add(&p->deleted, c->v.deleted);
		__sync_fetch_and_add(&p->large, c->v.large);
		__sync_fetch_and_add(&p->deleted_frozen, c->v.deleted_frozen);
		if (c->v.max_order > p->max_order)
			p->max_order = c->v.max_order;
	}
	__builtin_memset(&c->v, 0, sizeof(c->v));
}

static __always_inline int pop_event(u16 probe, u64 ino, u32 dev, u64 index, u64 pfn, u64 order)
{
	int zero = 0;
	struct pop_cache_v *c;
	struct fkey k = {};
	int frozen_now;
	if (dev != GMEM_DEV)
		return 0;
	c = pop_cache.lookup(&zero);
	if (!c)
		return 0;
	if (c->key.ino != ino || c->key.dev != dev) {
		pop_flush(c);
		c->key.ino = ino;
		c->key.dev = dev;
		c->key.handler = HANDLER_GUEST_MEMFD;
	}
	k = c->key;
	frozen_now = any_frozen() && frozen.lookup(&k);
	if (probe == PROBE_pop_add) {
		c->v.added++;
		if (order) {
			c->v.large++;
			if (order > c->v.max_order)
				c->v.max_order = order;
		}
	} else {
		c->v.deleted++;
		if (frozen_now)
			c->v.deleted_frozen++;
	}
	if (frozen_now && probe == PROBE_pop_add) {
		struct luo_event e;
		ev_init(&e, probe, EV_INSTANT);
		ev_key(&e, &k);
		e.a0 = index;
		e.a1 = pfn;
		e.a2 = order;
		emit(&e);
	}
	return 0;
}

TRACEPOINT_PROBE(filemap, mm_filemap_add_to_page_cache)
{
	return pop_event(PROBE_pop_add, args->i_ino, args->s_dev, args->index, args->pfn, args->order);
}

TRACEPOINT_PROBE(filemap, mm_filemap_delete_from_page_cache)
{
	return pop_event(PROBE_pop_delete, args->i_ino, args->s_dev, args->index, args->pfn, args->order);
}

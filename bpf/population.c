/* luotrace: guest_memfd population through the kernel's filemap tracepoints
 * (folio and trace modes).
 *
 * Only inodes on a watched superblock (the guest_memfd one, found by the
 * loader) count.  Per inode: folios added and removed, and how many were
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

BPF_HASH(watch_dev, u32, u8, 16);
BPF_HASH(population, struct fkey, struct pop_v, MAX_FILES);

static __always_inline int pop_event(u16 probe, u64 ino, u32 dev, u64 index, u64 pfn, u64 order)
{
	struct fkey k = {};
	struct pop_v zero = {}, *p;
	if (!watch_dev.lookup(&dev))
		return 0;
	k.ino = ino;
	k.dev = dev;
	k.handler = HANDLER_GUEST_MEMFD;
	p = population.lookup_or_try_init(&k, &zero);
	if (p) {
		if (probe == PROBE_pop_add) {
			__sync_fetch_and_add(&p->added, 1);
			if (order) {
				__sync_fetch_and_add(&p->large, 1);
				if (order > p->max_order)
					p->max_order = order;
			}
		} else {
			__sync_fetch_and_add(&p->deleted, 1);
		}
	}
	if (!frozen.lookup(&k))
		return 0;
	if (probe != PROBE_pop_add) {
		if (p)
			__sync_fetch_and_add(&p->deleted_frozen, 1);
	} else {
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

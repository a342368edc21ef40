/* luotrace: lifecycle probes of the LUO file handlers, KHO metadata and LUO
 * sessions.  One event per call entry and return; cheap enough for every mode.
 * Probe ids and the meaning of a0..a2 are declared in tracer/catalog.py.
 */

/* Common return: emits ret, the call's duration in a2 and the key saved at
 * entry; `a0` is filled by the caller from return-time state. */
/* What a return event adds (op_return's ret_kind). */
enum ret_adds {
	RET_PLAIN = 0,          /* return value and duration only */
	RET_SER = 1,            /* args op: args->serialized_data after the call */
	RET_OUT_COUNT = 2,      /* walk: *out_count after the call */
	RET_NEW_INODE = 3,      /* retrieve: the new file's inode */
};
/* Whether the return ends the handler operation running on the thread. */
enum { KEEP_CUR = 0, CLEAR_CUR = 1 };
/* How an args op names its file (args_op_entry's by_ser). */
enum { KEY_BY_FILE = 0, KEY_BY_SER = 1 };

/* Folio mode reading the handlers' serialized folio arrays (kho.c): a
 * handler's kho_preserve_vmalloc opens the walk of its array, its preserve's
 * successful return commits the counts to the file. */
#ifdef FOLIO_ARRAY
static __always_inline void fser_open(u64 kv);
static __always_inline void fser_close(u64 rc);
static __always_inline void fser_commit(struct fkey *k, u64 rc);
static __always_inline void frestore_commit(struct fkey *k);
static __always_inline void funpreserve_count(u64 kv);
#else
#define fser_open(kv) do { } while (0)
#define fser_close(rc) do { } while (0)
#define fser_commit(k, rc) do { } while (0)
#define frestore_commit(k) do { } while (0)
#define funpreserve_count(kv) do { } while (0)
#endif

static __always_inline int op_return(u64 rc, u16 probe, int clear_cur, int ret_kind)
{
	u64 id = inflight_id(probe);
	struct inflight_v *v = inflight.lookup(&id);
	struct luo_event e;
	ev_init(&e, probe, EV_RETURN);
	e.ret = (s32)rc;
	if (v) {
		ev_key(&e, &v->key);
		e.a2 = e.ts - v->ts;
		if (ret_kind == RET_SER) {      /* args op: serialized_data after the call */
			e.a0 = read_ptr(v->ptr, OFF_ARGS_SER);
			fser_commit(&v->key, rc);
		}
		else if (ret_kind == RET_OUT_COUNT) /* walk: *out_count after the call */
			e.a0 = read_ptr(v->ptr, 0), e.a1 = v->a1;
		else if (ret_kind == RET_NEW_INODE) /* retrieve: the new file's inode */
			e.a0 = read_ptr(inode_of_file(read_ptr(v->ptr, OFF_ARGS_FILE)), OFF_INODE_INO);
		if (clear_cur)          /* a retrieve or finish that took its folio array back */
			frestore_commit(&v->key);
		inflight.delete(&id);
	} else {
		e.flags |= EVF_KEY_UNKNOWN;
	}
	if (clear_cur)
		cur_clear();
	emit(&e);
	return 0;
}

/* An op taking struct liveupdate_file_op_args *: the file is args->file, or
 * the serialized-data handle when there is no file yet (retrieve, finish). */
static __always_inline int args_op_entry(u64 *a, u16 probe, u32 handler, u32 role, int by_ser)
{
	u64 args = a[0];
	struct luo_event e;
	struct fkey k = {};
	ev_init(&e, probe, EV_ENTRY);
	k.handler = handler;
	if (by_ser) {
		if (OFF_ARGS_SER < 0)
			e.flags |= EVF_KEY_UNKNOWN;
		k.ino = read_ptr(args, OFF_ARGS_SER);
		k.dev = SER_DEV;
	} else {
		u64 inode = inode_of_file(read_ptr(args, OFF_ARGS_FILE));
		if (OFF_ARGS_FILE < 0 || key_from_inode(inode, &k, handler))
			e.flags |= EVF_KEY_UNKNOWN;
		if (OFF_INODE_SIZE >= 0 && inode)
			e.a0 = read_ptr(inode, OFF_INODE_SIZE);
		else
			e.flags |= EVF_A0_UNKNOWN;
		if (OFF_INODE_GMEM_FLAGS >= 0 && inode)
			e.a1 = read_ptr(inode, OFF_INODE_GMEM_FLAGS);
		else
			e.flags |= EVF_A1_UNKNOWN;
	}
	ev_key(&e, &k);
	inflight_put(probe, &k, args, 0, 0, e.ts);
	cur_set(&k, role);
	emit(&e);
	return 0;
}

/* can_preserve(handler, file): LUO asks every handler about every file, so
 * a1 carries the file's superblock magic (which kind of file it is). */
static __always_inline int file_arg2_entry(u64 *a, u16 probe, u32 handler)
{
	struct luo_event e;
	struct fkey k = {};
	u64 inode = inode_of_file(a[1]);
	ev_init(&e, probe, EV_ENTRY);
	if (key_from_inode(inode, &k, handler))
		e.flags |= EVF_KEY_UNKNOWN;
	if (OFF_SB_MAGIC >= 0 && OFF_INODE_SB >= 0 && inode)
		e.a1 = read_ptr(read_ptr(inode, OFF_INODE_SB), OFF_SB_MAGIC) & 0xffffffff;
	else
		e.flags |= EVF_A1_UNKNOWN;
	ev_key(&e, &k);
	inflight_put(probe, &k, 0, 0, 0, e.ts);
	emit(&e);
	return 0;
}

/* freeze(inode, bool): records the freeze state the population tracepoint
 * checks.  With AT_RETURN a freeze counts once the call returns: the posted
 * kvm_gmem_freeze() waits there for allocations already in flight (an SRCU
 * grace period), and their folios are no race; an unfreeze counts from its
 * start.  The inode being frozen waits here per thread for the return. */
BPF_HASH(freezing, u32, struct fkey, 1024);

static __always_inline int inode_freeze_entry(u64 *a, u16 probe, u32 handler, int at_return)
{
	struct luo_event e;
	struct fkey k = {};
	u64 on = a[1] & 0xff;
	ev_init(&e, probe, EV_INSTANT);
	if (key_from_inode(a[0], &k, handler))
		e.flags |= EVF_KEY_UNKNOWN;
	ev_key(&e, &k);
	e.a0 = on;
	if (!(e.flags & EVF_KEY_UNKNOWN)) {
		k.handler = HANDLER_GUEST_MEMFD;   /* population keys are guest_memfd's */
		if (on && at_return) {
			u32 tid = bpf_get_current_pid_tgid();
			freezing.update(&tid, &k);
		} else {
			frozen_set(&k, on);
		}
	}
	emit(&e);
	return 0;
}

static __always_inline int inode_freeze_return(void)
{
	u32 tid = bpf_get_current_pid_tgid();
	struct fkey *pk = freezing.lookup(&tid), k;

	if (!pk)
		return 0;
	k = *pk;
	freezing.delete(&tid);
	frozen_set(&k, 1);
	return 0;
}

/* A call attributed to the file whose handler op runs on this thread. */
static __always_inline int attributed_entry(u16 probe, u64 ptr, u64 a0, u64 a1, u64 a2, u8 kind)
{
	struct cur_v *c = cur_get();
	struct luo_event e;
	struct fkey k = {};
	ev_init(&e, probe, kind);
	if (c)
		k = c->key;
	else
		e.flags |= EVF_KEY_UNKNOWN;
	ev_key(&e, &k);
	e.a0 = a0;
	e.a1 = a1;
	e.a2 = a2;
	if (kind == EV_ENTRY)
		inflight_put(probe, &k, ptr, a0, a1, e.ts);
	emit(&e);
	return 0;
}

/* Handlers: NAME_entry_body(args) and NAME_return_body(return value).  The
 * loader wraps each for the attach type it chose (kprobe/uprobe: struct
 * pt_regs; fentry/fexit: the u64 argument array), see tracer/loader.py. */
#define ARGS_OP(NAME, HANDLER, ROLE, BY_SER, RET_KIND)                                   \
	static __always_inline int NAME##_entry_body(u64 *a)                              \
	{ return args_op_entry(a, PROBE_##NAME, HANDLER, ROLE, BY_SER); }                \
	static __always_inline int NAME##_return_body(u64 rc)                             \
	{ return op_return(rc, PROBE_##NAME, CLEAR_CUR, RET_KIND); }
#define BODY_ENTRY(NAME) static __always_inline int NAME##_entry_body(u64 *a)
#define BODY_RETURN(NAME, CLEAR, KIND)                                                   \
	static __always_inline int NAME##_return_body(u64 rc) { return op_return(rc, PROBE_##NAME, CLEAR, KIND); }

/* The file handlers' probes are in bpf/handlers/<handler>.c, compiled after
 * this file when the handler is traced (tracer/catalog.py HANDLER_LIST). */

/* KHO metadata */
/* kho_preserve_vmalloc(ptr, &ser->folios) */
BODY_ENTRY(kho_preserve_vmalloc) { fser_open(a[1]); return attributed_entry(PROBE_kho_preserve_vmalloc, 0, 0, 0, 0, EV_ENTRY); }
static __always_inline int kho_preserve_vmalloc_return_body(u64 rc)
{ fser_close(rc); return op_return(rc, PROBE_kho_preserve_vmalloc, KEEP_CUR, RET_PLAIN); }
BODY_ENTRY(kho_unpreserve_vmalloc) { funpreserve_count(a[0]); return attributed_entry(PROBE_kho_unpreserve_vmalloc, 0, 0, 0, 0, EV_INSTANT); }
BODY_ENTRY(kho_alloc_preserve) { cur_meta(1); return attributed_entry(PROBE_kho_alloc_preserve, 0, a[0], 0, 0, EV_ENTRY); }
static __always_inline int kho_alloc_preserve_return_body(u64 rc) { cur_meta(-1); return op_return(rc, PROBE_kho_alloc_preserve, KEEP_CUR, RET_PLAIN); }
BODY_ENTRY(kho_unpreserve_free) { cur_meta(1); return attributed_entry(PROBE_kho_unpreserve_free, 0, 0, 0, 0, EV_ENTRY); }
static __always_inline int kho_unpreserve_free_return_body(u64 rc) { cur_meta(-1); return op_return(rc, PROBE_kho_unpreserve_free, KEEP_CUR, RET_PLAIN); }

/* LUO sessions: luo_preserve_file(set, token, fd) */
BODY_ENTRY(luo_preserve_file)
{ return attributed_entry(PROBE_luo_preserve_file, 0, a[1], a[2] & 0xffffffff, a[0], EV_ENTRY); }
BODY_RETURN(luo_preserve_file, KEEP_CUR, RET_PLAIN)
BODY_ENTRY(luo_file_freeze) { return attributed_entry(PROBE_luo_file_freeze, 0, 0, 0, a[0], EV_ENTRY); }
BODY_RETURN(luo_file_freeze, KEEP_CUR, RET_PLAIN)
BODY_ENTRY(luo_unpreserve_files) { return attributed_entry(PROBE_luo_unpreserve_files, 0, 0, 0, a[0], EV_INSTANT); }
BODY_ENTRY(luo_get_token) { return attributed_entry(PROBE_luo_get_token, a[2], 0, 0, 0, EV_ENTRY); }
BODY_RETURN(luo_get_token, KEEP_CUR, RET_OUT_COUNT)

/* kernel_kexec(): the reboot into the next kernel.  Forced wakeup: the
 * consumer must see it at once, flush, and keep draining the freeze that
 * follows (liveupdate_reboot) until the CPUs stop. */
BODY_ENTRY(kexec)
{
	struct luo_event e;
	ev_init(&e, PROBE_kexec, EV_INSTANT);
	e.flags |= EVF_KEY_UNKNOWN;
	emit_flags(&e, BPF_RB_FORCE_WAKEUP);
	return 0;
}

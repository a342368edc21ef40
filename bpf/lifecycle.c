/* luotrace: lifecycle probes of the LUO file handlers, KHO metadata and LUO
 * sessions.  One event per call entry and return; cheap enough for every mode.
 * Probe ids and the meaning of a0..a2 are declared in tracer/catalog.py.
 */

/* Common return: emits ret, the call's duration in a2 and the key saved at
 * entry; `a0` is filled by the caller from return-time state. */
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
		if (ret_kind == 1)              /* args op: serialized_data after the call */
			e.a0 = read_ptr(v->ptr, OFF_ARGS_SER);
		else if (ret_kind == 2)         /* walk: *out_count after the call */
			e.a0 = read_ptr(v->ptr, 0), e.a1 = v->a1;
		else if (ret_kind == 3)         /* retrieve: the new file's inode */
			e.a0 = read_ptr(inode_of_file(read_ptr(v->ptr, OFF_ARGS_FILE)), OFF_INODE_INO);
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

/* freeze(inode, bool): records the freeze state the population tracepoint checks. */
static __always_inline int inode_freeze_entry(u64 *a, u16 probe, u32 handler)
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
		frozen_set(&k, on);
	}
	emit(&e);
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
	{ return op_return(rc, PROBE_##NAME, 1, RET_KIND); }
#define BODY_ENTRY(NAME) static __always_inline int NAME##_entry_body(u64 *a)
#define BODY_RETURN(NAME, CLEAR, KIND)                                                   \
	static __always_inline int NAME##_return_body(u64 rc) { return op_return(rc, PROBE_##NAME, CLEAR, KIND); }

/* guest_memfd handler */
BODY_ENTRY(gmem_can_preserve) { return file_arg2_entry(a, PROBE_gmem_can_preserve, HANDLER_GUEST_MEMFD); }
BODY_RETURN(gmem_can_preserve, 0, 0)
ARGS_OP(gmem_preserve, HANDLER_GUEST_MEMFD, ROLE_PRESERVE, 0, 1)
BODY_ENTRY(gmem_freeze_inode) { return inode_freeze_entry(a, PROBE_gmem_freeze_inode, HANDLER_GUEST_MEMFD); }
/* walk(mapping, end_index, folios_ser, out_count): keep out_count for the return */
BODY_ENTRY(gmem_walk) { return attributed_entry(PROBE_gmem_walk, a[3], a[1], a[2] ? 1 : 0, 0, EV_ENTRY); }
BODY_RETURN(gmem_walk, 0, 2)
ARGS_OP(gmem_luo_freeze, HANDLER_GUEST_MEMFD, ROLE_LUO_FREEZE, 0, 0)
ARGS_OP(gmem_unpreserve, HANDLER_GUEST_MEMFD, ROLE_UNPRESERVE, 0, 0)
ARGS_OP(gmem_retrieve, HANDLER_GUEST_MEMFD, ROLE_RETRIEVE, 1, 3)
ARGS_OP(gmem_finish, HANDLER_GUEST_MEMFD, ROLE_FINISH, 1, 0)

/* memfd handler */
BODY_ENTRY(memfd_can_preserve) { return file_arg2_entry(a, PROBE_memfd_can_preserve, HANDLER_MEMFD); }
BODY_RETURN(memfd_can_preserve, 0, 0)
ARGS_OP(memfd_preserve, HANDLER_MEMFD, ROLE_PRESERVE, 0, 1)
BODY_ENTRY(memfd_shmem_freeze) { return inode_freeze_entry(a, PROBE_memfd_shmem_freeze, HANDLER_MEMFD); }
/* preserve_folios(file, kv, out, nr_foliosp) */
BODY_ENTRY(memfd_preserve_folios) { return attributed_entry(PROBE_memfd_preserve_folios, a[3], 0, 1, 0, EV_ENTRY); }
BODY_RETURN(memfd_preserve_folios, 0, 2)
ARGS_OP(memfd_luo_freeze, HANDLER_MEMFD, ROLE_LUO_FREEZE, 0, 0)
ARGS_OP(memfd_unpreserve, HANDLER_MEMFD, ROLE_UNPRESERVE, 0, 0)
ARGS_OP(memfd_retrieve, HANDLER_MEMFD, ROLE_RETRIEVE, 1, 3)
ARGS_OP(memfd_finish, HANDLER_MEMFD, ROLE_FINISH, 1, 0)

/* KHO metadata */
BODY_ENTRY(kho_preserve_vmalloc) { return attributed_entry(PROBE_kho_preserve_vmalloc, 0, 0, 0, 0, EV_ENTRY); }
BODY_RETURN(kho_preserve_vmalloc, 0, 0)
BODY_ENTRY(kho_unpreserve_vmalloc) { return attributed_entry(PROBE_kho_unpreserve_vmalloc, 0, 0, 0, 0, EV_INSTANT); }
BODY_ENTRY(kho_alloc_preserve) { cur_meta(1); return attributed_entry(PROBE_kho_alloc_preserve, 0, a[0], 0, 0, EV_ENTRY); }
static __always_inline int kho_alloc_preserve_return_body(u64 rc) { cur_meta(-1); return op_return(rc, PROBE_kho_alloc_preserve, 0, 0); }
BODY_ENTRY(kho_unpreserve_free) { cur_meta(1); return attributed_entry(PROBE_kho_unpreserve_free, 0, 0, 0, 0, EV_ENTRY); }
static __always_inline int kho_unpreserve_free_return_body(u64 rc) { cur_meta(-1); return op_return(rc, PROBE_kho_unpreserve_free, 0, 0); }

/* LUO sessions: luo_preserve_file(set, token, fd) */
BODY_ENTRY(luo_preserve_file)
{ return attributed_entry(PROBE_luo_preserve_file, 0, a[1], a[2] & 0xffffffff, a[0], EV_ENTRY); }
BODY_RETURN(luo_preserve_file, 0, 0)
BODY_ENTRY(luo_file_freeze) { return attributed_entry(PROBE_luo_file_freeze, 0, 0, 0, a[0], EV_ENTRY); }
BODY_RETURN(luo_file_freeze, 0, 0)
BODY_ENTRY(luo_unpreserve_files) { return attributed_entry(PROBE_luo_unpreserve_files, 0, 0, 0, a[0], EV_INSTANT); }
BODY_ENTRY(luo_get_token) { return attributed_entry(PROBE_luo_get_token, a[2], 0, 0, 0, EV_ENTRY); }
BODY_RETURN(luo_get_token, 0, 2)

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

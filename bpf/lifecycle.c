/* luotrace: lifecycle probes of the LUO file handlers, KHO metadata and LUO
 * sessions.  One event per call entry and return; cheap enough for every mode.
 * Probe ids and the meaning of a0..a2 are declared in tracer/catalog.py.
 */

/* Common return: emits ret, the call's duration in a2 and the key saved at
 * entry; `a0` is filled by the caller from return-time state. */
static __always_inline int op_return(struct pt_regs *ctx, u16 probe, int clear_cur, int ret_kind)
{
	u64 id = inflight_id(probe);
	struct inflight_v *v = inflight.lookup(&id);
	struct luo_event e;
	ev_init(&e, probe, EV_RETURN);
	e.ret = (s32)PT_REGS_RC(ctx);
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
static __always_inline int args_op_entry(struct pt_regs *ctx, u16 probe, u32 handler, u32 role, int by_ser)
{
	u64 args = PT_REGS_PARM1(ctx);
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

/* can_preserve(handler, file) */
static __always_inline int file_arg2_entry(struct pt_regs *ctx, u16 probe, u32 handler)
{
	struct luo_event e;
	struct fkey k = {};
	ev_init(&e, probe, EV_ENTRY);
	if (key_from_inode(inode_of_file(PT_REGS_PARM2(ctx)), &k, handler))
		e.flags |= EVF_KEY_UNKNOWN;
	ev_key(&e, &k);
	inflight_put(probe, &k, 0, 0, 0, e.ts);
	emit(&e);
	return 0;
}

/* freeze(inode, bool): records the freeze state the population tracepoint checks. */
static __always_inline int inode_freeze_entry(struct pt_regs *ctx, u16 probe, u32 handler)
{
	struct luo_event e;
	struct fkey k = {};
	u64 on = PT_REGS_PARM2(ctx) & 0xff;
	ev_init(&e, probe, EV_INSTANT);
	if (key_from_inode(PT_REGS_PARM1(ctx), &k, handler))
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
static __always_inline int attributed_entry(struct pt_regs *ctx, u16 probe, u64 ptr, u64 a0, u64 a1, u64 a2, u8 kind)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct cur_v *c = cur_file.lookup(&tid);
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

#define ARGS_OP(NAME, HANDLER, ROLE, BY_SER, RET_KIND)                                   \
	int NAME##_entry(struct pt_regs *ctx)                                            \
	{ return args_op_entry(ctx, PROBE_##NAME, HANDLER, ROLE, BY_SER); }              \
	int NAME##_return(struct pt_regs *ctx)                                           \
	{ return op_return(ctx, PROBE_##NAME, 1, RET_KIND); }

/* guest_memfd handler */
int gmem_can_preserve_entry(struct pt_regs *ctx) { return file_arg2_entry(ctx, PROBE_gmem_can_preserve, HANDLER_GUEST_MEMFD); }
int gmem_can_preserve_return(struct pt_regs *ctx) { return op_return(ctx, PROBE_gmem_can_preserve, 0, 0); }
ARGS_OP(gmem_preserve, HANDLER_GUEST_MEMFD, ROLE_PRESERVE, 0, 1)
int gmem_freeze_inode_entry(struct pt_regs *ctx) { return inode_freeze_entry(ctx, PROBE_gmem_freeze_inode, HANDLER_GUEST_MEMFD); }
int gmem_walk_entry(struct pt_regs *ctx)
{
	/* walk(mapping, end_index, folios_ser, out_count): keep out_count for the return */
	u64 fill = PT_REGS_PARM3(ctx) ? 1 : 0;
	return attributed_entry(ctx, PROBE_gmem_walk, PT_REGS_PARM4(ctx), PT_REGS_PARM2(ctx), fill, 0, EV_ENTRY);
}
int gmem_walk_return(struct pt_regs *ctx) { return op_return(ctx, PROBE_gmem_walk, 0, 2); }
ARGS_OP(gmem_luo_freeze, HANDLER_GUEST_MEMFD, ROLE_LUO_FREEZE, 0, 0)
ARGS_OP(gmem_unpreserve, HANDLER_GUEST_MEMFD, ROLE_UNPRESERVE, 0, 0)
ARGS_OP(gmem_retrieve, HANDLER_GUEST_MEMFD, ROLE_RETRIEVE, 1, 3)
ARGS_OP(gmem_finish, HANDLER_GUEST_MEMFD, ROLE_FINISH, 1, 0)

/* memfd handler */
int memfd_can_preserve_entry(struct pt_regs *ctx) { return file_arg2_entry(ctx, PROBE_memfd_can_preserve, HANDLER_MEMFD); }
int memfd_can_preserve_return(struct pt_regs *ctx) { return op_return(ctx, PROBE_memfd_can_preserve, 0, 0); }
ARGS_OP(memfd_preserve, HANDLER_MEMFD, ROLE_PRESERVE, 0, 1)
int memfd_shmem_freeze_entry(struct pt_regs *ctx) { return inode_freeze_entry(ctx, PROBE_memfd_shmem_freeze, HANDLER_MEMFD); }
int memfd_preserve_folios_entry(struct pt_regs *ctx)
{
	/* preserve_folios(file, kv, out, nr_foliosp) */
	return attributed_entry(ctx, PROBE_memfd_preserve_folios, PT_REGS_PARM4(ctx), 0, 1, 0, EV_ENTRY);
}
int memfd_preserve_folios_return(struct pt_regs *ctx) { return op_return(ctx, PROBE_memfd_preserve_folios, 0, 2); }
ARGS_OP(memfd_luo_freeze, HANDLER_MEMFD, ROLE_LUO_FREEZE, 0, 0)
ARGS_OP(memfd_unpreserve, HANDLER_MEMFD, ROLE_UNPRESERVE, 0, 0)
ARGS_OP(memfd_retrieve, HANDLER_MEMFD, ROLE_RETRIEVE, 1, 3)
ARGS_OP(memfd_finish, HANDLER_MEMFD, ROLE_FINISH, 1, 0)

/* KHO metadata */
int kho_preserve_vmalloc_entry(struct pt_regs *ctx)
{ return attributed_entry(ctx, PROBE_kho_preserve_vmalloc, 0, 0, 0, 0, EV_ENTRY); }
int kho_preserve_vmalloc_return(struct pt_regs *ctx) { return op_return(ctx, PROBE_kho_preserve_vmalloc, 0, 0); }
int kho_unpreserve_vmalloc_entry(struct pt_regs *ctx)
{ return attributed_entry(ctx, PROBE_kho_unpreserve_vmalloc, 0, 0, 0, 0, EV_INSTANT); }

/* LUO sessions */
int luo_preserve_file_entry(struct pt_regs *ctx)
{
	/* luo_preserve_file(set, token, fd) */
	return attributed_entry(ctx, PROBE_luo_preserve_file, 0, PT_REGS_PARM2(ctx),
				PT_REGS_PARM3(ctx) & 0xffffffff, PT_REGS_PARM1(ctx), EV_ENTRY);
}
int luo_preserve_file_return(struct pt_regs *ctx) { return op_return(ctx, PROBE_luo_preserve_file, 0, 0); }
int luo_file_freeze_entry(struct pt_regs *ctx)
{ return attributed_entry(ctx, PROBE_luo_file_freeze, 0, 0, 0, PT_REGS_PARM1(ctx), EV_ENTRY); }
int luo_file_freeze_return(struct pt_regs *ctx) { return op_return(ctx, PROBE_luo_file_freeze, 0, 0); }
int luo_unpreserve_files_entry(struct pt_regs *ctx)
{ return attributed_entry(ctx, PROBE_luo_unpreserve_files, 0, 0, 0, PT_REGS_PARM1(ctx), EV_INSTANT); }
int luo_get_token_entry(struct pt_regs *ctx)
{ return attributed_entry(ctx, PROBE_luo_get_token, PT_REGS_PARM3(ctx), 0, 0, 0, EV_ENTRY); }
int luo_get_token_return(struct pt_regs *ctx) { return op_return(ctx, PROBE_luo_get_token, 0, 2); }

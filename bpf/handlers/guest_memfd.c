/* luotrace: the guest_memfd LUO file handler (virt/kvm/guest_memfd_luo.c of
 * the patch under review, v1).  Compiled after lifecycle.c, whose helpers and
 * ARGS_OP / BODY_ENTRY / BODY_RETURN it uses; one line per catalog probe. */
BODY_ENTRY(gmem_can_preserve) { return file_arg2_entry(a, PROBE_gmem_can_preserve, HANDLER_GUEST_MEMFD); }
BODY_RETURN(gmem_can_preserve, KEEP_CUR, RET_PLAIN)
ARGS_OP(gmem_preserve, HANDLER_GUEST_MEMFD, ROLE_PRESERVE, KEY_BY_FILE, RET_SER)
BODY_ENTRY(gmem_freeze_inode) { return inode_freeze_entry(a, PROBE_gmem_freeze_inode, HANDLER_GUEST_MEMFD, 1); }
static __always_inline int gmem_freeze_inode_return_body(u64 rc) { return inode_freeze_return(); }
/* walk(mapping, end_index, folios_ser, out_count): keep out_count for the return */
BODY_ENTRY(gmem_walk) { return attributed_entry(PROBE_gmem_walk, a[3], a[1], a[2] ? 1 : 0, 0, EV_ENTRY); }
BODY_RETURN(gmem_walk, KEEP_CUR, RET_OUT_COUNT)
ARGS_OP(gmem_luo_freeze, HANDLER_GUEST_MEMFD, ROLE_LUO_FREEZE, KEY_BY_FILE, RET_PLAIN)
ARGS_OP(gmem_unpreserve, HANDLER_GUEST_MEMFD, ROLE_UNPRESERVE, KEY_BY_FILE, RET_PLAIN)
ARGS_OP(gmem_retrieve, HANDLER_GUEST_MEMFD, ROLE_RETRIEVE, KEY_BY_SER, RET_NEW_INODE)
ARGS_OP(gmem_finish, HANDLER_GUEST_MEMFD, ROLE_FINISH, KEY_BY_SER, RET_PLAIN)

/* luotrace: the memfd LUO file handler (mainline mm/memfd_luo.c).  Compiled
 * after lifecycle.c, whose helpers and ARGS_OP / BODY_ENTRY / BODY_RETURN it
 * uses; one line per catalog probe. */
BODY_ENTRY(memfd_can_preserve) { return file_arg2_entry(a, PROBE_memfd_can_preserve, HANDLER_MEMFD); }
BODY_RETURN(memfd_can_preserve, KEEP_CUR, RET_PLAIN)
ARGS_OP(memfd_preserve, HANDLER_MEMFD, ROLE_PRESERVE, KEY_BY_FILE, RET_SER)
BODY_ENTRY(memfd_shmem_freeze) { return inode_freeze_entry(a, PROBE_memfd_shmem_freeze, HANDLER_MEMFD, 0); }
/* preserve_folios(file, kv, out, nr_foliosp) */
BODY_ENTRY(memfd_preserve_folios) { return attributed_entry(PROBE_memfd_preserve_folios, a[3], 0, 1, 0, EV_ENTRY); }
BODY_RETURN(memfd_preserve_folios, KEEP_CUR, RET_OUT_COUNT)
ARGS_OP(memfd_luo_freeze, HANDLER_MEMFD, ROLE_LUO_FREEZE, KEY_BY_FILE, RET_PLAIN)
ARGS_OP(memfd_unpreserve, HANDLER_MEMFD, ROLE_UNPRESERVE, KEY_BY_FILE, RET_PLAIN)
ARGS_OP(memfd_retrieve, HANDLER_MEMFD, ROLE_RETRIEVE, KEY_BY_SER, RET_NEW_INODE)
ARGS_OP(memfd_finish, HANDLER_MEMFD, ROLE_FINISH, KEY_BY_SER, RET_PLAIN)

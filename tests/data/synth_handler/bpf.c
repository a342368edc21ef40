/* luotrace: a synthetic file handler (tests/test_new_handler.py).  One line
 * per catalog probe, as bpf/handlers/memfd.c. */
BODY_ENTRY(synth_can_preserve) { return file_arg2_entry(a, PROBE_synth_can_preserve, HANDLER_SYNTH); }
BODY_RETURN(synth_can_preserve, KEEP_CUR, RET_PLAIN)
ARGS_OP(synth_preserve, HANDLER_SYNTH, ROLE_PRESERVE, KEY_BY_FILE, RET_SER)
/* preserve_folios(mapping, folios_ser, nr_foliosp) */
BODY_ENTRY(synth_walk) { return attributed_entry(PROBE_synth_walk, a[2], 0, 1, 0, EV_ENTRY); }
BODY_RETURN(synth_walk, KEEP_CUR, RET_OUT_COUNT)
ARGS_OP(synth_luo_freeze, HANDLER_SYNTH, ROLE_LUO_FREEZE, KEY_BY_FILE, RET_PLAIN)
ARGS_OP(synth_unpreserve, HANDLER_SYNTH, ROLE_UNPRESERVE, KEY_BY_FILE, RET_PLAIN)
ARGS_OP(synth_retrieve, HANDLER_SYNTH, ROLE_RETRIEVE, KEY_BY_SER, RET_NEW_INODE)
ARGS_OP(synth_finish, HANDLER_SYNTH, ROLE_FINISH, KEY_BY_SER, RET_PLAIN)

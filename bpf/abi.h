/* Generated from tracer/kernel/abi.py: do not edit (python -m tracer.kernel.abi > bpf/abi.h). */
#ifndef LUOTRACE_ABI_H
#define LUOTRACE_ABI_H

#define EV_ENTRY 0
#define EV_RETURN 1
#define EV_INSTANT 2

#define EVF_KEY_UNKNOWN 1
#define EVF_A0_UNKNOWN 2
#define EVF_A1_UNKNOWN 4

#define CNT_LOST 0	/* lifecycle events dropped: ring buffer full */
#define CNT_EMITTED 1	/* lifecycle events written */
#define CNT_SAMPLED_OUT 2	/* per-folio events skipped by --sample */
#define CNT_INFLIGHT_FULL 3	/* calls whose entry could not be remembered (in-flight map or task storage full) */
#define CNT_UNATTRIBUTED 4	/* per-folio KHO calls made outside any traced handler operation */
#define CNT_SAMPLE_TICK 5	/* per-folio calls seen by the sampler */
#define CNT_FOLIO_LOST 6	/* per-folio events dropped: folio ring buffer full */
#define CNT_FOLIO_EMITTED 7	/* per-folio events written */
#define CNT_MAP_FULL 8	/* a per-file map was full: that file's counts are incomplete */
#define NR_COUNTERS 9

#define SER_DEV 0xffffffff

struct luo_event {
	u64 ts;	/* CLOCK_MONOTONIC ns (bpf_ktime_get_ns) */
	u32 tgid;
	u32 tid;
	u16 probe;	/* PROBE_<name>: index in tracer/probes/catalog.py PROBES */
	u8 kind;	/* EV_* */
	u8 flags;	/* EVF_* */
	s32 ret;	/* return value (EV_RETURN) */
	u64 ino;	/* file key: inode number, or the serialized-data handle when dev == SER_DEV */
	u32 dev;	/* file key: the superblock's dev_t (kernel encoding) */
	u32 handler;	/* HANDLER_* */
	u64 a0;	/* probe-specific, named per probe in the catalog */
	u64 a1;
	u64 a2;	/* on EV_RETURN: the call's duration in ns */
};

#endif

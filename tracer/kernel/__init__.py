"""Facts about the running kernel and host, and the calls that read them: the LUO and KVM ABIs, BTF,
bpf(2), clocks, guest_memfd and its stand-in.  Imports tracer.base only."""

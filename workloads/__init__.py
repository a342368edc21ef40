"""Workloads luotrace traces: the guest_memfd driver and the reference model."""

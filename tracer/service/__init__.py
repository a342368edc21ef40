"""`luotrace serve`: the HTTP side, readiness, the update export at the kexec.  Imports every layer
below and the exporters; only tracer.cli imports it."""

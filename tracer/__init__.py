"""luotrace: eBPF observability for Linux live-update (LUO/KHO) preservation runs."""
__version__ = "0.1.0"

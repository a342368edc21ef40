"""guest_memfd workload driver: a VM and guest_memfds populated for real
(the VM and file handling itself is the tracer's, tracer/kernel/kvm.py and backing.py)."""
from __future__ import annotations

from typing import List

from tracer.kernel.backing import VM, gmem_superblock_dev
from tracer.kernel.kvm import GmemError, GmemFile, fallocate, kernel_dev

__all__ = ["VM", "GmemError", "GmemFile", "fallocate", "gmem_superblock_dev", "kernel_dev", "populate"]


def populate(sizes: List[int], vm: VM) -> List[GmemFile]:
    """Create and fully pre-allocate one guest_memfd per size."""
    files = [vm.create_gmem(s) for s in sizes]
    for f in files:
        f.populate()
    return files

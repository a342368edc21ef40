"""Every kernel-side program of the catalog passes the real verifier here,
loaded as kprobe programs without attaching (this kernel has no
CONFIG_KPROBES and none of the LUO symbols), with the layout this kernel's
BTF gives and with a layout where every member is known (the code paths a
patched kernel exercises)."""
from __future__ import annotations

import pytest

from tracer.probes import catalog
from tracer.kernel.btf import BTF
from tracer.probes.layout import LOGICAL, Layout, kernel_layout
from tracer.attach.tracer import verify_kernel_programs

# Offsets as a patched x86_64 kernel would give them (values only need to be
# plausible: the verifier checks the reads, not what they find).
FULL = {"ARGS_FILE": 16, "ARGS_SER": 24, "FILE_INODE": 32, "INODE_INO": 64, "INODE_SB": 40, "INODE_SIZE": 80,
        "SB_DEV": 16, "SB_MAGIC": 96, "INODE_GMEM_FLAGS": 720, "FOLIO_INDEX": 32, "FOLIO_PFN": -1}


def expected_programs(mode):
    out = set()
    for p in catalog.probes_for(mode):
        if p.kind == "tracepoint":
            continue
        out.add(p.entry_fn)
        if p.return_fn:
            out.add(p.return_fn)
    return out


@pytest.mark.parametrize("mode", catalog.MODES)
def test_programs_verify_with_this_kernels_btf(mode, root):
    layout = kernel_layout(BTF.from_file())
    results = verify_kernel_programs(mode, layout)
    assert set(results) == expected_programs(mode)
    assert set(results.values()) == {"ok"}


@pytest.mark.parametrize("mode", ["light", "trace"])
def test_programs_verify_with_every_member_known(mode, root):
    layout = Layout("synthetic full", dict(FULL), vmemmap_base_ptr=0xFFFFFFFF82A00000, page_struct_size=64)
    assert set(layout.offsets) == set(LOGICAL)
    results = verify_kernel_programs(mode, layout)
    assert len(results) == len(expected_programs(mode))
    assert set(results.values()) == {"ok"}


def test_unknown_members_are_reported_not_read(root):
    layout = kernel_layout(BTF.from_file())
    unknown = layout.unknown()
    # this kernel has no LUO: the op args struct cannot be resolved, and says why
    assert "ARGS_FILE" in unknown and "liveupdate_file_op_args" in unknown["ARGS_FILE"]
    assert "-DOFF_ARGS_FILE=-1" in layout.cflags()
    assert layout.offsets["INODE_INO"] > 0

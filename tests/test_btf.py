"""The BTF reader against the real kernel BTF, cross-checked with bpftool."""
from __future__ import annotations

import re
import subprocess

import pytest

from tracer.btf import BTF, BTFError


@pytest.fixture(scope="module")
def btf():
    return BTF.from_file("/sys/kernel/btf/vmlinux")


def bpftool_member_offset(struct: str, member: str) -> int:
    out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"STRUCT '%s' size=\d+ vlen=\d+\n((?:\t.*\n)+)" % re.escape(struct), out)
    assert m, struct
    mm = re.search(r"\t'%s' type_id=\d+ bits_offset=(\d+)" % re.escape(member), m.group(1))
    assert mm, member
    return int(mm.group(1)) // 8


@pytest.mark.parametrize("struct,member", [("inode", "i_ino"), ("inode", "i_sb"), ("inode", "i_size"),
                                           ("file", "f_inode"), ("super_block", "s_dev")])
def test_offsets_match_bpftool(btf, struct, member):
    assert btf.offsetof(struct, member) == bpftool_member_offset(struct, member)


def test_member_inside_anonymous_union(btf):
    # folio.index sits in an anonymous struct inside an anonymous union
    assert btf.offsetof("folio", "index") == btf.offsetof("folio", "mapping") + 8 == 32


def test_unknown_struct_or_member_is_none(btf):
    assert btf.offsetof("liveupdate_file_op_args", "file") is None
    assert btf.offsetof("inode", "no_such_member") is None
    assert "kvm_gmem_create" in btf.functions
    assert btf.sizeof("page") == 64


@pytest.mark.parametrize("blob", [b"", b"\x00" * 64, b"\x9f\xeb" + b"\x00" * 30])
def test_not_btf_is_a_clear_error(blob):
    with pytest.raises(BTFError):
        BTF(blob)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(BTFError, match="cannot read"):
        BTF.from_file(str(tmp_path / "nope"))

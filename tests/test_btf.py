"""The BTF reader against the real kernel BTF, cross-checked with bpftool."""
from __future__ import annotations

import re
import subprocess

import pytest

from tracer.kernel.btf import BTF, BTFError


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


def test_unknown_member_is_none(btf):
    assert btf.offsetof("inode", "no_such_member") is None
    assert btf.offsetof("no_such_struct", "i_ino") is None
    assert btf.sizeof("page") == 64


# What the host's BTF has depends on its kernel (LUO or not, KVM or not): the
# facts about the patched kernel come from BTF built here, from this C.
PATCHED = """
struct liveupdate_session;
struct file;
struct liveupdate_file_op_args { void *handler; struct liveupdate_session *session; int retrieve_status;
                                 struct file *file; unsigned long long serialized_data; void *private_data; };
struct guest_memfd_luo_ser { unsigned long long size, flags, nr_folios, vm_token;
                             struct { unsigned long long first; unsigned int total_pages;
                                      unsigned short flags, order; } __attribute__((packed)) folios; }
                           __attribute__((packed));
/* v3's base: serialized_data a KHOSER union (phys or a pointer), at the same place */
struct liveupdate_file_op_args_v3 { void *handler; struct liveupdate_session *session; int retrieve_status;
                                    struct file *file; union { unsigned long long phys; void *ptr; } serialized_data;
                                    void *private_data; };
int kvm_gmem_luo_preserve(struct liveupdate_file_op_args *args) { return args->retrieve_status; }
int v3_preserve(struct liveupdate_file_op_args_v3 *args) { return args->retrieve_status; }
void kvm_gmem_freeze(struct guest_memfd_luo_ser *ser, _Bool freeze) { ser->flags = freeze; }
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> BTF:
    """BTF of PATCHED: gcc -g, then pahole -J encodes it (dwarves, installed by `make setup`)."""
    d = tmp_path_factory.mktemp("btf")
    (d / "p.c").write_text(PATCHED)
    subprocess.run(["gcc", "-g", "-O2", "-c", "p.c", "-o", "p.o"], cwd=d, check=True)
    subprocess.run(["pahole", "-J", "p.o"], cwd=d, check=True)
    subprocess.run(["objcopy", "--dump-section", ".BTF=p.btf", "p.o"], cwd=d, check=True)
    return BTF.from_file(str(d / "p.btf"))


def test_built_btf_gives_the_patched_kernels_layout(built):
    assert built.offsetof("liveupdate_file_op_args", "session") == 8
    assert built.offsetof("liveupdate_file_op_args", "file") == 24
    assert built.offsetof("liveupdate_file_op_args", "serialized_data") == 32
    assert built.offsetof("guest_memfd_luo_ser", "nr_folios") == 16
    assert built.offsetof("guest_memfd_luo_ser", "folios") == 32
    assert built.sizeof("guest_memfd_luo_ser") == 48
    assert {"kvm_gmem_luo_preserve", "kvm_gmem_freeze"} <= built.functions
    assert built.func_signature("kvm_gmem_freeze") == (2, True)  # two arguments, returns void
    assert built.offsetof("liveupdate_file_op_args", "no_such_member") is None
    assert "kvm_gmem_luo_freeze" not in built.functions
    # by field name, whatever its type: v3's union form resolves to the same offset
    assert built.offsetof("liveupdate_file_op_args_v3", "serialized_data") == 32


@pytest.mark.parametrize("blob", [b"", b"\x00" * 64, b"\x9f\xeb" + b"\x00" * 30])
def test_not_btf_is_a_clear_error(blob):
    with pytest.raises(BTFError):
        BTF(blob)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(BTFError, match="cannot read"):
        BTF.from_file(str(tmp_path / "nope"))

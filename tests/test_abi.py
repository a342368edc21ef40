"""The KVM facts are stated twice (C for the model, Python for the driver):
they must agree, and agree with the running kernel."""
from __future__ import annotations

import os
import re

from tests.conftest import REPO
from workloads import kvm_abi
from workloads.gmem import VM


def c_defines():
    text = open(os.path.join(REPO, "workloads", "model", "kvm_abi.h")).read()
    out = {}
    for name, val in re.findall(r"#define\s+(\w+)\s+\(?([0-9xA-Fa-f]+)u?(?:ULL)?", text):
        out[name] = int(val, 0)
    for name, sh in re.findall(r"#define\s+(\w+)\s+\(1ULL << (\d+)\)", text):
        out[name] = 1 << int(sh)
    return out


def test_c_and_python_agree():
    c = c_defines()
    for name in ("KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_CREATE_GUEST_MEMFD", "KVM_CAP_GUEST_MEMFD_FLAGS",
                 "GUEST_MEMFD_FLAG_MMAP", "GUEST_MEMFD_FLAG_INIT_SHARED"):
        assert c[name] == getattr(kvm_abi, name), name
    assert kvm_abi.KVM_CREATE_GUEST_MEMFD_STRUCT.size == 64


def test_kernel_supports_the_flags_we_use(kvm):
    with VM() as vm:
        assert vm.supported_flags() & 3 == 3
        f = vm.create_gmem(1 << 20)
        assert f.ino > 0

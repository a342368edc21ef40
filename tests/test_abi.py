"""ABI facts stated twice must agree: the KVM ioctls (C for the model, Python
for the driver, and the running kernel), and the event record (gcc's layout
of the generated struct against the numpy dtype)."""
from __future__ import annotations

import os
import re

from tests.conftest import REPO
from tracer.kernel import kvm_abi
from tracer.kernel.backing import VM, Backing


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
    for name in ("KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_CREATE_GUEST_MEMFD", "KVM_CAP_GUEST_MEMFD",
                 "KVM_CAP_GUEST_MEMFD_FLAGS", "GUEST_MEMFD_FLAG_MMAP", "GUEST_MEMFD_FLAG_INIT_SHARED", "RAMFS_MAGIC"):
        assert c[name] == getattr(kvm_abi, name), name
    assert kvm_abi.KVM_CREATE_GUEST_MEMFD_STRUCT.size == 64
    text = open(os.path.join(REPO, "workloads", "model", "kvm_abi.h")).read()
    for name in ("STANDIN_DIR", "STANDIN_LOCK"):
        assert f'#define {name} "{getattr(kvm_abi, name)}"' in re.sub(r"[ \t]+", " ", text), name


def test_kernel_supports_the_flags_we_use(real_gmem):
    with VM(backing=Backing("guest_memfd")) as vm:
        assert vm.supported_flags() & 3 == 3
        f = vm.create_gmem(1 << 20)
        assert f.ino > 0


def test_the_model_and_luotrace_probe_the_host_alike(model, gmem, tmp_path):
    """Both ask the host the same question and choose the same backing, so
    that luotrace's population filter watches the model's files; a forced
    stand-in is said with who forced it."""
    import json
    import subprocess
    from tracer.kernel.kvm import probe
    env = {k: v for k, v in os.environ.items() if k != "LUOTRACE_GMEM"}
    for force, want in ((None, "guest_memfd" if probe().ok else "standin"), ("standin", "standin")):
        out = tmp_path / "t.json"
        subprocess.run([model, "--json", str(out)] + (["--gmem", force] if force else []) + ["keep:gmem:64K"],
                       check=True, capture_output=True, env=env)
        g = json.loads(out.read_text())["gmem"]
        assert g["backing"] == want
        if want == "standin":
            assert g["why"] == ("forced by --gmem" + ("; this host makes guest_memfds too" if probe().ok else
                                                      f"; besides, {probe().why}") if force else probe().why)
        else:
            assert g["why"] is None


def test_event_dtype_matches_the_compiled_struct(tmp_path):
    """The numpy dtype and struct luo_event come from one table
    (tracer/kernel/abi.py); gcc lays the struct out and every offset must agree."""
    import subprocess

    from tracer.kernel import abi
    fields = [name for name, _ctype, _doc in abi.EVENT_FIELDS]
    prog = tmp_path / "layout.c"
    prog.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n"
                    "typedef uint64_t u64; typedef uint32_t u32; typedef uint16_t u16; typedef uint8_t u8;"
                    " typedef int32_t s32;\n" + abi.header() +
                    "int main(void) {\n"
                    + "".join(f'  printf("{f} %zu %zu\\n", offsetof(struct luo_event, {f}), '
                              f"sizeof(((struct luo_event *)0)->{f}));\n" for f in fields)
                    + '  printf("size %zu 0\\n", sizeof(struct luo_event));\n'
                    + "  printf(\"counters %d 0\\n\", NR_COUNTERS);\n  return 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(exe), str(prog)], check=True)
    got = {name: (int(a), int(b)) for name, a, b in
           (line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                    check=True).stdout.splitlines())}
    for f in fields:
        assert got[f] == (abi.EVENT_DTYPE.fields[f][1], abi.EVENT_DTYPE.fields[f][0].itemsize), f
    assert got["size"][0] == abi.EVENT_SIZE == 64
    assert got["counters"][0] == len(abi.COUNTER_NAMES)


def test_checked_in_abi_header_is_the_generated_one():
    from tracer.kernel import abi
    assert open(os.path.join(REPO, "bpf", "abi.h")).read() == abi.header(), "run: python -m tracer.kernel.abi > bpf/abi.h"

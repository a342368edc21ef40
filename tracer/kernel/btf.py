"""A small reader of kernel BTF, enough to find struct member offsets and
function names.

Why not headers: on a host the installed headers need not match the running
kernel (here they are 6.1 for a 6.18 kernel), so every member the BPF programs
read is resolved from ``/sys/kernel/btf/vmlinux`` of the kernel really running.

Format: include/uapi/linux/btf.h and Documentation/bpf/btf.rst (kernel 6.x).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

BTF_MAGIC = 0xEB9F

# BTF_KIND_* (include/uapi/linux/btf.h)
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

# Bytes that follow struct btf_type, per kind: (fixed, per vlen entry).
_EXTRA = {
    KIND_INT: (4, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12), KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8), KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0), KIND_ENUM64: (0, 12),
}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BTFError(Exception):
    """The BTF blob is missing or not BTF."""


@dataclass
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


class BTF:
    """Parsed BTF: names of structs/unions/functions and their members."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("file too short for a BTF header")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError("not a BTF blob (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        if hdr_len < 24 or hdr_len + max(type_off + type_len, str_off + str_len) > len(data) or not str_len:
            raise BTFError("BTF header is corrupt (sections outside the blob)")
        self._types = data[hdr_len + type_off: hdr_len + type_off + type_len]
        self._strs = data[hdr_len + str_off: hdr_len + str_off + str_len]
        # type id -> (kind, name_off, kind_flag, vlen, size_or_type, offset of extra data)
        self._t: List[Tuple[int, int, int, int, int, int]] = [(0, 0, 0, 0, 0, 0)]
        self.structs: Dict[str, int] = {}
        self.functions: Set[str] = set()
        self._func_ids: Dict[str, int] = {}
        self._index()

    @classmethod
    def from_file(cls, path: str = "/sys/kernel/btf/vmlinux") -> "BTF":
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as e:
            raise BTFError(f"cannot read {path}: {e.strerror}") from None

    def _name(self, off: int) -> str:
        end = self._strs.index(b"\0", off)
        return self._strs[off:end].decode()

    def _index(self) -> None:
        buf, pos, n = self._types, 0, len(self._types)
        unpack = struct.Struct("<III").unpack_from
        while pos < n:
            name_off, info, size = unpack(buf, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kflag = info >> 31
            fixed, per = _EXTRA.get(kind, (0, 0))
            self._t.append((kind, name_off, kflag, vlen, size, pos + 12))
            if name_off and kind in (KIND_STRUCT, KIND_UNION):
                self.structs.setdefault(self._name(name_off), len(self._t) - 1)
            elif name_off and kind == KIND_FUNC:
                fname = self._name(name_off)
                self.functions.add(fname)
                self._func_ids.setdefault(fname, len(self._t) - 1)
            pos += 12 + fixed + per * vlen
        if pos != n:
            raise BTFError("BTF type section is corrupt")

    def func_signature(self, name: str) -> Optional[Tuple[int, bool]]:
        """(number of arguments, returns void) of a kernel function, for fentry/fexit:
        an fexit program finds the return value after the arguments."""
        fid = self._func_ids.get(name)
        if fid is None:
            return None
        proto = self._t[fid][4]
        kind, _n, _kf, vlen, ret_type, _x = self._t[proto]
        if kind != KIND_FUNC_PROTO:
            return None
        return vlen, ret_type == 0

    def members(self, type_id: int) -> List[Member]:
        kind, _n, kflag, vlen, _s, extra = self._t[type_id]
        if kind not in (KIND_STRUCT, KIND_UNION):
            return []
        out = []
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", self._types, extra + 12 * i)
            bits, size = (off & 0xFFFFFF, off >> 24) if kflag else (off, 0)
            out.append(Member(self._name(name_off) if name_off else "", mtype, bits, size))
        return out

    def resolve(self, type_id: int) -> int:
        """Strip typedefs and qualifiers."""
        while self._t[type_id][0] in _MODIFIERS:
            type_id = self._t[type_id][4]
        return type_id

    def sizeof(self, name: str) -> Optional[int]:
        tid = self.structs.get(name)
        return None if tid is None else self._t[tid][4]

    def _find(self, type_id: int, name: str) -> Optional[Tuple[int, int]]:
        """(bit offset, member type) of ``name``, looking inside anonymous members."""
        for m in self.members(type_id):
            if m.name == name:
                return m.bit_offset, m.type_id
            if not m.name:
                sub = self._find(self.resolve(m.type_id), name)
                if sub is not None:
                    return m.bit_offset + sub[0], sub[1]
        return None

    def offsetof(self, struct_name: str, path: str) -> Optional[int]:
        """Byte offset of ``path`` (``a.b.c``) in ``struct struct_name``, or None."""
        tid = self.structs.get(struct_name)
        if tid is None:
            return None
        bits = 0
        for part in path.split("."):
            found = self._find(self.resolve(tid), part)
            if found is None:
                return None
            bits += found[0]
            tid = found[1]
        if bits % 8:
            return None
        return bits // 8

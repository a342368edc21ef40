"""/dev/liveupdate ABI facts used by the LUO driver.

Source: include/uapi/linux/liveupdate.h, Linux 7.2 (Debian's linux-source-7.2,
7.2.13).  Every ioctl is _IO(0xBA, nr): no size or direction bits; each
struct carries its own size as its first member.
"""
from __future__ import annotations

import struct

LIVEUPDATE_IOCTL_TYPE = 0xBA
LIVEUPDATE_SESSION_NAME_LENGTH = 64


def _io(nr: int) -> int:
    return (LIVEUPDATE_IOCTL_TYPE << 8) | nr  # _IO(type, nr): dir 0, size 0


LIVEUPDATE_IOCTL_CREATE_SESSION = _io(0x00)
LIVEUPDATE_IOCTL_RETRIEVE_SESSION = _io(0x01)
LIVEUPDATE_SESSION_PRESERVE_FD = _io(0x40)
LIVEUPDATE_SESSION_RETRIEVE_FD = _io(0x41)
LIVEUPDATE_SESSION_FINISH = _io(0x42)
LIVEUPDATE_SESSION_GET_NAME = _io(0x43)

# struct liveupdate_ioctl_create_session / _retrieve_session { __u32 size; __s32 fd; __u8 name[64]; }
SESSION_STRUCT = struct.Struct("<Ii64s")
# struct liveupdate_session_preserve_fd / _retrieve_fd { __u32 size; __s32 fd; __aligned_u64 token; }
FD_STRUCT = struct.Struct("<IiQ")
# struct liveupdate_session_finish { __u32 size; __u32 reserved; }
FINISH_STRUCT = struct.Struct("<II")

DEV = "/dev/liveupdate"

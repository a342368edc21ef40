"""Where luotrace keeps state as root (/run/luotrace, the kept BPF programs'
metadata and pins, the stand-in ramfs): created with explicit modes (0700
directories, 0600 files) whatever the umask, and refused, never followed,
when something else is found there first.  Another local user who could
write there could swap a kept map and make root's next run count wrong."""
from __future__ import annotations

import os
import stat


class Unsafe(OSError):
    """A path luotrace would keep state in is not its own."""


def _check(path: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise Unsafe(f"{path} is a symlink where luotrace keeps a directory of its own: refusing to follow it; "
                     f"remove it")
    if not stat.S_ISDIR(st.st_mode):
        raise Unsafe(f"{path} is not a directory (luotrace keeps a directory of its own there); remove it")
    if st.st_uid != os.geteuid():
        raise Unsafe(f"{path} is owned by uid {st.st_uid}, not by this user: refusing to use it; remove it")


RUN_DIR = "/run/luotrace"  # this boot's state: kept programs' metadata, the stand-in ramfs


def private_dir(path: str, top: str = "") -> str:
    """PATH as a directory of this user's alone (0700), created with its
    missing parents the same way, and so is every directory from TOP down to
    it; Unsafe when a symlink, another file or another user's directory is
    there."""
    path = path.rstrip("/")
    parent = os.path.dirname(path)
    if top and path != top.rstrip("/") and parent.startswith(top.rstrip("/")):
        private_dir(parent, top)
    elif parent and parent != path and not os.path.isdir(parent):
        private_dir(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    _check(path, st)
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)  # ours, made under a looser umask by an earlier luotrace
    return path


def private_open(path: str, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """An fd on PATH, a file of this user's alone (0600), never through a
    symlink."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise Unsafe(f"{path} is not a regular file of this user's: refusing to use it; remove it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd

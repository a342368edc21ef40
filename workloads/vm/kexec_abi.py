"""kexec ABI facts used to reboot the VM into the next kernel (live update).

Sources (Linux 7.2): arch/x86/entry/syscalls/syscall_64.tbl (syscall number),
include/uapi/linux/kexec.h (flags), include/uapi/linux/reboot.h (reboot
command).  x86-64 only: the VM lane boots an x86-64 guest.
"""
from __future__ import annotations

NR_KEXEC_FILE_LOAD = 320          # kexec_file_load(kernel_fd, initrd_fd, cmdline_len, cmdline, flags)
KEXEC_FILE_UNLOAD = 0x00000001
KEXEC_FILE_NO_INITRAMFS = 0x00000004
LINUX_REBOOT_CMD_KEXEC = 0x45584543  # glibc's reboot() adds the two magic numbers

"""The real-kernel lane: a Linux 7.2 LUO kernel under QEMU (TCG), luotrace inside."""

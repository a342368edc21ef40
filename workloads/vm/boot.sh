# Sourced by the lane's scripts: the one way they boot a kernel.
# boot_guest KDIR RWDIR CONSOLE COMMAND boots KDIR/bzImage under QEMU TCG
# (nested KVM fails on these machines: "KVM internal error") with the host's
# root filesystem visible and RWDIR shared read/write, runs COMMAND as root
# inside, and writes the guest console to CONSOLE.  liveupdate=1: LUO is off
# unless asked for on the command line (kernel/liveupdate/luo_core.c).  vng
# runs virtme-run from PATH (the checkout's venv).
boot_guest() {
  vng --verbose --run "$1/bzImage" --disable-kvm --cpus 2 --memory 4G --user root --append "liveupdate=1" \
    --rwdir "$2" --qemu-opts="-cpu max" --exec "$4" > "$3" 2>&1 || true
}

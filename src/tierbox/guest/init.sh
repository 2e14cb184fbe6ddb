#!/bin/busybox sh
# /init of the tierbox microVM initramfs (busybox-static, kernel modules, the agent).
#
# Loads the virtio-mmio drivers the Debian cloud kernel ships as modules,
# mounts the image's read-only ext4 (/dev/vda) under a writable tmpfs overlay
# at /newroot, and hands PID 1 to tierbox-agent, which chroots each workload
# into /newroot. Kernel command line knobs (set by tierbox.vmm.qemu):
#   tierbox.disk=1      a root disk is attached as /dev/vda (else the
#                       initramfs itself, with busybox, is the lower layer)
#   tierbox.rw_mib=N    size cap of the writable layer (tmpfs, guest RAM)
#   tierbox.agent=0     do not start the agent (tests: "agent never answers")
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs devtmpfs /dev
disk=0
rw_mib=0
agent=1
for arg in $(busybox cat /proc/cmdline); do
	case "$arg" in
	tierbox.disk=*) disk="${arg#*=}" ;;
	tierbox.rw_mib=*) rw_mib="${arg#*=}" ;;
	tierbox.agent=*) agent="${arg#*=}" ;;
	esac
done
busybox modprobe -a virtio_mmio virtio_console virtio_rng overlay
[ "$disk" = 1 ] && busybox modprobe virtio_blk

busybox mkdir -p /run/lower /run/rw /newroot
opts=mode=0755
[ "$rw_mib" != 0 ] && opts="$opts,size=${rw_mib}m"
busybox mount -t tmpfs -o "$opts" rw /run/rw
busybox mkdir -p /run/rw/upper /run/rw/work
lower=/rootfs
if [ "$disk" = 1 ]; then
	n=0
	while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do
		busybox usleep 10000
		n=$((n + 1))
	done
	busybox mount -t ext4 -o ro,noload /dev/vda /run/lower || {
		echo "tierbox-init: cannot mount the root disk /dev/vda" >&2
		busybox poweroff -f
	}
	lower=/run/lower
fi
busybox mount -t overlay overlay -o "lowerdir=$lower,upperdir=/run/rw/upper,workdir=/run/rw/work" /newroot
for d in proc sys dev tmp; do
	[ -d /newroot/$d ] || busybox mkdir -p /newroot/$d
done
busybox chmod 1777 /newroot/tmp
busybox mount -t proc proc /newroot/proc
busybox mount -t sysfs sysfs /newroot/sys
busybox mount -t devtmpfs devtmpfs /newroot/dev
busybox mkdir -p /newroot/dev/pts /newroot/dev/shm
busybox mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
busybox mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
busybox ip link set lo up
busybox hostname tierbox
if [ "$agent" = 0 ]; then
	echo "tierbox-init: agent disabled by tierbox.agent=0" >&2
	exec busybox sleep 1000000
fi
exec /tierbox-agent /newroot

#!/bin/bash
# Build qinst's test guest images: Debian 12 (bookworm) cloud-style qcow2 disks made from Debian packages only,
# for amd64 (plus a broken variant: cloud-init disabled) and arm64 (issue 25: UEFI only, emulated under TCG), a
# mirror tree that keeps an upstream-like path, a catalog file pointing at it and images.json listing every image.
# One script for both architectures: the root file system, its configuration and the ESP are made by the same
# code, parameterised by architecture.  See README.md beside this file.
#
# Usage: tests/images/build.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to $QINST_TEST_IMAGE_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/qinst-test-image.
#   The result goes to OUTPUT_DIR/<sha256 of this script>/ and that absolute path is the last line printed
#   on stdout (everything else goes to stderr).  A complete cached result is reused at once, without root.
#   QINST_TEST_ARCHES=amd64 builds the amd64 images only, into OUTPUT_DIR/<sha256>-amd64/ (a complete
#   OUTPUT_DIR/<sha256>/ is reused for it, since it holds them too).
#
# Building needs root (loop devices, mount) and these Debian packages:
#   apt-get install mmdebstrap qemu-utils e2fsprogs fdisk extlinux syslinux-common util-linux mount dosfstools mtools
# and for arm64 also (foreign binaries run under qemu-user through binfmt_misc, which this script mounts and
# enables when it is not):
#   apt-get install qemu-user-static binfmt-support arch-test
# (debian-archive-keyring, which mmdebstrap pulls in, verifies the archive.)  Booting the result for tests
# also needs qemu-system-x86 (qemu-system-arm and qemu-efi-aarch64 for arm64), cloud-image-utils and
# openssh-client, but this script does not.
#
# Environment:
#   QINST_TEST_IMAGE_DIR        output directory when no argument is given
#   QINST_TEST_ARCHES           the architectures to build: "amd64 arm64" (the default) or "amd64"; comma or space
#   QINST_TEST_DEBIAN_MIRROR    Debian archive URL (default: the host's apt sources, else deb.debian.org)
#   QINST_TEST_SECURITY_MIRROR  Debian security archive URL (same defaults)
set -euo pipefail

readonly SUITE=bookworm
readonly RAW_SIZE=2G                  # sparse; the guest grows its root fs to the overlay's size
readonly ESP_START=2048               # sectors of 512 bytes: the EFI system partition starts at 1 MiB
readonly ESP_SECTORS=196608           # 96 MiB of FAT: systemd-boot, the kernel and the initrd for UEFI boots
readonly PART_START=$((ESP_START + ESP_SECTORS)) # the root partition follows it (last, so growpart can grow it)
readonly FS_LABEL=qinst-root
readonly IMAGE_DIR_REL=mirror/images/cloud/bookworm/qinst-test
readonly GOOD_NAME=debian-12-qinst-test-amd64.qcow2
readonly BROKEN_NAME=debian-12-qinst-test-broken-amd64.qcow2
readonly ARM64_NAME=debian-12-qinst-test-arm64.qcow2
readonly UPSTREAM_DIR=https://cloud.debian.org/images/cloud/bookworm/qinst-test
readonly ALL_ARCHES=(amd64 arm64)

# Per architecture (Debian's names as keys).  Serial console last: cloud-init writes its "finished" line and
# the SSH host keys to /dev/console, which is the last console= given.  The launcher reads the boot from the
# serial log: the 16550 UART (ttyS0) on a PC, the PL011 (ttyAMA0) on QEMU's arm "virt" machine.
# no_timer_check (amd64): the kernel's IO-APIC timer check counts timer interrupts over a short busy wait; an emulated
# guest whose vCPU thread is starved (TCG on a host at a load of 15 on 2 cores) saw none and panicked ("IO-APIC +
# timer doesn't work!"). Fedora's cloud images and libguestfs's appliance boot with it for the same reason.
declare -rA KERNEL_CONSOLE=([amd64]="console=tty0 console=ttyS0,115200n8 no_timer_check" [arm64]="console=tty0 console=ttyAMA0,115200n8")
declare -rA QEMU_ARCH=([amd64]=x86_64 [arm64]=aarch64)  # the catalog's and QEMU's name
declare -rA EFI_ARCH=([amd64]=x64 [arm64]=aa64)         # systemd-boot<x>.efi -> EFI/BOOT/BOOT<X>.EFI
declare -rA FIRMWARE=([amd64]="bios uefi" [arm64]="uefi") # amd64 also boots with SeaBIOS (extlinux); arm64 UEFI only

# What goes into the guest, and why:
#  - linux-image-cloud-<arch>: the kernel Debian's genericcloud images use (virtio, no AHCI);
#  - cloud-init (NoCloud only, see 99-qinst-test.cfg below), cloud-guest-utils (growpart), fdisk (sfdisk, which
#    growpart uses on MBR), e2fsprogs (resize2fs): the root fs grows to the disk at first boot;
#  - ifupdown + isc-dhcp-client: what bookworm's genericcloud uses; cloud-init renders ENI for it;
#  - locales: cloud-init's locale module runs update-locale, and fails without it;
#  - systemd-sysv, udev, dbus (hostnamectl), openssh-server, sudo, procps;
#  - systemd-boot-efi: the UEFI boot path (its BOOTX64.EFI / BOOTAA64.EFI is copied to the ESP; nothing runs
#    bootctl);
#  - no qemu-guest-agent: Ubuntu's cloud images have none, so readiness must not need it.
readonly PACKAGES=(
	systemd-sysv udev dbus
	cloud-init cloud-guest-utils fdisk e2fsprogs
	ifupdown isc-dhcp-client iproute2 netbase
	openssh-server sudo locales procps
	systemd-boot-efi
)

log() { printf '[build-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

# All chatter goes to stderr; fd 3 keeps the real stdout for the final path.
exec 3>&1 1>&2

# The architectures asked for, in ALL_ARCHES' order.
arches=()
want=" ${QINST_TEST_ARCHES:-${ALL_ARCHES[*]}} "
want=${want//,/ }
for a in $want; do
	case $a in
	amd64 | x86_64) ;;
	arm64 | aarch64) ;;
	*) die "QINST_TEST_ARCHES: unknown architecture '$a' (amd64, arm64)" ;;
	esac
done
want=${want//x86_64/amd64}
want=${want//aarch64/arm64}
for a in "${ALL_ARCHES[@]}"; do
	[[ $want == *" $a "* ]] && arches+=("$a")
done
((${#arches[@]})) || die "QINST_TEST_ARCHES names no architecture"
has_arch() { [[ " ${arches[*]} " == *" $1 "* ]]; }

# The files each architecture contributes to the mirror tree.
image_files() {
	case $1 in
	amd64) echo "$GOOD_NAME $BROKEN_NAME" ;;
	arm64) echo "$ARM64_NAME" ;;
	esac
}

script_path=$(readlink -f "${BASH_SOURCE[0]}")
key=$(sha256sum "$script_path" | cut -d' ' -f1)
out_arg=${1:-${QINST_TEST_IMAGE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qinst-test-image}}
mkdir -p "$out_arg"
out=$(cd "$out_arg" && pwd -P)
full="$out/$key" # every architecture: the default
if [[ "${arches[*]}" == "${ALL_ARCHES[*]}" ]]; then
	final=$full
else
	final="$out/$key-$(IFS=+; echo "${arches[*]}")" # e.g. <key>-amd64
fi

is_complete() { # DIR ARCH...
	local d=$1 a f
	shift
	[[ -s "$d/catalog.toml" && -s "$d/images.json" && -s "$d/$IMAGE_DIR_REL/SHA512SUMS" ]] || return 1
	for a; do
		for f in $(image_files "$a"); do
			[[ -s "$d/$IMAGE_DIR_REL/$f" ]] || return 1
		done
	done
}
cached() { # prints the reusable result directory, if any: the one asked for, else the complete build of all
	if is_complete "$final" "${arches[@]}"; then
		echo "$final"
	elif [[ $final != "$full" ]] && is_complete "$full" "${ALL_ARCHES[@]}"; then
		echo "$full"
	else
		return 1
	fi
}

if hit=$(cached); then
	log "cached: $hit"
	echo "$hit" >&3
	exit 0
fi

# ---- preflight: fail early, naming what is missing ----
[[ $EUID -eq 0 ]] || die "building the image needs root (loop devices, mount); no cached build at $final"
missing=()
tools=(mmdebstrap:mmdebstrap qemu-img:qemu-utils sfdisk:fdisk mkfs.ext4:e2fsprogs mklost+found:e2fsprogs
	mkfs.vfat:dosfstools mcopy:mtools mmd:mtools losetup:util-linux fstrim:util-linux flock:util-linux blkid:util-linux
	mount:mount umount:mount mountpoint:util-linux unshare:util-linux sha512sum:coreutils od:coreutils pgrep:procps)
install="mmdebstrap qemu-utils e2fsprogs fdisk util-linux mount dosfstools mtools procps"
if has_arch amd64; then
	tools+=(extlinux:extlinux)
	install+=" extlinux syslinux-common"
fi
if has_arch arm64; then
	tools+=(qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support arch-test:arch-test)
	install+=" qemu-user-static binfmt-support arch-test"
fi
for tool in "${tools[@]}"; do
	command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool%%:*} (package ${tool#*:})")
done
mbr_bin=
if has_arch amd64; then
	for f in /usr/lib/syslinux/mbr/mbr.bin /usr/lib/EXTLINUX/mbr.bin; do
		[[ -r $f ]] && { mbr_bin=$f; break; }
	done
	[[ -n $mbr_bin ]] || missing+=("mbr.bin (package syslinux-common)")
fi
if ((${#missing[@]})); then
	die "missing tools: ${missing[*]}. Install: apt-get install $install"
fi
[[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || true
[[ -e /dev/loop-control ]] || die "no loop device support (/dev/loop-control missing; try: modprobe loop)"
# arm64 maintainer scripts run under qemu-user: binfmt_misc must be mounted (it is not on a fresh machine without
# systemd) and the qemu-aarch64 entry enabled (qemu-user-static's trigger does it only when it is mounted).
# arch-test runs a tiny arm64 binary, which is also how mmdebstrap checks.
if has_arch arm64 && ! arch-test arm64 >/dev/null 2>&1; then
	binfmt=/proc/sys/fs/binfmt_misc
	if [[ ! -e $binfmt/register ]]; then
		log "mounting binfmt_misc on $binfmt"
		mount -t binfmt_misc binfmt_misc "$binfmt" || die "cannot mount binfmt_misc on $binfmt"
	fi
	if [[ ! -e $binfmt/qemu-aarch64 ]] || ! grep -qx enabled "$binfmt/qemu-aarch64"; then
		log "enabling qemu-aarch64 in binfmt_misc (update-binfmts)"
		update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
	fi
	arch-test arm64 >/dev/null 2>&1 || die "arm64 binaries do not run here (arch-test arm64: $(arch-test arm64 2>&1))"
fi

# ---- the build's own mount namespace ----
# libvirtd starts each QEMU in a private copy of the host's mount namespace, which keeps a file system mounted at
# that moment alive after our umount: the disk would be copied with an unclean journal (seen here while other
# tests started guests).  The build's mounts live in a namespace of their own that nothing copies (and vanish with
# it if the build is killed).  The script runs again in it; fd 3's stdout is given back first.  Where namespaces
# are not allowed, the build goes on without one: detach() below still refuses an unclean file system.
if [[ ${QINST_TEST_BUILD_NS:-} != "$key" ]] && unshare --mount --propagation private true 2>/dev/null; then
	exec 1>&3 3>&-
	QINST_TEST_BUILD_NS=$key exec unshare --mount --propagation private -- bash "$script_path" "$out"
fi

# ---- one builder per key; a second caller waits, then finds the cache ----
exec 9>"$out/.lock-$key"
if ! flock -n 9; then
	log "another build of $key is running; waiting for it"
	flock 9
fi
if hit=$(cached); then
	log "cached (built by another process): $hit"
	echo "$hit" >&3
	exit 0
fi
rm -rf "$out/.build-$key".* # leftovers of a killed build of this key (we hold its lock)

tmp=$(mktemp -d "$out/.build-$key.XXXXXX")
workers=()
kill_tree() { # stop a worker and everything it started (by process id), then terminate them
	local pid=$1 child
	kill -STOP "$pid" 2>/dev/null || return 0
	for child in $(pgrep -P "$pid"); do kill_tree "$child"; done
	kill -TERM "$pid" 2>/dev/null
	kill -CONT "$pid" 2>/dev/null
}
cleanup() {
	local rc=$? pid m f
	set +e
	for pid in "${workers[@]}"; do kill_tree "$pid"; done
	for pid in "${workers[@]}"; do wait "$pid" 2>/dev/null; done
	for m in "$tmp"/*/mnt; do
		if mountpoint -q "$m" 2>/dev/null; then
			umount -R "$m" 2>/dev/null || umount -R -l "$m"
		fi
	done
	for f in "$tmp"/*/*.raw; do
		[[ -e $f ]] && losetup --list --noheadings --output NAME --associated "$f" | xargs -r -n1 losetup -d
	done
	rm -rf "$tmp"
	((rc == 0)) || log "FAILED (exit $rc); nothing was cached"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t_start=$SECONDS
step() { log "[$((SECONDS - t_start))s] $*"; }

# Mirror: the host's own apt sources when they name a Debian archive (so builds use the same mirror or proxy
# as apt-get here), else deb.debian.org.
host_uris() {
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[[ -r $f ]] || continue
		sed -e 's/#.*//' "$f"
	done | awk '
		/^[[:space:]]*deb[[:space:]]/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }
		/^[[:space:]]*URIs:/ { for (i = 2; i <= NF; i++) print $i }'
}
uris=$(host_uris || true)
debian_mirror=${QINST_TEST_DEBIAN_MIRROR:-$(grep -m1 -E '/debian/?$' <<<"$uris" || true)}
debian_mirror=${debian_mirror:-http://deb.debian.org/debian}
security_mirror=${QINST_TEST_SECURITY_MIRROR:-$(grep -m1 -E '/debian-security/?$' <<<"$uris" || true)}
security_mirror=${security_mirror:-http://deb.debian.org/debian-security}
step "mirrors: $debian_mirror, $security_mirror; architectures: ${arches[*]}"

img_dir="$tmp/result/$IMAGE_DIR_REL"
mkdir -p "$img_dir"
offset=$((PART_START * 512))

# ---- one architecture's disk(s), from nothing to qcow2; runs in its own subshell (a worker) ----
# Its loop device, mount point and raw files live in $tmp/ARCH; cleanup() finds and releases them by path.
# It leaves its qcow2 files in $img_dir and what build-info.txt needs in $tmp/ARCH/info.
build_arch() {
	local arch=$1
	local dir="$tmp/$arch"
	local astep_prefix="[$arch]"
	astep() { step "$astep_prefix $*"; }
	mkdir "$dir"
	mnt="$dir/mnt"
	loop=
	local attached=
	attach() { # loop device for the partition of disk file $1: no partition nodes without udev, hence -o
		loop=$(losetup --find --show --offset "$offset" --sizelimit "$part_bytes" "$1")
		attached=$1
	}
	detach() {
		umount -R "$mnt"
		losetup -d "$loop"
		loop=
		# The last umount clears ext4's "needs recovery" flag (incompat bit 0x4; superblock at 1024, field 0x60).
		local incompat
		incompat=$(od -An -tu4 -j $((offset + 1024 + 0x60)) -N4 "$attached" | tr -d ' ')
		(((incompat & 4) == 0)) || die "$attached: the file system is still mounted somewhere (its journal is not clean)"
	}

	# ---- disk: MBR; an EFI system partition (type ef) at 1 MiB, then one bootable ext4 partition to the end ----
	# amd64: SeaBIOS runs the MBR code, which boots the active (root) partition with extlinux; OVMF finds the FAT
	# ESP (UEFI accepts an MBR partition of type 0xEF) and runs its removable-media path EFI/BOOT/BOOTX64.EFI.
	# arm64: UEFI only (AAVMF, the same EDK2 code): EFI/BOOT/BOOTAA64.EFI; no MBR code, no extlinux.
	local raw="$dir/disk.raw"
	truncate -s "$RAW_SIZE" "$raw"
	printf 'label: dos\nstart=%d, size=%d, type=ef\nstart=%d, type=83, bootable\n' \
		"$ESP_START" "$ESP_SECTORS" "$PART_START" | sfdisk -q "$raw"
	if [[ $arch == amd64 ]]; then
		dd if="$mbr_bin" of="$raw" bs=440 count=1 conv=notrunc status=none
	fi
	part_bytes=$(($(stat -c %s "$raw") - offset))

	attach "$raw"
	# No 64bit feature: extlinux reads the fs itself, and 32-bit block numbers are what it knows best (a 4 KiB-block
	# fs without it still grows to 16 TiB); arm64 keeps the same file system.  Inode tables initialised now, not
	# by a lazy kernel thread on first boot under TCG.
	mkfs.ext4 -q -L "$FS_LABEL" -O ^64bit -E lazy_itable_init=0,lazy_journal_init=0 "$loop"
	local fs_uuid
	fs_uuid=$(blkid -o value -s UUID "$loop")
	mkdir "$mnt"
	mount "$loop" "$mnt"
	rmdir "$mnt/lost+found" # mmdebstrap wants an empty target

	# ---- root filesystem ----
	# A foreign architecture's maintainer scripts (and dpkg itself) run under qemu-user via binfmt_misc, where
	# every process start costs about 0.1 s.  So three jobs that installing does piecemeal are done once, at the
	# end, with every package configured (the same files result; measured on arm64):
	#  - the initramfs: the kernel's postinst makes one, then initramfs-tools' trigger makes it again (2.5 min each
	#    under qemu-user).  INITRD=No stops the kernel's hook (/etc/kernel/postinst.d/initramfs-tools); the
	#    trigger then finds no initramfs to update.
	#  - Python byte-code: 25 postinsts run py3compile, one Python start-up after another (about 100 s); one
	#    py3compile run compiles the same 733 files in 10 s.
	#  - update-ca-certificates: ca-certificates' postinst and then its trigger rebuild /etc/ssl/certs (about 35 s
	#    each: a process per certificate and per link).
	# The last two are diverted (dpkg-divert) to a stub that does nothing while packages install, then restored.
	# And dpkg does not fsync every file it unpacks (force-unsafe-io, removed from the guest's dpkg.cfg.d below):
	# a third of an emulated unpack's time; a failed build leaves nothing cached anyway.
	# arm64's initramfs holds only the drivers of the disks a QEMU virt machine has (MODULES=list), not
	# MODULES=most's 222 modules: 45 s under qemu-user instead of 150, and 6 MB instead of 15.  ext4 and NVMe are
	# built into the cloud kernel.  amd64 keeps Debian's default, which costs seconds there.
	local initramfs_modules=()
	if [[ $arch == arm64 ]]; then
		initramfs_modules=(virtio_pci virtio_mmio virtio_blk virtio_scsi sd_mod)
	fi
	cat >"$dir/hook.sh" <<'HOOK'
#!/bin/sh
# mmdebstrap hooks, written by tests/images/build.sh: hook.sh essential|customize TARGET [INITRAMFS-MODULE...]
set -e
phase=$1 root=$2
shift 2
deferred="/usr/bin/py3compile /usr/sbin/update-ca-certificates"
case $phase in
essential)
	for f in $deferred; do
		chroot "$root" dpkg-divert --quiet --local --rename --divert "$f.qinst-build" --add "$f"
		printf '#!/bin/sh\n# qinst test image build: deferred to the end of the build\nexit 0\n' >"$root$f"
		chmod 755 "$root$f"
	done
	;;
customize)
	for f in $deferred; do
		rm -f "$root$f"
		chroot "$root" dpkg-divert --quiet --local --rename --remove "$f"
		[ -x "$root$f" ] || { echo "hook.sh: $f missing after its diversion" >&2; exit 1; }
	done
	chroot "$root" py3compile /usr/lib/python3/dist-packages /usr/share/python3
	chroot "$root" update-ca-certificates --fresh
	if [ $# -gt 0 ]; then
		printf '%s\n' "# qinst test image (tests/images/build.sh): the modules in /etc/initramfs-tools/modules only" \
			MODULES=list >"$root/etc/initramfs-tools/conf.d/qinst-test"
		printf '%s\n' "# qinst test image: the disk drivers of QEMU virt machines" "$@" >>"$root/etc/initramfs-tools/modules"
	fi
	chroot "$root" update-initramfs -c -k all
	;;
esac
HOOK
	local hook_sh
	hook_sh=$(printf '%q' "$dir/hook.sh")
	astep "mmdebstrap $SUITE ($arch) into the partition"
	INITRD=No mmdebstrap \
		--architectures="$arch" \
		--variant=minbase \
		--mode=root \
		--format=directory \
		--include="$(IFS=,; echo "linux-image-cloud-$arch,${PACKAGES[*]}")" \
		--aptopt='Acquire::Check-Valid-Until "false"' \
		--aptopt='Acquire::Languages "none"' \
		--aptopt='APT::Sandbox::User "root"' \
		--dpkgopt='path-exclude=/usr/share/man/*' \
		--dpkgopt='path-exclude=/usr/share/info/*' \
		--dpkgopt='path-exclude=/usr/share/doc/*' \
		--dpkgopt='path-include=/usr/share/doc/*/copyright' \
		--dpkgopt='path-exclude=/usr/share/locale/*' \
		--dpkgopt='force-unsafe-io' \
		--essential-hook="sh $hook_sh essential \"\$1\"" \
		--customize-hook="sh $hook_sh customize \"\$1\" ${initramfs_modules[*]}" \
		"$SUITE" "$mnt" \
		"deb $debian_mirror $SUITE main" \
		"deb $debian_mirror $SUITE-updates main" \
		"deb $security_mirror $SUITE-security main" \
		2>&1 | while IFS= read -r line; do printf '[mmdebstrap %(%H:%M:%S)T] [%s] %s\n' -1 "$arch" "$line"; done >&2
	if compgen -G "$mnt/usr/*bin/*.qinst-build" >/dev/null || ! compgen -G "$mnt/boot/initrd.img-*" >/dev/null; then
		die "the customize hook did not finish its work (a diversion is left, or there is no initramfs)"
	fi
	mklost+found "$mnt/lost+found" >/dev/null 2>&1 || mkdir -m 0700 "$mnt/lost+found"

	astep "configuring the guest"
	# Build-time apt and dpkg switches do not belong in the guest (its dpkg keeps the path excludes).
	rm -f "$mnt/etc/apt/apt.conf.d/99mmdebstrap"
	sed -i '/^force-unsafe-io$/d' "$mnt/etc/dpkg/dpkg.cfg.d/99mmdebstrap"

	cat >"$mnt/etc/cloud/cloud.cfg.d/99-qinst-test.cfg" <<'EOF'
# qinst test image (written by qinst's tests/images/build.sh).
# The seed is always a NoCloud (cidata) disk: never probe cloud metadata services.
datasource_list: [NoCloud, None]
# The hostname from meta-data resolves (sudo complains otherwise), as on Debian's cloud images.
manage_etc_hosts: true
# C.UTF-8 is built into glibc: no locale-gen, and update-locale accepts it (Debian's default en_US.UTF-8
# is not generated here and fails the locale module).
locale: C.UTF-8
# No RSA (about 5 s under TCG) nor DSA host keys: ed25519 and ECDSA are what ssh picks anyway.
ssh_genkeytypes: [ed25519, ecdsa]
# There is no GRUB in this image.
grub_dpkg:
  enabled: false
EOF

	cat >"$mnt/etc/fstab" <<EOF
UUID=$fs_uuid / ext4 rw,discard,errors=remount-ro 0 1
EOF

	echo localhost >"$mnt/etc/hostname"
	cat >"$mnt/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
	rm -f "$mnt/etc/resolv.conf"

	# ifupdown's own config only sources interfaces.d, where cloud-init writes 50-cloud-init.
	cat >"$mnt/etc/network/interfaces" <<'EOF'
# The loopback network interface; cloud-init writes the rest to interfaces.d/50-cloud-init.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
EOF
	mkdir -p "$mnt/etc/network/interfaces.d"

	# A guest whose DHCP gets no answer gives up after 20 s instead of dhclient's 60 s (ifup -a blocks the boot).
	sed -i -e '/^#\?timeout /d' "$mnt/etc/dhcp/dhclient.conf"
	echo 'timeout 20;' >>"$mnt/etc/dhcp/dhclient.conf"

	# No identity baked in: host keys are made by cloud-init at first boot (and printed to the console),
	# machine-id is empty (systemd makes one at first boot), root has no password and there is no user.
	rm -f "$mnt"/etc/ssh/ssh_host_*
	: >"$mnt/etc/machine-id"
	rm -f "$mnt/var/lib/dbus/machine-id"
	if grep -q '^root:[^*!:]' "$mnt/etc/shadow"; then
		die "root has a password in the built image"
	fi
	rm -rf "$mnt"/var/lib/cloud/* "$mnt"/var/log/*.log "$mnt"/var/log/apt/* "$mnt"/tmp/* "$mnt"/var/tmp/*

	shopt -s nullglob
	local kernels=("$mnt"/boot/vmlinuz-*)
	shopt -u nullglob
	((${#kernels[@]} == 1)) || die "expected one kernel in /boot, found ${#kernels[@]}"
	local kver=${kernels[0]##*/vmlinuz-}
	[[ -e "$mnt/boot/initrd.img-$kver" ]] || die "no initrd for kernel $kver"
	local console=${KERNEL_CONSOLE[$arch]}

	# ---- boot loader (amd64): syslinux MBR + extlinux on the partition, booted by SeaBIOS like any disk ----
	if [[ $arch == amd64 ]]; then
		mkdir -p "$mnt/boot/extlinux"
		cat >"$mnt/boot/extlinux/extlinux.conf" <<EOF
# Written by qinst's tests/images/build.sh.  The serial console (ttyS0) comes last so that it is /dev/console.
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
	LINUX /boot/vmlinuz-$kver
	INITRD /boot/initrd.img-$kver
	APPEND root=UUID=$fs_uuid ro $console
EOF
		extlinux --install "$mnt/boot/extlinux" 2>&1 | sed 's/^/extlinux: /' >&2
	fi
	# The UEFI path (both): systemd-boot on the ESP with one entry; it reads the kernel and initrd from the ESP
	# (FAT), so they are copied there.  Written with mtools into a FAT image, then placed at the ESP's offset.
	local efi_arch=${EFI_ARCH[$arch]}
	local efi_stub="$mnt/usr/lib/systemd/boot/efi/systemd-boot$efi_arch.efi"
	[[ -r $efi_stub ]] || die "no $efi_stub in the image (package systemd-boot-efi)"
	local esp="$dir/esp.img"
	truncate -s $((ESP_SECTORS * 512)) "$esp"
	mkfs.vfat -F 32 -n QINST-ESP "$esp" >/dev/null
	export MTOOLS_SKIP_CHECK=1
	mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/debian
	mcopy -i "$esp" "$efi_stub" "::/EFI/BOOT/BOOT${efi_arch^^}.EFI"
	mcopy -i "$esp" "$mnt/boot/vmlinuz-$kver" ::/debian/vmlinuz
	mcopy -i "$esp" "$mnt/boot/initrd.img-$kver" ::/debian/initrd.img
	printf 'default debian.conf\ntimeout 0\n' >"$dir/loader.conf"
	printf 'title Debian (qinst test image)\nlinux /debian/vmlinuz\ninitrd /debian/initrd.img\noptions root=UUID=%s ro %s\n' \
		"$fs_uuid" "$console" >"$dir/debian.conf"
	mcopy -i "$esp" "$dir/loader.conf" ::/loader/loader.conf
	mcopy -i "$esp" "$dir/debian.conf" ::/loader/entries/debian.conf
	if [[ $arch == amd64 ]]; then
		# extlinux learns the partition's start sector ("hidden sectors", offset 0x1c of the boot sector) from the
		# block device; a loop device with an offset says 0.  Write the real value, as an install on /dev/sda1 would.
		printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((PART_START & 255)) $(((PART_START >> 8) & 255)) \
			$(((PART_START >> 16) & 255)) $(((PART_START >> 24) & 255)))" |
			dd of="$loop" bs=1 seek=28 count=4 conv=notrunc status=none
	fi
	sync
	fstrim "$mnt" >/dev/null 2>&1 || true # freed blocks (apt's downloads) become holes in the raw file
	local du_root
	du_root=$(df -h --output=used "$mnt" | tail -1 | tr -d ' ')
	detach
	dd if="$esp" of="$raw" bs=512 seek="$ESP_START" conv=notrunc,sparse status=none
	rm -f "$esp"
	local loaders="ESP with systemd-boot"
	[[ $arch == amd64 ]] && loaders="extlinux; $loaders"
	astep "root filesystem: $du_root used, kernel $kver; $loaders"

	# ---- images ----
	# Compressed qcow2, like Debian's own images: a third of the size (about 150 MB instead of 470 MB) to serve,
	# hash and cache, for well under a second of host CPU to inflate what a boot reads.
	local pids=() f rc=0
	if [[ $arch == amd64 ]]; then
		astep "broken variant: a copy of the disk with cloud-init disabled"
		local raw_broken="$dir/disk-broken.raw"
		cp --sparse=always "$raw" "$raw_broken"
		attach "$raw_broken"
		mount "$loop" "$mnt"
		touch "$mnt/etc/cloud/cloud-init.disabled"
		detach
		astep "qemu-img convert -c (both images at once)"
		qemu-img convert -c -O qcow2 "$raw" "$img_dir/$GOOD_NAME" & pids+=($!)
		qemu-img convert -c -O qcow2 "$raw_broken" "$img_dir/$BROKEN_NAME" & pids+=($!)
	else
		astep "qemu-img convert -c"
		qemu-img convert -c -O qcow2 "$raw" "$img_dir/$(image_files "$arch")" & pids+=($!)
	fi
	for f in "${pids[@]}"; do wait "$f" || rc=1; done
	((rc == 0)) || die "qemu-img convert failed ($arch)"
	rm -f "$dir"/*.raw

	cat >"$dir/info" <<EOF
kernel=$kver
kernel_cmdline=root=UUID=$fs_uuid ro $console
root_fs_uuid=$fs_uuid
build_seconds=$((SECONDS - t_start))
EOF
	astep "done"
}

# The architectures are built side by side: arm64's emulated dpkg run is one busy core for minutes, amd64's
# build fits in beside it.
for a in "${arches[@]}"; do
	build_arch "$a" &
	workers+=($!)
done
for i in "${!workers[@]}"; do
	wait "${workers[$i]}" || die "the ${arches[$i]} build failed"
done
workers=()

(cd "$img_dir" && for a in "${arches[@]}"; do sha512sum $(image_files "$a"); done >SHA512SUMS)
sum_of() { awk -v f="$1" '$2 == f { print $1 }' "$img_dir/SHA512SUMS"; }

catalog_entry() { # NAME TITLE ARCH FILE
	cat <<EOF
[images.$1]
title = "$2"
aliases = []
os = "debian"
release = "12"
arch = "$3"
format = "qcow2"
url = "$UPSTREAM_DIR/$4"
digest = "sha512:$(sum_of "$4")"
latest_url = "$UPSTREAM_DIR/$4"
checksums_url = "$UPSTREAM_DIR/SHA512SUMS"
default_user = "debian"
EOF
}
{
	cat <<EOF
# qinst catalog for the project's test image, written by tests/images/build.sh (key $key).
# Serve the mirror/ folder beside this file over HTTP and pass --mirror http://127.0.0.1:PORT.
EOF
	if has_arch amd64; then
		echo
		catalog_entry qinst-test "qinst test image (Debian 12, cloud kernel)" x86_64 "$GOOD_NAME"
		echo
		catalog_entry qinst-test-broken "qinst test image, broken: cloud-init disabled (Debian 12, cloud kernel)" \
			x86_64 "$BROKEN_NAME"
	fi
	if has_arch arm64; then
		if has_arch amd64; then # qinst-test names both builds, as the built-in entries do: --arch picks one
			echo
			echo "[images.qinst-test.aarch64]"
			echo "url = \"$UPSTREAM_DIR/$ARM64_NAME\""
			echo "digest = \"sha512:$(sum_of "$ARM64_NAME")\""
			echo "latest_url = \"$UPSTREAM_DIR/$ARM64_NAME\""
		fi
		echo # and an entry of the arm64 build alone (an arm64-only catalog entry: --arch is not needed)
		catalog_entry qinst-test-arm64 "qinst test image for arm64, UEFI only (Debian 12, cloud kernel)" \
			aarch64 "$ARM64_NAME"
	fi
} >"$tmp/result/catalog.toml"

# images.json: every image file, machine-readable (see README.md).
json_entry() { # CATALOG-NAME ARCH FILE BROKEN
	local arch=$2 file=$3 info="$tmp/$2/info"
	local kver cmdline
	kver=$(sed -n 's/^kernel=//p' "$info")
	cmdline=$(sed -n 's/^kernel_cmdline=//p' "$info")
	local fw=${FIRMWARE[$arch]}
	printf '    {"name": "%s", "arch": "%s", "debian_arch": "%s", "broken": %s, "file": "%s", "path": "%s", "url": "%s", "format": "qcow2", "sha512": "%s", "size": %d, "virtual_size": %d, "firmware": [%s], "kernel": "%s", "kernel_cmdline": "%s"}' \
		"$1" "${QEMU_ARCH[$arch]}" "$arch" "$4" "$file" "$IMAGE_DIR_REL/$file" "$UPSTREAM_DIR/$file" "$(sum_of "$file")" \
		"$(stat -c %s "$img_dir/$file")" "$(numfmt --from=iec "$RAW_SIZE")" "$(printf '"%s", ' $fw | sed 's/, $//')" \
		"$kver" "$cmdline"
}
{
	printf '{\n  "key": "%s",\n  "suite": "%s",\n  "checksums": "%s",\n  "images": [\n' \
		"$key" "$SUITE" "$IMAGE_DIR_REL/SHA512SUMS"
	entries=()
	if has_arch amd64; then
		entries+=("$(json_entry qinst-test amd64 "$GOOD_NAME" false)")
		entries+=("$(json_entry qinst-test-broken amd64 "$BROKEN_NAME" true)")
	fi
	if has_arch arm64; then
		entries+=("$(json_entry qinst-test-arm64 arm64 "$ARM64_NAME" false)")
	fi
	(IFS=$'\n'; sed '$!s/$/,/' <<<"${entries[*]}")
	printf '  ]\n}\n'
} >"$tmp/result/images.json"

{
	echo "key=$key"
	echo "suite=$SUITE"
	if has_arch amd64; then # the amd64 lines keep their names; other architectures' lines end in _ARCH
		grep -E '^(kernel|kernel_cmdline|root_fs_uuid)=' "$tmp/amd64/info"
	fi
	echo "debian_mirror=$debian_mirror"
	echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "build_seconds=$((SECONDS - t_start))"
	echo "architectures=${arches[*]}"
	for a in "${arches[@]}"; do
		[[ $a == amd64 ]] && continue
		sed "s/=/_$a=/" "$tmp/$a/info"
	done
	if has_arch amd64; then
		sed -n 's/^build_seconds=/build_seconds_amd64=/p' "$tmp/amd64/info"
	fi
} >"$tmp/result/build-info.txt"

chmod -R a+rX "$tmp/result"
rm -rf "$final" # an incomplete leftover (we hold the lock)
mv -T "$tmp/result" "$final"
for a in "${arches[@]}"; do
	for f in $(image_files "$a"); do
		step "done: $(du -h --apparent-size "$final/$IMAGE_DIR_REL/$f" | cut -f1) $f"
	done
done
step "done: $final"
echo "$final" >&3

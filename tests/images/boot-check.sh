#!/bin/bash
# Boot an image built by build.sh directly with QEMU (TCG) and check what qinst relies on: the boot on the
# serial console, cloud-init's SSH host key block and final line, SSH login verified against the console's
# host keys, `cloud-init status`, hostname, runcmd, root fs grown.  A manual proof and debugging aid; qinst's
# own tests go through libvirt instead.  Never reaches anything but 127.0.0.1 (user-mode net, restrict=on).
#
# Usage: tests/images/boot-check.sh IMAGE.qcow2 [--arch x86_64|aarch64] [--machine pc|q35|virt] [--cpu MODEL]
#                                   [--seed-bus virtio|ide] [--no-nic] [--expect-broken] [--timeout SECONDS]
#                                   [--port PORT] [--keep DIR]
# --arch aarch64 boots an arm64 image on QEMU's "virt" machine with AAVMF (UEFI; the code read-only, a copy of the
# variables store), the console on the PL011 (ttyAMA0); its default --cpu is cortex-a72 (see README.md), x86_64's
# is max.
# Needs: qemu-system-x86 (qemu-system-arm and qemu-efi-aarch64 for aarch64) qemu-utils cloud-image-utils
# openssh-client.  Exit 0 when every check passed.
set -euo pipefail

image=
arch=x86_64
machine=
cpu=
seed_bus=virtio
nic=1
expect_broken=0
timeout=
port=
keep=
while (($#)); do
	case $1 in
	--arch) arch=$2; shift 2 ;;
	--machine) machine=$2; shift 2 ;;
	--cpu) cpu=$2; shift 2 ;;
	--seed-bus) seed_bus=$2; shift 2 ;;
	--no-nic) nic=0; shift ;;
	--expect-broken) expect_broken=1; shift ;;
	--timeout) timeout=$2; shift 2 ;;
	--port) port=$2; shift 2 ;;
	--keep) keep=$2; shift 2 ;;
	-*) echo "unknown option $1" >&2; exit 2 ;;
	*) image=$(readlink -f "$1"); shift ;;
	esac
done
[[ -f $image ]] || { echo "usage: $0 IMAGE.qcow2 [options] (see the script's header)" >&2; exit 2; }
case $arch in
x86_64 | amd64)
	arch=x86_64
	machine=${machine:-pc}
	cpu=${cpu:-max}
	timeout=${timeout:-240}
	[[ $machine == pc || $machine == q35 ]] || { echo "x86_64: --machine pc or q35" >&2; exit 2; }
	;;
aarch64 | arm64)
	arch=aarch64
	machine=${machine:-virt}
	cpu=${cpu:-cortex-a72}
	timeout=${timeout:-600} # TCG emulating another architecture: several times slower than x86_64 on x86_64
	[[ $machine == virt ]] || { echo "aarch64: --machine virt" >&2; exit 2; }
	[[ $seed_bus == virtio ]] || { echo "aarch64: the virt machine has no IDE bus; --seed-bus virtio" >&2; exit 2; }
	aavmf_code=/usr/share/AAVMF/AAVMF_CODE.fd
	aavmf_vars=/usr/share/AAVMF/AAVMF_VARS.fd
	for f in "$aavmf_code" "$aavmf_vars"; do
		[[ -r $f ]] || { echo "missing $f (package qemu-efi-aarch64)" >&2; exit 2; }
	done
	;;
*) echo "unknown --arch $arch (x86_64, aarch64)" >&2; exit 2 ;;
esac
for tool in "qemu-system-$arch" qemu-img cloud-localds ssh ssh-keygen; do
	command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
if [[ $seed_bus == ide && $machine == q35 ]]; then
	echo "q35 has no IDE bus (its CD-ROM would be SATA/AHCI, which Debian's cloud kernel lacks)" >&2
	exit 2
fi
if [[ -z $port ]]; then
	port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

work=${keep:-$(mktemp -d)}
mkdir -p "$work"
qemu_pid=
cleanup() {
	local rc=$?
	if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
		kill "$qemu_pid"
		for _ in $(seq 50); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$qemu_pid" 2>/dev/null || true
	fi
	[[ -n $keep ]] || rm -rf "$work"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fails=0
ok() { printf 'PASS %s\n' "$*"; }
bad() { printf 'FAIL %s\n' "$*"; fails=$((fails + 1)); }
now() { date +%s.%N; }
clk_tck=$(getconf CLK_TCK)
qemu_cpu() { # CPU seconds QEMU has used so far (user + system, all threads): what the boot costs, whatever the load
	awk -v t="$clk_tck" '{ sub(/^.*\) /, ""); printf "%.1f", ($12 + $13) / t }' "/proc/$qemu_pid/stat" 2>/dev/null || echo -
}
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

host=qinst-check-$RANDOM
ssh-keygen -q -t ed25519 -N '' -C qinst-boot-check -f "$work/id"
cat >"$work/user-data" <<EOF
#cloud-config
users:
  - name: debian
    sudo: ALL=(ALL) NOPASSWD:ALL
    shell: /bin/bash
    ssh_authorized_keys:
      - $(cat "$work/id.pub")
runcmd:
  - [touch, /var/tmp/qinst-runcmd-marker]
EOF
printf 'instance-id: iid-%s\nlocal-hostname: %s\n' "$host" "$host" >"$work/meta-data"
cloud-localds "$work/seed.iso" "$work/user-data" "$work/meta-data"
qemu-img create -q -f qcow2 -F qcow2 -b "$image" "$work/disk.qcow2" 4G

args=(
	-machine "$machine" -accel tcg -cpu "$cpu" -smp 2 -m 1024
	-nodefaults -display none -no-user-config
	-serial "file:$work/console.log"
)
if [[ $arch == aarch64 ]]; then
	# UEFI only: AAVMF's code read-only, a private copy of its variables store (both 64 MiB pflash units).
	cp "$aavmf_vars" "$work/AAVMF_VARS.fd"
	args+=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$aavmf_code"
		-drive "if=pflash,format=raw,unit=1,file=$work/AAVMF_VARS.fd")
fi
args+=(-drive "file=$work/disk.qcow2,if=virtio,format=qcow2")
case $seed_bus in
virtio) args+=(-drive "file=$work/seed.iso,if=virtio,format=raw,readonly=on") ;;
ide) args+=(-drive "file=$work/seed.iso,if=ide,media=cdrom,format=raw,readonly=on") ;;
*) echo "unknown seed bus $seed_bus" >&2; exit 2 ;;
esac
if ((nic)); then
	args+=(-netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=n0)
fi

echo "booting $image: arch=$arch machine=$machine cpu=$cpu seed=$seed_bus nic=$nic port=$port work=$work"
t0=$(now)
"qemu-system-$arch" "${args[@]}" >"$work/qemu.log" 2>&1 &
qemu_pid=$!

console="$work/console.log"
t_kernel= t_keys= t_final= t_login= cpu_final=
deadline=$(($(date +%s) + timeout))
while (($(date +%s) < deadline)); do
	kill -0 "$qemu_pid" 2>/dev/null || { bad "QEMU exited: $(cat "$work/qemu.log")"; break; }
	if [[ -z $t_kernel ]] && grep -q 'Linux version' "$console" 2>/dev/null; then t_kernel=$(since "$t0"); fi
	if [[ -z $t_keys ]] && grep -q -- '-----END SSH HOST KEY KEYS-----' "$console" 2>/dev/null; then t_keys=$(since "$t0"); fi
	if [[ -z $t_login ]] && grep -qE "^$host login:|login: " "$console" 2>/dev/null; then t_login=$(since "$t0"); fi
	if grep -qE 'Cloud-init v\. .* finished at' "$console" 2>/dev/null; then t_final=$(since "$t0"); cpu_final=$(qemu_cpu); break; fi
	if grep -qE 'Kernel panic' "$console" 2>/dev/null; then bad "kernel panic"; break; fi
	# The broken variant never finishes: stop once it shows a login prompt and has had time to run.
	if ((expect_broken)) && [[ -n $t_login ]] && (($(date +%s) > ${t_login%.*} + ${t0%.*} + 20)); then break; fi
	sleep 0.5
done
echo "timings (s from QEMU start): kernel=${t_kernel:--} host-keys=${t_keys:--} login-prompt=${t_login:--} cloud-init-finished=${t_final:--} (QEMU CPU time then: ${cpu_final:--} s; load $(cut -d' ' -f1-3 /proc/loadavg))"

[[ -n $t_kernel ]] && ok "kernel booted: $(grep -m1 -a -i 'command line:' "$console" | tr -d '\r')" || bad "no kernel on the console"
if ((expect_broken)); then
	[[ -z $t_final ]] && ok "no cloud-init finished line (expected for the broken image)" || bad "cloud-init finished on the broken image"
	[[ -z $t_keys ]] && ok "no SSH host key block" || bad "host key block on the broken image"
	[[ -n $t_login ]] && ok "the guest reached a login prompt at ${t_login}s" || bad "no login prompt"
	((fails == 0)) && echo "ALL PASSED" || echo "$fails FAILED"
	((fails == 0))
	exit
fi
[[ -n $t_final ]] && ok "$(grep -m1 -aoE 'Cloud-init v\. .* finished at .*' "$console" | tr -d '\r')" || bad "no cloud-init finished line within ${timeout}s"
if [[ -n $t_keys ]]; then
	sed -n '/-----BEGIN SSH HOST KEY KEYS-----/,/-----END SSH HOST KEY KEYS-----/p' "$console" | tr -d '\r' |
		grep -v -- '-----' | awk -v h="[127.0.0.1]:$port" 'NF >= 2 { print h, $1, $2 }' >"$work/known_hosts"
	ok "host key block: $(awk '{print $2}' "$work/known_hosts" | paste -sd' ')"
else
	bad "no SSH host key block on the console"
fi
((nic)) || { ((fails == 0)) && echo "ALL PASSED (no NIC: SSH not checked)" || echo "$fails FAILED"; ((fails == 0)); exit; }

ssh_cmd=(ssh -i "$work/id" -p "$port" -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$work/known_hosts"
	-o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR debian@127.0.0.1)
t_ssh0=$(now)
out=
for _ in $(seq 30); do
	if out=$("${ssh_cmd[@]}" 'hostname; cloud-init status; test -e /var/tmp/qinst-runcmd-marker && echo marker-ok; df -B1 --output=size / | tail -1; cat /var/lib/cloud/data/instance-id; echo "arch=$(uname -m)"; echo "console=$(cat /sys/class/tty/console/active)"; test -d /sys/firmware/efi && echo firmware=uefi || echo firmware=bios' 2>&1); then
		break
	fi
	sleep 1
done
echo "$out" | sed 's/^/  guest: /'
grep -q '^status: done' <<<"$out" && ok "ssh with the console's host key works (after $(since "$t_ssh0")s); cloud-init status: done" || bad "ssh / cloud-init status: $out"
grep -qx "$host" <<<"$out" && ok "hostname is $host" || bad "hostname is not $host"
grep -qx marker-ok <<<"$out" && ok "runcmd ran" || bad "runcmd marker missing"
size=$(sed -n 4p <<<"$out")
[[ $size =~ ^[0-9]+$ ]] && ((size > 3 * 1024 * 1024 * 1024)) && ok "root fs grown to $size bytes (disk 4 GiB, image 2 GiB)" || bad "root fs not grown ($size)"
grep -qx "iid-$host" <<<"$out" && ok "instance-id iid-$host" || bad "instance-id"
grep -qx "arch=$arch" <<<"$out" && ok "uname -m is $arch" || bad "uname -m is not $arch: $(grep '^arch=' <<<"$out")"
serial=ttyS0
[[ $arch == aarch64 ]] && serial=ttyAMA0
# /dev/console is the last console= (the active list ends with it): cloud-init's output reaches the serial log.
[[ $(grep '^console=' <<<"$out") == *" $serial" || $(grep '^console=' <<<"$out") == "console=$serial" ]] &&
	ok "/dev/console is $serial ($(grep '^console=' <<<"$out"))" || bad "/dev/console is not $serial: $(grep '^console=' <<<"$out")"
if [[ $arch == aarch64 ]]; then
	grep -qx firmware=uefi <<<"$out" && ok "booted by UEFI (/sys/firmware/efi)" || bad "no /sys/firmware/efi on aarch64"
fi
((fails == 0)) && echo "ALL PASSED" || echo "$fails FAILED"
((fails == 0))

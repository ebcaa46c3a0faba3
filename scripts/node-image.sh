#!/usr/bin/env bash
# Builds the node image: a kernel and an initramfs whose PID 1 is the node agent
# (`node-agent init`: loads the KVM and virtio modules, configures the first ethernet
# interface from the kernel command line, mounts the state disk (formatted ext4 on first
# boot) and runs the agent with its TCP API).
#
#   scripts/node-image.sh OUT_DIR        -> OUT_DIR/vmlinuz, OUT_DIR/initramfs.cpio
#
# Inputs: the host's Debian cloud kernel (newest /boot/vmlinuz-*-cloud-amd64, or NODE_KERNEL)
# and its modules; release builds of node-agent and of the vmm (static-pie, as shipped:
# scripts/build-vmm.sh); guest-init and the guest kernel (guest-kernels/build-init.sh,
# build-kernel.sh, both cached); mkfs.ext4 and blkid with their libraries; a demo workload
# image (busybox root packed as an flist with a dir:// store under /usr/share/gridnode/demo,
# allowlisted in the vmm's node configuration).
#
# The image's layout:
#   /init                              node-agent (PID 1 runs `node-agent init`)
#   /usr/bin/vmm                       the micro-VM monitor
#   /usr/lib/gridnode/{vmlinux,initrd.cpio}   guest kernel, guest-init initramfs
#   /usr/lib/gridnode/modules/NN-*.ko  host modules, loaded in name order
#   /etc/gridnode/{agent.json,node.json}      agent and vmm configuration
#   /usr/share/gridnode/demo/{root.flist,store}  demo workload image
#
# Boot it on a laptop with KVM (state.img: any raw file, e.g. `truncate -s 4G state.img`;
# the API is then on localhost:7070):
#   qemu-system-x86_64 -enable-kvm -cpu host -m 4096 -smp 2 -nographic \
#     -kernel OUT_DIR/vmlinuz -initrd OUT_DIR/initramfs.cpio \
#     -append "console=ttyS0 gridnode.state=/dev/vda gridnode.ip=10.0.2.15/24,gw=10.0.2.2" \
#     -drive file=state.img,if=virtio,format=raw \
#     -nic user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:7070-10.0.2.15:7070
# then, from the host:
#   node-agent keygen --out me.key
#   node-agent twin register --key me.key --registrar http://127.0.0.1:7070/registrar
#   node-agent deploy d.json --key me.key --agent http://127.0.0.1:7070
# (d.json: a deployment whose VM image is /usr/share/gridnode/demo/root.flist.)
set -euo pipefail

die() { echo "node-image: error: $*" >&2; exit 1; }
log() { echo "node-image: $*" >&2; }

[[ $# -eq 1 ]] || die "usage: $0 OUT_DIR"
out="$1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ws="$(cd "$here/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$ws/target}"
for tool in cargo cpio modprobe ldd busybox mkfs.ext4 blkid; do
    command -v "$tool" >/dev/null || die "'$tool' not found (apt packages: cpio kmod busybox-static e2fsprogs util-linux)"
done

# The host kernel and its modules.
kernel="${NODE_KERNEL:-$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1)}"
[[ -n "$kernel" && -r "$kernel" ]] || die "no readable kernel (apt-get install linux-image-cloud-amd64, or set NODE_KERNEL)"
release="${kernel##*/vmlinuz-}"
[[ -f "/lib/modules/$release/modules.dep" ]] || die "no modules for $release in /lib/modules"

log "building vmm (release, static-pie), node-agent and flist (release)"
(cd "$ws" && cargo build --release -p node-agent -p flist-fs \
    --bin node-agent --bin flist --target-dir "$target_dir" >&2)
vmm="$(CARGO_TARGET_DIR="$target_dir" bash "$ws/scripts/build-vmm.sh" | tail -n1)"
agent="$target_dir/release/node-agent"
flist="$target_dir/release/flist"
guest_init="$(bash "$ws/guest-kernels/build-init.sh" | tail -n1)"
guest_kernel="$(bash "$ws/guest-kernels/build-kernel.sh" | tail -n1)/vmlinux"
[[ -f "$guest_kernel" ]] || die "guest kernel $guest_kernel missing"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
mkdir -p "$root"/{dev,proc,sys,run,tmp,var/lib/gridnode,usr/bin,usr/sbin,etc/gridnode} \
         "$root"/usr/lib/gridnode/modules "$root"/usr/share/gridnode/demo

# Copies a program and the shared libraries it needs (at the same paths).
add_program() {
    local src="$1" dst="$2" lib
    install -m 0755 "$src" "$root$dst"
    for lib in $(ldd "$src" | grep -o '/[^ ]*' || true); do
        [[ -e "$root$lib" ]] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
add_program "$agent" /init
ln -s /init "$root/usr/bin/node-agent"
add_program "$vmm" /usr/bin/vmm
add_program "$(command -v mkfs.ext4)" /usr/sbin/mkfs.ext4
add_program "$(command -v blkid)" /usr/sbin/blkid

# Host modules in load order (dependencies first), decompressed: KVM for the micro-VMs,
# virtio for the state disk and the NIC. A module built into this kernel is skipped.
log "modules of $release"
n=0
declare -A seen=()
for want in kvm_amd kvm_intel virtio_pci virtio_blk virtio_net; do
    while read -r verb path _; do
        [[ "$verb" == insmod ]] || continue
        name="$(basename "$path")"; name="${name%%.ko*}"; name="${name//-/_}"
        [[ -n "${seen[$name]:-}" ]] && continue
        seen[$name]=1
        dst="$root/usr/lib/gridnode/modules/$(printf '%02d' "$n")-$name.ko"
        case "$path" in
            *.xz) xz -dc "$path" > "$dst" ;;
            *.zst) zstd -qdc "$path" > "$dst" ;;
            *.gz) gzip -dc "$path" > "$dst" ;;
            *) cp "$path" "$dst" ;;
        esac
        n=$((n + 1))
    done < <(modprobe --show-depends -S "$release" "$want")
done
log "$n modules"

# The guest side: kernel and a guest-init initramfs (guest-init as /init, busybox /bin/sh).
cp "$guest_kernel" "$root/usr/lib/gridnode/vmlinux"
groot="$stage/guest"
mkdir -p "$groot"/{dev,proc,sys,tmp,run,usr/bin,sbin,bin}
install -m 0755 "$guest_init" "$groot/init"
install -m 0755 "$(command -v busybox)" "$groot/bin/busybox"
ln -s busybox "$groot/bin/sh"
(cd "$groot" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
    > "$root/usr/lib/gridnode/initrd.cpio"

# The demo workload image: a busybox root packed as an flist into a dir:// store.
drootfs="$stage/demo-rootfs"
mkdir -p "$drootfs"/{bin,etc,proc,dev,tmp,sys,run,data}
install -m 0755 "$(command -v busybox)" "$drootfs/bin/busybox"
for a in sh cat echo sleep ls sync uname nproc; do ln -s busybox "$drootfs/bin/$a"; done
echo "an flist root" > "$drootfs/etc/motd"
demo=/usr/share/gridnode/demo
"$flist" pack "$drootfs" -o "$root$demo/root.flist" --store "dir://$root$demo/store" >/dev/null
# The image records its store by the path inside the node image, which the vmm's node
# configuration allowlists.
"$flist" set-stores --store "dir://$demo/store" "$root$demo/root.flist" >/dev/null
cat > "$root/etc/gridnode/node.json" <<EOF
{"image_cache": "/var/lib/gridnode/image-cache", "stores": ["dir://$demo/store"]}
EOF
chmod 0600 "$root/etc/gridnode/node.json"
cat > "$root/etc/gridnode/agent.json" <<'EOF'
{"state_dir": "/var/lib/gridnode", "registrar": "local", "tcp_registrar": true,
 "vmm": {"bin": "/usr/bin/vmm", "kernel": "/usr/lib/gridnode/vmlinux",
         "initrd": "/usr/lib/gridnode/initrd.cpio", "node_config": "/etc/gridnode/node.json"}}
EOF

mkdir -p "$out"
cp "$kernel" "$out/vmlinuz"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
    > "$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
log "kernel $release, initramfs $(du -h "$out/initramfs.cpio" | cut -f1)"
echo "$out"

#!/usr/bin/env bash
# Builds the weft test guest: a Debian 12 cloud kernel and a busybox initramfs.
#
#   build-guest.sh OUT_DIR      build OUT_DIR/{vmlinuz,initramfs.img,manifest.txt}
#   build-guest.sh --resolve    print the exact packages (name=version) a build would use
#
# Packages come from the machine's apt sources (`apt-get download`, no install):
#   - the kernel: the package that `linux-image-cloud-amd64` depends on right now
#     (override with WEFT_GUEST_KERNEL_PKG=linux-image-6.1.0-NN-cloud-amd64);
#   - busybox-static;
#   - Debian's sqlite3 CLI (`sqlite3`) and the packages of the shared libraries it loads
#     (`libsqlite3-0 libreadline8 libtinfo6 zlib1g libc6`): /usr/bin/sqlite3 gets exactly
#     the libraries its ELF `NEEDED` entries name, transitively, plus the loader, so tests
#     can run a real application that was not built with weft.
# Debian's mirror only serves the current kernel ABI, so "pinned" means: the exact
# name=version is resolved once, recorded in OUT_DIR/manifest.txt, and is part of the
# cache key the Rust harness computes (it runs `--resolve`). A new kernel upload gives a new key.
#
# Env: WEFT_GUEST_KERNEL_PKG (kernel package), WEFT_GUEST_MODULES (space-separated module
# load list, default below). Needs: apt-get, apt-cache, dpkg, cpio, gzip, readelf (binutils)
# (xz/zstd only if the kernel ships compressed modules). The init script is the file `init` next to this script.
#
# The guest also gets static binaries built from this workspace with cargo
# (`-C target-feature=+crt-static -C strip=symbols`, `--target x86_64-unknown-linux-gnu`, release, in their own
# target directory `$CARGO_TARGET_DIR/guest-build`, default `target/guest-build`, so the
# flags never mix with the host build and a running `cargo test` never holds its lock):
# `/usr/bin/weft-dpa` (guest-dpa), `/usr/bin/weft-dpa-workload` and `/usr/bin/weft-blkread`
# (integration/dpa-workload).
# `--resolve` prints a hash of their sources and of Cargo.lock (`dpa-sources=...`), so a change
# to them gives a new cache key.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORKSPACE="$(cd "$HERE/../.." && pwd)"
# The sqlite3 CLI and the packages holding what it links against.
SQLITE_PKGS="sqlite3 libsqlite3-0 libreadline8 libtinfo6 zlib1g libc6"
MODULES="${WEFT_GUEST_MODULES:-virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_net vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport virtio_balloon af_packet}"

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

# Candidate version of a package, empty if apt does not know it.
candidate() {
    apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n 's/^Version: //p' | head -n1
}

# field INFO PACKAGE FIELD: a field of one package's stanza in `apt-cache show` output.
field() {
    awk -v p="$2" -v f="$3:" '
        $1 == "Package:" { cur = $2 }
        cur == p && $1 == f { sub("^" f " *", ""); print; exit }' <<<"$1"
}

# Prints "kernel=<pkg>=<ver>", "busybox=busybox-static=<ver>" and "sqlite=<pkg>=<ver>" per
# package of SQLITE_PKGS.
# One apt-cache call in the common case: every test process runs this to compute the cache key.
resolve_once() {
    local info kpkg kver bver dep p v
    if [ -n "${WEFT_GUEST_KERNEL_PKG:-}" ]; then
        kpkg="$WEFT_GUEST_KERNEL_PKG"
        # shellcheck disable=SC2086 # the list is split on purpose
        info="$(apt-cache show --no-all-versions "$kpkg" busybox-static $SQLITE_PKGS 2>/dev/null)" || return 1
        kver="$(field "$info" "$kpkg" Version)"
    else
        # shellcheck disable=SC2086
        info="$(apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static $SQLITE_PKGS 2>/dev/null)" || return 1
        # e.g. "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
        dep="$(field "$info" linux-image-cloud-amd64 Depends)"
        kpkg="$(sed -n 's/^\(linux-image-6\.1\.0-[^ ,]*-cloud-amd64\).*/\1/p' <<<"$dep")"
        kver="$(sed -n 's/^[^ ,]* (= \([^)]*\)).*/\1/p' <<<"$dep")"
        [ -n "$kpkg" ] || return 1
        [ -n "$kver" ] || kver="$(candidate "$kpkg")"
    fi
    bver="$(field "$info" busybox-static Version)"
    [ -n "$kver" ] && [ -n "$bver" ] || return 1
    echo "kernel=$kpkg=$kver"
    echo "busybox=busybox-static=$bver"
    for p in $SQLITE_PKGS; do
        v="$(field "$info" "$p" Version)"
        [ -n "$v" ] || return 1
        echo "sqlite=$p=$v"
    done
    echo "dpa-sources=$(dpa_sources_hash)"
}

# Hash of everything the guest's Rust binaries are built from (their crates and Cargo.lock).
dpa_sources_hash() {
    (
        cd "$WORKSPACE"
        find guest-dpa integration/dpa-workload -type f \( -name '*.rs' -o -name Cargo.toml \) \
            -not -path '*/target/*' -not -path '*/tests/*' | LC_ALL=C sort
        echo Cargo.lock
    ) | (cd "$WORKSPACE" && xargs sha256sum) | sha256sum | cut -c1-16
}

# Builds the guest's static binaries; prints the directory holding them.
build_guest_binaries() {
    command -v cargo >/dev/null || die "cargo not found: the guest's weft-dpa and weft-dpa-workload are built from this workspace"
    local tdir="${CARGO_TARGET_DIR:-target}"
    case "$tdir" in /*) ;; *) tdir="$WORKSPACE/$tdir" ;; esac
    tdir="$tdir/guest-build"
    log "building static weft-dpa and weft-dpa-workload (cargo, target dir $tdir)"
    (
        cd "$WORKSPACE"
        RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" CARGO_TARGET_DIR="$tdir" \
            cargo build -q --release --target x86_64-unknown-linux-gnu -p weft-dpa -p weft-dpa-workload
    ) >&2 || die "cargo build of the guest binaries failed"
    echo "$tdir/x86_64-unknown-linux-gnu/release"
}

resolve() {
    if resolve_once; then return; fi
    if [ "$(id -u)" = 0 ]; then
        log "apt lists do not know the guest packages; running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        resolve_once && return
    fi
    die "cannot resolve the guest kernel (linux-image-cloud-amd64 -> linux-image-6.1.0-*-cloud-amd64), busybox-static or $SQLITE_PKGS from apt; run 'apt-get update' or set WEFT_GUEST_KERNEL_PKG"
}

if [ "${1:-}" = "--resolve" ]; then
    resolve
    exit 0
fi
[ $# -eq 1 ] || die "usage: $0 OUT_DIR | --resolve"
OUT="$1"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

RESOLVED="$(resolve)"
KPKG_SPEC="$(sed -n 's/^kernel=//p' <<<"$RESOLVED")"   # name=version
BPKG_SPEC="$(sed -n 's/^busybox=//p' <<<"$RESOLVED")"
mapfile -t SPKG_SPECS < <(sed -n 's/^sqlite=//p' <<<"$RESOLVED")

WORK="$(mktemp -d -t weft-guest.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
# apt-get download drops privileges to _apt when it can write the directory.
chmod 755 "$WORK"
cd "$WORK"

log "downloading $KPKG_SPEC $BPKG_SPEC ${SPKG_SPECS[*]}"
apt-get download -q -o APT::Sandbox::User=root "$KPKG_SPEC" "$BPKG_SPEC" "${SPKG_SPECS[@]}" >&2 ||
    die "apt-get download failed"
mkdir -p kpkg bpkg spkg
for deb in ./*.deb; do
    case "$(dpkg-deb -f "$deb" Package)" in
        busybox-static) dpkg -x "$deb" bpkg ;;
        linux-image-*) dpkg -x "$deb" kpkg ;;
        *) dpkg -x "$deb" spkg ;;
    esac
done

VMLINUZ="$(find kpkg/boot -maxdepth 1 -name 'vmlinuz-*' | head -n1)"
[ -n "$VMLINUZ" ] || die "no /boot/vmlinuz-* in ${KPKG_SPEC%%=*}"
KREL="${VMLINUZ##*/vmlinuz-}"
MODDIR="kpkg/lib/modules/$KREL"
[ -d "$MODDIR" ] || die "no $MODDIR in the kernel package"
[ -x bpkg/bin/busybox ] || die "no /bin/busybox in busybox-static"

# --- initramfs tree ---------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,data,tmp,run,etc,lib/modules}
cp bpkg/bin/busybox "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
install -m 0755 "$HERE/init" "$ROOT/init"
GUEST_BIN="$(build_guest_binaries)"
for b in weft-dpa weft-dpa-workload weft-blkread; do
    install -m 0755 "$GUEST_BIN/$b" "$ROOT/usr/bin/$b"
done
mkdir -p "$ROOT/var/lib"

# Debian's sqlite3 CLI: the binary, the libraries its NEEDED entries name (transitively,
# found in the extracted packages) and the loader its PT_INTERP names.
[ -x spkg/usr/bin/sqlite3 ] || die "no /usr/bin/sqlite3 in the sqlite3 package"
install -m 0755 spkg/usr/bin/sqlite3 "$ROOT/usr/bin/sqlite3"
mkdir -p "$ROOT/lib/x86_64-linux-gnu" "$ROOT/lib64"
declare -A STAGED_LIB=()
stage_libs() {
    local lib src
    for lib in $(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        [ -z "${STAGED_LIB[$lib]:-}" ] || continue
        STAGED_LIB[$lib]=1
        src=""
        for d in spkg/lib/x86_64-linux-gnu spkg/usr/lib/x86_64-linux-gnu; do
            if [ -e "$d/$lib" ]; then
                src="$d/$lib"
                break
            fi
        done
        [ -n "$src" ] || die "sqlite3 needs $lib, which none of $SQLITE_PKGS holds"
        cp -L "$src" "$ROOT/lib/x86_64-linux-gnu/$lib"
        stage_libs "$ROOT/lib/x86_64-linux-gnu/$lib"
    done
}
stage_libs "$ROOT/usr/bin/sqlite3"
INTERP="$(readelf -l spkg/usr/bin/sqlite3 | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')"
[ "$INTERP" = /lib64/ld-linux-x86-64.so.2 ] || die "unexpected loader $INTERP for sqlite3"
cp -L spkg/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$ROOT/lib64/ld-linux-x86-64.so.2"

# Index every module file of the kernel by module name (dashes are underscores to the kernel).
declare -A MODFILE=()
while IFS= read -r f; do
    name="${f##*/}"
    name="${name%%.ko*}"
    MODFILE["${name//-/_}"]="$f"
done < <(find "$MODDIR" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

# Copy a module into the initramfs as a plain .ko (busybox insmod cannot be relied on
# to decompress), returning its path.
stage_module() {
    local name="$1" src="${MODFILE[$1]}" dst="$ROOT/lib/modules/$1.ko"
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
    esac
}

# Load order: each listed module after its dependencies (read from the module's
# .modinfo "depends=" string, so no depmod/kmod is needed on the host).
declare -A SEEN=()
ORDER=()
MANIFEST_MODULES=()
add_module() {
    local name="${1//-/_}" dep deps
    [ -z "${SEEN[$name]:-}" ] || return 0
    SEEN[$name]=1
    if [ -z "${MODFILE[$name]:-}" ]; then
        if grep -qE "/${name//_/[-_]}\.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
            MANIFEST_MODULES+=("$name builtin")
        else
            log "warning: module $name is neither a module nor built into $KREL; skipped"
            MANIFEST_MODULES+=("$name missing")
        fi
        return 0
    fi
    stage_module "$name"
    deps="$(tr '\0' '\n' <"$ROOT/lib/modules/$name.ko" | sed -n 's/^depends=//p' | head -n1)"
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    ORDER+=("$name")
    MANIFEST_MODULES+=("$name module")
}
for m in $MODULES; do
    add_module "$m"
done
printf '%s\n' "${ORDER[@]}" >"$ROOT/etc/weft-modules"

# --- outputs ----------------------------------------------------------------
cp "$VMLINUZ" "$OUT/vmlinuz"
(
    cd "$ROOT"
    find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 --reproducible
) | gzip -9n >"$OUT/initramfs.img"

{
    echo "# weft test guest, built by integration/assets/build-guest.sh"
    echo "kernel-package: ${KPKG_SPEC/=/ }"
    echo "busybox-package: ${BPKG_SPEC/=/ }"
    for spec in "${SPKG_SPECS[@]}"; do
        echo "sqlite3-package: ${spec/=/ }"
    done
    echo "sqlite3-libraries: ${!STAGED_LIB[*]}"
    echo "dpa-sources: $(sed -n 's/^dpa-sources=//p' <<<"$RESOLVED")"
    echo "kernel-release: $KREL"
    echo "module-load-order: ${ORDER[*]}"
    for line in "${MANIFEST_MODULES[@]}"; do
        echo "module: $line"
    done
} >"$OUT/manifest.txt"
log "built $OUT (kernel $KREL, ${#ORDER[@]} modules)"

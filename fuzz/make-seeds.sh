#!/usr/bin/env bash
# Regenerates the seed inputs of the fuzz corpora from images made by qemu-img and qemu-io:
#
#   fuzz/corpus/header/qemu-<name>    each image file as it is
#   fuzz/corpus/image/qemu-<name>     the same image ++ plan bytes ++ len(plan) as u16 LE
#                                     (the `image` target's format, see conformance/src/fuzzing.rs)
#   fuzz/corpus/{script,crash}/seed-* a few pseudo-random plans
#
# Images are small (mostly 512-byte and 4 KiB clusters, virtual sizes of a few MiB) so that
# inputs stay a few KiB. Seeds are only a start: after fuzzing, minimise the corpus before
# committing it (`cargo +nightly fuzz cmin -a -s none <target>`, or libFuzzer's `-merge=1`
# over the inputs under a few KiB, then `-merge=1 -use_counters=0` for the edges only larger
# ones reach: the committed corpora stay under 2 MiB together). Needs qemu-img and qemu-io.
set -euo pipefail
cd "$(dirname "$0")"
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || {
    echo "make-seeds.sh: qemu-img and qemu-io are needed (apt-get install qemu-utils)" >&2
    exit 1
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p corpus/header corpus/image corpus/script corpus/crash
ulimit -c 0

# Deterministic pseudo-random bytes: `bytes NAME COUNT`.
bytes() {
    local i=0 hex=""
    while [ $((${#hex} / 2)) -lt "$2" ]; do
        hex+=$(printf '%s-%d' "$1" "$i" | sha256sum | cut -c1-64)
        i=$((i + 1))
    done
    printf "$(printf '%s' "${hex:0:$(($2 * 2))}" | sed 's/../\\x&/g')"
}

img() { qemu-img create -q -f qcow2 "$@"; }
io() { qemu-io -f qcow2 "$@" >/dev/null; }

# Writes a little data of each kind: a pattern, zeroes, a discard.
data() {
    io -c "write -P 0xa5 0 3k" -c "write -P 0x5a 70k 9k" -c "write -z 20k 8k" \
        -c "discard 72k 4k" "$1"
}

cd "$tmp"
img -o compat=0.10,cluster_size=512 v2-512.qcow2 1M && data v2-512.qcow2
img -o compat=0.10,cluster_size=4096 v2-4k-snapshot.qcow2 2M && data v2-4k-snapshot.qcow2 &&
    qemu-img snapshot -c s1 v2-4k-snapshot.qcow2 && io -c "write -P 7 1k 2k" v2-4k-snapshot.qcow2
img -o cluster_size=512 v3-512-empty.qcow2 1M
img -o cluster_size=512 v3-512.qcow2 4M && data v3-512.qcow2
img -o cluster_size=4096 v3-4k.qcow2 4M && data v3-4k.qcow2
img -o cluster_size=512,refcount_bits=1 v3-512-refcount1.qcow2 1M && data v3-512-refcount1.qcow2
img -o cluster_size=512,refcount_bits=64 v3-512-refcount64.qcow2 1M && data v3-512-refcount64.qcow2
img -o cluster_size=512,lazy_refcounts=on v3-512-lazy.qcow2 1M && data v3-512-lazy.qcow2
# A crash with lazy refcounts leaves the dirty bit set.
img -o cluster_size=512,lazy_refcounts=on v3-512-lazy-dirty.qcow2 1M &&
    bash -c 'qemu-io -f qcow2 -c "write -P 3 0 5k" -c abort v3-512-lazy-dirty.qcow2 >/dev/null; true' 2>/dev/null
img -o cluster_size=4096 v3-4k-snapshots.qcow2 1M && data v3-4k-snapshots.qcow2 &&
    qemu-img snapshot -c first v3-4k-snapshots.qcow2 && io -c "write -P 9 0 6k" v3-4k-snapshots.qcow2 &&
    qemu-img snapshot -c second v3-4k-snapshots.qcow2 && io -c "discard 0 4k" v3-4k-snapshots.qcow2
img -o cluster_size=512 base.qcow2 1M && data base.qcow2
img -o cluster_size=512 -b base.qcow2 -F qcow2 v3-512-backing.qcow2 && io -c "write -P 1 0 1k" v3-512-backing.qcow2
img -o cluster_size=512,data_file=data.raw v3-512-data-file.qcow2 1M
img -o cluster_size=4096,compression_type=zstd v3-4k-zstd.qcow2 1M
img -o cluster_size=4096 v3-4k-bitmap.qcow2 1M && qemu-img bitmap --add v3-4k-bitmap.qcow2 b0
img -o cluster_size=512,preallocation=metadata v3-512-prealloc.qcow2 32k
img -o cluster_size=16384,extended_l2=on v3-16k-extended-l2.qcow2 1M && data v3-16k-extended-l2.qcow2
img -o cluster_size=65536 v3-64k-empty.qcow2 1M
# Compressed clusters (zlib), by qemu-img convert -c.
head -c 64k /dev/zero | tr '\0' 'q' >raw.img && head -c 64k /dev/zero >>raw.img
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 raw.img v3-4k-compressed.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o compat=0.10,cluster_size=4096 raw.img v2-4k-compressed.qcow2
# AES encryption (crypt_method 1) is refused by QEMU 10 for new images; LUKS headers are
# too big for a seed. The fuzzer reaches crypt_method by mutation.
cd - >/dev/null

for f in "$tmp"/*.qcow2; do
    name=qemu-$(basename "$f" .qcow2)
    [ "$(basename "$f")" = base.qcow2 ] && continue
    cp "$f" "corpus/header/$name"
    plan=$(mktemp)
    bytes "$name" 160 >"$plan"
    n=$(stat -c %s "$plan")
    { cat "$f" "$plan"; printf "\\x$(printf %02x $((n & 255)))\\x$(printf %02x $((n >> 8)))"; } \
        >"corpus/image/$name"
    rm -f "$plan"
done
for i in 1 2 3 4 5 6 7 8; do
    bytes "script-$i" $((64 * i)) >"corpus/script/seed-$i"
    bytes "crash-$i" $((48 * i)) >"corpus/crash/seed-$i"
done
du -sh corpus/*

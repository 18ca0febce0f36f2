#!/usr/bin/env bash
# Writes the seed inputs of every fuzz target into fuzz/corpus/<target>/ (alongside
# what fuzzing found; `cargo fuzz cmin` keeps what adds coverage). Seeds come from the
# real thing where there is one: QEMU's QMP, qemu-nbd's replies, a real chunk store
# and the DPA's encoder (seedgen/), busybox udhcpc's DHCP packets, mkfs.ext4 -d, the
# sqlite3 CLI, the rules in docs/compositions.md.
#
# Needs: qemu-system-x86_64, qemu-nbd, mkfs.ext4, sqlite3, python3, busybox, cargo;
# root for the DHCP capture (network namespaces; skipped otherwise).
set -euo pipefail
fuzz=$(cd "$(dirname "$0")" && pwd)
corpus="$fuzz/corpus"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$corpus"
seed() { # seed TARGET NAME < bytes
    mkdir -p "$corpus/$1"
    cat >"$corpus/$1/$2"
}

# --- qmp_reply: every line QEMU's QMP sent for a short session (greeting, replies,
# errors, events, job events of a backup between two null block nodes).
{
    printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-status"}' \
        '{"execute":"query-version"}' '{"execute":"no-such-command"}' \
        '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":1048576}}' \
        '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n1","size":1048576}}' \
        '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"b0","persistent":false}}' \
        '{"execute":"query-named-block-nodes","arguments":{"flat":true}}' \
        '{"execute":"blockdev-backup","arguments":{"job-id":"j0","device":"n0","target":"n1","sync":"full"}}'
    sleep 1
    printf '%s\n' '{"execute":"query-jobs"}' '{"execute":"stop"}' '{"execute":"cont"}' \
        '{"execute":"blockdev-del","arguments":{"node-name":"nope"}}' '{"execute":"quit"}'
} | timeout 30 qemu-system-x86_64 -machine none -nodefaults -display none -monitor none \
    -serial none -qmp stdio >"$work/qmp.out"
i=0
while IFS= read -r line; do
    i=$((i + 1))
    printf '%s' "$line" | seed qmp_reply "qemu-$i"
done <"$work/qmp.out"

# --- nbd_reply: replies qemu-nbd sent to a read, a block status, a write, a flush
# and write-zeroes (structured replies negotiated), and to a simple-reply client.
truncate -s 1M "$work/disk.raw"
printf 'weft nbd seed data' | dd of="$work/disk.raw" bs=1 seek=4096 conv=notrunc status=none
qemu-nbd -f raw -x exp -k "$work/nbd.sock" -t "$work/disk.raw" &
nbd_pid=$!
for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
python3 - "$work/nbd.sock" "$corpus/nbd_reply" <<'EOF'
import os, socket, struct, sys
sock_path, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
COOKIE = 0x0102030405060708

def recv(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b

def option(s, opt, data):
    s.sendall(b"IHAVEOPT" + struct.pack(">II", opt, len(data)) + data)
    replies = []
    while True:
        magic, o, typ, n = struct.unpack(">QIII", recv(s, 20))
        body = recv(s, n)
        replies.append((typ, body))
        if typ == 1 or typ & 0x80000000:
            return replies

def connect(structured):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    recv(s, 18)
    s.sendall(struct.pack(">I", 3))
    ctx = None
    if structured:
        option(s, 8, b"")
        q = b"base:allocation"
        for typ, body in option(s, 10, struct.pack(">I", 3) + b"exp" + struct.pack(">II", 1, len(q)) + q):
            if typ == 4:
                ctx = struct.unpack(">I", body[:4])[0]
    option(s, 7, struct.pack(">I", 3) + b"exp" + struct.pack(">H", 0))
    return s, ctx

def reply(s, ctx):
    """Reads one whole reply (all chunks), rewriting the context id to 2."""
    magic = struct.unpack(">I", recv(s, 4))[0]
    if magic == 0x67446698:
        return struct.pack(">I", magic) + recv(s, 12)
    out = b""
    while True:
        if out:
            magic = struct.unpack(">I", recv(s, 4))[0]
        flags, typ, cookie, n = struct.unpack(">HHQI", recv(s, 16))
        body = recv(s, n)
        if typ == 5 and ctx is not None:
            body = struct.pack(">I", 2) + body[4:]
        out += struct.pack(">IHHQI", magic, flags, typ, cookie, n) + body
        if flags & 1:
            return out

def request(s, typ, offset, length, data=b""):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, typ, COOKIE, offset, length) + data)

def head(cmd, structured, offset, length, extra=0):
    # The target's 8 bytes: command (bit 7 set = simple replies), offset / 512,
    # length - 1 (24 bits), export bytes past the request.
    b0 = cmd | (0 if structured else 0x80)
    return bytes([b0]) + struct.pack(">H", offset // 512) + struct.pack(">I", length - 1)[1:] + struct.pack(">H", extra)

for structured in (True, False):
    s, ctx = connect(structured)
    tag = "structured" if structured else "simple"
    cases = [
        ("read", 0, 0, 8192, 0, b""),
        ("read-hole", 0, 65536, 4096, 0, b""),
        ("write", 2, 8192, 512, 1, b"w" * 512),
        ("flush", 3, 0, 1, 3, b""),
        ("write-zeroes", 4, 16384, 4096, 6, b""),
    ]
    if structured:
        cases.append(("block-status", 1, 0, 131072, 7, b""))
    for name, cmd, offset, length, typ, data in cases:
        request(s, typ, offset, length, data)
        r = reply(s, ctx)
        if typ == 0 and not structured:
            r += recv(s, length)
        with open(os.path.join(out, f"qemu-{tag}-{name}"), "wb") as f:
            f.write(head(cmd, structured, offset, length) + r)
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, COOKIE, 0, 0))
    s.close()
EOF
kill "$nbd_pid"
wait "$nbd_pid" 2>/dev/null || true

# --- store_index, store_chunk, dpa_frames, dpa_conn: weft's own encoders.
(cd "$fuzz/seedgen" && cargo run -q --release --target-dir "$fuzz/target/seedgen" -- "$corpus")

# --- virtio_blk_request: one request of each type a guest's driver sends, as its
# descriptor chain (header, data, status) and the memory behind it.
python3 - "$corpus/virtio_blk_request" <<'EOF'
import os, struct, sys
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
NEXT, WRITE = 1, 2
def desc(addr, length, flags, nxt):
    return struct.pack("<IIHH", addr, length, flags, nxt)
def seed(name, typ, sector, data_len, data_write, payload=b""):
    hdr = struct.pack("<IIQ", typ, 0, sector)
    chain = [desc(0x10000, 16, NEXT, 1)]
    if data_len:
        chain.append(desc(0x11000, data_len, NEXT | (WRITE if data_write else 0), 2))
    chain.append(desc(0x20000, 1, WRITE, 0))
    mem = hdr.ljust(0x1000, b"\0") + payload
    with open(os.path.join(out, name), "wb") as f:
        f.write(bytes([len(chain) - 1]) + b"".join(chain) + mem)
seed("read", 0, 8, 4096, True)
seed("write", 1, 16, 512, False, b"d" * 512)
seed("flush", 4, 0, 0, False)
seed("get-id", 8, 0, 20, True)
# discard / write zeroes: one segment (sector u64, sectors u32, flags u32)
seg = struct.pack("<QII", 4, 8, 0)
seed("discard", 11, 0, 16, False, seg)
seed("write-zeroes", 13, 0, 16, False, seg)
seed("read-past-end", 0, 1 << 20, 4096, True)
EOF

# --- dhcp_packet: what busybox udhcpc sends (DISCOVER, REQUEST, RELEASE) against
# busybox udhcpd, captured in a pair of network namespaces.
if [ "$(id -u)" = 0 ] && command -v busybox >/dev/null; then
    ns=weftseed$$
    ip netns add "${ns}s" && ip netns add "${ns}c"
    ip link add "${ns}a" netns "${ns}s" type veth peer name "${ns}b" netns "${ns}c"
    ip -n "${ns}s" addr add 10.203.0.1/24 dev "${ns}a"
    ip -n "${ns}s" link set "${ns}a" up
    ip -n "${ns}c" link set "${ns}b" up
    cat >"$work/udhcpd.conf" <<EOF
start 10.203.0.10
end 10.203.0.20
interface ${ns}a
lease_file $work/leases
pidfile $work/udhcpd.pid
opt router 10.203.0.1
opt subnet 255.255.255.0
opt lease 600
EOF
    touch "$work/leases"
    ip netns exec "${ns}s" busybox udhcpd -f "$work/udhcpd.conf" &
    udhcpd=$!
    ip netns exec "${ns}s" python3 - "${ns}a" "$corpus/dhcp_packet" <<'EOF' &
import os, socket, sys, time
ifname, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((ifname, 0))
s.settimeout(1)
n, end = 0, time.time() + 12
while time.time() < end:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17:
        continue
    ihl = (f[14] & 15) * 4
    udp = f[14 + ihl:]
    sport, dport = int.from_bytes(udp[0:2], "big"), int.from_bytes(udp[2:4], "big")
    if (sport, dport) not in ((68, 67), (67, 68)):
        continue
    n += 1
    who = "client" if dport == 67 else "server"
    with open(os.path.join(out, f"busybox-{who}-{n}"), "wb") as o:
        o.write(udp[8:])
EOF
    sniff=$!
    sleep 1
    ip netns exec "${ns}c" busybox udhcpc -i "${ns}b" -n -q -R -t 3 -T 1 -s /bin/true \
        -x hostname:weave -V weft-seed >/dev/null 2>&1 || true
    ip netns exec "${ns}c" busybox udhcpc -i "${ns}b" -n -q -t 2 -T 1 -s /bin/true \
        -r 10.203.0.99 -O staticroutes >/dev/null 2>&1 || true
    wait "$sniff" || true
    kill "$udhcpd" 2>/dev/null || true
    wait "$udhcpd" 2>/dev/null || true
    ip netns del "${ns}s"
    ip netns del "${ns}c"
else
    echo "seeds.sh: not root or no busybox: no DHCP seeds" >&2
fi

# --- ext4_base: small ext4 images made by mkfs.ext4 -d from a tree holding every
# kind of source the target extracts.
tree="$work/tree"
mkdir -p "$tree/data" "$tree/etc/app.d" "$tree/a/b/c/d/e/f"
sqlite3 "$tree/data/app.db" "PRAGMA page_size=512; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1,'one'),(2,'two');"
printf '{"feature":{"dark":true},"n":[1,2,3]}\n' >"$tree/etc/app.json"
printf 'MODE=on\n# comment\nNAME="weft"\n' >"$tree/etc/app.env"
printf 'on\n' >"$tree/etc/app.d/MODE"
printf '{"deep":1}\n' >"$tree/a/b/c/d/e/f/doc.json"
# 64 KiB each (the campaign caps this target's inputs there): fuzzing copies the whole
# image per run, and the corpus holds many. The files are made full size first, as a
# disk is (mkfs.ext4 alone leaves the unused tail out).
for v in "^has_journal,^resize_inode,^flex_bg:mkfs-64k" \
    "64bit,metadata_csum,^has_journal,^resize_inode,^flex_bg:mkfs-64k-64bit-csum"; do
    rm -f "$work/img.ext4"
    truncate -s 64K "$work/img.ext4"
    mkfs.ext4 -q -F -b 1024 -N 32 -m 0 -O "${v%%:*}" -E root_owner=0:0 -d "$tree" "$work/img.ext4"
    seed ext4_base "${v##*:}" <"$work/img.ext4"
done

# --- sqlite_base: databases the sqlite3 CLI wrote (rollback journal and WAL;
# a table with a rowid, one WITHOUT ROWID, an index, a trigger and a view).
db="$work/base.db"
sqlite3 "$db" "PRAGMA page_size=512;
CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, price REAL, raw BLOB);
INSERT INTO t VALUES (1,'tea',2.5,x'00ff'),(2,'cake',NULL,NULL);
CREATE TABLE u(a TEXT, b INTEGER, PRIMARY KEY(a, b)) WITHOUT ROWID;
INSERT INTO u VALUES ('x',1),('y',2);
CREATE INDEX t_name ON t(name);
CREATE VIEW v AS SELECT name FROM t;
CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET price = 0 WHERE price IS NULL; END;"
seed sqlite_base cli-tables <"$db"
sqlite3 "$work/auto.db" "PRAGMA page_size=512; CREATE TABLE t(id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT); INSERT INTO t(v) VALUES ('a'),('b'); DELETE FROM t WHERE id = 1;"
seed sqlite_base cli-autoincrement <"$work/auto.db"
sqlite3 "$work/wal.db" "PRAGMA page_size=512; PRAGMA journal_mode=WAL; CREATE TABLE t(k TEXT PRIMARY KEY, v TEXT); INSERT INTO t VALUES ('a','1');" >/dev/null
seed sqlite_base cli-wal <"$work/wal.db"

# --- data_merge: log entries as the target reads them (type, op, then source, table,
# key, value by tabs; op 0xff ends a state).
{
    printf '\x00\x03/data/app.db\titems\t\t"CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT)"\n'
    printf '\x00\x00/data/app.db\titems\t[1]\t{"id":1,"v":"a"}\n'
    printf '\x01\x00/etc/app.json\t\t/feature/dark\ttrue\n'
    printf '\x02\x00/etc/app.env\t\tMODE\t"on"\n'
    printf '\x00\xff\n'
    printf '\x00\x01/data/app.db\titems\t[1]\t{"id":1,"v":"b"}\n'
    printf '\x02\x01/etc/app.env\t\tMODE\t"off"\n'
    printf '\x00\xff\n'
    printf '\x00\x01/data/app.db\titems\t[1]\t{"id":1,"v":"c"}\n'
    printf '\x01\x02/etc/app.json\t\t/feature/dark\n'
    printf '\x02\x00/etc/app.env\t\t*\t"glob"\n'
    printf '\x00\xff\n'
} | seed data_merge three-states

# --- schema_sql: table definitions applications write, and what a hostile guest
# would try (name, newline, definition).
i=0
while IFS= read -r line; do
    i=$((i + 1))
    printf '%b' "$line" | seed schema_sql "def-$i"
done <<'EOF'
t\nCREATE TABLE t(x)
items\nCREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL, price REAL CHECK (price >= 0 AND abs(price) < 1e9), at TEXT DEFAULT (datetime('now')), owner INTEGER REFERENCES users(id))
pairs\nCREATE TABLE pairs(a TEXT, b INTEGER, PRIMARY KEY(a, b)) WITHOUT ROWID
s\nCREATE TABLE IF NOT EXISTS main.s(a INTEGER, b INTEGER AS (a + 1) STORED, c TEXT COLLATE NOCASE) STRICT
we"ird; name\nCREATE TABLE "we""ird; name"(x)
t\nCREATE TABLE t(x); ATTACH DATABASE 'weft-fuzz-attached.db' AS p; CREATE TABLE p.y(z)
p\nATTACH DATABASE '/tmp/weft-fuzz-attached.db' AS p
v\nCREATE VIEW v AS SELECT 1
tr\nCREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END
x\nCREATE TABLE x(a CHECK (load_extension('/tmp/e.so')))
x\nCREATE TABLE x(a DEFAULT (readfile('/etc/hostname')))
x\nCREATE TEMP TABLE x(a)
x\nCREATE VIRTUAL TABLE x USING fts5(a)
x\nCREATE TABLE x AS SELECT 1 AS a
x\nCREATE TABLE x(a CHECK (a IN (SELECT 1)))
x\nPRAGMA writable_schema=1
x\nCREATE TABLE x(a);
EOF

# --- rules_toml: the rule files of docs/compositions.md, and a JSON one.
python3 - "$fuzz/../docs/compositions.md" "$corpus/rules_toml" <<'EOF'
import os, re, sys
doc, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
text = open(doc).read()
blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
for i, b in enumerate(blocks, 1):
    open(os.path.join(out, f"docs-{i}"), "w").write(b)
EOF
cat <<'EOF' | seed rules_toml merge-prompt
conflict = "prompt"
at = "2026-11-22T12:00:00Z"

[[rule]]
name = "db"
resources = ["disk:v*", "config"]
from = "2026-11-20T00:00:00Z"
until = "2026-11-21T23:00:00Z"
categories = ["nightly"]

[[rule]]
name = "patched"
resources = ["disk:vda", "data:/etc/*"]
strategy = "closest-to"
closest_to = "2026-11-22T10:00:00Z"
exclude_categories = ["broken"]
EOF
printf '{"conflict":"merge-by-timestamp","rule":[{"resources":["config"],"pin":11},{"resources":["config","net"],"strategy":"earliest"}]}' |
    seed rules_toml json-pin

# --- api_json: request bodies as the CLI sends them (byte 0 picks the type, in the
# order of the target's match).
api() { printf "\\x$(printf %02x "$1")%s" "$3" | seed api_json "$2"; }
api 0 create-managed '{"kind":"managed","name":"web","disks":[{"path":"/var/lib/weft/images/web.qcow2","name":"vda","format":"qcow2"},{"path":"/var/lib/weft/images/data.raw","read_only":true}],"memory_mib":256,"cpus":1,"accel":"tcg","kernel":"/var/lib/weft/images/vmlinuz","initrd":"/var/lib/weft/images/initrd","append":"console=ttyS0","nics":[{"id":"n0","tap":"tap0","mac":"52:54:00:12:34:56"}],"no_start":true}'
api 0 create-attached '{"kind":"attached","name":"db","qmp_socket":"/run/libvirt/qemu/db.monitor"}'
api 1 snapshot '{"resource":"disk:vda","category":"nightly","note":"before the upgrade"}'
api 2 prune '{"resource":"disk:vda","keep":{"last":3,"daily":7},"dry_run":true}'
api 3 restore '{"output":"/var/lib/weft/export/vda.qcow2","format":"qcow2"}'
api 4 guest-plan '{"guest_ip":"10.0.2.15","guest_prefix":24,"gateway":"10.0.2.2"}'
api 5 egress '{"egress":"internet"}'
api 6 expose '{"guest_port":80,"host_port":8080,"guest_ip":"10.0.2.15"}'
api 7 unexpose '{"host_port":8080}'
api 8 weave-at '{"name":"w1","source":{"at":"2026-11-22T10:00:00Z"},"live":true,"egress":"none"}'
api 8 weave-snapshot '{"source":{"snapshot":3}}'
api 9 composition '{"name":"mix","env":"web","rules":{"conflict":"prompt","rule":[{"name":"db","resources":["disk:vda"],"until":"2026-11-21T00:00:00Z"},{"resources":["config"],"pin":11}]}}'
api 10 resolve '{"resource":"disk:vda","key":"slots 2..3","take":"newer"}'
api 10 resolve-all '{"all":true,"take":4}'
api 11 apply '{"weave":"w2","live":false,"egress":"all"}'
api 12 policy '{"resource":"disk:vda","every_secs":900,"category":"nightly","keep":{"last":4}}'
api 12 policy-huge '{"resource":"all","every_secs":18446744073709551615}'
api 13 config '{"memory_mib":512,"cpus":2}'
api 14 limits '{"cpu_percent":150,"memory_mib":512}'
api 15 route '{"guest_port":22,"host_port":2222}'
api 16 gc '{"grace_secs":3600}'
api 17 tier '{"cold_after_secs":604800,"frequent_reads":10,"frequent_cold_after_secs":2592000,"promote_after_cold_reads":3}'
api 18 replay '{"to":"2026-11-22T10:00:00Z","from":"2026-11-21T00:00:00Z","out":"/var/lib/weft/export/replay","base":3,"base_margin_secs":120}'
api 18 replay-into '{"to":"now","into":"w1","force":true}'
api 19 sync '{"dst":"w2","volume":"vda","prefer":"src","reset":false}'
api 20 audit-query 'limit=20'
api 21 snapshot-query 'resource=disk%3Avda&since=2026-11-20T00%3A00%3A00Z&category=nightly&all=true'
api 22 policy-query 'env=web'
api 23 page-query 'source=%2Fdata%2Fapp.db&table=items&after_seq=10&limit=100&max_bytes=65536'

du -sh "$corpus"

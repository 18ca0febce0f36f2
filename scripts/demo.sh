#!/usr/bin/env bash
# The quick-start demo: weftd on its embedded defaults (SQLite catalog, local
# storage) under ./.weft-demo, one environment booted from the test guest.
#   scripts/demo.sh start   (what `make demo` runs after building)
#   scripts/demo.sh stop    (what `make demo-stop` runs)
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
demo="$top/.weft-demo"
sock="$demo/run/weftd.sock"
weft() { "$top/target/debug/weft" --socket "$sock" "$@"; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$(( $(date +%s) + $1 )); local what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then echo "demo: timed out waiting for $what" >&2; return 1; fi
        sleep 0.2
    done
}

provenance_arrived() {
    weft --json provenance tail demo -n 1 | grep -q '"seq"'
}

start() {
    mkdir -p "$demo"
    if [ -f "$demo/weftd.pid" ] && kill -0 "$(cat "$demo/weftd.pid")" 2>/dev/null; then
        echo "demo: weftd already runs (pid $(cat "$demo/weftd.pid")); run 'make demo-stop' first" >&2
        exit 1
    fi
    assets=$("$top/target/debug/weft-guest-assets")
    echo "==> guest assets: $assets"

    # weftd takes images only from image_dirs and writes restores and replays only
    # into export_dirs: here the guest assets and the demo's own directory.
    cat >"$demo/weftd.toml" <<EOT
image_dirs = ["$assets", "$demo"]
export_dirs = ["$demo"]
EOT
    echo "==> starting weftd (data: $demo/data, socket: $sock, config: $demo/weftd.toml, log: $demo/weftd.log)"
    # Own session: closing the terminal or Ctrl-C after the demo leaves weftd running.
    setsid "$top/target/debug/weftd" --config "$demo/weftd.toml" --data-dir "$demo/data" --run-dir "$demo/run" \
        </dev/null >"$demo/weftd.log" 2>&1 &
    echo $! > "$demo/weftd.pid"
    if ! wait_for 20 "weftd to answer" weft status; then cat "$demo/weftd.log" >&2; exit 1; fi
    weft status

    if [ ! -f "$demo/demo-data.img" ]; then
        echo "==> making a 64 MiB ext4 data disk: $demo/demo-data.img"
        truncate -s 64M "$demo/demo-data.img"
        mkfs.ext4 -q -F "$demo/demo-data.img"
    fi

    echo "==> weft env create demo --disk $demo/demo-data.img,name=vda --memory 256M --kernel … --initrd …"
    weft env create demo --disk "$demo/demo-data.img,name=vda" --memory 256M --cpus 1 \
        --kernel "$assets/vmlinuz" --initrd "$assets/initramfs.img" \
        --append "console=ttyS0 panic=-1 weft.workload=dpa weft.dpa=1 weft.workload_args=--count=500,--checkpoints=1,--settle-ms=200"
    serial="$demo/data/environments/demo/serial.log"
    echo "==> waiting for the guest to report WEFT-READY on its serial console ($serial)"
    if ! wait_for 120 "the guest to boot" grep -q WEFT-READY "$serial"; then
        tail -n 30 "$serial" >&2 || true; exit 1
    fi
    echo "==> waiting for the guest's application (500 SQLite, JSON and key-value changes) to finish"
    if ! wait_for 120 "the guest workload" grep -q "weft-dpa-workload: done" "$serial"; then
        tail -n 30 "$serial" >&2 || true; exit 1
    fi
    echo
    echo "==> weft env list"
    weft env list
    echo
    echo "==> weft env show demo"
    weft env show demo
    echo
    echo "==> weft snapshot create demo --category demo   (config and disk, as a job with progress)"
    weft snapshot create demo --category demo
    echo
    echo "==> weft snapshot list demo"
    weft snapshot list demo
    disk_snapshot=$(weft --json snapshot list demo --resource disk:vda | sed -n 's/^ *"id": \([0-9]*\),$/\1/p' | tail -n 1)
    echo
    echo "==> weft weave create demo --snapshot $disk_snapshot --name past   (a running branch from that instant)"
    weft weave create demo --snapshot "$disk_snapshot" --name past
    if ! wait_for 120 "the weave to boot" grep -q WEFT-READY "$demo/data/environments/past/serial.log"; then
        tail -n 30 "$demo/data/environments/past/serial.log" >&2 || true; exit 1
    fi
    echo
    echo "==> weft weave list demo"
    weft weave list demo
    echo
    echo "==> weft provenance tail demo -n 5   (changes the guest's DPA streamed over vsock)"
    wait_for 30 "the provenance log" provenance_arrived || true
    weft provenance tail demo -n 5
    echo
    echo "==> weft replay demo --to now --out $demo/replay   (the application's state rebuilt from the log)"
    weft replay demo --to now --out "$demo/replay"
    echo
    echo "==> weft audit"
    weft audit
    cat <<EOT

The demo environment and its weave "past" run under weftd. Try:
  target/debug/weft --socket $sock env stop demo
  target/debug/weft --socket $sock env start demo
  target/debug/weft --socket $sock snapshot create demo
  target/debug/weft --socket $sock restore $disk_snapshot --output $demo/demo-vda.img
  target/debug/weft --socket $sock provenance query demo --table customers --limit 10
  tail -f $serial
Stop everything and remove ./.weft-demo with: make demo-stop
EOT
}

stop() {
    if [ -S "$sock" ]; then
        weft weave delete past 2>/dev/null || true
        weft env delete demo 2>/dev/null || true
    fi
    if [ -f "$demo/weftd.pid" ]; then
        pid=$(cat "$demo/weftd.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            wait_for 20 "weftd to exit" bash -c "! kill -0 $pid" || kill -KILL "$pid"
        fi
    fi
    rm -rf "$demo"
    echo "demo stopped; ./.weft-demo removed"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

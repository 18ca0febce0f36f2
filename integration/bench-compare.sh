#!/usr/bin/env bash
# bench-compare.sh: the same benchmarks run by two builds of weft, interleaved round by round.
#
#   integration/bench-compare.sh [--rounds N] [--only LIST] [--logs DIR] OLD NEW
#
# OLD and NEW are release directories of two builds (`<target>/release`), each holding
# `weft-bench` and the binaries it starts: `weftd` and `weft` (for `weave`) and `weft-blk`
# (for `blk`). weft-bench finds them next to itself, and its guest assets under its own
# `<target>/guest-assets/`. Build each tree with
#
#   cargo build --release -p weft -p weft-client -p weft-blockdev -p weft-integration \
#       --bin weftd --bin weft --bin weft-blk --bin weft-bench
#
# (before the crate split `weft` was a binary of the `weft` package: drop `-p weft-client`).
#
# For each benchmark of LIST (default `backup,weave,blk`) it runs N rounds (default 5), each
# round `OLD/weft-bench <bench> --rounds 1` and then `NEW/weft-bench <bench> --rounds 1`, so
# both builds see the same machine state in turn: on a shared machine the interleaving, not
# a quiet machine, is what makes the two comparable. Both use one `WEFT_BENCH_DIR` (default
# `NEW/../bench`), so they read the same cached backup image and blk store. The figures are
# taken from each run's markdown tables (stdout); every run's stdout and stderr are kept in
# DIR (default: a new directory under /tmp). The result is one markdown table per measure:
# the old and new medians over the rounds, new/old, the median of each round's own new/old
# ("paired") and the per-round values; a new/old outside 0.90–1.10 is marked. A run that fails is run once more (the message and the
# failed run's log say so); it exits non-zero if it fails again or a figure is missing.
#
# Measures (each a weft-side figure; ratios are to the peer in the same run):
#   backup  weft full (plain store) s and MiB/s, weft full (encrypted) s, full throughput
#           weft plain / restic, weft incremental s, weft restore s, restore weft / restic
#   weave   API call to the weave's QEMU running, ms, for the 1 GiB and the 64 GiB disk
#   blk     weft-blk sequential 1 MiB MiB/s and random 4 KiB IOPS, and both as a ratio to
#           qemu-storage-daemon's vhost-user-blk export of the same data (b)
#
# Needs root (the benchmarks drop the page cache and create network namespaces), and
# restic and borg for `backup` (`make bench` installs them).
set -euo pipefail

usage() {
    sed -n '3p' "$0" | sed 's/^# *//' >&2
    exit 2
}

rounds=5
only=backup,weave,blk
logs=
while [ $# -gt 0 ]; do
    case $1 in
    --rounds) rounds=${2:?}; shift 2 ;;
    --only) only=${2:?}; shift 2 ;;
    --logs) logs=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    -*) echo "bench-compare: unknown option $1" >&2; usage ;;
    *) break ;;
    esac
done
[ $# -eq 2 ] || usage
old=$(cd "$1" && pwd)
new=$(cd "$2" && pwd)
for side in "$old" "$new"; do
    [ -x "$side/weft-bench" ] || { echo "bench-compare: no weft-bench in $side: build it first (see the header of $0)" >&2; exit 2; }
done
case $rounds in '' | *[!0-9]* | 0) echo "bench-compare: --rounds takes a positive number" >&2; exit 2 ;; esac
export WEFT_BENCH_DIR=${WEFT_BENCH_DIR:-$(dirname "$new")/bench}
# weft-bench finds its target directory (guest assets) from its own path, not this variable.
unset CARGO_TARGET_DIR
logs=${logs:-$(mktemp -d /tmp/bench-compare.XXXXXX)}
mkdir -p "$logs"
results=$logs/results.tsv # bench, measure, side, round, value
: >"$results"

echo "bench-compare: old $old, new $new, $rounds rounds, WEFT_BENCH_DIR=$WEFT_BENCH_DIR, logs in $logs" >&2
echo "bench-compare: load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# The cells of the markdown row whose first cell starts with $2, in file $1: prints the
# $3-th cell (1 = the first after the name) without bold markers; fails if there is none.
cell() {
    awk -F'|' -v name="$2" -v col="$3" '
        { c = $2; sub(/^ +/, "", c) }
        index(c, name) == 1 { v = $(col + 2); gsub(/[ *]/, "", v); print v; found = 1; exit }
        END { exit !found }' "$1"
}

# Appends a measure of one run to the results, or fails naming the missing row.
record() { # bench measure side round file rowname column
    local v
    v=$(cell "$5" "$6" "$7") || { echo "bench-compare: no row \"$6\" in $5" >&2; exit 1; }
    case $v in '' | *[!0-9.]*) echo "bench-compare: row \"$6\" in $5 has no number: \"$v\"" >&2; exit 1 ;; esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$v" >>"$results"
}

parse() { # bench side round stdout
    local b=$1 s=$2 r=$3 f=$4
    case $b in
    backup)
        record "$b" "weft full, plain store (s)" "$s" "$r" "$f" "weft, plain store" 1
        record "$b" "weft full, plain store (MiB/s)" "$s" "$r" "$f" "weft, plain store" 4
        record "$b" "weft full, encrypted store (s)" "$s" "$r" "$f" "weft, encrypted store" 1
        record "$b" "full throughput, weft plain / restic" "$s" "$r" "$f" "full throughput, weft plain / restic" 1
        record "$b" "weft incremental (s)" "$s" "$r" "$f" "incremental time (s)" 1
        record "$b" "weft restore (s)" "$s" "$r" "$f" "weft (" 1
        record "$b" "restore throughput, weft / restic" "$s" "$r" "$f" "restore throughput, weft / restic" 1
        ;;
    weave)
        record "$b" "weave, 1 GiB disk (ms)" "$s" "$r" "$f" "1 GiB, all 1 GiB written" 1
        record "$b" "weave, 64 GiB disk (ms)" "$s" "$r" "$f" "64 GiB sparse" 1
        ;;
    blk)
        record "$b" "weft-blk sequential 1 MiB (MiB/s)" "$s" "$r" "$f" "(a) weft-blk" 1
        record "$b" "weft-blk random 4 KiB (IOPS)" "$s" "$r" "$f" "(a) weft-blk" 4
        record "$b" "sequential, weft-blk / storage daemon" "$s" "$r" "$f" "sequential, (a) / (b)" 1
        record "$b" "random 4 KiB, weft-blk / storage daemon" "$s" "$r" "$f" "random 4 KiB, (a) / (b)" 1
        ;;
    *) echo "bench-compare: unknown benchmark $b (backup, weave, blk)" >&2; exit 2 ;;
    esac
}

for bench in ${only//,/ }; do
    for round in $(seq 1 "$rounds"); do
        for side in old new; do
            [ $side = old ] && dir=$old || dir=$new
            out=$logs/$bench-$side-$round.out
            err=$logs/$bench-$side-$round.err
            start=$(date +%s)
            # A run that fails is run once more (its log kept as .failed); a second failure stops.
            if ! "$dir/weft-bench" "$bench" --rounds 1 >"$out" 2>"$err"; then
                mv "$err" "$err.failed"
                echo "bench-compare: $bench $side round $round failed ($(tail -1 "$err.failed")); running it again, the failed run's log is $err.failed" >&2
                if ! "$dir/weft-bench" "$bench" --rounds 1 >"$out" 2>"$err"; then
                    echo "bench-compare: $bench $side round $round failed again; see $err:" >&2
                    tail -5 "$err" >&2
                    exit 1
                fi
            fi
            echo "bench-compare: $bench round $round $side done in $(($(date +%s) - start)) s (load $(cut -d' ' -f1 /proc/loadavg))" >&2
            parse "$bench" "$side" "$round" "$out"
        done
    done
done

echo "bench-compare: load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# One row per measure: medians, new/old of the medians, the median of the rounds' own new/old
# (each round's two runs ran back to back, so this pairs like with like when the load
# drifts), and the rounds' values in order.
awk -F'\t' '
    function median(list,   n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function fmt(x) { return x >= 100 ? sprintf("%.0f", x) : x >= 10 ? sprintf("%.1f", x) : sprintf("%.3f", x) }
    !(($1 SUBSEP $2) in seen) { seen[$1, $2] = 1; order[++n] = $1 SUBSEP $2; name[n] = $2 }
    { vals[$1, $2, $3] = vals[$1, $2, $3] (vals[$1, $2, $3] == "" ? "" : " ") $5; at[$1, $2, $3, $4] = $5 }
    END {
        print "| measure | old median | new median | new/old | paired new/old | rounds (old; new) |"
        print "| --- | ---: | ---: | ---: | ---: | --- |"
        for (i = 1; i <= n; i++) {
            k = order[i]
            o = median(vals[k, "old"]); w = median(vals[k, "new"])
            r = o > 0 ? w / o : 0
            flag = (r < 0.9 || r > 1.1) ? " (outside 10 %)" : ""
            pairs = ""
            for (q = 1; (k, "old", q) in at; q++)
                if ((k, "new", q) in at && at[k, "old", q] > 0)
                    pairs = pairs (pairs == "" ? "" : " ") at[k, "new", q] / at[k, "old", q]
            p = pairs == "" ? "" : sprintf("%.3f", median(pairs))
            printf "| %s | %s | %s | %.3f%s | %s | %s; %s |\n", name[i], fmt(o), fmt(w), r, flag, p, vals[k, "old"], vals[k, "new"]
        }
    }' "$results" | tee "$logs/table.md"

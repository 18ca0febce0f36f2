#!/usr/bin/env bash
# The fuzzing campaign: every cargo-fuzz target runs until it has accumulated a budget
# of CPU time (default 30 min), two at a time, at nice 19, on its corpus in
# fuzz/corpus/<target>/. CPU time is the fuzzer process's utime + stime from /proc (on
# a shared machine wall time would overstate the work). Runs are cut into slices; each
# slice appends one line to fuzz/campaign.tsv:
#
#   date  target  cpu_s  wall_s  execs  cov  ft  corpus  crashes
#
# (execs: libFuzzer's stat::number_of_executed_units; cov/ft: the last `cov:`/`ft:`
# it printed; corpus: files in the corpus after the slice). Running the script again
# resumes: a target's accumulated CPU time is the sum of its lines, and a target at or
# over the budget is skipped unless --force (which gives it one more budget). At the
# end every corpus that grew is minimized (libFuzzer -merge=1, as `cargo fuzz cmin`).
# Exits 1 if any run left a crash, leak, timeout or OOM artifact in fuzz/artifacts/.
#
# Usage: fuzz/campaign.sh [--budget SECS] [--slice SECS] [--jobs N] [--force]
#                         [--no-build] [--no-cmin] [TARGET…]
#        fuzz/campaign.sh --report   (the totals per target, as a Markdown table)
set -euo pipefail
# One compound command: bash parses it whole before running it, so editing this file
# while a campaign runs does not change that campaign.
{

fuzz=$(cd "$(dirname "$0")" && pwd)
budget=${WEFT_FUZZ_BUDGET:-1800}
slice=600
jobs=2
force=0
build=1
cmin=1
report=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
    --budget) budget=$2; shift 2 ;;
    --slice) slice=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --force) force=1; shift ;;
    --no-build) build=0; shift ;;
    --no-cmin) cmin=0; shift ;;
    --report) report=1; shift ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "campaign.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
    esac
done
for n in "$budget" "$slice" "$jobs"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "campaign.sh: $n is not a positive number" >&2; exit 2; }
done

cd "$fuzz"
results="$fuzz/campaign.tsv"
if [ "$report" = 1 ]; then
    # CPU minutes and executions add up over the lines; cov and ft are the last run's
    # (libFuzzer recomputes them from the corpus at each start).
    awk -F'\t' 'NR > 1 {
            if (!($2 in cpu)) order[n++] = $2
            cpu[$2] += $3; execs[$2] += $5; cov[$2] = $6; ft[$2] = $7; crashes[$2] += $9
        }
        END {
            print "| target | CPU min | execs | cov | ft | crashes |"
            print "| --- | ---: | ---: | ---: | ---: | ---: |"
            for (i = 0; i < n; i++) {
                t = order[i]
                printf "| `%s` | %.1f | %d | %d | %d | %d |\n", t, cpu[t] / 60, execs[t], cov[t], ft[t], crashes[t]
            }
        }' "$results"
    exit 0
fi
logs="$fuzz/logs"
bin_dir="$fuzz/target/x86_64-unknown-linux-gnu/release"
mkdir -p "$logs" "$fuzz/artifacts"
[ -s "$results" ] || printf 'date\ttarget\tcpu_s\twall_s\texecs\tcov\tft\tcorpus\tcrashes\n' >"$results"
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi
if [ "$build" = 1 ]; then
    RUSTC_BOOTSTRAP=1 nice -n 19 cargo fuzz build
fi
tick=$(getconf CLK_TCK)
# As `cargo fuzz run` does: the bundled SQLite defines two static `aiOff` arrays, which
# ASan takes for an ODR violation at start.
export ASAN_OPTIONS="detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

# CPU seconds a target has accumulated in the results file.
accumulated() {
    awk -F'\t' -v t="$1" 'NR > 1 && $2 == t { s += $3 } END { printf "%d", s }' "$results"
}

# CPU seconds (utime + stime) of process $1, or nothing once it is gone.
cpu_of() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    # Fields after the command name (which may hold spaces): utime and stime are the
    # 12th and 13th of them.
    stat=${stat##*) }
    awk -v tick="$tick" '{ printf "%d", ($12 + $13) / tick }' <<<"$stat"
}

# Extra libFuzzer flags of a target: disk images are capped so the corpus stays small
# (its seeds are 64 KiB images). Targets that open SQLite through sqlx do not check
# leaks: sqlx's connection thread ends after `close` returns, and LeakSanitizer, which
# looks after each input, can see its thread-locals not yet freed (a leak that no rerun
# of the input shows).
flags_of() {
    case "$1" in
    ext4_base) echo "-max_len=65536" ;;
    schema_sql | sqlite_base) echo "-detect_leaks=0" ;;
    esac
}

count_artifacts() {
    find "$fuzz/artifacts/$1" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
        -o -name 'oom-*' \) 2>/dev/null | wc -l
}

# One slice: runs target $1 until it used $2 CPU seconds (or stopped); appends its line.
# Returns 1 if it left an artifact.
run_slice() {
    local t=$1 want=$2 corpus="$fuzz/corpus/$1" art="$fuzz/artifacts/$1/"
    local log started before pid cpu=0 now rc=0
    mkdir -p "$corpus" "$art"
    log="$logs/$(date -u +%Y%m%dT%H%M%SZ)-$t.log"
    before=$(count_artifacts "$t")
    started=$(date +%s)
    nice -n 19 "$bin_dir/$t" -print_final_stats=1 -timeout=30 -rss_limit_mb=2048 \
        $(flags_of "$t") -artifact_prefix="$art" "$corpus" >"$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        now=$(cpu_of "$pid")
        [ -n "$now" ] && cpu=$now
        if [ "$cpu" -ge "$want" ]; then
            # libFuzzer prints its final stats on SIGINT.
            kill -INT "$pid" 2>/dev/null || true
            break
        fi
        sleep 1
    done
    wait "$pid" || rc=$?
    # Scratch directories the targets keep per process.
    rm -rf "${TMPDIR:-/tmp}"/weft-fuzz-*-"$pid"
    local wall=$(($(date +%s) - started))
    local execs cov ft files crashes
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2)
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2)
    files=$(find "$corpus" -type f | wc -l)
    crashes=$(($(count_artifacts "$t") - before))
    if [ "$crashes" -eq 0 ] && [ "$rc" -ne 0 ] && [ "$rc" -ne 72 ] && [ "$rc" -ne 130 ]; then
        # Stopped by something else than our SIGINT (libFuzzer's 72): count it.
        crashes=1
    fi
    (
        flock 9
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$t" \
            "$cpu" "$wall" "${execs:-0}" "${cov:-0}" "${ft:-0}" "$files" "$crashes" >>"$results"
    ) 9>>"$results"
    echo "campaign: $t: ${cpu}s CPU in ${wall}s, ${execs:-0} execs, cov ${cov:-0} ft ${ft:-0}, $files inputs, $crashes crash(es) — $log"
    [ "$crashes" -eq 0 ]
}

# Runs target $1 in slices until it has its budget (from $2 accumulated).
run_target() {
    local t=$1 goal=$2 have
    while :; do
        have=$(accumulated "$t")
        [ "$have" -ge "$goal" ] && return 0
        local want=$((goal - have))
        [ "$want" -gt "$slice" ] && want=$slice
        # A slice that ends early (startup only) still counts its CPU; stop on a crash.
        run_slice "$t" "$want" || return 1
        [ "$(accumulated "$t")" -gt "$have" ] || return 1
    done
}

failed=0
ran=()
running=0
for t in "${targets[@]}"; do
    [ -x "$bin_dir/$t" ] || { echo "campaign.sh: no fuzz target $t (cargo fuzz list)" >&2; exit 2; }
    have=$(accumulated "$t")
    goal=$budget
    if [ "$force" = 1 ]; then
        goal=$((have + budget))
    elif [ "$have" -ge "$budget" ]; then
        echo "campaign: $t has ${have}s of ${budget}s: skipped (--force runs it again)"
        continue
    fi
    if [ "$running" -ge "$jobs" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
    echo "campaign: $t from ${have}s to ${goal}s CPU"
    run_target "$t" "$goal" &
    running=$((running + 1))
    ran+=("$t")
done
while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done

if [ "$cmin" = 1 ]; then
    for t in "${ran[@]}"; do
        corpus="$fuzz/corpus/$t"
        new="$corpus.cmin"
        rm -rf "$new"
        mkdir -p "$new"
        if nice -n 19 "$bin_dir/$t" -merge=1 -timeout=30 -rss_limit_mb=2048 $(flags_of "$t") \
            -artifact_prefix="$fuzz/artifacts/$t/" "$new" "$corpus" >"$logs/cmin-$t.log" 2>&1; then
            echo "campaign: $t corpus minimized: $(find "$corpus" -type f | wc -l) → $(find "$new" -type f | wc -l) inputs"
            rm -rf "$corpus"
            mv "$new" "$corpus"
        else
            echo "campaign: $t corpus not minimized (see $logs/cmin-$t.log)" >&2
            rm -rf "$new"
        fi
    done
fi

left=$(find "$fuzz/artifacts" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
    -o -name 'oom-*' \) | wc -l)
if [ "$failed" != 0 ] || [ "$left" != 0 ]; then
    echo "campaign: FAILED: $left artifact(s) in $fuzz/artifacts" >&2
    exit 1
fi
echo "campaign: done, no crash"
exit 0
}

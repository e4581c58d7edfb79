#!/usr/bin/env bash
# Runs cargo-fuzz targets for a given number of minutes each and reports executions and
# crashes.  Usage: fuzz/run.sh MINUTES [TARGET...]   (default: every target)
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Env: FUZZ_ARGS adds libFuzzer flags (e.g. FUZZ_ARGS="-jobs=2 -workers=2").
set -u
cd "$(dirname "$0")"
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "usage: $0 MINUTES [TARGET...]" >&2
    exit 2
fi
minutes=$1
shift
secs=$(awk -v m="$minutes" 'BEGIN { s = int(m * 60); if (s < 1) s = 1; print s }')
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
mkdir -p logs
status=0
summary=()
for t in "${targets[@]}"; do
    log="logs/$t.log"
    mkdir -p "corpus/$t"
    echo "== $t: ${secs}s (log: fuzz/$log)"
    # Fuzz a scratch copy of the corpus so new inputs do not clutter the committed seeds.
    work="target/corpus-work/$t"
    mkdir -p "$work"
    cp -n "corpus/$t"/* "$work"/ 2>/dev/null || true
    cargo +nightly fuzz run "$t" "$work" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        ${FUZZ_ARGS:-} >"$log" 2>&1
    rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
    if [ -z "$execs" ]; then
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    fi
    if grep -qE '==[0-9]+== ERROR: libFuzzer|panicked at|ERROR: AddressSanitizer|SUMMARY: libFuzzer' "$log"; then
        artifact=$(grep -oE 'artifacts/[^ ]+' "$log" | tail -1)
        result="CRASH (${artifact:-see log})"
        status=1
    elif [ $rc -ne 0 ]; then
        result="FAILED rc=$rc (see log)"
        status=1
    else
        result="no crash"
    fi
    line="$t: executions=${execs:-?} ${result}"
    echo "$line"
    summary+=("$line")
done
echo "== summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
exit $status

#!/bin/bash
# [M2] LMTP delivery: our filer vs the reference Dovecot LMTP, interleaved, plus the disk's
# fsync rate in the same window.
#
# For each of RUNS rounds:
#   1. disk: mailbench fsync, 1 and 20 threads (plain, and --dir-fsync)
#   2. ours: fresh directory, mailctl domain add / user import (1000 users), mailctl up,
#      mailbench lmtp against filer1 (127.0.0.1:2401) with the 500 users that filer1 holds
#      (from `mailctl user list --json`), count files in cur/+new/ under data/filers, stop
#   3. Dovecot: stop backend, empty /var/tmp/anchors/mail/example.test, start backend,
#      the same mailbench lmtp against 127.0.0.1:22024 with the SAME 500 users, count, stop
# Each LMTP run waits (bounded) for an idle machine (quiet.py), logs `uptime`, and takes
# proctree.py cpu of the server tree (mailctl up pid / Dovecot master pid) before and after,
# and /proc/stat before and after (other CPU = machine busy - server - mailbench).
#
# env: RUNS=3 N=20000 SESSIONS=20 SIZE=4096 MIN_IDLE=90 MAX_WAIT=300 BIN=target/release
#      OUT=results dir (default /var/tmp/bench-lmtp-<stamp>)
# Prerequisites: cargo build --release -p integration --bin mailctl --bin mailbench;
#   anchors copied to /tmp/anchors with setup.sh done. Never starts Postfix.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
A=${ANCHORS:-/tmp/anchors}
RUNS=${RUNS:-3}; N=${N:-20000}; SESSIONS=${SESSIONS:-20}; SIZE=${SIZE:-4096}
MIN_IDLE=${MIN_IDLE:-90}; MAX_WAIT=${MAX_WAIT:-300}
OUT=${OUT:-/var/tmp/bench-lmtp-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
M=$BIN/mailctl; B=$BIN/mailbench
UP=""; DIR=""
cleanup() {
  if [ -n "$UP" ]; then kill "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; fi
  [ -n "$DIR" ] && rm -rf "$DIR"
  "$A/stop.sh" backend || true
}
trap cleanup EXIT

log() { echo "$(date +%T) $*" | tee -a "$OUT/log.txt" >&2; }
stat_busy() { python3 -c "
with open('/proc/stat') as f: v=[int(x) for x in f.readline().split()[1:]]
import os; print((sum(v[:8])-v[3]-v[4])/os.sysconf('SC_CLK_TCK'))"; }
cpu() { python3 "$A/proctree.py" cpu "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cpu_s"])'; }

# one LMTP run: label target server_pid count_cmd
lmtp_run() {
  local label=$1 target=$2 pid=$3 count_root=$4 users=$5
  local q up c0 c1 s0 s1 res cnt
  q=$(python3 "$A/quiet.py" wait --min-idle "$MIN_IDLE" --max-wait "$MAX_WAIT")
  up=$(uptime)
  c0=$(cpu "$pid"); s0=$(stat_busy)
  res=$("$B" lmtp "$target" --messages "$N" --sessions "$SESSIONS" --size "$SIZE" \
        --rcpts-per-msg 1 --users "$users" --json)
  c1=$(cpu "$pid"); s1=$(stat_busy)
  sleep 1
  cnt=$(python3 "$A/maildir_count.py" "$count_root")
  python3 - "$label" "$q" "$up" "$c0" "$c1" "$s0" "$s1" "$res" "$cnt" <<'EOF' | tee -a "$OUT/lmtp.jsonl"
import json, sys
label, q, up, c0, c1, s0, s1, res, cnt = sys.argv[1:]
r = json.loads(res)
srv = float(c1) - float(c0)
busy = float(s1) - float(s0)
r.update(label=label, gate=json.loads(q), uptime=up.strip(),
         load1=float(up.split("load average:")[1].split(",")[0]),
         server_cpu_s=round(srv, 2),
         server_cpu_ms_per_msg=round(1000 * srv / max(1, r["messages_delivered"]), 3),
         machine_busy_s=round(busy, 1),
         other_cpu_s=round(busy - srv - r["client_cpu_s"], 1),
         maildir_count=int(cnt))
print(json.dumps(r))
EOF
}

for run in $(seq 1 "$RUNS"); do
  log "round $run: disk"
  for t in 1 20; do
    for d in "" --dir-fsync; do
      python3 "$A/quiet.py" wait --min-idle "$MIN_IDLE" --max-wait "$MAX_WAIT" >/dev/null
      "$B" fsync /var/tmp/mb --threads "$t" --seconds 5 $d --json | \
        python3 -c "import json,sys; r=json.load(sys.stdin); r['round']=$run; print(json.dumps(r))" | tee -a "$OUT/fsync.jsonl"
    done
  done

  log "round $run: ours (filer1, 127.0.0.1:2401)"
  DIR=$(mktemp -d /var/tmp/plat.XXXX)
  (cd "$DIR"
   "$M" domain add example.test >/dev/null
   python3 -c "for i in range(1,1001): print('user%04d@example.test pw-user%04d' % (i,i))" | "$M" user import >/dev/null)
  (cd "$DIR" && RUST_LOG=warn exec "$M" up > up.log 2>&1) &
  UP=$!
  for _ in $(seq 1 300); do (cd "$DIR" && "$M" status >/dev/null 2>&1) && break; sleep 0.1; done
  (cd "$DIR" && "$M" status >/dev/null) || { cat "$DIR/up.log"; exit 1; }
  (cd "$DIR" && "$M" user list --json) | python3 -c "
import json,sys
for u in json.load(sys.stdin):
    if u['filer']=='filer1': print(u['address'])" > "$OUT/users-filer1.txt"
  lmtp_run "ours-filer1" 127.0.0.1:2401 "$UP" "$DIR/data/filers" "$OUT/users-filer1.txt"
  cp "$DIR/up.log" "$OUT/up-$run.log"
  kill "$UP"; wait "$UP" || true; UP=""
  rm -rf "$DIR"; DIR=""

  log "round $run: Dovecot (127.0.0.1:22024)"
  "$A/stop.sh" backend
  rm -rf /var/tmp/anchors/mail/example.test
  "$A/start.sh" backend
  lmtp_run "dovecot" 127.0.0.1:22024 /var/tmp/anchors/run/backend/master.pid /var/tmp/anchors/mail "$OUT/users-filer1.txt"
  "$A/stop.sh" backend
done
log "done: $OUT"

#!/bin/bash
# Relay ([M6]): (a) authenticated submission into the relay, (b) outbound delivery from the
# relay's queue into Postfix's smtp-sink, (c) both at once. Everything on loopback.
#
# Starts the platform (release build) in a fresh directory with its listeners on ephemeral
# ports, except the relay's submission listener (SUBMIT_PORT); the relay routes every remote
# domain ("*") to smtp-sink on SINK_PORT. One user, alice@example.test, submits to recipients
# rcptNNNN@sink.test with `mailbench submit` (SESSIONS sessions, each logged in once).
#
#   (a) smtp-sink is started and then stopped (SIGSTOP): the kernel still completes the
#       relay's connections into its listen backlog, so the relay's first `max_deliveries`
#       attempts wait for a greeting and the rest of the queue waits its turn. Submission is
#       measured alone: N messages with AUTH in plaintext (allowed on loopback in dev mode),
#       then N with STARTTLS (mailbench --starttls: an openssl s_client per session).
#   (b) smtp-sink is resumed (SIGCONT); the clock runs until the relay's queue holds no
#       envelope (`*.env`): every message was delivered and removed. Outbound rate = 2N / that.
#   (c) N more in plaintext with smtp-sink running: submission rate while delivering, and
#       the time until the queue is empty again.
#
#   bench/relay.sh       prints a table; OUT=FILE also keeps the JSON line of each phase
# env: N=20000 (messages per submission run) SESSIONS=10 SIZE=4096 SUBMIT_PORT=12587
#      SINK_PORT=12526 DKIM=1 (sign with a key for example.test) NOBUILD=1 KEEP=1 (keep $DIR)
#      TIMEOUT=900 (seconds allowed for each phase)
#      MIN_IDLE=50 (before each phase, wait up to 5 min for the machine to be this % idle over
#      2 s, with the anchors' quiet.py; 0: don't) ANCHORS=../shared/anchors
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$ROOT/../shared/anchors}; MIN_IDLE=${MIN_IDLE:-50}
OUT=${OUT:+$(realpath -m "$OUT")}
N=${N:-20000}; SESSIONS=${SESSIONS:-10}; SIZE=${SIZE:-4096}; TIMEOUT=${TIMEOUT:-900}
SUBMIT_PORT=${SUBMIT_PORT:-12587}; SINK_PORT=${SINK_PORT:-12526}
SINK_BIN=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
[ -x "$SINK_BIN" ] || { echo "smtp-sink missing: apt-get install postfix (and keep its daemon stopped)" >&2; exit 1; }
command -v openssl >/dev/null || { echo "openssl missing (mailbench --starttls runs s_client)" >&2; exit 1; }
for p in "$SUBMIT_PORT" "$SINK_PORT"; do
  if ss -Hltn "sport = :$p" | grep -q .; then echo "port $p is in use" >&2; exit 1; fi
done
[ -n "${NOBUILD:-}" ] || (cd "$ROOT" && cargo build -q --release -p integration --bin mailctl --bin mailbench)
M="$ROOT/target/release/mailctl"; B="$ROOT/target/release/mailbench"
DIR=$(mktemp -d /var/tmp/relay-bench.XXXXXX)
cd "$DIR"
cleanup() {
  [ -n "${UP:-}" ] && kill "$UP" 2>/dev/null
  [ -n "${SINK:-}" ] && { kill -CONT "$SINK" 2>/dev/null; kill "$SINK" 2>/dev/null; }
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$DIR"
}
trap cleanup EXIT

cat > relay-bench.toml <<EOF
[platform]
data_dir = "$DIR/data"

[relay]
submission = "127.0.0.1:$SUBMIT_PORT"
submissions = "127.0.0.1:0"
internal = "127.0.0.1:0"
plaintext_on_loopback = true
messages_per_hour = 10000000
# While smtp-sink is stopped, the relay's attempts wait this long for its greeting.
smtp_timeout = "30m"

[relay.routes]
"*" = "127.0.0.1:$SINK_PORT"

[access]
imap = "127.0.0.1:0"
imaps = "127.0.0.1:0"
pop3 = "127.0.0.1:0"
pop3s = "127.0.0.1:0"

[spool]
smtp = "127.0.0.1:0"
reinject = "127.0.0.1:0"

[[filers]]
name = "filer1"
lmtp = "127.0.0.1:0"
imap = "127.0.0.1:0"
pop3 = "127.0.0.1:0"

[[filers]]
name = "filer2"
lmtp = "127.0.0.1:0"
imap = "127.0.0.1:0"
pop3 = "127.0.0.1:0"
EOF
export MAILCTL_CONFIG="$DIR/relay-bench.toml"
"$M" domain add example.test >/dev/null
printf 'pw-alice\n' | "$M" user add alice@example.test >/dev/null
[ -z "${DKIM:-}" ] || "$M" dkim generate example.test >/dev/null

"$SINK_BIN" -c -u nobody "127.0.0.1:$SINK_PORT" 1000 > sink.out 2>&1 &
SINK=$!
for _ in $(seq 1 100); do ss -Hltn "sport = :$SINK_PORT" | grep -q . && break; sleep 0.05; done
kill -STOP "$SINK"
RUST_LOG=warn "$M" up > up.log 2>&1 &
UP=$!
for _ in $(seq 1 300); do "$M" status >/dev/null 2>&1 && break; sleep 0.1; done
"$M" status >/dev/null || { cat up.log; exit 1; }
QUEUE="$DIR/data/relay"

ticks() { awk '{print $14 ":" $15}' "/proc/$1/stat"; }        # utime:stime of a process
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }     # user+nice+system+irq+softirq
envs() { find "$QUEUE" -maxdepth 1 -name '*.env' | wc -l; }
HZ=$(getconf CLK_TCK)
GATE='{}'
gate() {  # waits for a quiet machine; GATE: what it saw, and the load average
  local q='{}'
  if [ "$MIN_IDLE" != 0 ] && [ -f "$ANCHORS/quiet.py" ]; then
    q=$(python3 "$ANCHORS/quiet.py" wait --min-idle "$MIN_IDLE" --max-wait 300)
  fi
  GATE=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["load1"]=float(open("/proc/loadavg").read().split()[0]); print(json.dumps(d))' "$q")
}

# wait_empty T0 SUNK: waits until the queue holds no envelope; prints the seconds since T0
# (epoch s) and the envelopes left. Listing the full queue costs ~50 ms of CPU (80k files), so
# it first follows smtp-sink's counter (mesg=…, rewritten after every message) up to SUNK,
# looking at the queue only every 2 s, and then polls the by then nearly empty queue.
wait_empty() {
  python3 - "$QUEUE" "$1" "$TIMEOUT" "$DIR/sink.out" "$2" <<'PY'
import os, re, sys, time
queue, t0, timeout, sink, target = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
def envelopes():
    return sum(1 for e in os.scandir(queue) if e.name.endswith(".env"))
def sunk():
    with open(sink, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 200))
        found = re.findall(rb"mesg=(\d+)", f.read())
    return int(found[-1]) if found else 0
last_listing = time.time()
while sunk() < target and time.time() - t0 < timeout:
    if time.time() - last_listing > 2:
        if envelopes() == 0:
            break
        last_listing = time.time()
    time.sleep(0.05)
while True:
    n, now = envelopes(), time.time()
    if n == 0 or now - t0 > timeout:
        print(f"{now - t0:.3f} {n}")
        break
    time.sleep(0.05)
PY
}
sunk() {  # messages smtp-sink took so far (its counter lines are separated by \r)
  local n
  n=$(tr '\r' '\n' < "$DIR/sink.out" | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2 || true)
  echo "${n:-0}"
}

# phase NAME SECONDS MESSAGES SRV0 SRV1 SINK0 SINK1 BUSY0 BUSY1 CLIENT_JSON|-: one JSON line.
phase() {
  python3 - "$@" "$HZ" "$GATE" <<'PY' | tee -a results.jsonl
import json, sys
name, secs, msgs, s0, s1, k0, k1, b0, b1, client, hz, gate = sys.argv[1:]
secs, msgs, hz = float(secs), int(msgs), int(hz)
def ticks(t0, t1):  # (user, system) ticks between two utime:stime samples
    (u0, y0), (u1, y1) = (map(int, t.split(":")) for t in (t0, t1))
    return u1 - u0, y1 - y0
su, ss = ticks(s0, s1)
ku, ks = ticks(k0, k1)
out = {"phase": name, "gate": json.loads(gate), "messages": msgs, "seconds": round(secs, 3),
       "msgs_per_s": round(msgs / secs, 1) if secs > 0 else None,
       "server_cpu_s": round((su + ss) / hz, 2), "server_sys_cpu_s": round(ss / hz, 2),
       "server_cpu_ms_per_msg": round(1000 * (su + ss) / hz / max(1, msgs), 3),
       "sink_cpu_s": round((ku + ks) / hz, 2),
       "machine_busy_cpu_s": round((int(b1) - int(b0)) / hz, 2)}
if client != "-":
    out["client"] = json.loads(client)
print(json.dumps(out))
PY
}

submit() {  # submit EXTRA_ARGS...: one mailbench run, JSON on stdout
  MAILBENCH_PASSWORD=pw-alice "$B" submit "127.0.0.1:$SUBMIT_PORT" --user alice@example.test \
    --messages "$N" --sessions "$SESSIONS" --size "$SIZE" --user-fmt 'rcpt%04d@sink.test' \
    --user-count 1000 --max-seconds "$TIMEOUT" --json "$@"
}

run_submit() {  # run_submit NAME EXTRA_ARGS...
  local name=$1; shift
  local s0 k0 b0 t0 out t1
  gate
  s0=$(ticks "$UP"); k0=$(ticks "$SINK"); b0=$(busy); t0=$(date +%s.%N)
  out=$(submit "$@") || { echo "$out" >&2; exit 1; }
  t1=$(date +%s.%N)
  phase "$name" "$(awk "BEGIN{print $t1 - $t0}")" "$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages_delivered"])')" \
    "$s0" "$(ticks "$UP")" "$k0" "$(ticks "$SINK")" "$b0" "$(busy)" "$out" >/dev/null
}

echo "uptime: $(uptime)" >&2
run_submit submit_plain
run_submit submit_starttls --starttls
QUEUED=$(envs)
echo "queued before (b): $QUEUED envelopes" >&2

# (b) outbound: resume smtp-sink and wait for the queue to empty.
gate
s0=$(ticks "$UP"); k0=$(ticks "$SINK"); b0=$(busy); t0=$(date +%s.%N)
kill -CONT "$SINK"
read -r secs left < <(wait_empty "$t0" "$(( $(sunk) + QUEUED ))")
phase outbound "$secs" "$((QUEUED - left))" "$s0" "$(ticks "$UP")" "$k0" "$(ticks "$SINK")" "$b0" "$(busy)" - >/dev/null
[ "$left" -eq 0 ] || echo "queue not empty after ${TIMEOUT}s: $left left" >&2

# (c) both at once: submit with smtp-sink running, then wait for the queue to empty.
SUNK0=$(sunk)
gate
s0=$(ticks "$UP"); k0=$(ticks "$SINK"); b0=$(busy); t0=$(date +%s.%N)
out=$(submit) || { echo "$out" >&2; exit 1; }
ta=$(date +%s.%N)
s1=$(ticks "$UP"); k1=$(ticks "$SINK"); b1=$(busy)
read -r secs left < <(wait_empty "$t0" "$((SUNK0 + N))")
phase submit_while_delivering "$(awk "BEGIN{print $ta - $t0}")" "$N" "$s0" "$s1" "$k0" "$k1" "$b0" "$b1" "$out" >/dev/null
phase end_to_end "$secs" "$((N - left))" "$s0" "$(ticks "$UP")" "$k0" "$(ticks "$SINK")" "$b0" "$(busy)" - >/dev/null

SUNK=$(sunk)
[ -z "${OUT:-}" ] || cp results.jsonl "$OUT"
grep -E ' (WARN|ERROR) ' up.log | head -5 >&2 || true

python3 - results.jsonl "$SUNK" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'phase':<24} {'idle%/load':>10} {'msgs':>6} {'s':>7} {'msg/s':>7} {'p50/p99 ms (dot)':>17} "
      f"{'txn p50/p99 ms':>15} {'server ms/msg':>13} {'client CPU s':>12} {'errors':>6}")
for r in rows:
    c = r.get("client", {})
    lat = f"{c['lat_ms_p50']}/{c['lat_ms_p99']}" if c else "-"
    txn = f"{c['txn_ms_p50']}/{c['txn_ms_p99']}" if c else "-"
    errs = sum(c.get("errors", {}).values()) if c else 0
    rate = c["msgs_per_s"] if c else r["msgs_per_s"]
    g = r["gate"]
    quiet = f"{g.get('idle_pct', '-')}/{g['load1']}"
    print(f"{r['phase']:<24} {quiet:>10} {r['messages']:>6} {r['seconds']:>7} {rate:>7} {lat:>17} {txn:>15} "
          f"{r['server_cpu_ms_per_msg']:>13} {c.get('client_cpu_s', '-'):>12} {errs:>6}")
print(f"smtp-sink counted {sys.argv[2]} messages")
PY

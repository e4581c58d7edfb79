#!/bin/bash
# [M5] The access proxy vs the reference Dovecot proxy, with the anchors' load scripts.
#
#   1. ours: fresh directory, 1000 users (`mailctl user import`), `mailctl up` (all in one
#      process: spool, access proxy on 1143/1110 (+ PORT_OFFSET), filer1 and filer2);
#      MESSAGES x SIZE messages over each filer's LMTP with `mailbench lmtp`, to that filer's
#      users (from `mailctl user list --json`), so each user holds ~20 messages.
#   2. Dovecot: backend (22143/22110) and proxy (22243/22210) from the anchors. Its mail store is
#      moved aside (and put back at the end) and loaded the same way over 127.0.0.1:22024 (all
#      1000 users).
#   3. A warm-up imap_load.py pass on each server (moves new/ to cur/; Dovecot builds indexes).
#   4. INV rounds, each: imap_load.py, pop3_load.py, imap_noop.py and $OUT/fetch_stream.py
#      (FETCH 1:* BODY.PEEK[] of user0001's INBOX, 300 times on one connection) against, in turn,
#        ours-proxy    our access proxy (127.0.0.1:1143 / 1110)
#        ours-direct   our filers directly: the anchors' scripts run under a wrapper
#                      ($OUT/direct.py) that replaces LOGIN / USER+PASS with the proxy's trusted
#                      login (AUTHENTICATE PLAIN / AUTH PLAIN of user\0proxy\0secret) and connects
#                      to the user's filer (filers accept nothing else)
#        dovecot-proxy 127.0.0.1:22243 / 22210
#        dovecot-direct 127.0.0.1:22143 / 22110 (plain LOGIN on the backend)
#      Each run waits (bounded) for an idle machine and records `uptime`. Server CPU is the
#      `mailctl up` process (proxy and filers together) / the Dovecot backend (+ proxy) trees.
#      Our platform is restarted before each round (see RSS_LIMIT_MB).
#   5. imap_idle_hold.py --conns CONNS, RUNS_IDLE times each, each from freshly started servers:
#      ours all-in-one (one process: the proxy AND the filers holding the 2000 IMAP sessions),
#      as shipped and with MALLOC_MMAP_THRESHOLD_=1048576 ("-mmap"), and Dovecot (proxy tree and
#      backend tree reported separately).
#   6. ours split into three processes on the same database and mail (proxy.toml: access only;
#      f1.toml, f2.toml: one filer each): imap_idle_hold.py measuring the proxy process alone
#      (as shipped, and -mmap), then the filer1 process is killed and proxy_failure.py (IMAP, POP3) logs in a filer1 user.
#      Dovecot: backend stopped, proxy_failure.py against its proxy, default and with
#      `login_proxy_max_reconnects = 0` (conf/dovecot-proxy-noreconnect.conf).
# Everything is stopped at the end (trap); Postfix is never started. Results: $OUT/*.jsonl and
# $OUT/summary.md (medians; raw runs in brackets).
#
# env: USERS=1000 MESSAGES=20000 SIZE=4096 SESSIONS=1000 NOOPS=3000 CONNS=2000 INV=3
#      PORT_OFFSET=0 RUNS_IDLE=3 MIN_IDLE=80 MAX_WAIT=120 RSS_LIMIT_MB=12000 BIN=target/release ANCHORS=/tmp/anchors
#      OUT=/var/tmp/bench-proxy-<stamp> NO_BUILD=1 (skip cargo build)
# Prerequisites: anchors copied to /tmp/anchors with setup.sh done (see bench/README.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
A=${ANCHORS:-/tmp/anchors}
USERS=${USERS:-1000}; MESSAGES=${MESSAGES:-20000}; SIZE=${SIZE:-4096}
SESSIONS=${SESSIONS:-1000}; NOOPS=${NOOPS:-3000}; CONNS=${CONNS:-2000}
INV=${INV:-3}; RUNS_IDLE=${RUNS_IDLE:-3}; MIN_IDLE=${MIN_IDLE:-80}; MAX_WAIT=${MAX_WAIT:-120}
OUT=${OUT:-/var/tmp/bench-proxy-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
M=$BIN/mailctl; B=$BIN/mailbench
# Our listeners: the all-in-one defaults + PORT_OFFSET (another platform may hold the defaults)
OFF=${PORT_OFFSET:-0}
IMAP=$((1143 + OFF)); POP3=$((1110 + OFF))
F1_LMTP=$((2401 + OFF)); F1_IMAP=$((2143 + OFF)); F1_POP3=$((2110 + OFF))
F2_LMTP=$((2402 + OFF)); F2_IMAP=$((2144 + OFF)); F2_POP3=$((2111 + OFF))
ALL_PORTS="$IMAP $POP3 $F1_LMTP $F2_LMTP $F1_IMAP $F2_IMAP"
h=$(ulimit -Hn); [ "$h" = unlimited ] && h=65536; [ "$h" -gt 65536 ] && h=65536
ulimit -n "$h"   # 2000 proxied sessions = 6000 sockets in the all-in-one process

if [ -z "${NO_BUILD:-}" ]; then
  (cd "$ROOT" && cargo build --release -p integration --bin mailctl --bin mailbench)
fi

DIR=$(mktemp -d /var/tmp/plat-proxy.XXXX)
PIDS=()   # our mailctl up processes
STORE=/var/tmp/anchors/mail/example.test   # Dovecot's mail; what was there is put back
SAVED=/var/tmp/anchors/example.test.saved-$$   # outside mail/: maildir_count.py counts all of it
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  "$A/stop.sh" proxy backend || true
  if [ -d "$SAVED" ]; then rm -rf "$STORE" && mv "$SAVED" "$STORE"; fi
  true
}
trap cleanup EXIT
log() { echo "$(date -u +%T) $*" | tee -a "$OUT/log.txt" >&2; }
wait_port() {  # host port
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1:$2 did not open" >&2; return 1
}
free_port() {  # port: nothing may listen there before we start
  if ss -Hltn "sport = :$1" | grep -q .; then echo "port $1 is in use" >&2; exit 1; fi
}
start_ours() {  # config ("" = platform.toml) port...; sets LAST_PID. $MAILCTL_ENV: extra environment
  local cfg=${1:-platform.toml}; shift
  for p in "$@"; do free_port "$p"; done
  # shellcheck disable=SC2086
  (cd "$DIR" && exec env RUST_LOG=warn ${MAILCTL_ENV:-} "$M" -c "$cfg" up >> "up-${cfg%.toml}.log" 2>&1) &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  for p in "$@"; do wait_port 127.0.0.1 "$p"; done
  guard "$LAST_PID" &
}
# The proxy's RSS grows by GBs with logins (argon2's 19 MiB blocks kept by glibc malloc; see
# bench/README.md): kill a process of ours that passes RSS_LIMIT_MB rather than the machine.
RSS_LIMIT_MB=${RSS_LIMIT_MB:-12000}
guard() {  # pid
  while kill -0 "$1" 2>/dev/null; do
    local kb; kb=$(awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0)
    if [ "${kb:-0}" -gt $((RSS_LIMIT_MB * 1024)) ]; then
      echo "$(date -u +%T) GUARD: pid $1 RSS ${kb} kB > ${RSS_LIMIT_MB} MB: killed" | tee -a "$OUT/log.txt" >&2
      kill "$1"; return
    fi
    sleep 0.5
  done
}
rss() { awk '/^VmRSS/ {print $2 " kB"}' "/proc/$1/status" 2>/dev/null; }
stop_ours() {  # pid
  kill "$1"; wait "$1" 2>/dev/null || true
  local keep=(); for p in "${PIDS[@]}"; do [ "$p" != "$1" ] && keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}
quiet() { python3 "$A/quiet.py" wait --min-idle "$MIN_IDLE" --max-wait "$MAX_WAIT"; }
record() {  # name invocation quiet-json result-json  -> one line in $OUT/<workload>.jsonl
  python3 - "$@" "$(uptime)" "$OUT" <<'EOF'
import json, sys
name, inv, q, r, up, out = sys.argv[1:]
lines = [json.loads(l) for l in r.strip().splitlines() if l.strip()]
res = lines[-1]
if len(lines) > 1:
    res["tries"] = lines[:-1]
res.update(server=name, invocation=int(inv), quiet=json.loads(q), uptime=up.strip())
with open("%s/%s.jsonl" % (out, res["workload"]), "a") as f:
    f.write(json.dumps(res) + "\n")
print(json.dumps({k: v for k, v in res.items() if k not in ("tries", "by_comm_during")})[:400])
EOF
}
DB_PIDS_BACKEND=/var/tmp/anchors/run/backend/master.pid
DB_PIDS_PROXY=/var/tmp/anchors/run/proxy/master.pid

# --- 1. ours: set up and load --------------------------------------------------------------
log "ours: $DIR"
cat > "$DIR/platform.toml" <<CONF
[spool]
smtp = "127.0.0.1:$((2525 + OFF))"
reinject = "127.0.0.1:$((10025 + OFF))"
[access]
imap = "127.0.0.1:$IMAP"
imaps = "127.0.0.1:$((1993 + OFF))"
pop3 = "127.0.0.1:$POP3"
pop3s = "127.0.0.1:$((1995 + OFF))"
[[filers]]
name = "filer1"
lmtp = "127.0.0.1:$F1_LMTP"
imap = "127.0.0.1:$F1_IMAP"
pop3 = "127.0.0.1:$F1_POP3"
[[filers]]
name = "filer2"
lmtp = "127.0.0.1:$F2_LMTP"
imap = "127.0.0.1:$F2_IMAP"
pop3 = "127.0.0.1:$F2_POP3"
CONF
(cd "$DIR"
 "$M" -c platform.toml domain add example.test >/dev/null
 python3 -c "for i in range(1,$USERS+1): print('user%04d@example.test pw-user%04d' % (i,i))" \
   | "$M" -c platform.toml user import >/dev/null)
# shellcheck disable=SC2086
start_ours "" $ALL_PORTS
UP=$LAST_PID
(cd "$DIR" && "$M" -c platform.toml user list --json > "$OUT/users.json" &&
 "$M" -c platform.toml filer list --json > "$OUT/filers.json")
python3 - "$OUT" "$MESSAGES" <<'EOF'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
users = json.load(open(out + "/users.json"))
filers = {f["name"]: f for f in json.load(open(out + "/filers.json"))}
by = {}
for u in users:
    by.setdefault(u["filer"], []).append(u["address"])
plan = []
for name, addrs in sorted(by.items()):
    with open("%s/users-%s.txt" % (out, name), "w") as f:
        f.write("\n".join(addrs) + "\n")
    plan.append("%s %s %d" % (name, filers[name]["lmtp"], round(n * len(addrs) / len(users))))
# user -> [imap, pop3] of its filer, for the direct runs
json.dump({u["address"]: [filers[u["filer"]]["imap"], filers[u["filer"]]["pop3"]] for u in users},
          open(out + "/direct-map.json", "w"))
open(out + "/load-plan.txt", "w").write("\n".join(plan) + "\n")
EOF
while read -r name lmtp n; do
  log "ours: $n messages to the users of $name over $lmtp"
  "$B" lmtp "$lmtp" --messages "$n" --sessions 20 --size "$SIZE" --rcpts-per-msg 1 \
    --users "$OUT/users-$name.txt" --json | tee -a "$OUT/load-ours.json"
done < "$OUT/load-plan.txt"
log "ours: maildir count $(python3 "$A/maildir_count.py" "$DIR/data/filers")"
SECRET=$(cat "$DIR/data/proxy.secret")

# --- 2. Dovecot: load ------------------------------------------------------------------------
"$A/stop.sh" proxy backend
if [ -d "$STORE" ]; then mv "$STORE" "$SAVED"; fi
"$A/start.sh" backend
log "Dovecot: $MESSAGES messages over 127.0.0.1:22024"
"$B" lmtp 127.0.0.1:22024 --messages "$MESSAGES" --sessions 20 --size "$SIZE" --rcpts-per-msg 1 \
  --user-fmt 'user%04d@example.test' --user-count "$USERS" --json | tee -a "$OUT/load-dovecot.json"
log "Dovecot: maildir count $(python3 "$A/maildir_count.py" /var/tmp/anchors/mail)"
"$A/start.sh" proxy

# --- the direct-to-filer wrapper ---------------------------------------------------------------
cat > "$OUT/direct.py" <<'EOF'
"""direct.py MAP.json SECRET SCRIPT ARGS...: runs an anchors script against our filers directly.
imaplib/poplib connect to the user's filer (from MAP: user -> [imap, pop3]) when the user is
known (at login), and log in with the proxy's trusted login (SASL PLAIN user\\0proxy\\0secret);
a raw `L LOGIN "user" "pw"` line (imap_noop.py) becomes AUTHENTICATE PLAIN with SASL-IR."""
import base64, imaplib, json, poplib, runpy, socket, sys
MAP = json.load(open(sys.argv[1])); SECRET = sys.argv[2]
script = sys.argv[3]; sys.argv = [script] + sys.argv[4:]
token = lambda u: ("%s\0proxy\0%s" % (u, SECRET)).encode()
def hp(a):
    h, p = a.rsplit(":", 1); return h, int(p)

def imap_init(self, host="", port=143, timeout=None):
    self._deferred = timeout
def imap_login(self, user, password):
    host, port = hp(MAP[user][0])
    imaplib.IMAP4._orig_init(self, host, port, self._deferred)
    return self.authenticate("PLAIN", lambda _: token(user))
imaplib.IMAP4._orig_init = imaplib.IMAP4.__init__
imaplib.IMAP4.__init__ = imap_init
imaplib.IMAP4.login = imap_login

def pop_init(self, host, port=110, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
    self._deferred = timeout
def pop_user(self, user):
    host, port = hp(MAP[user][1])
    poplib.POP3._orig_init(self, host, port, self._deferred)
    self._user = user
    return b"+OK"
def pop_pass(self, pw):
    return self._shortcmd("AUTH PLAIN " + base64.b64encode(token(self._user)).decode())
poplib.POP3._orig_init = poplib.POP3.__init__
poplib.POP3.__init__ = pop_init
poplib.POP3.user = pop_user
poplib.POP3.pass_ = pop_pass

_sendall = socket.socket.sendall
def sendall(self, data, *a):
    if data.startswith(b"L LOGIN "):
        user = data.split(b'"')[1].decode()
        data = b"L AUTHENTICATE PLAIN " + base64.b64encode(token(user)) + b"\r\n"
    return _sendall(self, data, *a)
socket.socket.sendall = sendall
runpy.run_path(script, run_name="__main__")
EOF
# FETCH throughput on one logged-in connection (no login in the timing; the anchors' scripts
# log in once per session, and our logins cost an argon2 verification, Dovecot's none)
cat > "$OUT/fetch_stream.py" <<'EOF'
"""fetch_stream.py HOST:PORT USER PASSWORD [--trusted SECRET] [--rounds N]: logs in (LOGIN, or
AUTHENTICATE PLAIN user\0proxy\0SECRET on a filer), SELECTs INBOX, then times N rounds of
FETCH 1:* (BODY.PEEK[]) over a raw socket (one command in flight). Prints one JSON line."""
import argparse, base64, json, socket, time
ap = argparse.ArgumentParser()
ap.add_argument("target"); ap.add_argument("user"); ap.add_argument("password")
ap.add_argument("--trusted"); ap.add_argument("--rounds", type=int, default=300)
a = ap.parse_args()
h, p = a.target.rsplit(":", 1)
s = socket.create_connection((h, int(p)), timeout=60)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray()
def until(tag):
    n = 0
    while True:
        i = 0 if buf.startswith(tag + b" ") else buf.find(b"\r\n" + tag + b" ")
        if i >= 0:
            k = i if i == 0 else i + 2
            j = buf.find(b"\r\n", k)
            if j >= 0:
                line = bytes(buf[k:j]); n += j + 2; del buf[:j + 2]
                if tag != b"*" and not line.startswith(tag + b" OK"):
                    raise RuntimeError(line)
                return n
        d = s.recv(1 << 20)
        if not d:
            raise ConnectionError("closed")
        buf.extend(d)
until(b"*")  # greeting
if a.trusted:
    tok = base64.b64encode(("%s\0proxy\0%s" % (a.user, a.trusted)).encode()).decode()
    s.sendall(b"L AUTHENTICATE PLAIN " + tok.encode() + b"\r\n")
else:
    s.sendall(('L LOGIN "%s" "%s"\r\n' % (a.user, a.password)).encode())
until(b"L"); s.sendall(b"S SELECT INBOX\r\n"); until(b"S")
lat, total = [], 0
t0 = time.perf_counter()
for k in range(a.rounds):
    t = time.perf_counter()
    s.sendall(b"F%d FETCH 1:* (BODY.PEEK[])\r\n" % k)
    total += until(b"F%d" % k)
    lat.append(time.perf_counter() - t)
el = time.perf_counter() - t0
s.sendall(b"Z LOGOUT\r\n")
lat.sort()
print(json.dumps({"workload": "fetch_stream", "target": a.target, "rounds": a.rounds,
                  "bytes_per_round": total // a.rounds, "MB_per_s": round(total / el / 1e6, 2),
                  "round_ms_median": round(lat[len(lat) // 2] * 1e3, 3),
                  "round_ms_p99": round(lat[int(len(lat) * 0.99)] * 1e3, 3)}))
EOF
U1=user0001@example.test
U1_IMAP=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]][0])" "$OUT/direct-map.json" "$U1")
direct() { python3 "$OUT/direct.py" "$OUT/direct-map.json" "$SECRET" "$@"; }
target() {  # name imap|pop3 -> host:port
  case $1-$2 in
    ours-proxy-imap) echo "127.0.0.1:$IMAP" ;; ours-proxy-pop3) echo "127.0.0.1:$POP3" ;;
    ours-direct-*) echo 127.0.0.1:0 ;;  # direct.py connects to the user's filer
    dovecot-proxy-imap) echo 127.0.0.1:22243 ;; dovecot-proxy-pop3) echo 127.0.0.1:22210 ;;
    dovecot-direct-imap) echo 127.0.0.1:22143 ;; dovecot-direct-pop3) echo 127.0.0.1:22110 ;;
  esac
}
cpu_pids() {  # name -> process trees whose CPU is counted
  case $1 in
    ours-*) echo "$UP" ;;
    dovecot-proxy) echo "$DB_PIDS_BACKEND $DB_PIDS_PROXY" ;;
    dovecot-direct) echo "$DB_PIDS_BACKEND" ;;
  esac
}
run() {  # name script args...
  local name=$1 script=$2; shift 2
  if [ "$name" = ours-direct ]; then direct "$A/$script" "$@"; else python3 "$A/$script" "$@"; fi
}

# --- 3. warm-up ------------------------------------------------------------------------------
for name in ours-proxy dovecot-direct; do
  log "warm-up $name"
  python3 "$A/imap_load.py" "$(target $name imap)" --users "$USERS" --sessions "$USERS" >> "$OUT/warmup.jsonl"
done

# --- 4. throughput and NOOP latency, interleaved -------------------------------------------
for i in $(seq 1 "$INV"); do
  # a fresh process each round, so that its RSS (see guard) starts low; the page cache stays warm
  stop_ours "$UP"; start_ours "" $ALL_PORTS; UP=$LAST_PID
  for w in imap pop3 noop fetch; do
    for name in ours-proxy ours-direct dovecot-proxy dovecot-direct; do
      q=$(quiet)
      log "round $i: $w $name $(uptime)"
      # shellcheck disable=SC2046
      case $w in
        imap) r=$(run $name imap_load.py "$(target $name imap)" --users "$USERS" --sessions "$SESSIONS" \
                    --server-pid $(cpu_pids $name)) ;;
        pop3) r=$(run $name pop3_load.py "$(target $name pop3)" --users "$USERS" --sessions "$SESSIONS" \
                    --server-pid $(cpu_pids $name)) ;;
        noop) t=$(target $name imap); [ $name = ours-direct ] && t=$U1_IMAP
              r=$(run $name imap_noop.py "$t" --count "$NOOPS") ;;
        fetch) if [ $name = ours-direct ]; then
                 r=$(python3 "$OUT/fetch_stream.py" "$U1_IMAP" "$U1" x --trusted "$SECRET")
               else
                 r=$(python3 "$OUT/fetch_stream.py" "$(target $name imap)" "$U1" pw-user0001)
               fi ;;
      esac
      record "$name" "$i" "$q" "$r"
      if [ "${name%%-*}" = ours ]; then log "ours: RSS of mailctl up: $(rss "$UP")"; fi
    done
  done
done

# --- 5. 2000 idle IMAP connections, from freshly started servers ------------------------------
MMAP_ENV=MALLOC_MMAP_THRESHOLD_=1048576   # glibc: big blocks always mmap'd, returned at free
for i in $(seq 1 "$RUNS_IDLE"); do
  for variant in ours-all-in-one ours-all-in-one-mmap; do
    stop_ours "$UP"
    MAILCTL_ENV=""; if [ $variant = ours-all-in-one-mmap ]; then MAILCTL_ENV=$MMAP_ENV; fi
    start_ours "" $ALL_PORTS; UP=$LAST_PID; MAILCTL_ENV=""
    q=$(quiet); log "idle $i: $variant $(uptime)"
    r=$(python3 "$A/imap_idle_hold.py" "127.0.0.1:$IMAP" --users "$USERS" --conns "$CONNS" --measure "platform=$UP")
    record $variant "$i" "$q" "$r"
  done
  "$A/stop.sh" proxy; "$A/start.sh" proxy
  q=$(quiet); log "idle $i: Dovecot $(uptime)"
  r=$(python3 "$A/imap_idle_hold.py" 127.0.0.1:22243 --users "$USERS" --conns "$CONNS" \
        --measure "proxy=$DB_PIDS_PROXY" "backend=$DB_PIDS_BACKEND")
  record dovecot "$i" "$q" "$r"
done
stop_ours "$UP"

# --- 6. ours split: proxy alone, then filer1 killed -------------------------------------------
common() {  # data_dir: the sections every split process shares
  cat <<CONF
[platform]
data_dir = "$1"
[database]
url = "sqlite:data/location.db"
[trust]
proxy_secret = "$SECRET"
[spool]
enabled = false
[relay]
enabled = false
[filter]
enabled = false
CONF
}
{ echo "filers = []"; common data-proxy; cat <<CONF
[access]
imap = "127.0.0.1:$IMAP"
imaps = "127.0.0.1:$((1993 + OFF))"
pop3 = "127.0.0.1:$POP3"
pop3s = "127.0.0.1:$((1995 + OFF))"
CONF
} > "$DIR/proxy.toml"
for n in 1 2; do
  { common "data-f$n"; cat <<CONF
[access]
enabled = false
[[filers]]
name = "filer$n"
lmtp = "127.0.0.1:$((2400 + n + OFF))"
imap = "127.0.0.1:$((2142 + n + OFF))"
pop3 = "127.0.0.1:$((2109 + n + OFF))"
mail_root = "data/filers/filer$n"
CONF
  } > "$DIR/f$n.toml"
done
start_ours f1.toml "$F1_LMTP" "$F1_IMAP" "$F1_POP3"; F1=$LAST_PID
start_ours f2.toml "$F2_LMTP" "$F2_IMAP" "$F2_POP3"; F2=$LAST_PID
for variant in ours-split ours-split-mmap; do
  if [ -n "${P:-}" ]; then stop_ours "$P"; fi
  MAILCTL_ENV=""; if [ $variant = ours-split-mmap ]; then MAILCTL_ENV=$MMAP_ENV; fi
  start_ours proxy.toml "$IMAP" "$POP3"; P=$LAST_PID; MAILCTL_ENV=""
  q=$(quiet); log "idle: $variant $(uptime)"
  c0=$(python3 "$A/proctree.py" cpu "$P")
  r=$(python3 "$A/imap_idle_hold.py" "127.0.0.1:$IMAP" --users "$USERS" --conns "$CONNS" \
        --measure "proxy=$P" "filer1=$F1" "filer2=$F2")
  c1=$(python3 "$A/proctree.py" cpu "$P")
  record $variant 1 "$q" "$r"
  # the proxy process's CPU per login (argon2 verification, filer login, IDLE, logout)
  python3 -c "
import json, sys
c0, c1, r = (json.loads(x) for x in sys.argv[1:4])
print(json.dumps({'variant': sys.argv[4], 'logins': r['idling'], 'proxy_cpu_s': round(c1['cpu_s'] - c0['cpu_s'], 2),
                  'proxy_cpu_ms_per_login': round(1e3 * (c1['cpu_s'] - c0['cpu_s']) / max(1, r['idling']), 2)}))" \
    "$c0" "$c1" "$r" $variant | tee -a "$OUT/proxy_login_cpu.jsonl"
done
UF1=$(python3 -c "import json,sys; print(next(u['address'] for u in json.load(open(sys.argv[1])) if u['filer'] == 'filer1'))" "$OUT/users.json")
PF1=pw-${UF1%@*}
stop_ours "$F1"
log "failure: filer1 (of $UF1) killed"
for proto in imap pop3; do
  port=$IMAP; [ $proto = pop3 ] && port=$POP3
  r=$(python3 "$A/proxy_failure.py" "127.0.0.1:$port" --proto $proto --tries 5 --user "$UF1" --password "$PF1")
  record ours-proxy 1 '{}' "$r"
done
"$A/stop.sh" backend
log "failure: Dovecot backend stopped"
for variant in default noreconnect; do
  "$A/stop.sh" proxy
  if [ $variant = noreconnect ]; then PROXY_CONF="$A/conf/dovecot-proxy-noreconnect.conf" "$A/start.sh" proxy
  else "$A/start.sh" proxy; fi
  for proto in imap pop3; do
    port=22243; [ $proto = pop3 ] && port=22210
    r=$(python3 "$A/proxy_failure.py" "127.0.0.1:$port" --proto $proto --tries 5)
    record "dovecot-proxy-$variant" 1 '{}' "$r"
  done
done
"$A/stop.sh" proxy

# --- summary ---------------------------------------------------------------------------------
python3 - "$OUT" > "$OUT/summary.md" <<'EOF'
import json, statistics, sys
out = sys.argv[1]
def load(w):
    try:
        return [json.loads(l) for l in open("%s/%s.jsonl" % (out, w))]
    except FileNotFoundError:
        return []
def med(rows, key):
    v = [r[key] for r in rows if r.get(key) is not None]
    return (statistics.median(v), v) if v else (None, [])
def cell(rows, key):
    m, v = med(rows, key)
    return "**%s** %s" % (m, v) if m is not None else "-"
names = ["ours-proxy", "ours-direct", "dovecot-proxy", "dovecot-direct"]
for w, keys in [("imap_load", ["sessions_per_s", "MB_per_s", "session_ms_median", "session_ms_p99", "server_cpu_ms_per_session", "errors"]),
                ("pop3_load", ["sessions_per_s", "MB_per_s", "session_ms_median", "session_ms_p99", "server_cpu_ms_per_session", "errors"]),
                ("imap_noop", ["us_median", "us_p90", "us_p99", "us_max"]),
                ("fetch_stream", ["MB_per_s", "round_ms_median", "round_ms_p99", "bytes_per_round"])]:
    rows = load(w)
    print("\n### %s\n\n| | %s |\n|%s" % (w, " | ".join(keys), "---|" * (len(keys) + 1)))
    for n in names:
        print("| %s | %s |" % (n, " | ".join(cell([r for r in rows if r["server"] == n], k) for k in keys)))
    for a, b in [("ours-proxy", "ours-direct"), ("dovecot-proxy", "dovecot-direct"), ("ours-proxy", "dovecot-proxy")]:
        ra = [r for r in rows if r["server"] == a]; rb = [r for r in rows if r["server"] == b]
        cells = []
        for k in keys:
            x, y = med(ra, k)[0], med(rb, k)[0]
            cells.append("%.3f" % (x / y) if x is not None and y else "-")
        print("| %s / %s | %s |" % (a, b, " | ".join(cells)))
rows = load("imap_idle_hold")
print("\n### imap_idle_hold\n\n| run | tree | idling | errors | logins/s | RSS MB before / during | PSS MB during | RSS KB/conn | PSS KB/conn |\n|---|---|---|---|---|---|---|---|---|")
for r in rows:
    for k, v in r.items():
        if isinstance(v, dict) and "rss_kb_during" in v:
            print("| %s %d | %s | %d | %d | %s | %.1f / %.1f | %.1f | %s | %s |" % (
                r["server"], r["invocation"], k, r["idling"], r["errors"], r["logins_per_s"],
                v["rss_kb_before"] / 1024, v["rss_kb_during"] / 1024, v["pss_kb_during"] / 1024,
                v["rss_kb_per_conn"], v["pss_kb_per_conn"]))
rows = load("proxy_failure")
print("\n### proxy_failure\n\n| server | proto | replies | login reply ms (each try) | connection after |\n|---|---|---|---|---|")
for r in rows:
    t = r.get("tries", [])
    print("| %s | %s | %s | %s | %s |" % (r["server"], r["proto"], "; ".join(r["replies"]),
          ", ".join(str(x.get("login_reply_ms")) for x in t), ", ".join(sorted(set(x.get("connection_after_reply", "?") for x in t)))))
EOF
cat "$OUT/proxy_login_cpu.jsonl" >> "$OUT/summary.md"
cat "$OUT/summary.md"
log "done: $OUT (our platform in $DIR)"

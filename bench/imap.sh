#!/bin/bash
# [M3] IMAP on one INBOX of COUNT (100,000) messages: our filer vs the reference Dovecot.
#
# Other sessions on this machine use the default platform ports (2401/2143/...) and the anchors'
# Dovecot instance (22024/22143, /var/tmp/anchors/mail) and empty its mail store, so this script
# runs PRIVATE instances that nobody else touches:
#   - ours: `mailctl --config` with filer1 LMTP 127.0.0.1:23401 IMAP :23143, filer2 :23402 /
#     :23144, spool disabled (otherwise the all-in-one defaults), in a fresh directory;
#   - Dovecot: the anchors' conf/dovecot-backend.conf unchanged except instance name, paths
#     (/var/tmp/anchors-m3/...) and ports (LMTP 127.0.0.1:24024, IMAP :24143, POP3 :24110).
#
# Steps:
#   1. ours: domain + 1000 users, mailctl up; user0001's filer from `mailctl user list --json` and
#      `mailctl filer list --json`; load COUNT x SIZE messages into user0001 over that filer's
#      LMTP (bench/lmtp_load_mailbox.py: every 100th Subject contains "needle"); stop
#   2. Dovecot: fresh mail store, start, load the same messages over LMTP; stop
#   3. start both again (the first session of each is the first after a server start; the page
#      cache stays warm), then alternate INV invocations of
#      `bench/imap_mailbox.py HOST:PORT user0001@example.test proxy SECRET --runs RUNS`
#      (ours: data/proxy.secret; Dovecot: its master user `proxy`). The very first run of each
#      server is its "first" run (Dovecot updates its index on that SELECT).
# Leaves both servers stopped; the mail stays ($OUT/log.txt names the directories) unless CLEAN=1.
#
# env: COUNT=100000 SIZE=4096 LOAD_SESSIONS=8 INV=3 RUNS=3 MIN_IDLE=90 MAX_WAIT=300
#      BIN=target/release OUT=/var/tmp/bench-imap-<stamp> ANCHORS=/tmp/anchors
#      DROOT=/var/tmp/anchors-m3 D_LMTP=24024 D_IMAP=24143 D_POP3=24110 PORT_BASE=23
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
A=${ANCHORS:-/tmp/anchors}
COUNT=${COUNT:-100000}; SIZE=${SIZE:-4096}; LOAD_SESSIONS=${LOAD_SESSIONS:-8}
INV=${INV:-3}; RUNS=${RUNS:-3}; MIN_IDLE=${MIN_IDLE:-90}; MAX_WAIT=${MAX_WAIT:-300}
OUT=${OUT:-/var/tmp/bench-imap-$(date +%Y%m%d-%H%M%S)}
DROOT=${DROOT:-/var/tmp/anchors-m3}
D_LMTP=${D_LMTP:-24024}; D_IMAP=${D_IMAP:-24143}; D_POP3=${D_POP3:-24110}; PB=${PORT_BASE:-23}
M=$BIN/mailctl
U=user0001@example.test
mkdir -p "$OUT"

busy=$(ss -Hltn | awk '{print $4}' | grep -E ":(${PB}401|${PB}402|${PB}143|${PB}144|${PB}110|${PB}111|$D_LMTP|$D_IMAP|$D_POP3)\$" || true)
[ -z "$busy" ] || { echo "ports in use (another run?): $busy" >&2; exit 1; }

# --- private configurations
export MAILCTL_CONFIG=$OUT/platform.toml
cat > "$MAILCTL_CONFIG" <<EOF
[[filers]]
name = "filer1"
lmtp = "127.0.0.1:${PB}401"
imap = "127.0.0.1:${PB}143"
pop3 = "127.0.0.1:${PB}110"
[[filers]]
name = "filer2"
lmtp = "127.0.0.1:${PB}402"
imap = "127.0.0.1:${PB}144"
pop3 = "127.0.0.1:${PB}111"
[spool]
enabled = false
[relay]
enabled = false
[filter]
enabled = false
EOF
DCONF=$DROOT/dovecot.conf
mkdir -p "$DROOT"/{etc,run,state,log}
sed "s#/var/tmp/anchors/mail/#$DROOT/mail/#" /var/tmp/anchors/etc/users.passwd > "$DROOT/etc/users.passwd"
cp /var/tmp/anchors/etc/backend-master.passwd "$DROOT/etc/"
chgrp dovecot "$DROOT/etc/users.passwd" "$DROOT/etc/backend-master.passwd"
chmod 640 "$DROOT/etc/users.passwd" "$DROOT/etc/backend-master.passwd"
sed -e "s#^instance_name = .*#instance_name = anchor-m3#" \
    -e "s#/var/tmp/anchors/run/backend#$DROOT/run#" \
    -e "s#/var/tmp/anchors/state/backend#$DROOT/state#" \
    -e "s#/var/tmp/anchors/log/dovecot-backend.log#$DROOT/log/dovecot.log#" \
    -e "s#/var/tmp/anchors/mail/#$DROOT/mail/#" \
    -e "s#/var/tmp/anchors/etc/#$DROOT/etc/#" \
    -e "s#port = 22143#port = $D_IMAP#" -e "s#port = 22110#port = $D_POP3#" \
    -e "s#port = 22024#port = $D_LMTP#" \
    "$A/conf/dovecot-backend.conf" > "$DCONF"
cp "$DCONF" "$OUT/dovecot.conf"

DIR=$(mktemp -d /var/tmp/plat-imap.XXXX)
UP=""
log() { echo "$(date +%T) $*" | tee -a "$OUT/log.txt" >&2; }
d_start() {
  dovecot -c "$DCONF"
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$D_IMAP") 2>/dev/null && break; sleep 0.1; done
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$D_LMTP") 2>/dev/null && break; sleep 0.1; done
}
d_stop() {
  local pid
  [ -f "$DROOT/run/master.pid" ] || return 0
  pid=$(cat "$DROOT/run/master.pid")
  kill -0 "$pid" 2>/dev/null || return 0
  doveadm -c "$DCONF" stop >/dev/null 2>&1 || kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "dovecot (pid $pid) still running" >&2
}
up() {
  (cd "$DIR" && RUST_LOG=warn exec "$M" up >> up.log 2>&1) &
  UP=$!
  for _ in $(seq 1 600); do (cd "$DIR" && "$M" status >/dev/null 2>&1) && break; sleep 0.1; done
  (cd "$DIR" && "$M" status >/dev/null) || { cat "$DIR/up.log"; exit 1; }
}
down() { kill "$UP"; wait "$UP" || true; UP=""; }
cleanup() {
  if [ -n "$UP" ]; then kill "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; fi
  d_stop || true
  [ -n "${CLEAN:-}" ] && rm -rf "$DIR" "$DROOT/mail"
  true
}
trap cleanup EXIT
gate() { python3 "$A/quiet.py" wait --min-idle "$MIN_IDLE" --max-wait "$MAX_WAIT"; }

log "ours: $DIR (config $MAILCTL_CONFIG)"
(cd "$DIR"
 "$M" domain add example.test >/dev/null
 python3 -c "for i in range(1,1001): print('user%04d@example.test pw-user%04d' % (i,i))" | "$M" user import >/dev/null)
up
read -r LMTP IMAP < <(cd "$DIR" && python3 - "$M" "$U" <<'EOF'
import json, subprocess, sys
m, u = sys.argv[1:]
users = json.loads(subprocess.check_output([m, "user", "list", "--json"]))
filer = next(x["filer"] for x in users if x["address"] == u)
for f in json.loads(subprocess.check_output([m, "filer", "list", "--json"])):
    f = f.get("filer", f)
    if f["name"] == filer:
        print(f["lmtp"], f["imap"])
EOF
)
log "ours: $U on LMTP $LMTP IMAP $IMAP; gate $(gate)"
log "ours: load; $(uptime)"
python3 "$ROOT/bench/lmtp_load_mailbox.py" "$LMTP" "$U" --count "$COUNT" --size "$SIZE" \
  --sessions "$LOAD_SESSIONS" | tee -a "$OUT/load-ours.json"
log "ours: loaded; $(uptime); maildir count $(python3 "$A/maildir_count.py" "$DIR/data/filers")"
down

log "Dovecot: $DROOT/mail"
d_stop
rm -rf "$DROOT/mail"; mkdir -p "$DROOT/mail"; chown vmail:vmail "$DROOT/mail"; chmod 770 "$DROOT/mail"
d_start
log "Dovecot: gate $(gate)"
log "Dovecot: load; $(uptime)"
python3 "$ROOT/bench/lmtp_load_mailbox.py" "127.0.0.1:$D_LMTP" "$U" --count "$COUNT" --size "$SIZE" \
  --sessions "$LOAD_SESSIONS" | tee -a "$OUT/load-dovecot.json"
log "Dovecot: loaded; $(uptime); maildir count $(python3 "$A/maildir_count.py" "$DROOT/mail")"
d_stop

# --- measure: both freshly started, alternating
up
d_start
SECRET=$(cat "$DIR/data/proxy.secret")
MASTER=$(sed -n 's/^proxy:{PLAIN}//p' "$DROOT/etc/backend-master.passwd")
for i in $(seq 1 "$INV"); do
  for who in ours dovecot; do
    g=$(gate)
    up_=$(uptime)
    if [ $who = ours ]; then
      r=$(python3 "$ROOT/bench/imap_mailbox.py" "$IMAP" "$U" proxy "$SECRET" --runs "$RUNS")
    else
      r=$(python3 "$ROOT/bench/imap_mailbox.py" "127.0.0.1:$D_IMAP" "$U" proxy "$MASTER" --runs "$RUNS")
    fi
    python3 -c "
import json,sys; r=json.loads(sys.argv[1]); r.update(server=sys.argv[2], invocation=int(sys.argv[3]), gate=json.loads(sys.argv[4]), uptime=sys.argv[5].strip()); print(json.dumps(r))" \
      "$r" "$who" "$i" "$g" "$up_" | tee -a "$OUT/imap.jsonl"
  done
done
down
d_stop
log "done: $OUT (our mail in $DIR, Dovecot's in $DROOT/mail)"

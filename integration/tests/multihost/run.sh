#!/usr/bin/env bash
# The platform spread over test hosts: network namespaces joined by veth pairs to a bridge in a
# switch namespace, addressed from the documentation range 192.0.2.0/24 (RFC 5737). Nothing is
# connected to the root namespace, so no packet can reach a real network.
#
#   db 192.0.2.10 (PostgreSQL: the location database)   spool1 .11  spool2 .12  filter .20
#   relay .30   access1 .41  access2 .42   filer1 .51  filer2 .52  filer3 .53   client .100
#
# Each host runs `mailctl -c <host>.toml up` with its own data directory and `roles`; all share
# the location database on PostgreSQL. The client (Python's smtplib and imaplib):
#   1. delivers mail to users on every filer through both spools, reads it through both proxies;
#   2. cuts filer3 off (its link down): only filer3's users get the temporary answer, at once,
#      while mail for them waits in the spools; the link back up, the held mail arrives;
#   3. migrates a mailbox from filer1 to filer2 (the command runs on filer2's host) while mail
#      for it keeps arriving: nothing is lost.
#
# Needs root (namespaces), iproute2, python3 and PostgreSQL's server binaries
# (/usr/lib/postgresql/*/bin). usage: run.sh MAILCTL   (KEEP=1 keeps the work directory)
set -euo pipefail
MAILCTL=$(realpath "${1:?usage: run.sh PATH-TO-mailctl}")
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$PGBIN/postgres" ] || { echo "no PostgreSQL server binaries" >&2; exit 2; }
P=mh$$                     # namespace prefix: unique per run
WORK=$(mktemp -d /tmp/multihost.XXXXXX)
chmod 755 "$WORK"
declare -A IP=([db]=10 [spool1]=11 [spool2]=12 [filter]=20 [relay]=30 [access1]=41 [access2]=42
               [filer1]=51 [filer2]=52 [filer3]=53 [client]=100)
PIDS=()
log() { echo "$(date -u +%T.%N | cut -c1-12) $*" >&2; }
cleanup() {
  local rc=$?
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
  # Whatever else runs in a test host (a child of what was started) goes too.
  for h in "${!IP[@]}"; do
    ip netns pids "$P-$h" 2>/dev/null | xargs -r kill 2>/dev/null || true
  done
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$p" 2>/dev/null || true; done
  for h in "${!IP[@]}"; do
    for _ in $(seq 50); do [ -z "$(ip netns pids "$P-$h" 2>/dev/null)" ] && break; sleep 0.1; done
    ip netns pids "$P-$h" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
  for h in "${!IP[@]}" sw; do ip netns del "$P-$h" 2>/dev/null || true; done
  if [ $rc -ne 0 ]; then
    for f in "$WORK"/*.log; do echo "== $f" >&2; tail -n 25 "$f" >&2; done
  fi
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap "exit 143" TERM INT
on() { local h=$1; shift; ip netns exec "$P-$h" "$@"; }
wait_port() {  # host ip port: a bounded wait for a listener, from inside that host
  for _ in $(seq 300); do
    on "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$1: $2:$3 never opened" >&2; return 1
}

# --- the network
ip netns add "$P-sw"
ip -n "$P-sw" link set lo up
ip -n "$P-sw" link add br0 type bridge
ip -n "$P-sw" link set br0 up
for h in "${!IP[@]}"; do
  ip netns add "$P-$h"
  ip -n "$P-$h" link set lo up
  ip link add eth0 netns "$P-$h" type veth peer name "v-$h" netns "$P-sw"
  ip -n "$P-$h" addr add "192.0.2.${IP[$h]}/24" dev eth0
  ip -n "$P-$h" link set eth0 up
  ip -n "$P-sw" link set "v-$h" master br0 up
done
log "network: ${#IP[@]} hosts on 192.0.2.0/24"

# --- the database host
mkdir -p "$WORK/pg" "$WORK/pgsock"
chown postgres "$WORK/pg" "$WORK/pgsock"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg" -A trust -U postgres >"$WORK/initdb.log" 2>&1
echo "host all all 192.0.2.0/24 trust" >> "$WORK/pg/pg_hba.conf"
# `ip netns exec` and `setpriv` exec what they run: $! is postgres itself.
start_db() {
  ip netns exec "$P-db" setpriv --reuid=postgres --regid=postgres --init-groups \
    "$PGBIN/postgres" -D "$WORK/pg" -c listen_addresses=192.0.2.10 -c port=5432 \
    -k "$WORK/pgsock" >>"$WORK/db.log" 2>&1 &
  PG_PID=$!
}
start_db
PIDS+=("$PG_PID")
wait_port db 192.0.2.10 5432
for _ in $(seq 100); do
  on db runuser -u postgres -- "$PGBIN/psql" -h 192.0.2.10 -U postgres -qc 'CREATE DATABASE mail' \
    >/dev/null 2>&1 && break
  sleep 0.1
done
DB="postgres://postgres@192.0.2.10:5432/mail"
log "database up"

# --- configurations
common() {  # host
  local ip=192.0.2.${IP[$1]}
  cat <<EOF
[platform]
hostname = "$1.example.net"
data_dir = "$WORK/$1/data"
dev_mode = true
[database]
url = "$DB"
cache_ttl = "200ms"
[trust]
spool_networks = ["192.0.2.0/24"]
proxy_networks = ["192.0.2.0/24"]
proxy_secret = "multihost test secret"
[admin]
listen = "$ip:8025"
EOF
}
for h in spool1 spool2; do
  { echo 'roles = ["spool"]'; common $h; cat <<EOF
[spool]
smtp = "192.0.2.${IP[$h]}:2525"
reinject = "192.0.2.${IP[$h]}:10025"
filter = "192.0.2.20:10024"
relay = "192.0.2.30:10587"
greet_delay = "0s"
retry_min = "200ms"
retry_max = "1s"
EOF
  } > "$WORK/$h.toml"
done
{ echo 'roles = ["filter"]'; common filter; cat <<EOF
[filter]
listen = "192.0.2.20:10024"
reinject = "192.0.2.11:10025"
network_checks = false
EOF
} > "$WORK/filter.toml"
{ echo 'roles = ["relay"]'; common relay; cat <<EOF
[relay]
submission = "192.0.2.30:2587"
submissions = ""
internal = "192.0.2.30:10587"
hosted_route = "192.0.2.11:2525"
EOF
} > "$WORK/relay.toml"
for h in access1 access2; do
  { echo 'roles = ["access"]'; common $h; cat <<EOF
[access]
imap = "192.0.2.${IP[$h]}:1143"
imaps = ""
pop3 = "192.0.2.${IP[$h]}:1110"
pop3s = ""
filer_connect_timeout = "1s"
login_delay = "10ms"
login_delay_max = "50ms"
EOF
  } > "$WORK/$h.toml"
done
for n in 1 2 3; do
  h=filer$n
  { echo 'roles = ["filer"]'; common $h; cat <<EOF
[[filers]]
name = "$h"
lmtp = "192.0.2.${IP[$h]}:2401"
imap = "192.0.2.${IP[$h]}:2143"
pop3 = "192.0.2.${IP[$h]}:2110"
EOF
  } > "$WORK/$h.toml"
done

# --- the hosts
up() {  # host port...
  local h=$1; shift
  mkdir -p "$WORK/$h"
  # Not through `on`: a function in the background is a subshell, and $! would be its pid.
  ip netns exec "$P-$h" env RUST_LOG=info "$MAILCTL" -c "$WORK/$h.toml" up >"$WORK/$h.log" 2>&1 &
  PIDS+=($!)
  for p in "$@"; do wait_port "$h" "192.0.2.${IP[$h]}" "$p"; done
}
for n in 1 2 3; do up filer$n 2401 2143 2110; done
up spool1 2525 10025
up spool2 2525 10025
up filter 10024
up relay 2587 10587
up access1 1143 1110
up access2 1143 1110
log "11 hosts up"

# --- users: two on each filer
M() { local h=$1; shift; on "$h" "$MAILCTL" -c "$WORK/$h.toml" "$@"; }
M filer1 domain add example.test >/dev/null
for n in 1 2 3; do
  for u in a b; do
    printf 'pw\n' | M filer$n user add "$u$n@example.test" --filer filer$n >/dev/null
  done
done
log "users added"

cat > "$WORK/client.py" <<'EOF'
import imaplib, json, smtplib, ssl, sys, time

TLS = ssl.create_default_context()
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE

def send(spool, to, subject):
    with smtplib.SMTP(spool, 2525, timeout=10) as s:
        s.sendmail("someone@remote.test", [to],
                   f"Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\n{subject}\r\n".encode())

def login(proxy, user):
    m = imaplib.IMAP4(proxy, 1143, timeout=10)
    m.starttls(ssl_context=TLS)
    m.login(user, "pw")
    return m

def subjects(proxy, user):
    m = login(proxy, user)
    m.select("INBOX")
    typ, data = m.search(None, "ALL")
    out = []
    for n in data[0].split():
        typ, d = m.fetch(n, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out.append(d[0][1].decode().split(":", 1)[1].strip())
    m.logout()
    return sorted(out)

def wait_for(proxy, user, want, seconds=30):
    end = time.monotonic() + seconds
    while True:
        try:
            got = subjects(proxy, user)
        except Exception as e:  # a proxy answering "unavailable" while a filer is away
            got = [f"error: {e}"]
        if sorted(want) == got:
            return got
        if time.monotonic() > end:
            sys.exit(f"{user} via {proxy}: want {sorted(want)}, got {got}")
        time.sleep(0.2)

cmd = sys.argv[1]
if cmd == "send":
    spool, to, subject = sys.argv[2:5]
    send(spool, to, subject)
elif cmd == "expect":
    proxy, user = sys.argv[2:4]
    wait_for(proxy, user, sys.argv[4:])
elif cmd == "tempfail":
    spool, to = sys.argv[2:4]
    try:
        send(spool, to, "while-the-database-is-down")
        sys.exit(f"{to}: accepted while the location database is down")
    except smtplib.SMTPRecipientsRefused as e:
        code, text = e.recipients[to]
        if not 400 <= code < 500:
            sys.exit(f"{to}: not a temporary refusal: {code} {text}")
        print(f"{to}: {code} {text.decode()}")
elif cmd == "unavailable":
    proxy, user = sys.argv[2:4]
    m = imaplib.IMAP4(proxy, 1143, timeout=10)
    m.starttls(ssl_context=TLS)
    t = time.monotonic()
    try:
        m.login(user, "pw")
        sys.exit(f"{user}: login succeeded while its filer is cut off")
    except imaplib.IMAP4.error as e:
        took = time.monotonic() - t
        text = str(e)
        if "UNAVAILABLE" not in text:
            sys.exit(f"{user}: not the temporary answer: {text}")
        if took > 3:
            sys.exit(f"{user}: the temporary answer took {took:.1f} s")
        print(f"{user}: {text} in {took*1000:.0f} ms")
else:
    sys.exit(f"unknown command {cmd}")
EOF
C() { on client python3 "$WORK/client.py" "$@"; }
S1=192.0.2.11; S2=192.0.2.12; A1=192.0.2.41; A2=192.0.2.42

# --- 1. mail to every filer through both spools, read through both proxies
for n in 1 2 3; do
  C send $S1 a$n@example.test one-a$n
  C send $S2 b$n@example.test one-b$n
done
for n in 1 2 3; do
  C expect $A1 a$n@example.test one-a$n
  C expect $A2 b$n@example.test one-b$n
done
log "step 1: delivered through both spools, read through both proxies"

# --- 2. filer3 cut off
ip -n "$P-sw" link set v-filer3 down
C unavailable $A1 a3@example.test
C unavailable $A2 b3@example.test
C expect $A2 a1@example.test one-a1        # the others are served
C expect $A1 b2@example.test one-b2
C send $S1 a3@example.test held-1
C send $S2 b3@example.test held-2
held() {  # spool: pending recipients in its queue
  M "$1" queue list --json | python3 -c 'import json,sys; print(sum(1 for e in json.load(sys.stdin) for r in e["recipients"] if r["state"] == "pending"))'
}
for _ in $(seq 100); do
  h1=$(held spool1); h2=$(held spool2)
  [ $((h1 + h2)) -ge 2 ] && break
  sleep 0.2
done
[ $((h1 + h2)) -ge 2 ] || { echo "mail for filer3 is not waiting in the spools ($h1 + $h2)" >&2; exit 1; }
log "step 2: filer3 cut off: its users get the temporary answer; $((h1 + h2)) message(s) wait in the spools"
ip -n "$P-sw" link set v-filer3 up
C expect $A1 a3@example.test one-a3 held-1
C expect $A2 b3@example.test one-b3 held-2
for _ in $(seq 100); do [ "$(held spool1)$(held spool2)" = 00 ] && break; sleep 0.2; done
[ "$(held spool1)$(held spool2)" = 00 ] || { echo "the spools did not drain" >&2; exit 1; }
log "step 2: filer3 back: the held mail arrived, the spools are empty"

# --- 3. a migration between hosts while mail arrives
want=(one-a1)
(
  for i in $(seq 1 20); do
    if [ $((i % 2)) = 0 ]; then s=$S1; else s=$S2; fi
    C send $s a1@example.test during-$i
  done
) &
sender=$!
M filer2 migrate a1@example.test --to filer2 >"$WORK/migrate.log" 2>&1
wait $sender
for i in $(seq 1 20); do want+=("during-$i"); done
C expect $A1 a1@example.test "${want[@]}"
C expect $A2 a1@example.test "${want[@]}"
where=$(M filer1 user list --json | python3 -c 'import json,sys; print([u["filer"] for u in json.load(sys.stdin) if u["address"] == "a1@example.test"][0])')
[ "$where" = filer2 ] || { echo "a1 is on $where after the migration" >&2; exit 1; }
log "step 3: a1 moved filer1 -> filer2 while 20 messages arrived; all 21 are there"

# --- 4. the location database down: every answer is temporary, nothing bounces
kill -INT "$PG_PID"   # fast shutdown
wait "$PG_PID" 2>/dev/null || true
C tempfail $S1 b2@example.test
C tempfail $S2 a3@example.test
C unavailable $A1 b2@example.test
[ "$(held spool1)$(held spool2)" = 00 ] || { echo "something was queued while the database was down" >&2; exit 1; }
log "step 4: the database down: RCPT and logins get temporary answers, nothing is queued or bounced"
start_db
PIDS+=("$PG_PID")
wait_port db 192.0.2.10 5432
for _ in $(seq 150); do
  C send $S2 b2@example.test after-db 2>/dev/null && break
  sleep 0.2
done
C expect $A2 b2@example.test one-b2 after-db
log "step 4: the database back: mail flows again"
echo "multihost: ok"

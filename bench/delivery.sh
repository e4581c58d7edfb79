#!/bin/bash
# Inbound end to end ([M4]): SMTP into the spool -> queue -> LMTP -> every message fsynced in a
# Maildir. Starts the platform (release build) on loopback in a fresh directory with USERS
# mailboxes spread over the two default filers, then runs the reference's own load script
# (../shared/anchors/bench_delivery.sh: smtp-source, N messages of SIZE bytes, SESSIONS at a
# time, random recipients), which waits until every message is counted in a Maildir.
#   bench/delivery.sh            prints one JSON line (the anchor script's format)
# env: N=20000 SIZE=4096 SESSIONS=20 USERS=1000 ANCHORS=../shared/anchors KEEP=1 (keep the dir)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$ROOT/../shared/anchors}
USERS=${USERS:-1000}
command -v smtp-source >/dev/null || { echo "smtp-source missing: apt-get install postfix (and keep its daemon stopped)" >&2; exit 1; }
[ -n "${NOBUILD:-}" ] || (cd "$ROOT" && cargo build -q --release -p integration --bin mailctl)
M="$ROOT/target/release/mailctl"
DIR=$(mktemp -d /var/tmp/platform-bench.XXXXXX)
cd "$DIR"
cleanup() { [ -n "${UP:-}" ] && kill "$UP" 2>/dev/null; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$DIR"; }
trap cleanup EXIT
"$M" domain add example.test >/dev/null
python3 -c "
for i in range(1, $USERS + 1): print('user%04d@example.test pw-user%04d' % (i, i))" | "$M" user import >/dev/null
RUST_LOG=warn "$M" up > up.log 2>&1 &
UP=$!
for _ in $(seq 1 300); do "$M" status >/dev/null 2>&1 && break; sleep 0.1; done
"$M" status >/dev/null || { cat up.log; exit 1; }
SERVER_PIDS="$UP" bash "$ANCHORS/bench_delivery.sh" 127.0.0.1:2525 "$DIR/data/filers"
